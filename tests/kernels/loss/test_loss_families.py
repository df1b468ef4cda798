"""The anchors' loss families (`bnpo`, `gspo`, `luspo`, `cispo`, `sapo`, `vespo`) against the two
implementations users compare us with, on the same off-policy batch with the clips firing:

* Liger-Kernel 0.8.5: its loss function (`LigerFusedLinearGRPOFunction.ppo_loss_fn`) on
  per-token log-probs of materialised logits, in the test's dtype; and its module
  (`LigerFusedLinearGRPOLoss`) end to end in fp32.
* TRL 1.16: `GRPOTrainer._compute_loss`, run on a stand-in trainer whose model hands it the
  same materialised log-probs, in the test's dtype.

Values and gradients (hidden, weight) of `fused_vimpo_loss` on every backend that runs here.

Tolerances (relative, max |diff| / max |reference|, `rel_err`):
* fp64: 1e-6 (the issue's target; we measure ~1e-15).
* fp32: our error against the fp64 truth is at most 2x the peer's own fp32 error against it,
  or 1e-6, whichever is larger (the flash-attention / CCE rule: judged against what torch
  itself achieves in fp32).
* Liger's module end to end: it computes log-probs and gradients in float32 whatever the input
  dtype (`_selective_logprob_forward` allocates fp32), so it is held at fp32 tolerance, 1e-5.

Where the peers disagree with each other we follow TRL and test that: Liger's `luspo` multiplies
the per-token loss by L_i and averages over all B x T positions, padding included, which equals
TRL's masked sum / B only while the loss is one number per sequence (no KL penalty, no per-token
importance weights); and TRL forms SAPO's temperatures as float32 scalars (`torch.where` of two
Python floats), 2e-7 relative off in fp64, so the peers agree to 1e-6, not 1e-12.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from golden_data import rel_err
from vimpo_kernels import ALGORITHMS, VIMPOConfig, fused_vimpo_loss, plan
from vimpo_kernels._backends import BACKEND_TABLE, available_backends, runs_on

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

FAMILIES = ("bnpo", "gspo", "luspo", "cispo", "sapo", "vespo")
FP64_RTOL, FP32_FLOOR, LIGER_MODULE_RTOL = 1e-6, 1e-6, 1e-5
# Ragged, with a one-token response and a hole in row 3; no empty row (TRL and Liger average
# over every row, our seq-mean modes over rows with a token; `num_sequences=B` would align them).
LENGTHS = [7, 1, 4, 6, 3, 7]
T, H, V = 7, 12, 37
B = len(LENGTHS)

# Per family, >= 3 configurations (`VIMPOConfig.for_algorithm` overrides) and how far the old
# policy is from the current one: `noise` (std of the log-ratio), `shift` ({row: log-ratio
# offset}, to push a ratio past a clip), `is_weights` (rollout importance weights).
CASES = {
    "bnpo": {
        "preset": dict(cfg={}, noise=0.4),
        "kl-clip_higher": dict(cfg=dict(kl_loss_coeff=0.04, clip_ratio_high=0.28), noise=0.4),
        "dual_clip-is_weights": dict(cfg=dict(clip_ratio_c=1.5), noise=0.5, is_weights=True),
    },
    "gspo": {
        "preset": dict(cfg={}, noise=3e-4, shift={0: 2e-3}),
        "kl-wide_band": dict(cfg=dict(kl_loss_coeff=0.04, clip_ratio_low=0.05, clip_ratio_high=0.08), noise=0.3),
        "dual_clip-is_weights": dict(cfg=dict(clip_ratio_low=0.1, clip_ratio_high=0.1, clip_ratio_c=1.2), noise=0.3,
                                     shift={3: 0.6}, is_weights=True),
    },
    "luspo": {
        "preset": dict(cfg={}, noise=3e-4, shift={0: 2e-3}),
        "wide_band": dict(cfg=dict(clip_ratio_low=0.05, clip_ratio_high=0.08), noise=0.3),
        "dual_clip": dict(cfg=dict(clip_ratio_low=0.1, clip_ratio_high=0.1, clip_ratio_c=1.2), noise=0.3,
                          shift={3: 0.6}),
        # Liger 0.8.5 weighs a per-token KL or importance weight differently (module docstring): TRL only.
        "kl": dict(cfg=dict(kl_loss_coeff=0.04, clip_ratio_low=0.05, clip_ratio_high=0.08), noise=0.3,
                   peers=("trl",)),
        "is_weights": dict(cfg=dict(clip_ratio_low=0.1, clip_ratio_high=0.1), noise=0.3, is_weights=True,
                           peers=("trl",)),
    },
    "cispo": {
        "preset": dict(cfg={}, noise=0.4, shift={0: 2.0}),
        "kl-cap_1.3": dict(cfg=dict(kl_loss_coeff=0.04, clip_ratio_high=0.3), noise=0.4),
        "cap_2-is_weights": dict(cfg=dict(clip_ratio_high=1.0), noise=0.5, shift={2: 0.8}, is_weights=True),
    },
    "sapo": {
        "preset": dict(cfg={}, noise=0.4),
        "kl-temperatures": dict(cfg=dict(kl_loss_coeff=0.04, sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
                                noise=0.6),
        "is_weights": dict(cfg={}, noise=0.4, is_weights=True),
    },
    "vespo": {
        "preset": dict(cfg={}, noise=0.3),
        "kl-shape": dict(cfg=dict(kl_loss_coeff=0.04, vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5,
                                  vespo_lambda_neg=1.5), noise=0.3, shift={1: -0.8}),
        "is_weights": dict(cfg={}, noise=0.3, is_weights=True),
    },
}
_LIGER_LOSS_TYPE = {"bnpo": "bnpo", "gspo": "grpo", "luspo": "luspo", "cispo": "cispo", "sapo": "sapo",
                    "vespo": "vespo"}


def _backends(dtype):
    """Every backend of the table that runs this dtype on CPU tensors here (Triton only under
    the interpreter, see test_triton_interpreter_families)."""
    here = available_backends()
    return [b for b in BACKEND_TABLE if b in here and runs_on(b, torch.device("cpu"))
            and dtype in BACKEND_TABLE[b].dtypes]


def _config(family, case):
    return VIMPOConfig.for_algorithm(family, **CASES[family][case]["cfg"])


def _problem(family, case, dtype, seed=0):
    """Hidden states, head, targets, the mask (with a hole), advantages of both signs, old and
    reference log-probs near the current ones, optional importance weights (1 at padding, as a
    rollout engine writes them)."""
    spec = CASES[family][case]
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    hidden, weight = mk(B, T, H) * 0.7, mk(V, H) * 0.4
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    mask[3, 2] = False
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.3], dtype=torch.float64)
    with torch.no_grad():
        logp = _logprobs(hidden, weight, targets)
    offset = spec["noise"] * mk(B, T)
    for row, shift in spec.get("shift", {}).items():
        offset[row] += shift
    p = {"hidden": hidden, "weight": weight, "targets": targets, "mask": mask, "advantages": advantages,
         "old": torch.where(mask, logp - offset, 0.0), "ref": torch.where(mask, logp + 0.3 * mk(B, T), 0.0),
         "is_weights": torch.where(mask, 0.6 + 0.8 * torch.rand(B, T, generator=g, dtype=torch.float64), 1.0)
         if spec.get("is_weights") else None}
    # Rounded to `dtype` first, so the fp64 truth sees the same numbers as the fp32 run.
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in p.items()}


def _logprobs(hidden, weight, targets):
    """Per-token log-probs from materialised logits (the peers' input), in the inputs' dtype."""
    return torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None]).squeeze(-1)


def _grads(loss_fn, p):
    h, w = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    loss = loss_fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _ours(p, cfg, backend):
    def fn(h, w):
        rewards, group_ids = torch.zeros(B, dtype=h.dtype), torch.arange(B)  # advantages are given
        return fused_vimpo_loss(h, w, p["targets"], p["mask"], rewards, group_ids, old_logprobs=p["old"],
                                ref_logprobs=p["ref"] if cfg.kl_loss_coeff > 0 else None,
                                rollout_is_weights=p["is_weights"], advantages=p["advantages"], config=cfg,
                                backend=backend)[0]
    return _grads(fn, p)


def _peer_options(cfg):
    """Our config as the peers' options. Our dual clip c is their `delta` (for A < 0 both cap
    the loss at -A c; for A > 0 the upper clip binds first since c >= 1 + eps_high here)."""
    ppo = cfg.spec.policy_loss == "ppo_clip"
    return dict(
        loss_type=_LIGER_LOSS_TYPE[cfg.algorithm], beta=cfg.kl_loss_coeff, epsilon_low=cfg.clip_ratio_low,
        # CISPO: the peers cap the weight at epsilon_high itself (our 1 + clip_ratio_high, lower bound 0).
        epsilon_high=1.0 + cfg.clip_ratio_high if cfg.algorithm == "cispo" else cfg.clip_ratio_high,
        importance_sampling_level=cfg.spec.ratio_level, delta=cfg.clip_ratio_c if ppo else None,
        sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos, vespo_lambda_pos=cfg.vespo_lambda_pos, vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg)


def _liger_math(p, cfg):
    """Liger's loss function on materialised log-probs, in the inputs' dtype."""
    opts = _peer_options(cfg)
    m = p["mask"].to(p["hidden"].dtype)

    def fn(h, w):
        loss, _ = liger_grpo.LigerFusedLinearGRPOFunction.ppo_loss_fn(
            per_token_logps=_logprobs(h, w, p["targets"]), attention_mask=m, advantages=p["advantages"],
            full_attention_mask=m, ref_per_token_logps=p["ref"] if cfg.kl_loss_coeff > 0 else None,
            old_per_token_logps=p["old"], vllm_is_ratio=p["is_weights"], use_bias_correction_kl=False, **opts)
        return loss
    return _grads(fn, p)


class _TRLStandIn:
    """What `GRPOTrainer._compute_loss` reads of its trainer, on one process, in train mode, with
    no gradient accumulation; its model's log-probs are the materialised ones of (h, w)."""

    get_gamma_weights = staticmethod(trl_grpo.GRPOTrainer.get_gamma_weights)

    def __init__(self, cfg, logps, vllm_is):
        o = _peer_options(cfg)
        self.args = SimpleNamespace(use_bias_correction_kl=False, delta=o["delta"], steps_per_generation=1,
                                    sapo_temperature_pos=o["sapo_temperature_pos"],
                                    sapo_temperature_neg=o["sapo_temperature_neg"], vespo_k_pos=o["vespo_k_pos"],
                                    vespo_lambda_pos=o["vespo_lambda_pos"], vespo_k_neg=o["vespo_k_neg"],
                                    vespo_lambda_neg=o["vespo_lambda_neg"])
        self.loss_type, self.beta = o["loss_type"], o["beta"]
        self.epsilon_low, self.epsilon_high = o["epsilon_low"], o["epsilon_high"]
        self.importance_sampling_level = o["importance_sampling_level"]
        self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
        self.use_vllm = self.vllm_importance_sampling_correction = vllm_is
        self.aux_loss_enabled = self._entropy_bonus_enabled = False
        self.current_gradient_accumulation_steps, self.max_completion_length = 1, T
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                           gather_for_metrics=lambda x: x)
        self._metrics = {"train": defaultdict(list)}
        self._logps = logps

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._logps, torch.zeros_like(self._logps), None


