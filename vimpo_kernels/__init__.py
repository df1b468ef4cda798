"""vimpo_kernels: fused kernels for VIMPO (Value-Implicit Policy Optimization).

Public API:
    fused_linear_logprobs(hidden, weight, targets, ...) -> TokenStats
    fused_vimpo_loss(hidden, weight, targets, mask, rewards, group_ids, ...) -> (loss, metrics)
    vimpo_loss(logprobs, ref_logprobs, token_kl, mask, rewards, group_ids, ...) -> (loss, metrics)
    VIMPOConfig, TokenStats
    available_backends(), backend_status(), selftest(device=None)
"""

from ._backends import available_backends, backend_status
from .config import VIMPOConfig
from .logprobs import fused_linear_logprobs
from .selftest import selftest
from .stats import TokenStats
from .vimpo_loss import fused_vimpo_loss, vimpo_loss

__version__ = "0.1.0"

__all__ = ["fused_linear_logprobs", "fused_vimpo_loss", "vimpo_loss", "VIMPOConfig", "TokenStats",
           "available_backends", "backend_status", "selftest", "__version__"]
