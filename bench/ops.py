"""The ops the benchmark measures: one `Op` entry each, and the points and inputs they run on.

An op is a loss (or the per-token log-prob) computed from final hidden states and an LM head,
forward + backward. Its entry says everything the machinery needs: the title of its table, its
config (the loss is `vimpo_loss` under that config: the same engine for every algorithm), the
inputs it adds to the shared ones, the forward GEMMs of its floor, how many N x V buffers the
materializing reference holds, and its tolerances. The truth (`truth.py`), the materializing
baseline and our contenders (`contenders/`) are derived from the entry; adding an op is one
`register_op(Op(...))` below, plus the peers that compete on it.

Every contender of a point gets bit-identical inputs (same seed, built the same way). Inputs are
drawn in float32 and then cast to the point's dtype; the float64 truth is computed from the
*cast* values, so the error columns measure the computation, not the input rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Optional

import torch

from vimpo_kernels import ALGORITHMS, VIMPOConfig, vimpo_loss
from vimpo_kernels.vimpo_loss import grpo_advantages

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Normwise relative error allowed per input dtype (every op's default).
#  fp32: GEMMs over H <= 2048 products and softmax sums over V <= 151936 terms in float32 give
#        ~1e-6..1e-5 normwise error; 1e-4 leaves a 10x margin, while any wrong term (a missing
#        KL, a wrong normaliser, a dropped chunk) moves these by far more than 1e-3.
#  bf16: implementations may round logits and gradients to bf16 (8-bit mantissa, 2^-8 = 3.9e-3
#        relative; logits of magnitude ~10 lose ~0.02 absolute, which moves probabilities by
#        ~2%), so 3e-2 admits that rounding and still catches wrong math.
TOLERANCE = MappingProxyType({"fp32": 1e-4, "bf16": 3e-2})

# Response length of the (B, T) layout the loss ops need; N = B * T tokens, all valid, so the
# number of tokens the floor counts is the number every contender must process.
SEQ_LEN = 256
GROUP_SIZE = 4
# Loss knobs shared by our DAPO path and Liger's (TRL's defaults for GRPO with a KL term).
DAPO_BETA = 0.04
DAPO_EPS_LOW, DAPO_EPS_HIGH = 0.2, 0.28

# The GEMMs of the floor, each 2*N*H*V flops: "logits" = hidden @ weight.T (once per model whose
# logits the op needs), "d_hidden" = dlogits @ weight, "d_weight" = dlogits.T @ hidden.
# Recomputing logits in the backward is a choice (memory for time), so it is not in the floor.
BACKWARD_GEMMS = ("d_hidden", "d_weight")


# ---------------------------------------------------------------------------------------------
# A point and its inputs
# ---------------------------------------------------------------------------------------------

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
            raise ValueError(f"op must be one of {tuple(OPS)}, got {self.op!r}")
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
    ref_hidden: Optional[torch.Tensor] = None    # the reference model's hidden states (B, T, H)
    ref_weight: Optional[torch.Tensor] = None    # the reference model's LM head (V, H)
    ref_logprobs: Optional[torch.Tensor] = None  # precomputed reference log-probs (B, T), float32
    advantages: Optional[torch.Tensor] = None    # (B,) given advantages, float32

    def zero_grad(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) hidden states and (N,) targets: the layout of the token-level functions."""
        p = self.point
        return self.hidden.reshape(p.N, p.H), self.targets.reshape(p.N)

    def loss_inputs(self) -> dict[str, torch.Tensor]:
        """The op's own inputs that are present, as keywords of `fused_vimpo_loss`."""
        given = dict(ref_hidden=self.ref_hidden, ref_weight=self.ref_weight, ref_logprobs=self.ref_logprobs,
                     advantages=self.advantages)
        return {k: v for k, v in given.items() if v is not None}


