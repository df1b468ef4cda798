"""`selftest()`: every available backend against the reference, on a small odd-shaped batch.

A user with a GPU runs `python -c "import vimpo_kernels; vimpo_kernels.selftest('cuda')"`
once to trust the CUDA and Triton paths on their machine.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._backends import backend_status
from .config import VIMPOConfig


def _problem(device, dtype, B=4, T=7, H=48, V=203, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) * 0.5
    ref_hidden = hidden + 0.05 * torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    ref_weight = weight + 0.02 * torch.randn(V, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([T, 1, 3, T - 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    group_ids = torch.tensor([0, 0, 1, 1])
    to = lambda x: x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)  # noqa: E731
    return [to(x) for x in (hidden, weight, targets, mask, rewards, group_ids, ref_hidden, ref_weight)]


def _loss_and_grads(backend, tensors, config):
    from .vimpo_loss import fused_vimpo_loss
    hidden, weight, targets, mask, rewards, group_ids, ref_hidden, ref_weight = tensors
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss, _ = fused_vimpo_loss(hidden, weight, targets, mask, rewards.float(), group_ids,
                               ref_hidden=ref_hidden, ref_weight=ref_weight, config=config, backend=backend)
    loss.backward()
    return loss.detach().double(), hidden.grad.double(), weight.grad.double()


# The paths a backend can take: the paper recipe (exact KL, detached); a KL that carries a
# gradient (the reference logits recomputed in backward) with a temperature; the candidate-set
# KL; and the GRPO family's forward-gradient path.
_CONFIGS = {
    "vimpo": VIMPOConfig(beta=0.05, actor_coeff=0.1),
    "vimpo-kl-grad": VIMPOConfig(beta=0.05, actor_coeff=0.1, detach_kl=False, temperature=0.7),
    "vimpo-candidate-set": VIMPOConfig(beta=0.05, actor_coeff=0.1, kl_estimator="candidate_set",
                                       candidate_kl_topk=8, detach_kl=False),
    "dapo": VIMPOConfig.for_algorithm("dapo"),
}
_NOT_ON = {"triton": {"vimpo-candidate-set"}}  # the Triton kernels have no top-k


def selftest(device: Optional[str] = None, verbose: bool = True) -> dict[str, str]:
    """Compare every available backend with the float64 reference on `device`, for each path
    a backend can take (`_CONFIGS`).

    Returns {backend: "pass" | "FAIL: ..." | "unavailable: ..."} and prints a line per backend.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    truths = {name: _loss_and_grads("torch", _problem(device, torch.float64), config)
              for name, config in _CONFIGS.items()}
    results = {}
    for backend, (ok, why) in backend_status().items():
        if backend == "torch":
            continue
        if not ok:
            results[backend] = f"unavailable: {why}"
            continue
        failures = []
        for name, config in _CONFIGS.items():
            if name in _NOT_ON.get(backend, ()):
                continue
            try:
                got = _loss_and_grads(backend, _problem(device, torch.float32), config)
                # fp32 kernels against a float64 truth: errors are a few ulp of fp32 times the
                # reduction depth; 1e-4 relative is far above that and far below any real bug.
                worst = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                            for a, b in zip(got, truths[name]))
                if not worst < 1e-4:
                    failures.append(f"{name}: max relative error {worst:.2e}")
            except Exception as exc:  # report, don't crash: the point is to tell the user what works
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
        results[backend] = "pass" if not failures else "FAIL: " + "; ".join(failures)
    if verbose:
        for backend, res in results.items():
            print(f"vimpo_kernels selftest [{device}] {backend:7s} {res}")
    return results
