"""The public surface: `__all__` pinned, the nn.Module forms equal the functions, the algorithm
registry is what routes and validates, and a tiny model trained a few steps with the fused loss
lands where the reference lands (a convergence test, as Liger's)."""

import pytest
import torch

import vimpo_kernels
from vimpo_kernels import (ALGORITHMS, FusedLinearGRPOLoss, FusedLinearVIMPOLoss, VIMPOConfig, fused_vimpo_loss,
                           plan)
from vimpo_kernels.algorithms import needs_reference
from vimpo_kernels.vimpo_loss import grpo_advantages

B, T, H, V = 6, 5, 12, 37
LENGTHS, GROUPS, REWARDS = [5, 1, 3, 4, 2, 5], [0, 0, 1, 1, 2, 2], [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]


def test_public_api_is_pinned():
    assert sorted(vimpo_kernels.__all__) == sorted([
        "fused_linear_logprobs", "fused_vimpo_loss", "vimpo_loss", "FusedLinearVIMPOLoss", "FusedLinearGRPOLoss",
        "VIMPOConfig", "TokenStats", "ALGORITHMS", "available_backends", "backend_status", "plan", "selftest",
        "__version__"])
    assert all(hasattr(vimpo_kernels, name) for name in vimpo_kernels.__all__)


def _batch(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    hidden = mk(B, T, H)
    return dict(hidden=hidden, weight=mk(V, H) * 0.4, targets=torch.randint(0, V, (B, T), generator=g),
                mask=torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None],
                rewards=torch.tensor(REWARDS, dtype=dtype), group_ids=torch.tensor(GROUPS),
                ref_hidden=hidden + 0.1 * mk(B, T, H))


def _grads(fn, b):
    h, w = b["hidden"].clone().requires_grad_(), b["weight"].clone().requires_grad_()
    loss, metrics = fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad, metrics


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_vimpo_module_equals_the_function(backend):
    b = _batch()
    cfg = VIMPOConfig(beta=0.1, actor_coeff=0.2)
    module = FusedLinearVIMPOLoss(cfg, backend=backend)
    rest = dict(ref_hidden=b["ref_hidden"])
    got = _grads(lambda h, w: module(h, w, b["targets"], b["mask"], b["rewards"], b["group_ids"], **rest), b)
    want = _grads(lambda h, w: fused_vimpo_loss(h, w, b["targets"], b["mask"], b["rewards"], b["group_ids"],
                                                config=cfg, backend=backend, **rest), b)
    for x, y in zip(got[:3], want[:3]):
        assert torch.equal(x, y)
    assert got[3].keys() == want[3].keys()


def test_vimpo_module_carries_and_checkpoints_the_adaptive_state():
    b = _batch()
    module = FusedLinearVIMPOLoss(VIMPOConfig(beta=0.1, actor_coeff=0.2, adaptive_actor_coeff=True), backend="cpu")
    for _ in range(2):
        _grads(lambda h, w: module(h, w, b["targets"], b["mask"], b["rewards"], b["group_ids"],
                                   ref_hidden=b["ref_hidden"]), b)
    state = module.state_dict()
    assert module.adaptive_state.ema_value > 0 and module.adaptive_state.ema_actor > 0
    fresh = FusedLinearVIMPOLoss(module.config, backend="cpu")
    fresh.load_state_dict(state)
    assert fresh.adaptive_state == module.adaptive_state


@pytest.mark.parametrize("loss_type", [name for name, a in ALGORITHMS.items() if a.advantages_suffice])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_grpo_module_equals_the_function(loss_type, backend):
    b = _batch()
    adv = grpo_advantages(b["rewards"], b["group_ids"], norm_by_std=ALGORITHMS[loss_type].advantage == "group_std")
    old = torch.zeros(B, T, dtype=torch.float64)
    module = FusedLinearGRPOLoss(loss_type, backend=backend, clip_ratio_high=0.3)
    got = _grads(lambda h, w: module(h, w, b["targets"], b["mask"], adv, old_logprobs=old), b)
    want = _grads(lambda h, w: fused_vimpo_loss(
        h, w, b["targets"], b["mask"], b["rewards"], b["group_ids"], advantages=adv, old_logprobs=old,
        config=VIMPOConfig.for_algorithm(loss_type, clip_ratio_high=0.3), backend=backend), b)
    for x, y in zip(got[:3], want[:3]):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", [name for name, a in ALGORITHMS.items() if not a.advantages_suffice])