def _trl_math(p, cfg):
    """TRL's `GRPOTrainer._compute_loss` on materialised log-probs, in the inputs' dtype."""
    completion_mask = p["mask"].long()
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": p["targets"], "completion_mask": completion_mask, "advantages": p["advantages"],
              "old_per_token_logps": p["old"], "num_items_in_batch": completion_mask.sum()}
    if cfg.kl_loss_coeff > 0:
        inputs["ref_per_token_logps"] = p["ref"]
    if p["is_weights"] is not None:
        inputs["importance_sampling_ratio"] = p["is_weights"]

    def fn(h, w):
        trainer = _TRLStandIn(cfg, _logprobs(h, w, p["targets"]), p["is_weights"] is not None)
        return trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    return _grads(fn, p)


PEERS = {"liger": _liger_math, "trl": _trl_math}
CASE_IDS = [(f, c) for f in FAMILIES for c in CASES[f]]


def _errs(got, want):
    return [rel_err(x, y) for x, y in zip(got, want)]


def test_every_family_is_registered_with_three_configurations_per_peer():
    for family in FAMILIES:
        assert family in ALGORITHMS
        for peer in PEERS:
            assert sum(peer in c.get("peers", PEERS) for c in CASES[family].values()) >= 3, (family, peer)


@pytest.mark.parametrize("family,case", CASE_IDS, ids=[f"{f}-{c}" for f, c in CASE_IDS])
def test_the_clips_fire(family, case):
    """The batch is off-policy enough that each family's nonlinearity acts on part of it."""
    p, cfg = _problem(family, case, torch.float64), _config(family, case)
    valid = p["mask"]
    with torch.no_grad():
        logp = _logprobs(p["hidden"], p["weight"], p["targets"])
    d = torch.where(valid, logp - p["old"], 0.0)
    adv = p["advantages"][:, None].expand(B, T)[valid]
    if cfg.spec.ratio_level == "sequence":
        d = (d.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)).expand(B, T)
    r = torch.exp(d[valid])
    if cfg.algorithm == "cispo":
        capped = r > 1 + cfg.clip_ratio_high
        assert capped.any() and not capped.all()
    elif cfg.spec.policy_loss == "ppo_clip":
        clipped = ((r > 1 + cfg.clip_ratio_high) & (adv > 0)) | ((r < 1 - cfg.clip_ratio_low) & (adv < 0))
        assert clipped.any() and not clipped.all()
        if cfg.clip_ratio_c < 5:
            assert ((r > cfg.clip_ratio_c) & (adv < 0)).any(), "the dual clip does not fire"
    else:  # soft gates: the ratios spread well away from 1
        assert (r - 1).abs().max() > 0.3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("family,case", CASE_IDS, ids=[f"{f}-{c}" for f, c in CASE_IDS])
