"""Policy and reference models: loading, the hidden-state path to the fused loss, FSDP2.

The training step never asks the model for logits: it runs the decoder (`model.get_decoder()`,
which ends with the final norm) and hands the last hidden states and the LM-head weight to
`vimpo_kernels.fused_vimpo_loss`, which never materialises the N x V logits (outside its
`torch` reference backend). Tied embeddings need nothing special: the head weight *is* the
embedding parameter and receives both gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from vimpo_kernels import VIMPOConfig, fused_linear_logprobs, fused_vimpo_loss
from vimpo_kernels.algorithms import needs_reference

from . import toy
from .train_config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Architectures whose logits are not `hidden @ W.T (+ b)`: the fused loss would silently
# compute different probabilities than the model samples from.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def load_policy(cfg: ModelConfig, seed: int = 0, task: str = "addition"):
    """(model, tokenizer) for `cfg.name_or_path`: the embedded toy model (its vocabulary that
    of the toy `task`) or any causal LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _DTYPES[cfg.dtype]
    check_attention(cfg.attn_implementation)
    if cfg.name_or_path == "toy":
        tokenizer = toy.build_tokenizer(task)
        config = toy.tiny_model_config(cfg.toy_hidden_size, cfg.toy_layers, cfg.toy_heads, task=task)
        config._attn_implementation = cfg.attn_implementation
        with torch.random.fork_rng(devices=[]):  # model init must not shift the run's RNG stream
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        path = cfg.name_or_path
        if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"model.name_or_path: {path!r} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code)
    check_supported(model)
    model.config.use_cache = True
    return model, tokenizer


def check_attention(name: str) -> None:
    if name == "flash_attention_2":
        import importlib.util

        if not torch.cuda.is_available():
            raise ValueError("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("model.attn_implementation=flash_attention_2 needs flash-attn "
                             "(pip install 'vimpo[flash]'); or use sdpa")


def check_supported(model: nn.Module) -> None:
    for name in _LOGIT_TRANSFORMS:
        value = getattr(model.config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__} transforms its logits ({name}={value}); the fused loss "
                             "computes hidden @ W.T and would not match the sampled distribution")
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference model: a copy of the initial weights, never trained."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def lm_head(model: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def context_length(model: nn.Module) -> Optional[int]:
    return getattr(model.config, "max_position_embeddings", None)


@dataclass
class SequenceBatch:
    """Prompts left-padded to width P, responses right-padded to width T, one row per response.

    `input_ids` = [prompt | response]; position ids count only real tokens, as `generate`
    does for left-padded prompts, so the trainer scores exactly what the sampler saw.
    """

    input_ids: torch.Tensor        # (B, P + T)
    attention_mask: torch.Tensor   # (B, P + T)
    prompt_width: int
    targets: torch.Tensor          # (B, T) response tokens (pad where mask = 0)
    mask: torch.Tensor             # (B, T) 1 on response tokens

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_hidden(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """(B, T, H) final hidden states that score the response tokens (shifted by one)."""
    out = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False)
    p, t = batch.prompt_width, batch.targets.shape[1]
    return out.last_hidden_state[:, p - 1:p + t - 1]


