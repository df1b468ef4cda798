"""The params spec: every scalar and flag of the compiled ops (`vimpo_kernels._C`), one frozen
dataclass per op family, mirrored field for field by the struct of the same name in
csrc/params.h (the flash-attention `Flash_fwd_params` pattern).

Tensors stay explicit arguments (they are the data); the scalars travel as ONE list of floats,
`params.pack()`, the fields in declared order. The C++ `from_packed()` reads it back and rejects a
wrong length, a flag that is not 0/1 and a non-integral integer, naming the field.
tests/kernels/test_params_spec.py holds each dataclass against its struct (`_C.param_names()`),
name for name and in order, and reads packs back through the C++.

    TokenStatsParams  token_stats_forward / token_stats_backward and the custom ops
                      vimpo::compiled_token_stats(_backward)  (logprobs/compiled_function.py)
    GrpoParams        grpo_forward_grad / grpo_dloss_dlogp     (vimpo_loss/forward_grad.py)
    EpilogueParams    vimpo_epilogue_scan / vimpo_epilogue_tokens (vimpo_loss/compiled_epilogue.py)

Adding a scalar to an op: a field here, the same member and its line in `fields()` of
csrc/params.h, its use in the kernel, and its test. Bindings, custom-op schemas and the call
signatures in between do not change. The dataclasses are keyword-only: a field's place in the
pack is the spec's business, never a caller's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

__all__ = ["TokenStatsParams", "GrpoParams", "EpilogueParams", "PARAMS_SPECS"]

_KINDS = {"float": float, "bool": bool, "int": int}


class _Packed:
    """`pack()` / `unpack()` / `names()` shared by the params dataclasses."""

    def pack(self) -> list[float]:
        """The fields in declared order as floats (flags 0.0 / 1.0): the `params` argument of
        the compiled ops, read back by the C++ struct's `from_packed()`."""
        return [float(getattr(self, f.name)) for f in dataclasses.fields(self)]

    @classmethod
    def unpack(cls, packed: Sequence[float]):
        """The dataclass back from `pack()`'s list (the custom ops' fakes and autograd read it)."""
        fields = dataclasses.fields(cls)
        if len(packed) != len(fields):
            raise ValueError(f"{cls.__name__}: expected {len(fields)} packed values "
                             f"({', '.join(f.name for f in fields)}), got {len(packed)}")
        return cls(**{f.name: _KINDS[f.type](v) for f, v in zip(fields, packed)})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Field names in declared order (the C++ struct's `names()` must equal them)."""
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True, kw_only=True)
class TokenStatsParams(_Packed):
    """Scalars of the chunked token statistics (csrc/logprobs_chunked.cpp). The forward reads
    `temperature`, the `want_*` flags, `topk` and `chunk_rows`; the backward `temperature`, the
    `need_*` flags and `chunk_rows` (its candidate set is the forward's `cand_idx` tensor)."""

    temperature: float = 1.0
    """The logits of both models are divided by it before the softmax (> 0)."""
    want_kl: bool = False
    """Compute KL(pi || pi_ref) per token (needs the reference model's hidden states)."""
    want_entropy: bool = False
    """Compute the policy entropy H(pi) per token."""
    want_grad_norm: bool = False
    """Compute ||d logp_y / d tempered logits||_2 per token (the adaptive actor coefficient's G_t)."""
    topk: int = 0
    """With `want_kl`: 0 = the exact KL; > 0 = the candidate-set KL over the `topk` largest policy
    logits of each row (capped at V)."""
    need_dh: bool = False
    """Backward: return d loss / d hidden."""
    need_dw: bool = False
    """Backward: return d loss / d weight."""
    need_db: bool = False
    """Backward: return d loss / d bias (ignored without a bias)."""
    chunk_rows: int = 0
    """Rows per chunk of the chunk loop; 0 = the backend's own choice (`VIMPO_CHUNK_ROWS`)."""


@dataclass(frozen=True, kw_only=True)
class GrpoParams(_Packed):
    """Scalars of the GRPO-family forward-gradient ops (csrc/logprobs_chunked.cpp):
    `grpo_forward_grad` reads every field, `grpo_dloss_dlogp` the four PPO constants."""

    clip_low: float
    """PPO clip: the ratio's floor is 1 - clip_low (negative advantages)."""
    clip_high: float
    """PPO clip: the ratio's ceiling is 1 + clip_high (positive advantages)."""
    clip_c: float
    """Dual clip: negative-advantage tokens with ratio > clip_c carry no gradient (> 1)."""
    kl_coeff: float = 0.0
    """Weight of the k3 KL penalty against the reference log-probs (> 0 needs `ref_logp`)."""
    temperature: float = 1.0
    """The policy logits are divided by it before the softmax (> 0)."""
    need_dh: bool = False
    """Form d loss / d hidden in the forward chunk loop."""
    need_dw: bool = False
    """Form d loss / d weight in the forward chunk loop."""
    need_db: bool = False
    """Form d loss / d bias in the forward chunk loop (ignored without a bias)."""
    chunk_rows: int = 0
    """Rows per chunk of the chunk loop; 0 = the backend's own choice (`VIMPO_CHUNK_ROWS`)."""


@dataclass(frozen=True, kw_only=True)
class EpilogueParams(_Packed):
    """Scalars of the VIMPO sequence epilogue (csrc/epilogue_math.h). `vimpo_epilogue_scan`
    reads `beta`, `lam` and `kl_estimator`; `vimpo_epilogue_tokens` every field but `lam`. The
    batch-level numbers formed between the passes travel as a device tensor (`EPILOGUE_BATCH`),
    so that forming them never reads a device value on the host."""

    beta: float
    """Scale of the token term u = beta (logp - ref_logp - k)."""
    lam: float
    """Lambda of the reverse advantage scan (1 = the implicit value itself)."""
    kl_estimator: int
    """How k is formed: 0 = the given token KL (exact or candidate set), 2 = k2, 3 = k3."""
    detach_kl: bool
    """No gradient through the KL term of u."""
    whiten: bool
    """Whiten the advantage: (adv_raw - adv_mean) * adv_rstd on valid tokens."""
    clip_low: float
    """PPO clip: the ratio's floor is 1 - clip_low."""
    clip_high: float
    """PPO clip: the ratio's ceiling is 1 + clip_high."""
    clip_c: float
    """Dual-clip constant (> 1)."""
    want_g_kl: bool = False
    """Also return d loss / d token_kl (a given KL that is not detached)."""

# The float64 (3,) `batch` tensor of `vimpo_epilogue_tokens` (csrc/params.h `EpilogueBatch`):
# the whitening mean and 1 / std of the raw advantage over valid tokens (all-reduced under data
# parallelism) and c_A, the weight of the PPO actor loss.
EPILOGUE_BATCH = ("adv_mean", "adv_rstd", "actor_coeff")

# Every params dataclass by its struct name in csrc/params.h.
PARAMS_SPECS = {cls.__name__: cls for cls in (TokenStatsParams, GrpoParams, EpilogueParams)}