def make_problem(point: Point) -> Problem:
    """Seeded inputs with LLM-like logit statistics (std ~2 over the vocabulary): the shared
    tensors, then the op's own (`Op.inputs`), drawn from the same generator after them."""
    g = torch.Generator().manual_seed(point.seed)
    B, T, H, V = point.B, point.T, point.H, point.V
    dev = torch.device(point.device)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * _weight_scale(point)
    targets = torch.randint(0, V, (B, T), generator=g)
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    group_ids = torch.arange(B) // GROUP_SIZE
    prob = Problem(point, _leaf(hidden, point), _leaf(weight, point), targets.to(dev),
                   torch.ones(B, T, dtype=torch.bool, device=dev), rewards.to(dev), group_ids.to(dev))
    OPS[point.op].inputs(prob, g, hidden, weight)
    return prob


def _weight_scale(point: Point) -> float:
    return 2.0 / point.H ** 0.5


# Copies, so that marking a leaf never makes a tensor derived from the same draw (the reference
# model's inputs) part of the policy's autograd graph.
def _leaf(x: torch.Tensor, point: Point) -> torch.Tensor:
    return x.to(device=point.device, dtype=point.torch_dtype, copy=True).requires_grad_(True)


def _const(x: torch.Tensor, point: Point) -> torch.Tensor:
    return x.to(device=point.device, dtype=point.torch_dtype, copy=True)


# The op-specific inputs: (problem, generator, float32 hidden draw, float32 weight draw) -> None.
InputsFn = Callable[[Problem, torch.Generator, torch.Tensor, torch.Tensor], None]