def test_grpo_module_rejects_losses_that_need_the_groups(name):
    with pytest.raises(ValueError, match="loss_type"):
        FusedLinearGRPOLoss(name)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_the_registry_routes_by_gradient_structure(name):
    """A per-token-separable loss takes the forward-gradient route on a backend that has one;
    anything else recomputes. The planner reads the registry, never the algorithm's name."""
    spec = ALGORITHMS[name]
    route = plan("cpu", torch.device("cpu"), torch.float32, separable=spec.separable,
                 forward_kernel=spec.forward_kernel, compiled_epilogue=True)
    # The cpu backend's forward kernel implements the PPO-clip coefficient only (the backend table).
    assert route.gradients == ("forward" if spec.separable and spec.forward_kernel == "ppo_clip" else "recompute")
    assert plan("torch", torch.device("cpu"), torch.float32, separable=spec.separable,
                forward_kernel=spec.forward_kernel).gradients == "recompute"
    cfg = VIMPOConfig.for_algorithm(name)
    assert needs_reference(cfg) == spec.always_needs_reference
    assert needs_reference(cfg.replace(kl_loss_coeff=0.1)) if not spec.always_needs_reference else True


def test_explicit_backend_is_never_demoted(gpu_with_triton_only):
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="'triton' does not support dtype torch.float64"):
        plan("triton", cuda, torch.float64)
    with pytest.raises(ValueError, match="kl='candidate_set'"):
        plan("triton", cuda, torch.bfloat16, kl="candidate_set")
    with pytest.raises(ValueError, match="mixed dtypes"):
        plan("triton", cuda, torch.bfloat16, weight_dtype=torch.float32)


def test_auto_never_materializes_on_a_gpu_silently(gpu_with_triton_only, monkeypatch):
    cuda = torch.device("cuda")
    assert plan("auto", cuda, torch.bfloat16, kl="exact").backend == "triton"
    with pytest.raises(ValueError, match="materializing 'torch' reference.*VIMPO_ALLOW_MATERIALIZE"):
        plan("auto", cuda, torch.bfloat16, kl="candidate_set")
    monkeypatch.setattr(gpu_with_triton_only._env, "ALLOW_MATERIALIZE", True)
    gpu_with_triton_only._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="skipped triton: kl='candidate_set'"):
        assert plan("auto", cuda, torch.bfloat16, kl="candidate_set").backend == "torch"


# -------------------------------------------------------------------------------------------
# Convergence: 5 optimizer steps of a tiny model, fused loss vs the reference
# -------------------------------------------------------------------------------------------

class _TinyLM(torch.nn.Module):
    def __init__(self, dtype, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype) * 0.5)
        self.mix = torch.nn.Parameter(torch.eye(H, dtype=dtype) + 0.1 * torch.randn(H, H, generator=g,
                                                                                      dtype=torch.float64).to(dtype))
        self.head = torch.nn.Parameter(torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype) * 0.3)

    def hidden(self, tokens):
        return torch.tanh(self.embed[tokens] @ self.mix)


def _train(name, backend, dtype, steps=5):
    torch.manual_seed(0)
    policy, reference = _TinyLM(dtype), _TinyLM(dtype)
    for p in reference.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    cfg = VIMPOConfig.for_algorithm(name, **({"beta": 0.1, "actor_coeff": 0.2} if name == "vimpo" else {}))
    b = _batch(dtype, seed=1)
    inputs = b["targets"].roll(1, dims=1)  # the "previous token" scores the next one
    old = None
    for _ in range(steps):
        hidden = policy.hidden(inputs)
        kw = {"ref_hidden": reference.hidden(inputs), "ref_weight": reference.head} \
            if needs_reference(cfg) else {}
        loss, _ = fused_vimpo_loss(hidden, policy.head, b["targets"], b["mask"], b["rewards"], b["group_ids"],
                                   old_logprobs=old, config=cfg, backend=backend, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().double() for p in policy.parameters()]


