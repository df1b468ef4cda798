"""`torch.compile(fullgraph=True)` over the whole `fused_vimpo_loss` on the compiled CPU path:
a graph break anywhere (a host read, an untraceable call) fails the compile. Values and
gradients through the compiled graph equal eager; what tracing changes is tested too: value
checks become device-side asserts (still raised), padding rows are computed and zeroed instead
of packed, and the GRPO family takes the recompute route.

Tolerance: float64, 1e-12 relative to the largest entry. Both sides run the same kernels; they
differ where the route differs (eager GRPO forms its gradients in the forward chunk loop, traced
GRPO recomputes) and in the order of a few sums (padding rows are zeros, not absent).
"""

import pytest
import torch
import torch._dynamo

from vimpo_kernels import VIMPOConfig, fused_vimpo_loss
from vimpo_kernels import _backends
from vimpo_kernels.algorithms import ALGORITHMS

RTOL = 1e-12
# "aot_eager" traces forward and backward (dynamo + AOT autograd) without generating code: it
# proves the full graph in seconds; one inductor case (slow tier) runs the generated code.
BACKEND = "aot_eager"


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, H, V = 4, 5, 8, 37
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    mask[2, 1:] = 0                                  # a one-token response
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, 3:] = -100                            # padding ids outside the vocabulary
    return dict(hidden=torch.randn(B, T, H, generator=g, dtype=torch.float64),
                weight=0.3 * torch.randn(V, H, generator=g, dtype=torch.float64),
                ref_hidden=torch.randn(B, T, H, generator=g, dtype=torch.float64),
                targets=targets, mask=mask, rewards=torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64),
                group_ids=torch.tensor([0, 0, 1, 1]),
                old_logprobs=-3.0 + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64))


def _loss_fn(p, config, backend="cpu"):
    def f(hidden, weight):
        loss, metrics = fused_vimpo_loss(hidden, weight, p["targets"], p["mask"], p["rewards"], p["group_ids"],
                                         ref_hidden=p["ref_hidden"], old_logprobs=p["old_logprobs"],
                                         config=config, backend=backend)
        return loss, metrics["loss"]
    return f


def _run(f, p):
    h, w = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    loss, metric = f(h, w)
    loss.backward()
    return loss.detach(), metric, h.grad, w.grad


def _close(a, b):
    return float((a - b).abs().max()) <= RTOL * max(float(b.abs().max()), 1e-30)


CONFIGS = {name: VIMPOConfig.for_algorithm(name) for name in ALGORITHMS}
CONFIGS.update({
    "vimpo-k3-lam-normalized": VIMPOConfig(kl_estimator="k3", lam=0.9, value_loss_normalized=True),
    "vimpo-huber-unbiased-seqmean": VIMPOConfig(value_loss_type="huber", huber_delta=0.1,
                                                whiten_variance="unbiased", loss_agg_mode="seq-mean-token-mean"),
    "vimpo-nondetached-kl": VIMPOConfig(detach_kl=False),
    "dapo-kl": VIMPOConfig.for_algorithm("dapo", kl_loss_coeff=0.04),
})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fullgraph_equals_eager(name):
    torch._dynamo.reset()  # every case compiles afresh (dynamo's recompile limit counts per code object)
    p = _problem()
    f = _loss_fn(p, CONFIGS[name])
    want = _run(f, p)
    got = _run(torch.compile(f, fullgraph=True, backend=BACKEND), p)
    for k, (a, b) in enumerate(zip(got, want)):
        assert _close(a, b), ("loss", "metrics['loss']", "d_hidden", "d_weight")[k]


@pytest.mark.xfail(strict=True, raises=(torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError),
                   reason="the adaptive actor coefficient is an EMA kept on the host (AdaptiveCoeffState): "
                          "one host read per call, a graph break under fullgraph=True")
def test_fullgraph_adaptive_actor_coeff_is_unsupported():
    from vimpo_kernels.vimpo_loss.reference import AdaptiveCoeffState

    torch._dynamo.reset()
    p = _problem()
    config = VIMPOConfig(adaptive_actor_coeff=True)

    def f(hidden, weight):
        return fused_vimpo_loss(hidden, weight, p["targets"], p["mask"], p["rewards"], p["group_ids"],
                                ref_hidden=p["ref_hidden"], config=config, backend="cpu",
                                adaptive_state=AdaptiveCoeffState())[0]

    torch.compile(f, fullgraph=True, backend=BACKEND)(p["hidden"], p["weight"])


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p["targets"].__setitem__((0, 0), 37), "outside the vocabulary"),
    (lambda p: p["mask"].zero_(), "no valid token"),
    (lambda p: p["rewards"].__setitem__(0, float("nan")), "rewards contains NaN"),
])
def test_value_checks_still_raise_while_traced(corrupt, message):
    """Traced, a value check is a device-side assert with the eager check's message."""
    torch._dynamo.reset()
    p = _problem()
    corrupt(p)
    f = torch.compile(_loss_fn(p, VIMPOConfig()), fullgraph=True, backend=BACKEND)
    with pytest.raises(RuntimeError, match=message):
        f(p["hidden"], p["weight"])
    with pytest.raises(ValueError, match=message):  # eager: the host check, before any kernel
        _loss_fn(p, VIMPOConfig())(p["hidden"], p["weight"])


def test_a_traced_call_takes_the_recompute_route():
    eager = _backends.plan("cpu", torch.device("cpu"), torch.float64, separable=True, forward_kernel="ppo_clip")
    traced = _backends.plan("cpu", torch.device("cpu"), torch.float64, separable=True, forward_kernel="ppo_clip",
                            traced=True)
    assert (eager.gradients, traced.gradients) == ("forward", "recompute")
    assert traced.backend == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vimpo", "grpo"])
def test_inductor_equals_eager(name):
    """The generated code, not only the trace."""
    torch._dynamo.reset()
    p = _problem(seed=1)
    f = _loss_fn(p, CONFIGS[name])
    want = _run(f, p)
    got = _run(torch.compile(f, fullgraph=True, backend="inductor"), p)
    for a, b in zip(got, want):
        assert _close(a, b)
