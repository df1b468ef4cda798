"""VIMPO inside verl: a policy loss and an advantage estimator in verl's registries, and a
forward patch that returns per-token log-probs, entropy and the exact KL from our kernels.

Load it through verl's external-module hook (it registers on import):

    VERL_USE_EXTERNAL_MODULES=vimpo.integrations.verl python -m verl.trainer.main_ppo \\
        algorithm.adv_estimator=vimpo actor_rollout_ref.actor.policy_loss.loss_mode=vimpo ...

How the VIMPO pieces map onto verl's two hooks (the math: docs/math.md):

* advantage estimator `vimpo` (driver, whole step batch): the VIMPO *target*
  y_i = R_i - b_i (docs/math.md, "Baseline, target and residual"), R_i the masked reward
  sum, b_i the mean of R over the responses sharing the uid, optionally capped
  (`algorithm.vimpo.cap_v0`). It is written to verl's `advantages` (and `returns`) on every
  position of the row, padding included, so rows with no valid token keep their target.
* policy loss `vimpo` (actor, per micro-batch): `vimpo_loss` with rewards = y, baseline = 0.
  verl's policy-loss signature carries no reference log-probs or KL, so the actor must put the
  current micro-batch's `ref_log_prob` and `token_kl` (B, T response layout) into
  `token_stats_context(...)` around the loss call; `patch_forward` computes both in the
  policy forward (with the frozen reference's hidden states) and returns them on the output.

verl's own forward patches do not call ours: wiring `patch_forward` and the context into
verl's engine workers is left to the user's worker (see docs/integrations.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch

from vimpo_kernels import VIMPOConfig, fused_linear_logprobs, vimpo_loss
from vimpo_kernels.vimpo_loss import group_baseline

VERL_TESTED = ("0.9.1",)
LOSS_NAME = "vimpo"
ADV_ESTIMATOR_NAME = "vimpo"

try:
    from verl.trainer.ppo import core_algos
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("vimpo.integrations.verl needs verl (tested: "
                      f"{', '.join(VERL_TESTED)}): see docs/integrations.md for the install") from exc

if not hasattr(core_algos, "register_policy_loss") or not hasattr(core_algos, "register_adv_est"):
    raise ImportError("vimpo.integrations.verl needs verl's register_policy_loss and register_adv_est "
                      f"(verl >= 0.5; tested: {', '.join(VERL_TESTED)})")


# -----------------------------------------------------------------------------------------
# Configuration
# -----------------------------------------------------------------------------------------

def _section(config: Any, name: str) -> dict:
    """`config.<name>` as a plain dict, for dicts, OmegaConf nodes and verl's dataclass configs."""
    if config is None:
        return {}
    value = config.get(name) if hasattr(config, "get") else getattr(config, name, None)
    if value is None:
        return {}
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(value):
            return dict(OmegaConf.to_container(value, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of VIMPOConfig fields, got {type(value).__name__}")
    return dict(value)


def _read(config: Any, name: str, default: Any = None) -> Any:
    if config is None:
        return default
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


_PROCESS_FIELDS: dict = {}


def set_vimpo_config(fields: Any) -> None:
    """Process-wide VIMPOConfig fields (a dict or a VIMPOConfig) for the `vimpo` loss.

    verl's dataclass `PolicyLossConfig` has no room for extra keys, so call this in each actor
    process (e.g. from the module named in VERL_USE_EXTERNAL_MODULES). A `policy_loss.vimpo`
    mapping in a dict/OmegaConf actor config, where present, overrides it field by field.
    """
    if isinstance(fields, VIMPOConfig):
        fields = {f.name: getattr(fields, f.name) for f in dataclasses.fields(fields) if f.name != "extra"}
    if not isinstance(fields, Mapping):
        raise TypeError(f"fields must be a mapping or a VIMPOConfig, got {type(fields).__name__}")
    VIMPOConfig(**fields)  # validate now, not at the first loss call
    _PROCESS_FIELDS.clear()
    _PROCESS_FIELDS.update(fields)


def vimpo_config_from_actor(config: Any, loss_agg_mode: str) -> VIMPOConfig:
    """VIMPOConfig for verl's actor config: `set_vimpo_config` fields, then `policy_loss.vimpo`;
    the PPO clip (clip_ratio[_low/_high], clip_ratio_c) and the aggregation are verl's own knobs."""
    fields = {**_PROCESS_FIELDS, **_section(_read(config, "policy_loss"), "vimpo")}
    owned_by_verl = sorted({"clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "loss_agg_mode"} & set(fields))
    if owned_by_verl:
        raise ValueError(f"VIMPO fields {owned_by_verl} are verl's actor knobs (actor.clip_ratio_low, ..., "
                         "actor.loss_agg_mode): set them there")
    clip = _read(config, "clip_ratio", 0.2)
    fields["clip_ratio_low"] = float(_read(config, "clip_ratio_low", clip))
    fields["clip_ratio_high"] = float(_read(config, "clip_ratio_high", clip))
    fields["clip_ratio_c"] = float(_read(config, "clip_ratio_c", 3.0))
    fields["loss_agg_mode"] = loss_agg_mode
    try:
        cfg = VIMPOConfig(**fields)
    except TypeError as exc:  # unknown field name
        raise ValueError(f"policy_loss.vimpo: {exc}") from None
    if cfg.algorithm != "vimpo" or cfg.value_type != "raw":
        raise ValueError("policy_loss.vimpo: only algorithm='vimpo' with value_type='raw' is served by this loss")
    if cfg.value_loss_normalized:
        raise ValueError("policy_loss.vimpo.value_loss_normalized=True needs the step-batch denominator D, which "
                         "verl's policy-loss signature does not carry; not supported yet")
    if cfg.adaptive_actor_coeff:
        raise ValueError("policy_loss.vimpo.adaptive_actor_coeff=True needs per-token logit-gradient norms; "
                         "not supported in the verl integration yet")
    return cfg


# -----------------------------------------------------------------------------------------
# Per-micro-batch side channel: what verl's policy-loss signature does not carry
# -----------------------------------------------------------------------------------------

_LOCAL = threading.local()


@contextlib.contextmanager
def token_stats_context(ref_log_prob: torch.Tensor, token_kl: Optional[torch.Tensor] = None) -> Iterator[None]:
    """Make this micro-batch's (B, T) reference log-probs and exact KL visible to the `vimpo`
    policy loss called inside the block (per thread; nests)."""
    previous = getattr(_LOCAL, "stats", None)
    _LOCAL.stats = (ref_log_prob, token_kl)
    try:
        yield
    finally:
        _LOCAL.stats = previous


def _current_token_stats(shape: torch.Size, config: VIMPOConfig) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    stats = getattr(_LOCAL, "stats", None)
    if stats is None:
        raise ValueError("the 'vimpo' policy loss needs the micro-batch's ref_log_prob and token_kl: call it inside "
                         "vimpo.integrations.verl.token_stats_context(ref_log_prob=..., token_kl=...)")
    ref_log_prob, token_kl = stats
    if ref_log_prob.shape != shape:
        raise ValueError(f"token_stats_context ref_log_prob has shape {tuple(ref_log_prob.shape)}, but log_prob "
                         f"has {tuple(shape)} (both must be in the padded response layout)")
    if config.needs_exact_kl:
        if token_kl is None:
            raise ValueError(f"kl_estimator={config.kl_estimator!r} needs token_kl in token_stats_context")
        if token_kl.shape != shape:
            raise ValueError(f"token_stats_context token_kl has shape {tuple(token_kl.shape)}, expected {tuple(shape)}")
    else:
        token_kl = None  # k2 / k3 are formed from the two log-probs
    return ref_log_prob, token_kl


# -----------------------------------------------------------------------------------------
# The registered functions (verl's exact signatures)
# -----------------------------------------------------------------------------------------

def compute_vimpo_target(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                         index: Optional[np.ndarray] = None, config: Any = None,
                         **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantage estimator `vimpo`: (advantages, returns), both y_i = R_i - b_i on every position.

    Args:
        token_level_rewards, response_mask: (bs, response_length).
        index: (bs,) prompt ids (verl's `uid`); None = each response its own group (target 0).
        config: verl's algorithm config; `config.vimpo.cap_v0` caps the baseline.
    """
    mask = response_mask.to(token_level_rewards.dtype)
    rewards = (token_level_rewards * mask).sum(-1)
    if index is None:
        group_ids = torch.arange(rewards.numel(), device=rewards.device)
    else:
        _, inverse = np.unique(np.asarray(index), return_inverse=True)
        group_ids = torch.as_tensor(inverse.reshape(-1), device=rewards.device)
    cap = {**_PROCESS_FIELDS, **_section(config, "vimpo")}.get("cap_v0")
    baseline = group_baseline(rewards, group_ids, None if cap is None else float(cap))
    target = (rewards - baseline)[:, None].expand_as(token_level_rewards).contiguous()
    return target, target.clone()


def compute_vimpo_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                              response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                              rollout_is_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """Policy loss `vimpo`: `vimpo_loss` of this micro-batch.

    `advantages` is the `vimpo` estimator's target y_i (read from the first position), passed as
    rewards with a zero baseline: target = R - b = y. `old_log_prob` gives the PPO ratio (pass
    `log_prob.detach()` on-policy, as verl does). verl's global batch info (dp_size,
    batch_num_tokens, global_batch_size) becomes our global token / sequence counts.
    """
    vimpo_cfg = vimpo_config_from_actor(config, loss_agg_mode)
    ref_log_prob, token_kl = _current_token_stats(log_prob.shape, vimpo_cfg)
    B = log_prob.shape[0]
    target = advantages[:, 0].to(log_prob.dtype) if advantages.dim() == 2 else advantages.to(log_prob.dtype)
    info = dict(_read(config, "global_batch_info", {}) or {})
    dp = float(info.get("dp_size") or 1)
    num_tokens = info.get("batch_num_tokens")
    num_sequences = info.get("global_batch_size")
    loss, metrics = vimpo_loss(
        log_prob, ref_log_prob, token_kl, response_mask, target, torch.arange(B, device=log_prob.device),
        old_logprobs=old_log_prob, rollout_is_weights=rollout_is_weights, config=vimpo_cfg,
        baseline=torch.zeros_like(target),
        num_tokens=None if num_tokens is None else float(num_tokens) / dp,
        num_sequences=None if num_sequences is None else float(num_sequences) / dp)
    return loss, {f"actor/vimpo/{k}": v.item() for k, v in metrics.items() if torch.is_tensor(v) and v.dim() == 0}


def register() -> None:
    """Put the `vimpo` loss and estimator into verl's registries (idempotent)."""
    if core_algos.POLICY_LOSS_REGISTRY.get(LOSS_NAME) is not compute_vimpo_policy_loss:
        core_algos.register_policy_loss(LOSS_NAME)(compute_vimpo_policy_loss)
    if core_algos.ADV_ESTIMATOR_REGISTRY.get(ADV_ESTIMATOR_NAME) is not compute_vimpo_target:
        core_algos.register_adv_est(ADV_ESTIMATOR_NAME)(compute_vimpo_target)


# -----------------------------------------------------------------------------------------
# Forward patch
# -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class VIMPOForwardOutput:
    """What the patched forward returns, per position of `input_ids` (the label of position t
    is token t+1, like verl's fused forward; the last position scores a rolled-in token and is
    meant to be dropped). `loss` is None: verl's fused path reads `log_probs` and `entropy`."""

    log_probs: torch.Tensor
    entropy: torch.Tensor
    ref_log_probs: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None

    def __getitem__(self, key: str) -> Any:  # verl indexes model outputs like a dict
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def patch_forward(model: torch.nn.Module, ref_model: Optional[torch.nn.Module] = None,
                  backend: str = "auto") -> None:
    """Replace `model.forward` by one returning `VIMPOForwardOutput` from our fused kernel
    (no logits): log-probs and entropy of the policy and, with a frozen `ref_model` (same
    tokenizer), the reference log-probs and the exact KL(pi || pi_ref) of every position.

    Same keywords as verl's fused forward (`input_ids`, `attention_mask`, `position_ids`,
    `temperature`, `labels` / `shift_labels`); the reference runs under no_grad on the same
    inputs. The model's `generate` is unaffected (it calls the class forward).
    """
    for name, module in (("model", model), ("ref_model", ref_model)):
        if module is not None and (not hasattr(module, "get_output_embeddings")
                                   or not hasattr(module, getattr(module, "base_model_prefix", ""))):
            raise TypeError(f"{name} must be a transformers causal LM (with get_output_embeddings and a backbone)")

    def forward(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, temperature: float = 1.0,
                labels: Optional[torch.Tensor] = None, shift_labels: Optional[torch.Tensor] = None,
                **_: Any) -> VIMPOForwardOutput:
        targets = _rolled_labels(input_ids, labels, shift_labels)
        hidden = _last_hidden(model, input_ids, attention_mask, position_ids)
        ref_hidden = ref_weight = ref_bias = None
        if ref_model is not None:
            with torch.no_grad():
                ref_hidden = _last_hidden(ref_model, input_ids, attention_mask, position_ids)
                ref_head = ref_model.get_output_embeddings()
                ref_weight, ref_bias = ref_head.weight, getattr(ref_head, "bias", None)
        head = model.get_output_embeddings()
        stats = fused_linear_logprobs(
            hidden, head.weight, targets, bias=getattr(head, "bias", None), ref_hidden=ref_hidden,
            ref_weight=ref_weight, ref_bias=ref_bias, temperature=float(temperature),
            kl="exact" if ref_model is not None else None, return_entropy=True, backend=backend)
        return VIMPOForwardOutput(log_probs=stats.logprobs, entropy=stats.entropy,
                                  ref_log_probs=stats.ref_logprobs, kl=stats.kl)

    model.forward = forward


def _rolled_labels(input_ids, labels, shift_labels) -> torch.Tensor:
    if shift_labels is not None:
        return shift_labels
    return torch.roll(labels if labels is not None else input_ids, shifts=-1, dims=-1)


def _last_hidden(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    backbone = getattr(model, model.base_model_prefix)
    return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False).last_hidden_state


register()
