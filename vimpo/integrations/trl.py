"""VIMPO, and our fused GRPO-family losses, inside TRL's `GRPOTrainer`.

    from vimpo.integrations.trl import VIMPOTrainer, VIMPOTRLConfig
    args = VIMPOTRLConfig(output_dir="out", vimpo={"beta": 5e-4, "actor_coeff": 5e-3})
    VIMPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds).train()

    from vimpo.integrations.trl import FusedGRPOTrainer      # a TRL GRPO user: same args,
    FusedGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), ...).train()

Both trainers keep TRL's generation (transformers or vLLM), reward functions, sampling,
gradient accumulation and logging, and replace only the loss: the per-token statistics come
from `fused_vimpo_loss` on the policy's (and the reference's) final hidden states and LM-head
weights, never from materialised logits. The fused call runs inside the model's forward and
inside the LM head's forward (forward redirection), so DDP's gradient hooks, FSDP's
unshard/reshard and DeepSpeed ZeRO-3's parameter gather fire around it exactly as around a
normal forward, in the forward and again in the backward.

Supported TRL: `TRL_SUPPORTED` below (tested: 1.16.0). Older releases scale the DAPO token
normaliser differently; importing this module with one of them raises ImportError.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from packaging.version import Version

from vimpo_kernels import ALGORITHMS, VIMPOConfig, fused_vimpo_loss
from vimpo_kernels._backends import BACKENDS
from vimpo_kernels.vimpo_loss import AdaptiveCoeffState, group_baseline

TRL_SUPPORTED = (">=1.10.0", "<2.0.0")
TRL_TESTED = ("1.16.0",)


def check_trl_version(version: str) -> None:
    """Raise ImportError unless `version` lies in `TRL_SUPPORTED`.

    1.10 is the first release whose DAPO normaliser (tokens of the accumulated batch, not of the
    whole generation batch) this module mirrors; 2.0 may move the hooks we override.
    """
    low, high = (Version(bound.lstrip("<>=")) for bound in TRL_SUPPORTED)
    if not low <= Version(version) < high:
        raise ImportError(
            f"vimpo.integrations.trl supports trl{TRL_SUPPORTED[0]},{TRL_SUPPORTED[1]} (tested with "
            f"{', '.join(TRL_TESTED)}), found trl {version}: pip install 'trl{TRL_SUPPORTED[0]},{TRL_SUPPORTED[1]}'")


try:
    import trl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("vimpo.integrations.trl needs TRL: pip install "
                      f"'trl{TRL_SUPPORTED[0]},{TRL_SUPPORTED[1]}' (or the `trl` extra of vimpo)") from exc
check_trl_version(trl.__version__)

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

# TRL 1.16 `loss_type` -> (our `loss_agg_mode`, TRL's normaliser). The normaliser says what
# `_loss_kwargs` passes and what the loss is divided by afterwards:
#   "global_tokens": valid tokens of the accumulation window (num_items_in_batch), no division;
#   "local_tokens":  valid tokens of the micro-batch, divided by the accumulation steps;
#   "rows":          every row of the micro-batch (also empty ones), divided by the accumulation steps.
_TRL_LOSS_TYPES = {
    "grpo": ("seq-mean-token-mean", "rows"),
    "bnpo": ("token-mean", "local_tokens"),
    "dr_grpo": ("seq-mean-token-sum-norm", "rows"),
    "dapo": ("token-mean", "global_tokens"),
    "cispo": ("token-mean", "global_tokens"),
    "sapo": ("seq-mean-token-mean", "rows"),
    "luspo": ("seq-mean-token-sum", "rows"),
    "vespo": ("token-mean", "global_tokens"),
}
# TRL's loss types whose policy term is PPO's clip on coef_1 (the others name their own term,
# which is the registry's `policy_loss` of the same name).
_TRL_PPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# TRL has no dual clip unless `delta` is set; a finite stand-in keeps VIMPOConfig's check
# (c > 1, finite). -A * c only wins the min for A < 0 and ratio > c, which never happens.
_NO_DUAL_CLIP = 1e30
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "num_images")


# -----------------------------------------------------------------------------------------
# Configuration
# -----------------------------------------------------------------------------------------

@dataclass
class VIMPOTRLConfig(GRPOConfig):
    """`GRPOConfig` plus the VIMPO loss configuration.

    `vimpo` holds the fields of `vimpo_kernels.VIMPOConfig` (a dict, a JSON string or a
    `VIMPOConfig`; stored as a plain dict so TRL can save and log the arguments). Its
    `temperature` is TRL's `temperature` (the rollout temperature). The PPO clip of VIMPO's
    actor is `vimpo["clip_ratio_low" / "clip_ratio_high" / "clip_ratio_c"]`; TRL's `epsilon`,
    `epsilon_high` and `loss_type` are not used, and TRL's `beta` (its k3 KL penalty) must stay 0:
    VIMPO's own beta is `vimpo["beta"]`.
    """

    vimpo: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "VIMPOConfig fields, e.g. {'beta': 5e-4, 'actor_coeff': 5e-3} (default: paper recipe)."})
    vimpo_backend: str = field(
        default="auto", metadata={"help": "Kernel backend: auto, triton, cuda, cpu or torch."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.vimpo = _vimpo_fields(self.vimpo, self.temperature)
        _check_backend_name("vimpo_backend", self.vimpo_backend)

    @property
    def vimpo_config(self) -> VIMPOConfig:
        return VIMPOConfig(**self.vimpo)


def _vimpo_fields(value: Any, temperature: float) -> dict:
    """The `vimpo` argument as a validated dict of VIMPOConfig fields, temperature from TRL."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"vimpo: not valid JSON ({exc})") from None
    if isinstance(value, VIMPOConfig):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.name != "extra"}
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(f"vimpo must be a dict, a JSON string or a VIMPOConfig, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(VIMPOConfig)} - {"extra"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"vimpo: unknown VIMPOConfig field(s) {unknown}; known: {sorted(known)}")
    if "temperature" in value and value["temperature"] != temperature:
        raise ValueError(f"vimpo['temperature']={value['temperature']} differs from temperature={temperature}: "
                         "both models' logits are divided by the rollout temperature; set only `temperature`")
    config = VIMPOConfig(**{**value, "temperature": float(temperature)})  # validates every value
    if config.algorithm != "vimpo":
        raise ValueError(f"vimpo['algorithm']={config.algorithm!r}: VIMPOTrainer trains VIMPO; for TRL's GRPO "
                         "family on the fused kernels use FusedGRPOTrainer with a GRPOConfig")
    if config.value_type != "raw":
        raise ValueError("vimpo['value_type']='soft' needs the old policy's KL, which this integration does not "
                         "compute yet; use value_type='raw'")
    return {f: getattr(config, f) for f in sorted(known)}


def _check_backend_name(name: str, backend: str) -> None:
    choices = ("auto", *BACKENDS)
    if backend not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {backend!r}")


def grpo_family_config(args: GRPOConfig) -> VIMPOConfig:
    """Our `VIMPOConfig` that reproduces TRL's loss for `args`: the registry algorithm with TRL's
    policy term (`trl_algorithm`), TRL's aggregation for its `loss_type`, and TRL's options under
    our names (docs/algorithms.md, "TRL's `GRPOConfig` on this engine").

    TRL's `delta` (two-sided clip) equals our dual clip c: for A < 0 both cap the loss at
    -A*delta, for A > 0 the upper PPO clip already binds first. TRL applies `delta` to the
    PPO-clip loss types only, and so do we.
    """
    _check_grpo_family_args(args)
    name = trl_algorithm(args.loss_type, args.importance_sampling_level)
    agg, _ = _TRL_LOSS_TYPES[args.loss_type]
    return VIMPOConfig.for_algorithm(
        name, loss_agg_mode=agg,
        loss_agg_norm_len=args.max_completion_length if args.loss_type == "dr_grpo" else None,
        kl_loss_coeff=float(args.beta), temperature=float(args.temperature), **_family_knobs(args),
        **_clip_fields(args))


def trl_algorithm(loss_type: str, importance_sampling_level: str = "token") -> str:
    """The registry algorithm whose policy term is TRL's for (`loss_type`,
    `importance_sampling_level`): the one with TRL's policy loss (PPO clip for grpo, bnpo,
    dr_grpo, dapo, luspo) at that ratio level, named like the loss type when one is (e.g. `dapo`,
    `luspo`), else the registry's first (`grpo` per token, `gspo` per sequence). Aggregation and
    clip band are set by `grpo_family_config`, so only the policy term matters here.
    Raises ValueError naming the option when the registry has no such algorithm."""
    if loss_type not in _TRL_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not available on the fused loss; use one of "
                         f"{sorted(_TRL_LOSS_TYPES)}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}: use 'token' or 'sequence'")
    policy = "ppo_clip" if loss_type in _TRL_PPO_LOSS_TYPES else loss_type
    # TRL's VESPO builds its own sequence weight from the token log-ratios whatever the level
    # (the level's ratio feeds only its KL bias correction, which we refuse): same loss.
    level = "token" if loss_type == "vespo" else importance_sampling_level
    names = [a.name for a in ALGORITHMS.values()
             if a.policy_loss == policy and a.ratio_level == level and a.advantages_suffice]
    if not names:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r} with loss_type={loss_type!r}: "
                         f"the fused loss has no {loss_type} on a {level}-level ratio; use "
                         "importance_sampling_level='token'")
    return loss_type if loss_type in names else names[0]