@pytest.mark.parametrize("name", ["vimpo", "dapo"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_five_steps_with_the_fused_loss_land_on_the_reference(name, dtype, tol):
    """fp64: 1e-10 relative (last-bit reduction-order differences, amplified by 5 steps). fp32:
    1e-4 relative: each step's gradient differs by a few fp32 ulps (~1e-6) between chunked and
    materialized summation orders, and SGD at lr 0.5 over 5 steps grows that by at most ~10x."""
    fused = _train(name, "cpu", dtype)
    ref = _train(name, "torch", dtype)
    moved = max(float((a - b).abs().max()) for a, b in zip(ref, [p.detach().double() for p in _TinyLM(dtype).parameters()]))
    assert moved > 1e-2, "the reference run did not move the parameters: the test would prove nothing"
    for a, b in zip(fused, ref):
        assert float((a - b).abs().max() / b.abs().max()) <= tol


def test_token_statistics_never_import_the_loss_package():
    """The data flow is the layout: token statistics -> loss -> trainer. An import the other way
    (even inside a function) is a cycle waiting to happen."""
    import ast
    from pathlib import Path
    pkg = Path(vimpo_kernels.__file__).parent
    offenders = []
    for path in (pkg / "logprobs").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any("vimpo_loss" in n or n == "vimpo" or n.startswith("vimpo.") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_deterministic_mode_keeps_triton_with_its_fixed_order_backward(gpu_with_triton_only, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) Triton stays eligible, asked for or by
    auto: its deterministic backward replaces the atomics by fixed-order owner kernels
    (the refusal of a backend without a deterministic mode: tests/kernels/test_backends.py)."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert plan("triton", cuda, torch.bfloat16).backend == "triton"
    assert plan("auto", cuda, torch.bfloat16, kl="exact").backend == "triton"


def test_deterministic_reaches_the_kernel_and_the_planner(monkeypatch):
    """`deterministic=` of the public functions is handed to the planner and to the chosen
    backend's implementation (Triton pins its configs and runs its fixed-order backward on it)."""
    from vimpo_kernels import VIMPOConfig, fused_vimpo_loss
    from vimpo_kernels.logprobs import api as logprobs_api

    seen = {}
    real_plan, real_impl = logprobs_api._backends.plan, logprobs_api._IMPLS["cpu"]

    def plan(*args, **kwargs):
        seen["plan"] = kwargs.get("deterministic")
        return real_plan(*args, **kwargs)

    def impl(*args, **kwargs):
        seen["impl"] = kwargs.get("deterministic")
        return real_impl(*args, **kwargs)

    monkeypatch.setattr(logprobs_api._backends, "plan", plan)
    monkeypatch.setitem(logprobs_api._IMPLS, "cpu", impl)
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 3, 8, generator=g), torch.randn(11, 8, generator=g)
    t, m = torch.randint(0, 11, (2, 3), generator=g), torch.ones(2, 3)
    runs = [fused_vimpo_loss(h, w, t, m, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), ref_hidden=h + 0.1,
                             config=VIMPOConfig(), backend="cpu", deterministic=True)[0] for _ in range(2)]
    assert seen == {"plan": True, "impl": True}
    assert torch.equal(runs[0], runs[1])


def test_auto_routes_fp64_and_mixed_dtypes_away_from_triton(simulated_gpu):
    """Triton computes in fp32 from fp32/bf16/fp16 operands of one dtype: `auto` sends fp64 and
    mixed-dtype calls to the compiled CUDA backend (Triton would raise a TypeError)."""
    cuda = torch.device("cuda")
    assert plan("auto", cuda, torch.bfloat16, kl="exact").backend in ("triton", "cuda")
    assert plan("auto", cuda, torch.float64, kl="exact").backend == "cuda"
    assert plan("auto", cuda, torch.bfloat16, weight_dtype=torch.float32).backend == "cuda"
