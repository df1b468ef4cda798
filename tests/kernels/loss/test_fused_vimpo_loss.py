"""`fused_vimpo_loss` end to end on the compiled backend ("cpu") against the reference backend
("torch", materialising) and against the golden vectors: loss and gradients w.r.t. hidden,
weight and bias, for every algorithm, ragged masks, one-token and empty responses, groups
with all-equal rewards, and off-policy old log-probs that trigger the clip and the dual clip.

Tolerances (relative, max |diff| / max |reference|):
* fp64 and golden (float64): 1e-10, the golden README's target (we measure ~1e-15).
* fp32 kernels against the fp64 truth: 1e-4. The statistics are ~1e-6 accurate
  (test_compiled_logprobs); whitening divides by the advantage std and the aggregation sums
  O(B*T) terms, which amplifies that by at most ~10-100 here; a wrong term is O(1).
"""

import subprocess
import sys
import textwrap

import pytest
import torch

from golden_data import config_from_case, golden_cases, load_golden, rel_err
from vimpo_kernels import VIMPOConfig, fused_vimpo_loss, vimpo_loss
from vimpo_kernels.logprobs import token_stats_from_logits
from vimpo_kernels.vimpo_loss.forward_grad import grpo_dloss_dlogp
from vimpo_kernels.vimpo_loss import group_mean, grpo_advantages

FP64_RTOL, FP32_RTOL = 1e-10, 1e-4
# Ragged: a full, a one-token, an empty and a mid-length response; group 1 is all rewarded
# (all-equal rewards: zero GRPO advantage, zero VIMPO target).
LENGTHS = [7, 1, 3, 0, 5, 7]
GROUPS = [0, 0, 1, 1, 2, 2]
REWARDS = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
T, H, V = 7, 20, 203

CONFIGS = {
    "vimpo-paper": VIMPOConfig(beta=0.05, actor_coeff=0.1),
    "vimpo-nondetached-kl-temp": VIMPOConfig(beta=0.05, actor_coeff=0.1, detach_kl=False, temperature=0.7),
    "vimpo-k3-lam-huber-seqmean": VIMPOConfig(beta=0.05, kl_estimator="k3", lam=0.9, value_loss_type="huber",
                                              huber_delta=0.05, loss_agg_mode="seq-mean-token-mean",
                                              clip_ratio_c=3.0),
    "vimpo-candidate-set-nondetached": VIMPOConfig(beta=0.05, actor_coeff=0.1, kl_estimator="candidate_set",
                                                   candidate_kl_topk=6, detach_kl=False),
    "grpo": VIMPOConfig.for_algorithm("grpo"),
    "dr_grpo": VIMPOConfig.for_algorithm("dr_grpo"),
    "dapo-k3-loss": VIMPOConfig.for_algorithm("dapo", kl_loss_coeff=0.1),
}
# log(ratio) offsets of the old policy, cycled over the valid tokens: dual clip (ratio e^3 > c
# for A < 0), lower clip, upper clip, inside the band.
_OFFSETS = torch.tensor([3.0, -0.6, 0.5, 0.05, -0.1, 2.5, 0.0], dtype=torch.float64)


def _problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    B = len(LENGTHS)
    hidden = mk(B, T, H) * 0.7
    p = {
        "hidden": hidden, "weight": mk(V, H) * 0.4, "bias": mk(V) * 0.5,
        "ref_hidden": hidden + 0.2 * mk(B, T, H), "ref_weight": None,
        "targets": torch.randint(0, V, (B, T), generator=g),
        "mask": torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None],
        "rewards": torch.tensor(REWARDS, dtype=torch.float64), "group_ids": torch.tensor(GROUPS),
    }
    p["ref_weight"] = p["weight"] + 0.05 * mk(V, H)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in p.items()}


def _old_logprobs(p, config):
    """Behaviour log-probs = current ones shifted by _OFFSETS: every clip region is hit."""
    logits = p["hidden"].double() @ p["weight"].double().T + p["bias"].double()
    logp = token_stats_from_logits(logits, p["targets"], temperature=config.temperature).logprobs
    shift = torch.zeros_like(logp)
    shift[p["mask"]] = _OFFSETS[torch.arange(int(p["mask"].sum())) % len(_OFFSETS)]
    return (logp - shift).masked_fill(~p["mask"], 0.0)


