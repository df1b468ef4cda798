"""The VIMPO loss: per-token reference epilogue (`vimpo_loss`) and the fused end-to-end op."""

from .api import fused_vimpo_loss
from .modules import FusedLinearGRPOLoss, FusedLinearVIMPOLoss
from .reference import (AdaptiveCoeffState, aggregate, group_baseline, group_mean, grpo_advantages, implicit_values,
                        reverse_scan_advantage, vimpo_loss, whiten)

__all__ = ["fused_vimpo_loss", "vimpo_loss", "FusedLinearVIMPOLoss", "FusedLinearGRPOLoss", "AdaptiveCoeffState", "aggregate", "group_baseline", "group_mean",
           "grpo_advantages", "implicit_values", "reverse_scan_advantage", "whiten"]