# TRL's SAPO / VESPO options, named as our fields.
_FAMILY_KNOBS = ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                 "vespo_lambda_neg")


def _family_knobs(args: GRPOConfig) -> dict:
    """The SAPO / VESPO options `args` has: releases before those loss types (1.10 is supported
    for grpo/bnpo/dr_grpo/dapo) lack the fields, and then the presets' values stay, unused."""
    return {name: float(getattr(args, name)) for name in _FAMILY_KNOBS if hasattr(args, name)}


def _clip_fields(args: GRPOConfig) -> dict:
    """TRL's `epsilon`, `epsilon_high` and `delta` as our clip fields, for the loss types that
    read them (SAPO and VESPO read none: the preset's values stay, unused)."""
    low = float(args.epsilon)
    high = float(args.epsilon_high) if args.epsilon_high is not None else low  # TRL's default
    if args.loss_type == "cispo":
        # TRL caps the detached weight at epsilon_high itself (no lower bound); our band is
        # [1 - clip_ratio_low, 1 + clip_ratio_high], so the cap is 1 + clip_ratio_high with the
        # lower bound at 0.
        if high < 1.0:
            raise ValueError(f"epsilon_high={high} with loss_type='cispo' caps every importance weight below 1 "
                             "(TRL's default epsilon_high=None takes epsilon); the fused CISPO needs a cap >= 1: "
                             "set epsilon_high (TRL's docs recommend 5.0)")
        return {"clip_ratio_low": 1.0, "clip_ratio_high": high - 1.0}
    if args.loss_type not in _TRL_PPO_LOSS_TYPES:
        return {}
    if not 0.0 <= low <= 1.0:
        raise ValueError(f"epsilon={low}: the lower clip 1 - epsilon must lie in [0, 1]")
    if high < 0.0:
        raise ValueError(f"epsilon_high={high}: must be >= 0")
    if args.delta is not None and not args.delta > 1.0:
        raise ValueError(f"delta={args.delta}: the two-sided clip must be > 1 (our dual clip c > 1)")
    return {"clip_ratio_low": low, "clip_ratio_high": high,
            "clip_ratio_c": float(args.delta) if args.delta is not None else _NO_DUAL_CLIP}