def _run(p, backend, config, old=None, **kw):
    leaves = {k: p[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    loss, metrics = fused_vimpo_loss(
        leaves["hidden"], leaves["weight"], p["targets"], p["mask"], p["rewards"], p["group_ids"],
        ref_hidden=p["ref_hidden"], ref_weight=p["ref_weight"], bias=leaves["bias"],
        old_logprobs=None if old is None else old.to(p["hidden"].dtype), config=config, backend=backend, **kw)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}, metrics


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("policy", ["on-policy", "off-policy"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cpu_backend_matches_reference(name, policy, dtype):
    config = CONFIGS[name]
    p64 = _problem(torch.float64)
    old = _old_logprobs(p64, config) if policy == "off-policy" else None
    want_loss, want_grads, want_metrics = _run(p64, "torch", config, old)
    if policy == "off-policy":  # the case really exercises both clips
        assert float(want_metrics["clip_frac"]) > 0 and float(want_metrics["clip_frac_lower"]) > 0
    got_loss, got_grads, got_metrics = _run(_problem(dtype), "cpu", config, old)
    rtol = FP64_RTOL if dtype == torch.float64 else FP32_RTOL
    errs = {"loss": rel_err(got_loss, want_loss), **{f"d_{k}": rel_err(got_grads[k], want_grads[k])
                                                    for k in want_grads}}
    # Metrics that can be ~0 (on-policy the whitened actor loss sums a zero-mean advantage) are
    # judged on the O(1) scale of a per-token loss, not relative to themselves.
    errs.update({f"metric_{k}": abs(float(got_metrics[k]) - float(want_metrics[k])) / max(1.0, abs(float(want_metrics[k])))
                 for k in ("actor_loss", "clip_frac")})
    bad = {k: v for k, v in errs.items() if not v <= rtol}
    assert not bad, bad
    assert got_grads["hidden"].dtype == dtype and got_grads["weight"].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_adaptive_actor_coeff_on_the_cpu_backend(dtype):
    """The adaptive coefficient needs ||d logp / d logits|| per token: the cpu kernels form it
    from sum_j p_j^2 in the forward pass; two steps carry the EMA state. c_A is float32 in the
    authors' code, hence 1e-6 for it and for everything it scales."""
    from vimpo_kernels.vimpo_loss import AdaptiveCoeffState
    config = VIMPOConfig(beta=0.05, adaptive_actor_coeff=True, adaptive_ema_decay=0.5)
    states = {"cpu": AdaptiveCoeffState(), "torch": AdaptiveCoeffState()}
    p64 = _problem(torch.float64)
    old = _old_logprobs(p64, config)
    for step in range(2):
        want_loss, want_grads, want_metrics = _run(p64, "torch", config, old, adaptive_state=states["torch"])
        got_loss, got_grads, got_metrics = _run(_problem(dtype), "cpu", config, old, adaptive_state=states["cpu"])
        rtol = 1e-6 if dtype == torch.float64 else FP32_RTOL
        errs = {"loss": rel_err(got_loss, want_loss), "c_A": rel_err(got_metrics["actor_coeff"],
                                                                    want_metrics["actor_coeff"]),
                **{f"d_{k}": rel_err(got_grads[k], want_grads[k]) for k in want_grads}}
        assert all(v <= rtol for v in errs.values()), (step, errs)
    assert float(got_metrics["actor_coeff"]) != config.actor_coeff


def test_bf16_within_twice_torch_error():
    """bf16 inputs: the compiled loss and gradients stay within 2x of what the torch
    backend achieves on the same bf16 inputs, both against the fp32-upcast truth."""
    config = CONFIGS["vimpo-paper"]
    p_bf = _problem(torch.bfloat16)
    p_truth = {k: (v.float() if v.is_floating_point() else v) for k, v in p_bf.items()}
    truth_loss, truth_grads, _ = _run(p_truth, "torch", config)
    ref_loss, ref_grads, _ = _run(p_bf, "torch", config)
    got_loss, got_grads, _ = _run(p_bf, "cpu", config)
    assert rel_err(got_loss, truth_loss) <= 2 * rel_err(ref_loss, truth_loss) + 1e-6
    for k in truth_grads:
        assert rel_err(got_grads[k], truth_grads[k]) <= 2 * rel_err(ref_grads[k], truth_grads[k]) + 1e-6, k


# ---------------------------------------------------------------------------------------------
# Golden vectors through the compiled kernel: weight = identity, hidden = logits
# ---------------------------------------------------------------------------------------------

WHITEN = {"dp1": "unbiased", "dpN": "biased"}


@pytest.mark.parametrize("variant", ["dp1", "dpN"])
@pytest.mark.parametrize("case", golden_cases("vimpo"))
def test_vimpo_golden_through_compiled_kernel(case, variant):
    z = load_golden("vimpo", case)
    h = case["hyperparameters"]
    cfg = config_from_case(h).replace(whiten_variance=WHITEN[variant])
    Vg = z["policy_logits"].shape[-1]
    eye = torch.eye(Vg, dtype=torch.float64)
    mask = z["response_mask"].bool()
    hidden = z["policy_logits"].clone().requires_grad_()
    kw = {"value_norm_denom": float(z["value_loss_norm_denom"])} if cfg.value_loss_normalized else {}
    loss, metrics = fused_vimpo_loss(
        hidden, eye, z["responses"], mask, z["seq_reward"], z["uid"], ref_hidden=z["ref_logits"], ref_weight=eye,
        old_logprobs=None if h["on_policy"] else z["old_log_prob"], rollout_is_weights=z.get("rollout_is_weights"),
        config=cfg, backend="cpu", baseline=z["reward_baseline"], **kw)
    loss.backward()
    scale = max(abs(float(z[f"total_loss_{variant}"])), float(z["value_loss"]))
    assert abs(float(loss.detach()) - float(z[f"total_loss_{variant}"])) / scale <= FP64_RTOL
    assert rel_err(metrics["value_loss"], z["value_loss"]) <= FP64_RTOL
    assert rel_err(hidden.grad, z[f"grad_policy_logits_{variant}"]) <= FP64_RTOL
    if cfg.kl_estimator in ("exact", "candidate_set"):
        assert rel_err(metrics["kl_mean"], z["kl_agg"]) <= FP64_RTOL


@pytest.mark.parametrize("case", golden_cases("grpo"))
def test_grpo_golden_through_compiled_kernel(case):
    z = load_golden("grpo", case)
    h = case["hyperparameters"]
    cfg = config_from_case(h)
    Vg = z["policy_logits"].shape[-1]
    eye = torch.eye(Vg, dtype=torch.float64)
    hidden = z["policy_logits"].clone().requires_grad_()
    mask = z["response_mask"].bool()
    loss, metrics = fused_vimpo_loss(hidden, eye, z["responses"], mask, z["seq_reward"], z["uid"],
                                     old_logprobs=None if h["on_policy"] else z["old_log_prob"], config=cfg,
                                     backend="cpu")
    loss.backward()
    assert rel_err(loss, z["pg_loss"]) <= FP64_RTOL
    assert rel_err(hidden.grad, z["grad_policy_logits"]) <= FP64_RTOL
    assert abs(float(metrics["clip_frac"]) - float(z["pg_clipfrac"])) < 1e-6
    assert abs(float(metrics["clip_frac_lower"]) - float(z["pg_clipfrac_lower"])) < 1e-6


# ---------------------------------------------------------------------------------------------
# The GRPO-family per-token coefficient (forward-gradient path) against autograd
# ---------------------------------------------------------------------------------------------

_AGG = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("with_is_weights", [False, True], ids=["no-is-w", "is-w"])
@pytest.mark.parametrize("kl_coeff", [0.0, 0.2], ids=["no-kl", "k3-kl"])
@pytest.mark.parametrize("agg", _AGG)
@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "dapo"])
def test_grpo_coefficient_matches_autograd_through_reference(algorithm, agg, kl_coeff, with_is_weights):
    cfg = VIMPOConfig.for_algorithm(algorithm, loss_agg_mode=agg, kl_loss_coeff=kl_coeff, clip_ratio_c=3.0)
    p = _problem(torch.float64)
    old = _old_logprobs(p, cfg)
    g = torch.Generator().manual_seed(7)
    logp = (old + _OFFSETS[torch.arange(old.numel()) % 7].reshape(old.shape)).masked_fill(~p["mask"], 0.0)
    ref = (logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)).masked_fill(~p["mask"], 0.0)
    is_w = (0.5 + torch.rand(logp.shape, generator=g, dtype=torch.float64)) if with_is_weights else None
    x = logp.clone().requires_grad_()
    loss, _ = vimpo_loss(x, ref, None, p["mask"], p["rewards"], p["group_ids"], old_logprobs=old,
                         rollout_is_weights=is_w, config=cfg)
    (want,) = torch.autograd.grad(loss, x)
    got = grpo_dloss_dlogp(logp, p["mask"], p["rewards"], p["group_ids"], cfg, old_logprobs=old,
                           rollout_is_weights=is_w, ref_logprobs=ref)
    assert rel_err(got, want) <= 1e-12
    assert (got[~p["mask"]] == 0).all()