def no_inputs(prob: Problem, g: torch.Generator, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """The shared inputs are all the op needs."""


def reference_model(prob: Problem, g: torch.Generator, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """A reference model close to the policy, as after a few RL steps from the same init."""
    p = prob.point
    prob.ref_hidden = _const(hidden + 0.05 * torch.randn(p.B, p.T, p.H, generator=g), p)
    prob.ref_weight = _const(weight + 0.05 * _weight_scale(p) * torch.randn(p.V, p.H, generator=g), p)


def given_reference_logprobs(prob: Problem, g: torch.Generator, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """TRL's GRPO setup: reference log-probs computed beforehand, group-normalised advantages.

    The reference log-probs are near those of a random-logit model (about -log V), so the k3 KL
    sees log-ratios of order 1 (no overflow in exp, a non-trivial gradient)."""
    p = prob.point
    base = -torch.log(torch.tensor(float(p.V)))
    prob.ref_logprobs = (base + 0.5 * torch.randn(p.B, p.T, generator=g)).to(p.device)
    prob.advantages = grpo_advantages(prob.rewards.cpu(), prob.group_ids.cpu(), norm_by_std=True).to(p.device)


# ---------------------------------------------------------------------------------------------
# The op entry and the registry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    name: str
    title: str
    """Heading of the op's table in the report."""
    forward_gemms: tuple[str, ...] = ("logits",)
    """The forward GEMMs of the floor: one "logits" per model whose logits the op needs."""
    config: Optional[VIMPOConfig] = None
    """The loss is `vimpo_loss` under this config. None: the op's output is the per-token log-prob
    of the target itself (compared with the truth), and its loss is their sum."""
    inputs: InputsFn = no_inputs
    """Adds the op's own inputs (reference model, given log-probs, ...) to the shared ones."""
    logit_copies: float = 3
    """float32 N x V buffers our materializing backend (`ours:torch`) holds at its peak (its memory
    estimate). The `materialize` baseline's estimate is `footprint.py`, derived from its code."""
    tolerance: Mapping[str, float] = field(default_factory=lambda: TOLERANCE)
    """Normwise relative error allowed per input dtype."""

    def floor_gemms(self, phase: str) -> tuple[str, ...]:
        """Names of the unavoidable GEMMs for `phase` ("fwd" or "fwdbwd")."""
        if phase not in ("fwd", "fwdbwd"):
            raise ValueError(f"phase must be 'fwd' or 'fwdbwd', got {phase!r}")
        return self.forward_gemms if phase == "fwd" else self.forward_gemms + BACKWARD_GEMMS

    def floor_flops(self, point: Point, phase: str) -> float:
        return 2.0 * point.N * point.H * point.V * len(self.floor_gemms(phase))

    @property
    def kl(self) -> Optional[str]:
        """The KL the loss reads from the token statistics ("exact", "candidate_set") or None."""
        return self.config.kl_estimator if self.config is not None and self.config.needs_exact_kl else None

    @property
    def kl_has_grad(self) -> bool:
        return self.kl is not None and not self.config.detach_kl

    def stats_options(self, with_kl: bool) -> dict:
        """Keywords of the reference token statistics (`token_stats_from_logits`,
        `linear_logprobs_reference`) that this op's loss needs."""
        options = {"temperature": self.config.temperature if self.config is not None else 1.0}
        if with_kl and self.kl is not None:
            options["kl"] = self.kl
            options["topk"] = self.config.candidate_kl_topk if self.kl == "candidate_set" else 0
        return options

    def loss(self, prob: Problem, logprobs: torch.Tensor, ref_logprobs: Optional[torch.Tensor] = None,
             kl: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The op's scalar loss from per-token statistics of shape (B, T), in their dtype (float64
        for the truth, float32 for the materializing baseline). `ref_logprobs` defaults to the
        given ones (`prob.ref_logprobs`)."""
        if self.config is None:
            return logprobs.sum()
        dt = logprobs.dtype
        if ref_logprobs is None and prob.ref_logprobs is not None:
            ref_logprobs = prob.ref_logprobs.to(dt)
        extra = {} if prob.advantages is None else {"advantages": prob.advantages.to(dt)}
        loss, _ = vimpo_loss(logprobs, ref_logprobs, kl, prob.mask, prob.rewards.to(dt), prob.group_ids,
                             config=self.config, **extra)
        return loss


OPS: dict[str, Op] = {}


def register_op(op: Op) -> Op:
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} already registered")
    OPS[op.name] = op
    return op


def get_op(name: str) -> Op:
    if name not in OPS:
        raise ValueError(f"op must be one of {tuple(OPS)}, got {name!r}")
    return OPS[name]


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

register_op(Op(
    name="vimpo",
    title="VIMPO loss, exact KL, policy + reference model (forward = both models' logits statistics)",
    config=VIMPOConfig(),  # the paper recipe: beta 5e-4, exact KL (detached), c_A 5e-3
    inputs=reference_model, forward_gemms=("logits", "logits"),
    # policy logits, their log-softmax (saved), its grad, reference logits and log-softmax,
    # the KL's p and p*(log p - log q): measured ~7 N x V buffers at the peak.
    logit_copies=8))

# On-policy (old log-probs = the detached current ones), so our dual clip (c = 10) and log-ratio
# clamp cannot fire (ratio = 1) and do not change the numbers against Liger's loss.
register_op(Op(
    name="dapo",
    title="DAPO loss, k3 KL from given reference log-probs (vs Liger)",
    config=VIMPOConfig.for_algorithm("dapo", kl_loss_coeff=DAPO_BETA, clip_ratio_low=DAPO_EPS_LOW,
                                     clip_ratio_high=DAPO_EPS_HIGH),
    inputs=given_reference_logprobs, logit_copies=4))

# The anchors' loss families (Liger-Kernel 0.8.5's loss types, TRL's loss_type), each with its
# registry preset, on dapo's inputs (on-policy, given reference log-probs, k3 penalty): one entry
# each, compared with Liger's module of the same loss type.
FAMILIES = ("bnpo", "gspo", "luspo", "cispo", "sapo", "vespo")
for _family in FAMILIES:
    register_op(Op(
        name=_family,
        title=f"{_family.upper()} loss ({ALGORITHMS[_family].summary}), k3 KL from given reference log-probs (vs Liger)",
        config=VIMPOConfig.for_algorithm(_family, kl_loss_coeff=DAPO_BETA),
        inputs=given_reference_logprobs, logit_copies=4))

# Cross-entropy libraries return -log p(target); their contenders negate it.
register_op(Op(
    name="logprobs",
    title="per-token log-prob of the target (shared sub-problem, vs CCE and torch)",
    logit_copies=3))