# -----------------------------------------------------------------------------------------
# What the fused path does not cover (fail before training, naming the argument)
# -----------------------------------------------------------------------------------------

def _check_common_args(args: GRPOConfig) -> None:
    unsupported = {
        "top_entropy_quantile": (getattr(args, "top_entropy_quantile", 1.0) < 1.0, "entropy masking needs "
                                 "per-token entropy in the loss, not supported yet; use 1.0"),
        "off_policy_mask_threshold": (getattr(args, "off_policy_mask_threshold", None) is not None,
                                      "off-policy sequence masking is not supported yet; use None"),
        "entropy_coef": (getattr(args, "entropy_coef", 0.0) != 0.0 or getattr(args, "use_adaptive_entropy", False),
                         "the entropy bonus is not supported yet; use 0.0 (and use_adaptive_entropy=False)"),
        "use_bias_correction_kl": (args.beta != 0.0 and getattr(args, "use_bias_correction_kl", False),
                                   "importance-weighting TRL's KL penalty is not supported yet; use False"),
        "use_liger_kernel": (getattr(args, "use_liger_kernel", False), "the loss already runs on fused kernels; "
                             "use False"),
    }
    for name, (bad, why) in unsupported.items():
        if bad:
            raise ValueError(f"{name}={getattr(args, name)!r}: {why}")


