"""Token statistics (log-prob, log-sum-exp, reference log-prob, exact KL, entropy) from
hidden states and LM-head weights."""

from .api import fused_linear_logprobs
from .reference import linear_logprobs_reference, logit_grad_norm, token_stats_from_logits

__all__ = ["fused_linear_logprobs", "linear_logprobs_reference", "logit_grad_norm", "token_stats_from_logits"]