def test_family_equals_liger_and_trl(family, case, dtype):
    cfg = _config(family, case)
    peers = CASES[family][case].get("peers", tuple(PEERS))
    truth_p = _problem(family, case, torch.float64)
    truth = {name: PEERS[name](truth_p, cfg) for name in peers}
    # The two peers agree with each other in fp64 (the comparison below is with one truth).
    if len(peers) == 2:
        assert max(_errs(truth["liger"], truth["trl"])) <= FP64_RTOL
    p = _problem(family, case, dtype)
    peer_low = {name: PEERS[name](p, cfg) for name in peers} if dtype != torch.float64 else None
    backends = _backends(dtype)
    assert {"cpu", "torch"} <= set(backends) or "cpu" not in available_backends()
    for backend in backends:
        assert plan(backend, torch.device("cpu"), dtype, separable=cfg.spec.separable,
                    forward_kernel=cfg.spec.forward_kernel).gradients == (
            "forward" if cfg.spec.forward_kernel in BACKEND_TABLE[backend].forward_kernels else "recompute")
        got = _ours(p, cfg, backend)
        assert got[0].abs() > 1e-4, "the comparison is not between two zeros"
        for name in peers:
            errs = _errs(got, truth[name])
            if dtype == torch.float64:
                assert max(errs) <= FP64_RTOL, (backend, name, errs)
            else:
                bound = [max(2 * e, FP32_FLOOR) for e in _errs(peer_low[name], truth[name])]
                assert all(e <= b for e, b in zip(errs, bound)), (backend, name, errs, bound)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_equals_the_liger_module_end_to_end(family):
    """`LigerFusedLinearGRPOLoss(loss_type=...)` itself (its chunked fp32 log-probs and its
    gradients formed in the forward) on every configuration both peers share, fp32: ours is
    within 2x the module's own error against the fp64 truth, or 1e-5."""
    for case, spec in CASES[family].items():
        if "liger" not in spec.get("peers", PEERS):
            continue
        cfg = _config(family, case)
        truth = _liger_math(_problem(family, case, torch.float64), cfg)
        p = _problem(family, case, torch.float32)
        opts = _peer_options(cfg)
        module = liger_grpo.LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=cfg.kl_loss_coeff > 0,
                                                      chunk_size=2, **opts)
        module_out = _grads(lambda h, w: module(h, w, p["targets"], p["mask"].float(), p["advantages"],
                                                ref_per_token_logps=p["ref"] if cfg.kl_loss_coeff > 0 else None,
                                                old_per_token_logps=p["old"], vllm_is_ratio=p["is_weights"])[0], p)
        got = _ours(p, cfg, "cpu" if "cpu" in available_backends() else "torch")
        bound = [max(2 * e, LIGER_MODULE_RTOL) for e in _errs(module_out, truth)]
        errs = _errs(got, truth)
        assert all(e <= b for e, b in zip(errs, bound)), (case, errs, bound)


