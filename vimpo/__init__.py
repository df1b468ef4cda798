"""vimpo: the VIMPO algorithm, configuration and trainer on top of `vimpo_kernels`."""

from vimpo_kernels import VIMPOConfig, fused_vimpo_loss, vimpo_loss
from vimpo_kernels.vimpo_loss import AdaptiveCoeffState, grpo_advantages

__all__ = ["VIMPOConfig", "vimpo_loss", "fused_vimpo_loss", "AdaptiveCoeffState", "grpo_advantages"]