def _check_grpo_family_args(args: GRPOConfig) -> None:
    _check_common_args(args)
    trl_algorithm(args.loss_type, args.importance_sampling_level)  # raises for what we do not implement


def _check_vimpo_args(args: Any) -> None:
    if not isinstance(args, VIMPOTRLConfig):
        raise TypeError(f"args must be a VIMPOTRLConfig, got {type(args).__name__}")
    if args.beta != 0.0:
        raise ValueError(f"beta={args.beta}: TRL's k3 KL penalty is not part of VIMPO (its KL enters through "
                         "vimpo['beta'] and the exact KL); set beta=0.0")
    if args.delta is not None:
        raise ValueError("delta: VIMPO's dual clip is vimpo['clip_ratio_c']; leave delta=None")
    if args.importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level={args.importance_sampling_level!r}: VIMPO's actor ratio is "
                         "per token; use 'token'")
    _check_common_args(args)


def _check_model(trainer: GRPOTrainer, peft_config: Any) -> None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    if peft_config is not None or hasattr(model, "peft_config"):
        raise ValueError("peft_config / PEFT models are not supported by the fused trainers yet")
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError("router_aux_loss_coef: MoE load-balancing loss is not supported by the fused trainers yet; "
                         "set router_aux_loss_coef=0.0")
    text_config = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling"):
        value = getattr(text_config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(f"model config {name}={value}: the fused kernels compute hidden @ weight.T / "
                             "temperature only; scaled or soft-capped logits are not supported yet")


# -----------------------------------------------------------------------------------------
# Forward redirection
# -----------------------------------------------------------------------------------------

def call_inside_forward(wrapper: torch.nn.Module, inner: torch.nn.Module, fn: Callable, *args: Any) -> Any:
    """Run `fn(*args)` as `inner`'s forward, entered through `wrapper(*args)`.

    `wrapper` is `inner` itself or a module wrapping it (DDP, FSDP, a DeepSpeed engine). Going
    through `wrapper.__call__` fires its forward hooks, and the hooks they register on the
    outputs fire in the backward: DDP's prepare_for_backward, FSDP's unshard/reshard, ZeRO-3's
    gather of `inner`'s parameters. A direct call of `fn` would see sharded (empty) weights.
    """
    had_own_forward = "forward" in inner.__dict__  # e.g. TRL's fused-head patch
    own_forward = inner.__dict__.get("forward")

    def restore() -> None:
        if had_own_forward:
            inner.forward = own_forward
        else:
            inner.__dict__.pop("forward", None)

    def redirected(*inner_args: Any) -> Any:
        restore()  # fn may call the real forward
        return fn(*inner_args)

    inner.forward = redirected
    try:
        return wrapper(*args)
    finally:
        restore()


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _completion_hidden(causal_lm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       n_completion: int) -> torch.Tensor:
    """(B, T, H) final hidden states scoring the T completion tokens (position t-1 scores t)."""
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return hidden[:, -n_completion - 1:-1]


def _head_params(head: torch.nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The LM head's weight and bias as plain tensors (FSDP2 keeps DTensor shards: gather them,
    differentiably, so the backward reduce-scatters the gradient)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return weight, bias


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


# -----------------------------------------------------------------------------------------
# Trainers
# -----------------------------------------------------------------------------------------

class FusedGRPOTrainer(GRPOTrainer):
    """TRL's `GRPOTrainer` whose loss (every TRL 1.16 `loss_type`: grpo, bnpo, dr_grpo, dapo,
    cispo, sapo, luspo, vespo; `importance_sampling_level` "token", or "sequence" for the PPO-clip
    types, i.e. GSPO, and for vespo, whose loss does not read it) runs on `fused_vimpo_loss` from
    the final hidden states and the LM head: same arguments, same advantages, clipping, KL
    penalty, normalisation, gradient accumulation and vLLM importance weights as TRL, without the
    logits. `vimpo_backend` picks the kernel backend; `grpo_family_config(args)` is the
    `VIMPOConfig` it uses.
    """

    def __init__(self, *args: Any, vimpo_backend: str = "auto", **kwargs: Any) -> None:
        _check_backend_name("vimpo_backend", vimpo_backend)
        if kwargs.get("peft_config") is not None:
            raise ValueError("peft_config: PEFT models are not supported by the fused trainers yet")
        super().__init__(*args, **kwargs)
        self._vimpo_backend = getattr(self.args, "vimpo_backend", vimpo_backend)
        self._setup_loss_config()
        _check_model(self, kwargs.get("peft_config"))

    def _setup_loss_config(self) -> None:
        self._loss_config = grpo_family_config(self.args)

    # ---- the loss ---------------------------------------------------------------------
    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        present = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
        if present:
            raise ValueError(f"inputs carry {present}: multimodal models are not supported by the fused trainers yet")
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        if inputs.get("tool_mask") is not None:
            mask = mask * inputs["tool_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        rewards, group_ids = self._outcome_inputs(inputs)
        loss_kwargs, divisor = self._loss_kwargs(inputs, mask, mode)
        loss_kwargs.update(self._reference_inputs(inputs, input_ids, attention_mask))
        unwrapped = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            loss, metrics = call_inside_forward(
                model, unwrapped, self._fused_loss_in_forward, input_ids, attention_mask,
                inputs["completion_ids"], mask, rewards, group_ids, loss_kwargs)
        self._log_loss_metrics(metrics, mode)
        return loss / divisor

    def _fused_loss_in_forward(self, input_ids, attention_mask, targets, mask, rewards, group_ids, loss_kwargs):
        causal_lm = _causal_lm(self.accelerator.unwrap_model(self.model))
        hidden = _completion_hidden(causal_lm, input_ids, attention_mask, targets.size(1))
        head = causal_lm.get_output_embeddings()

        def head_forward(h):
            weight, bias = _head_params(head)
            # The kernels accumulate in fp32 themselves; under autocast the torch reference's
            # matmul would be cast back down to bf16.
            with torch.autocast(h.device.type, enabled=False):
                return fused_vimpo_loss(h.to(weight.dtype), weight, targets, mask, rewards, group_ids, bias=bias,
                                        config=self._loss_config, backend=self._vimpo_backend, **loss_kwargs)

        return call_inside_forward(head, head, head_forward, hidden)

    def _outcome_inputs(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Placeholders: TRL's advantages are passed, so rewards and groups are not read."""
        rows, device = inputs["prompt_ids"].size(0), inputs["prompt_ids"].device
        return torch.zeros(rows, device=device), torch.arange(rows, device=device)

    def _reference_inputs(self, inputs, input_ids, attention_mask) -> dict[str, Any]:
        """TRL's reference log-probs (computed at generation) when its KL penalty is on."""
        if self._loss_config.kl_loss_coeff > 0:
            return {"ref_logprobs": inputs["ref_per_token_logps"]}
        return {}

    def _loss_kwargs(self, inputs, mask, mode) -> tuple[dict[str, Any], float]:
        """Per-call loss arguments, and what TRL divides the loss by afterwards (accumulation)."""
        kwargs: dict[str, Any] = {"advantages": inputs["advantages"], **self._policy_ratio_inputs(inputs, mask)}
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        _, normaliser = _TRL_LOSS_TYPES[self.args.loss_type]
        if normaliser == "global_tokens":
            # TRL (dapo, cispo, vespo): tokens of the accumulation window of this process
            # (num_items_in_batch spans the generation batch of all processes), no further division.
            n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return {**kwargs, "num_tokens": n}, 1
        if normaliser == "local_tokens":
            return {**kwargs, "num_tokens": mask.sum().clamp(min=1.0)}, accumulation
        # grpo, sapo, dr_grpo, luspo: TRL averages over every row, also rows whose mask is empty.
        return {**kwargs, "num_sequences": float(mask.size(0))}, accumulation

    def _policy_ratio_inputs(self, inputs, mask) -> dict[str, Any]:
        out: dict[str, Any] = {"old_logprobs": inputs.get("old_per_token_logps")}
        if self.use_vllm and self.vllm_importance_sampling_correction and inputs.get("importance_sampling_ratio") \
                is not None:
            out["rollout_is_weights"] = inputs["importance_sampling_ratio"].expand_as(mask).to(torch.float32)
        return out

    def _log_loss_metrics(self, metrics: dict[str, torch.Tensor], mode: str) -> None:
        names = sorted(k for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.dim() == 0)
        if not names:
            return
        # One gather for all scalars; every rank has the same names in the same order.
        local = torch.stack([metrics[k].detach().float() for k in names]).to(self.accelerator.device)
        means = self.accelerator.gather(local).view(-1, len(names)).nanmean(dim=0).tolist()
        for name, value in zip(names, means):
            self._metrics[mode][f"vimpo/{name}"].append(value)


class VIMPOTrainer(FusedGRPOTrainer):
    """TRL's `GRPOTrainer` training with the VIMPO loss (`args`: a `VIMPOTRLConfig`).

    Per step, on the whole generation batch (all processes, before TRL shuffles and splits it):
    the outcome reward R_i (the weighted sum of the reward functions), the prompt group (TRL's
    `num_generations` consecutive completions), the group baseline b_i and the value-loss
    denominator D. Per micro-batch: the policy and reference hidden states go through
    `fused_vimpo_loss` (exact KL over the vocabulary, no logits), and the loss is divided by the
    accumulation steps like TRL's `grpo` loss type. Whitening is pooled over all processes.
    """

    def __init__(self, model: Any, reward_funcs: Any = None, args: Optional[VIMPOTRLConfig] = None,
                 *rest: Any, **kwargs: Any) -> None:
        _check_vimpo_args(args)
        if not isinstance(model, str) and not getattr(getattr(model, "config", None), "_name_or_path", ""):
            raise ValueError("model: TRL builds the reference model from model.config._name_or_path, which is "
                             "empty for a model built in memory; save_pretrained() it and pass the path")
        with _reference_model_requested(args):
            super().__init__(model, reward_funcs, args, *rest, vimpo_backend=args.vimpo_backend, **kwargs)
        self.beta = 0.0  # TRL's own reference log-probs and k3 penalty stay off
        if self.ref_model is None:  # pragma: no cover - guarded by _check_model (PEFT)
            raise ValueError("VIMPOTrainer needs a reference model")
        self._adaptive_state = AdaptiveCoeffState()
        self._last_rewards_per_func: Optional[torch.Tensor] = None

    def _setup_loss_config(self) -> None:
        self._loss_config = self.args.vimpo_config

    # ---- per-step outcome fields ------------------------------------------------------
    def _calculate_rewards(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        self._last_rewards_per_func = rewards_per_func  # gathered over processes: the whole step batch
        return rewards_per_func

    def _generate_and_score_completions(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        output = super()._generate_and_score_completions(*args, **kwargs)
        mode = "train" if self.model.training else "eval"
        output.update(self._outcome_fields(self._last_rewards_per_func, output["prompt_ids"].size(0), mode))
        return output

    def _outcome_fields(self, rewards_per_func: torch.Tensor, local_rows: int, mode: str) -> dict[str, torch.Tensor]:
        """R, group id, baseline (per row, this process's slice) and D (a 0-d tensor, which TRL's
        shuffle and split pass through unchanged)."""
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        if unscorable.any():
            raise ValueError(f"{int(unscorable.sum())} completion(s) got None from every reward function: VIMPO "
                             "needs an outcome reward for every completion")
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = torch.arange(rewards.numel(), device=rewards.device) // group_size
        baseline = group_baseline(rewards, group_ids, self._loss_config.cap_v0)
        # D in float32 over the whole batch, like the reference trainer.
        denom = (rewards.float() - baseline.float()).pow(2).mean()
        rows = slice(self.accelerator.process_index * local_rows, (self.accelerator.process_index + 1) * local_rows)
        return {"vimpo_rewards": rewards[rows], "vimpo_group_ids": group_ids[rows],
                "vimpo_baseline": baseline[rows], "vimpo_value_norm_denom": denom}

    # ---- the loss ---------------------------------------------------------------------
    def _outcome_inputs(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs["vimpo_rewards"], inputs["vimpo_group_ids"]

    def _reference_inputs(self, inputs, input_ids, attention_mask) -> dict[str, Any]:
        ref_hidden, ref_weight, ref_bias = self._reference_hidden_and_head(input_ids, attention_mask,
                                                                           inputs["completion_ids"].size(1))
        return {"ref_hidden": ref_hidden.to(ref_weight.dtype), "ref_weight": ref_weight, "ref_bias": ref_bias}

    @torch.no_grad()
    def _reference_hidden_and_head(self, input_ids, attention_mask, n_completion):
        ref_wrapper = self.ref_model
        ref = self.accelerator.unwrap_model(ref_wrapper)

        def forward(ids, am):
            causal_lm = _causal_lm(ref)
            with self.accelerator.autocast():
                hidden = _completion_hidden(causal_lm, ids, am, n_completion)
            head = causal_lm.get_output_embeddings()
            weight, bias = call_inside_forward(head, head, lambda _h: _head_params(head), hidden)
            if _zero3_enabled():
                # ZeRO-3 re-partitions the head when its forward returns: keep a full copy.
                weight, bias = weight.clone(), (bias.clone() if bias is not None else None)
            return hidden, weight, bias

        return call_inside_forward(ref_wrapper, ref, forward, input_ids, attention_mask)

    def _loss_kwargs(self, inputs, mask, mode) -> tuple[dict[str, Any], float]:
        config = self._loss_config
        kwargs: dict[str, Any] = {"baseline": inputs["vimpo_baseline"], **self._policy_ratio_inputs(inputs, mask)}
        if config.value_loss_normalized:
            kwargs["value_norm_denom"] = float(inputs["vimpo_value_norm_denom"])
        if config.adaptive_actor_coeff:
            kwargs["adaptive_state"] = self._adaptive_state
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            kwargs["process_group"] = torch.distributed.group.WORLD
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        return kwargs, accumulation


@contextmanager
def _reference_model_requested(args: GRPOConfig):
    """TRL builds, prepares (DeepSpeed/FSDP/accelerate) and syncs a reference model only when
    its KL coefficient is non-zero; VIMPO always needs one but not TRL's penalty. Raise the
    coefficient while TRL constructs itself, then restore it."""
    saved = args.beta
    args.beta = 1.0
    try:
        yield
    finally:
        args.beta = saved