class PolicyWithReference(nn.Module):
    """The policy and its frozen reference under one root module.

    The fused loss runs inside this module's forward, so under FSDP2 (`shard`) the root's
    parameters -- embeddings, final norms, LM heads of both models -- are gathered when the
    kernels read the head weights, and their gradients are reduce-scattered afterwards.
    """

    def __init__(self, policy: nn.Module, reference: Optional[nn.Module]):
        super().__init__()
        self.policy = policy
        self.reference = reference

    def forward(self, batch: Optional[SequenceBatch], rewards: Optional[torch.Tensor] = None,
                group_ids: Optional[torch.Tensor] = None, *, config: Optional[VIMPOConfig] = None,
                backend: str = "auto", generate: Optional[dict] = None, logprobs_only: bool = False,
                token_stats: bool = False, **loss_kwargs: Any):
        if logprobs_only:  # behaviour log-probs for an off-policy update
            return self.policy_logprobs(batch, config.temperature, backend)
        if token_stats:  # the adaptive actor coefficient's statistics pass (vimpo/adaptive.py)
            return self.token_stats(batch, config, backend)
        if generate is not None:  # sampling inside the root forward: see `generate`
            return self.policy.generate(**generate)
        if batch is None:  # see `initialise_fsdp`
            return None
        hidden = response_hidden(self.policy, batch)
        weight, bias = lm_head(self.policy)
        ref = {}
        if self._needs_reference(config):
            with torch.no_grad():
                ref_hidden = response_hidden(self.reference, batch)
            ref_weight, ref_bias = lm_head(self.reference)
            ref = {"ref_hidden": ref_hidden, "ref_weight": ref_weight.detach(),
                   "ref_bias": None if ref_bias is None else ref_bias.detach()}
        return fused_vimpo_loss(hidden, weight, batch.targets, batch.mask, rewards.to(hidden.device),
                                group_ids.to(hidden.device), bias=bias, config=config, backend=backend,
                                **ref, **loss_kwargs)

    def generate(self, **kwargs):
        """`policy.generate` run inside this module's forward, so that under FSDP2 the root's
        parameters (embeddings, head) are gathered by FSDP's own hooks for the whole call."""
        return self(None, generate=kwargs)

    def initialise_fsdp(self) -> None:
        """FSDP2 sets up its state on the first forward of the root, which must come before
        anything calls the decoder layers directly. An empty forward does exactly that; the
        root keeps its parameters gathered after a forward, so reshard them: the optimizer
        must be built on the sharded parameters, not on the temporary unsharded ones."""
        self(None)
        self.reshard()

    @torch.no_grad()
    def token_stats(self, batch: SequenceBatch, config: VIMPOConfig, backend: str = "auto"):
        """No-grad token statistics of both models: log-probs, reference log-probs, the KL of
        the loss and ||d logp / d logits|| (what the adaptive actor coefficient needs)."""
        hidden = response_hidden(self.policy, batch)
        weight, bias = lm_head(self.policy)
        ref_hidden = response_hidden(self.reference, batch)
        ref_weight, ref_bias = lm_head(self.reference)
        kl = config.kl_estimator if config.kl_estimator in ("exact", "candidate_set") else None
        return fused_linear_logprobs(hidden, weight, batch.targets, bias=bias, ref_hidden=ref_hidden,
                                     ref_weight=ref_weight, ref_bias=ref_bias, temperature=config.temperature,
                                     kl=kl, topk=config.candidate_kl_topk if kl == "candidate_set" else 0,
                                     return_logit_grad_norm=True, mask=batch.mask.bool(), backend=backend)

    def _needs_reference(self, config: VIMPOConfig) -> bool:
        needed = needs_reference(config)
        if needed and self.reference is None:
            raise ValueError(f"algorithm={config.algorithm!r} needs a reference model")
        return needed

    @torch.no_grad()
    def policy_logprobs(self, batch: SequenceBatch, temperature: float, backend: str = "auto") -> torch.Tensor:
        """(B, T) log-probs of the response tokens under the current policy (0 at padding)."""
        hidden = response_hidden(self.policy, batch)
        weight, bias = lm_head(self.policy)
        stats = fused_linear_logprobs(hidden, weight, batch.targets, bias=bias, temperature=temperature,
                                      mask=batch.mask.bool(), backend=backend)
        return stats.logprobs


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the classes the model declares in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules; cannot find its decoder layers")
    return layers


def shard(wrapper: PolicyWithReference, mesh=None) -> PolicyWithReference:
    """FSDP2: each decoder layer of both models is its own unit; the root holds the rest."""
    from torch.distributed.fsdp import fully_shard

    for model in (wrapper.policy, wrapper.reference):
        if model is None:
            continue
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
    fully_shard(wrapper, mesh=mesh)
    return wrapper