def test_luspo_kl_follows_trl_where_liger_differs():
    """With a KL penalty or per-token importance weights, Liger 0.8.5's `luspo` sums
    (per-token loss) * L_i over every position (padding included) and divides by B T; TRL 1.16
    masks first and divides by B. We follow TRL (docs/algorithms.md): equal to TRL, measurably
    different from Liger on these batches."""
    for case in ("kl", "is_weights"):
        cfg = _config("luspo", case)
        p = _problem("luspo", case, torch.float64)
        got = _ours(p, cfg, "torch")
        assert max(_errs(got, _trl_math(p, cfg))) <= FP64_RTOL
        assert rel_err(got[0], _liger_math(p, cfg)[0]) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_on_policy_value_and_gradient(family):
    """On-policy (no old log-probs: ratio exactly 1) the families reduce to their policy
    gradient at r = 1: TRL's loss with old = sg[logp] gives the same numbers."""
    cfg = VIMPOConfig.for_algorithm(family)
    p = _problem(family, next(iter(CASES[family])), torch.float64)
    got = _grads(lambda h, w: fused_vimpo_loss(h, w, p["targets"], p["mask"], torch.zeros(B), torch.arange(B),
                                               advantages=p["advantages"], config=cfg, backend="torch")[0], p)
    inputs_old = None

    def trl(h, w):
        logps = _logprobs(h, w, p["targets"])
        completion_mask = p["mask"].long()
        inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
                  "completion_ids": p["targets"], "completion_mask": completion_mask,
                  "advantages": p["advantages"], "num_items_in_batch": completion_mask.sum(),
                  "old_per_token_logps": inputs_old}
        return trl_grpo.GRPOTrainer._compute_loss(_TRLStandIn(cfg, logps, False), None, inputs)
    want = _grads(trl, p)
    assert max(_errs(got, want)) <= FP64_RTOL


