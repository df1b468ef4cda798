"""vimpo_kernels: fused kernels for VIMPO (Value-Implicit Policy Optimization).

Public API:
    fused_linear_logprobs(hidden, weight, targets, ...) -> TokenStats
    fused_vimpo_loss(hidden, weight, targets, mask, rewards, group_ids, ...) -> (loss, metrics)
    vimpo_loss(logprobs, ref_logprobs, token_kl, mask, rewards, group_ids, ...) -> (loss, metrics)
    FusedLinearVIMPOLoss(config), FusedLinearGRPOLoss(loss_type)   nn.Module forms of the fused loss
    VIMPOConfig, TokenStats, ALGORITHMS (the algorithm registry)
    available_backends(), backend_status(), plan(...), selftest(device=None, dtype="fp32")
"""

from ._backends import available_backends, backend_status, plan
from .algorithms import ALGORITHMS
from .config import VIMPOConfig
from .logprobs import fused_linear_logprobs
from .selftest import selftest
from .stats import TokenStats
from .vimpo_loss import FusedLinearGRPOLoss, FusedLinearVIMPOLoss, fused_vimpo_loss, vimpo_loss

__version__ = "0.1.0"

__all__ = ["fused_linear_logprobs", "fused_vimpo_loss", "vimpo_loss", "FusedLinearVIMPOLoss", "FusedLinearGRPOLoss",
           "VIMPOConfig", "TokenStats", "ALGORITHMS", "available_backends", "backend_status", "plan", "selftest",
           "__version__"]
