"""A benchmark point and its inputs.

Every contender of a point gets bit-identical inputs (same seed, built the same way), so the
timings, the memory and the errors compare the same work. Inputs are drawn in float32 and then
cast to the point's dtype; the float64 truth is computed from the *cast* values, so the error
columns measure the computation, not the input rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

OPS = ("vimpo", "dapo", "logprobs")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Response length of the (B, T) layout the loss ops need; N = B * T tokens, all valid, so the
# number of tokens the floor counts is the number every contender must process.
SEQ_LEN = 256
GROUP_SIZE = 4
# Loss knobs shared by our DAPO path and Liger's (TRL's defaults for GRPO with a KL term).
DAPO_BETA = 0.04
DAPO_EPS_LOW, DAPO_EPS_HIGH = 0.2, 0.28


@dataclass(frozen=True)
class Point:
    op: str
    N: int
    H: int
    V: int
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in ("N", "H", "V"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.N > SEQ_LEN and self.N % SEQ_LEN:
            raise ValueError(f"N must be <= {SEQ_LEN} or a multiple of it (the (B, T) layout), got {self.N}")

    @property
    def B(self) -> int:
        return max(1, self.N // SEQ_LEN)

    @property
    def T(self) -> int:
        return min(self.N, SEQ_LEN)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def key(self) -> str:
        return f"{self.op}-N{self.N}-H{self.H}-V{self.V}-{self.dtype}-{self.device}"

    def shape_label(self) -> str:
        return f"H={self.H}, V={self.V}, {self.dtype}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Problem:
    """The tensors of one point. `hidden` and `weight` are leaves that require grad."""

    point: Point
    hidden: torch.Tensor          # (B, T, H)
    weight: torch.Tensor          # (V, H)
    targets: torch.Tensor         # (B, T) int64
    mask: torch.Tensor            # (B, T) bool, all valid
    rewards: torch.Tensor         # (B,) float32 in {0, 1}
    group_ids: torch.Tensor       # (B,) int64
    ref_hidden: Optional[torch.Tensor] = None    # vimpo: the reference model's hidden states
    ref_weight: Optional[torch.Tensor] = None    # vimpo: the reference model's LM head
    ref_logprobs: Optional[torch.Tensor] = None  # dapo: precomputed reference log-probs (B, T)
    advantages: Optional[torch.Tensor] = None    # dapo: (B,) group-normalised advantages

    def zero_grad(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hidden.grad, self.weight.grad


def make_problem(point: Point) -> Problem:
    """Seeded inputs with LLM-like logit statistics (std ~2 over the vocabulary)."""
    g = torch.Generator().manual_seed(point.seed)
    B, T, H, V = point.B, point.T, point.H, point.V
    dev, dt = torch.device(point.device), point.torch_dtype

    # Copies, so that marking a leaf never makes a tensor derived from the same draw (the
    # reference model's inputs) part of the policy's autograd graph.
    def leaf(x):
        return x.to(device=dev, dtype=dt, copy=True).requires_grad_(True)

    def const(x):
        return x.to(device=dev, dtype=dt, copy=True)

    w_scale = 2.0 / H ** 0.5
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * w_scale
    targets = torch.randint(0, V, (B, T), generator=g)
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    group_ids = torch.arange(B) // GROUP_SIZE
    prob = Problem(point, leaf(hidden), leaf(weight), targets.to(dev), torch.ones(B, T, dtype=torch.bool, device=dev),
                   rewards.to(dev), group_ids.to(dev))
    if point.op == "vimpo":
        # A reference model close to the policy, as after a few RL steps from the same init.
        prob.ref_hidden = const(hidden + 0.05 * torch.randn(B, T, H, generator=g))
        prob.ref_weight = const(weight + 0.05 * w_scale * torch.randn(V, H, generator=g))
    elif point.op == "dapo":
        from vimpo_kernels.vimpo_loss import grpo_advantages
        # Reference log-probs near those of a random-logit model (about -log V), so the k3
        # KL sees log-ratios of order 1 (no overflow in exp, a non-trivial gradient).
        base = -torch.log(torch.tensor(float(V)))
        prob.ref_logprobs = (base + 0.5 * torch.randn(B, T, generator=g)).to(dev)
        prob.advantages = grpo_advantages(rewards, group_ids, norm_by_std=True).to(dev)
    return prob


# ---------------------------------------------------------------------------------------------
# The physical floor: GEMMs no implementation can avoid (each 2*N*H*V flops).
# ---------------------------------------------------------------------------------------------

def floor_gemms(op: str, phase: str) -> tuple[str, ...]:
    """Names of the unavoidable GEMMs of `op` for `phase` ("fwd" or "fwdbwd").

    "logits": hidden @ weight.T (policy forward; the reference model's forward is another one),
    "d_hidden": dlogits @ weight, "d_weight": dlogits.T @ hidden. Recomputing the logits in the
    backward is a choice (memory for time), so it is not part of the floor.
    """
    fwd = {"vimpo": ("logits", "logits"), "dapo": ("logits",), "logprobs": ("logits",)}[op]
    return fwd if phase == "fwd" else fwd + ("d_hidden", "d_weight")


def floor_flops(point: Point, phase: str) -> float:
    return 2.0 * point.N * point.H * point.V * len(floor_gemms(point.op, phase))