# ---------------------------------------------------------------------------------------------
# Gradient accumulation / data parallel normalisation
# ---------------------------------------------------------------------------------------------

_SPLIT_CONFIGS = {
    # Whitening statistics are per micro-batch unless all-reduced (test_data_parallel covers the
    # process-group path of the shared epilogue); here the advantage is left unwhitened.
    "vimpo-unwhitened": VIMPOConfig(beta=0.05, actor_coeff=0.1, whiten_adv=False),
    "dapo-k3": VIMPOConfig.for_algorithm("dapo", kl_loss_coeff=0.1),
    "dr_grpo": VIMPOConfig.for_algorithm("dr_grpo"),
}


@pytest.mark.parametrize("name", list(_SPLIT_CONFIGS))
def test_two_half_batches_give_the_whole_batch_gradient(name):
    cfg = _SPLIT_CONFIGS[name]
    p = _problem(torch.float64)
    old = _old_logprobs(p, cfg)
    whole_loss, whole_grads, _ = _run(p, "cpu", cfg, old)
    # Global normalisers. The VIMPO value loss averages over every response (the empty one
    # too); the seq-mean aggregations only over responses with tokens.
    n_tok = float(p["mask"].sum())
    n_seq = float(len(LENGTHS)) if not cfg.is_grpo_family else float((p["mask"].sum(-1) > 0).sum())
    total_loss = 0.0
    grads = {"hidden": torch.zeros_like(p["hidden"]), "weight": 0.0, "bias": 0.0}
    for rows in (torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])):
        half = {k: (v[rows] if k not in ("weight", "bias", "ref_weight") else v) for k, v in p.items()}
        kw = {"num_tokens": n_tok, "num_sequences": n_seq}
        if cfg.is_grpo_family:
            kw["advantages"] = grpo_advantages(p["rewards"], p["group_ids"], norm_by_std=cfg.grpo_norm_by_std)[rows]
        else:
            kw["baseline"] = group_mean(p["rewards"], p["group_ids"])[rows]
        loss, g, _ = _run(half, "cpu", cfg, old[rows], **kw)
        total_loss += float(loss)
        grads["hidden"][rows] = g["hidden"]
        grads["weight"] = grads["weight"] + g["weight"]
        grads["bias"] = grads["bias"] + g["bias"]
    assert abs(total_loss - float(whole_loss)) <= FP64_RTOL * max(1.0, abs(float(whole_loss)))
    for k in grads:
        assert rel_err(grads[k], whole_grads[k]) <= FP64_RTOL, k


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors before any kernel runs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["vimpo", "dapo"])
@pytest.mark.parametrize("case", ["h-mismatch", "vocab-mismatch", "unbuilt-backend", "target-out-of-range"])
def test_bad_inputs_raise_before_any_kernel(case, algorithm, monkeypatch):
    from vimpo_kernels import _backends

    def boom(*_a, **_k):
        raise AssertionError("a kernel ran before the input check")

    monkeypatch.setattr(_backends, "require_extension", boom)
    p = _problem(torch.float32)
    cfg = VIMPOConfig.for_algorithm(algorithm, kl_loss_coeff=0.1) if algorithm != "vimpo" else VIMPOConfig()
    kw = dict(ref_hidden=p["ref_hidden"], ref_weight=p["ref_weight"], config=cfg, backend="cpu")
    weight, targets = p["weight"], p["targets"]
    if case == "h-mismatch":
        weight, err, what = torch.randn(V, H + 1), ValueError, "weight"
    elif case == "vocab-mismatch":
        kw["ref_weight"], err, what = torch.randn(V + 2, H), ValueError, "vocabulary"
    elif case == "target-out-of-range":
        targets, err, what = targets.masked_fill(p["mask"], V), ValueError, "targets"
    else:
        kw["backend"], err, what = "cuda", (RuntimeError, ValueError), "cuda"
    with pytest.raises(err, match=what):
        fused_vimpo_loss(p["hidden"], weight, targets, p["mask"], p["rewards"], p["group_ids"], **kw)


# ---------------------------------------------------------------------------------------------
# Every available backend, Triton included, under the Triton interpreter (slow)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_triton_interpreter_backend_matches_reference():
    """The Triton backend (interpreted on CPU tensors) on the same small batch as the compiled
    one: run in a subprocess because TRITON_INTERPRET is read at import."""
    code = textwrap.dedent("""
        import sys; sys.path[:0] = ["tests", "tests/kernels/loss"]
        import torch, test_fused_vimpo_loss as t
        from golden_data import rel_err
        from vimpo_kernels import available_backends
        assert "triton" in available_backends(), available_backends()
        for name in ("vimpo-paper", "dapo-k3-loss"):
            cfg = t.CONFIGS[name]
            want = t._run(t._problem(torch.float64), "torch", cfg)
            got = t._run(t._problem(torch.float32), "triton", cfg)
            errs = [rel_err(got[0], want[0])] + [rel_err(got[1][k], want[1][k]) for k in want[1]]
            assert max(errs) <= t.FP32_RTOL, (name, errs)
        print("ok")
    """)
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