def test_family_knobs_are_validated_by_name():
    for field, value in [("sapo_temperature_pos", 0.0), ("sapo_temperature_neg", -1.0), ("vespo_lambda_pos", 0.0),
                         ("vespo_k_neg", -0.5), ("vespo_k_pos", math.nan)]:
        with pytest.raises(ValueError, match=field):
            VIMPOConfig.for_algorithm("sapo" if "sapo" in field else "vespo", **{field: value})


@pytest.mark.parametrize("name", [n for n in ALGORITHMS if n != "vimpo"])
def test_for_algorithm_takes_the_common_overrides(name):
    """`for_algorithm(name, kl_loss_coeff=, clip_ratio_low=, clip_ratio_high=)` works for every
    name as for dapo, and the fused loss runs with ref/old log-probs and advantages."""
    cfg = VIMPOConfig.for_algorithm(name, kl_loss_coeff=0.1, clip_ratio_low=0.2, clip_ratio_high=0.3)
    p = _problem("bnpo", "preset", torch.float64)
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, metrics = fused_vimpo_loss(p["hidden"], p["weight"], p["targets"], p["mask"], torch.zeros(B), group_ids,
                                     ref_logprobs=p["ref"], old_logprobs=p["old"], advantages=p["advantages"],
                                     config=cfg, backend="auto")
    assert torch.isfinite(loss) and metrics["kl_mean"] > 0


@pytest.mark.slow
def test_triton_interpreter_families():
    """The Triton backend (interpreted on CPU tensors) on the recompute route of two families,
    fp32 against the fp64 truth: run in a subprocess because TRITON_INTERPRET is read at import."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys; sys.path[:0] = ["tests", "tests/kernels/loss"]
        import torch, test_loss_families as t
        from vimpo_kernels import available_backends
        assert "triton" in available_backends(), available_backends()
        for family, case in (("gspo", "kl-wide_band"), ("vespo", "is_weights")):
            cfg = t._config(family, case)
            truth = t._trl_math(t._problem(family, case, torch.float64), cfg)
            p = t._problem(family, case, torch.float32)
            bound = [max(2 * e, t.FP32_FLOOR) for e in t._errs(t._trl_math(p, cfg), truth)]
            errs = t._errs(t._ours(p, cfg, "triton"), truth)
            assert all(e <= max(b, 1e-4) for e, b in zip(errs, bound)), (family, errs, bound)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
