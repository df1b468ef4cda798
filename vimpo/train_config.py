"""Trainer configuration: plain dataclasses, a safe-loaded YAML file, `key=value` overrides.

Every section is a dataclass; the YAML mirrors it (`train: {steps: 10}`), and an override
names a dotted path (`train.steps=10`, `algorithm.loss.beta=0.01`). Values of overrides are
parsed with `yaml.safe_load`, so `true`, `3e-4`, `null` and `[0.9, 0.99]` mean what they look
like. Unknown keys, wrong types and impossible values raise `ConfigError` (a ValueError) that
names the key, before anything is loaded or trained.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from vimpo_kernels import ALGORITHMS, VIMPOConfig

from .rewards import CORRECTIONS, check_noise_rates

ROLLOUT_BACKENDS = ("hf", "vllm", "vllm-cpu")
OLD_LOGPROB_SOURCES = ("recompute", "rollout")
DTYPES = ("float32", "bfloat16", "float16")
TOY_TASKS = ("addition", "carry")
RECIPES = ("default", "paper")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


@dataclass
class ModelConfig:
    name_or_path: str = "toy"
    """`toy` (the embedded tiny model), a local directory, or a hub name (AutoModelForCausalLM)."""
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    """`sdpa`, `eager`, or `flash_attention_2` (GPU with flash-attn installed)."""
    trust_remote_code: bool = False
    use_chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template (instruct models)."""
    # The embedded toy model (ignored for real models). head_dim = hidden/heads = 32 keeps it
    # loadable by vLLM, which rejects smaller heads on CPU.
    toy_hidden_size: int = 128
    toy_layers: int = 2
    toy_heads: int = 4


@dataclass
class DataConfig:
    train: str = "toy"
    """`toy`, a local .jsonl/.parquet file, or a `datasets` name (`name` or `name:config`)."""
    eval: Optional[str] = None
    """Held-out prompts (same forms as `train`); None = a split of `train` (toy: its own held-out pairs)."""
    train_split: str = "train"
    eval_split: str = "test"
    eval_fraction: float = 0.1
    """Fraction of `train` held out for evaluation when `eval` is None and `train` is a file."""
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    max_prompt_length: int = 512
    """Prompts longer than this (in tokens) are an error, reported with the record index."""
    toy_task: str = "addition"
    """`addition` (a+b=, 3-4 token answers) or `carry` (written-out column addition, 28-31
    token answers); see vimpo/toy.py."""
    toy_max_operand: int = 99
    """Largest operand of the `addition` task."""
    toy_eval_size: int = 500
    toy_teacher_error: float = 0.0
    """Share of toy training pairs whose warm-start demonstration is off by one (see toy.py)."""


@dataclass
class RolloutConfig:
    backend: str = "hf"
    n: int = 8
    """Samples per prompt (the group size)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    eval_max_new_tokens: Optional[int] = None
    """None = max_new_tokens. Evaluation decodes greedily."""
    old_logprobs: str = "recompute"
    """Behaviour log-probs when the update is off-policy: `recompute` by the trainer before the
    update, or `rollout`: the sampler's own (vLLM), corrected by the PPO ratio and, with
    `is_cap`, truncated importance weights exp(trainer - sampler) capped at `is_cap`."""
    is_cap: Optional[float] = None
    vllm_gpu_memory_utilization: float = 0.3
    """Share of GPU memory for vLLM's KV cache (with `vllm-cpu`: of host memory; use ~0.1)."""
    vllm_max_model_len: Optional[int] = None


@dataclass
class RewardConfig:
    fn: str = "toy"
    """`toy` (exact match), `math` (math-verify, \\boxed{} answers) or `module:function`
    taking (prompts, completions, answers) and returning floats in [0, 1]."""
    error_value: float = 0.0
    """Reward of a sample whose reward function raised, timed out, or returned NaN / a value
    outside [0, 1]. Such samples are counted in the `reward_errors` metric."""
    timeout_s: float = 5.0
    """Per-sample time limit of the math verifier."""
    noise_flip_prob: float = 0.0
    """Robustness studies: flip each group's 0/1 rewards with this probability (training only)."""
    noise_seed: int = 0
    noise_fp_rate: float = 0.0
    """Robustness studies: a noisy verifier. Each 0/1 training reward 0 becomes 1 with this
    probability (false positive, rho0), seeded by `noise_seed`; logged rewards and evaluation
    stay clean (docs/math.md, "Noisy-verifier corrections")."""
    noise_fn_rate: float = 0.0
    """Each 0/1 training reward 1 becomes 0 with this probability (false negative, rho1)."""
    correction: str = "none"
    """`none`, `backward` (R^ = (R~ - rho0) / (1 - rho0 - rho1) replaces the reward before the group
    baseline / advantages) or `forward` (w(R~) = R~ + rho1 - 1 is each sample's score-function
    weight: the advantage, or VIMPO's target, with no group centring); docs/trainer.md, "Rewards"."""
    correction_fp_rate: float = 0.0
    """The false-positive rate rho0 the correction assumes (`backward` only)."""
    correction_fn_rate: Union[float, str] = 0.0
    """The false-negative rate rho1 the correction assumes, or `auto`: estimated online from
    appeals to `appeal_fn` (the paper's Eqs. (10)-(12); docs/math.md, "Noisy-verifier
    corrections"), refreshed every step."""
    appeal_fn: Optional[str] = None
    """The re-check function of the appeals (same forms as `fn`: `toy`, `math` or
    `module:function`): a second, more careful checker that re-scores a random share of the
    training rewards' negatives; the ones it accepts count as false negatives. When set, the
    appeals run and their estimate is logged (`fn_rate_estimate`) every step; it is used as
    rho1 only under `correction_fn_rate: auto`. 0/1 training rewards only."""
    appeal_prob: float = 0.1
    """q: the probability that a training reward 0 is appealed (the paper's default 0.1)."""
    appeal_ema_decay: float = 0.9
    """lambda of the estimate's exponential moving average over steps (the paper's 0.9)."""


@dataclass
class AlgorithmConfig:
    name: str = "vimpo"
    recipe: str = "default"
    """VIMPO only. `default`: beta = `beta_per_sequence` / (mean response length of the first
    step's rollouts) and the adaptive actor coefficient (see docs/trainer.md, "Defaults");
    `paper`: the paper's recipe verbatim (`VIMPOConfig()`: beta 5e-4, fixed c_A 5e-3), sized
    for ~2000-token responses. Either way `loss` overrides win."""
    beta_per_sequence: float = 1.0
    """The `default` recipe's beta x (mean response length): the implicit value
    beta * sum(log-ratio) can reach an O(1) target with an O(1) log-ratio per token, whatever
    the response length. The paper's 5e-4 over ~2000 tokens is about 1."""
    loss: dict = field(default_factory=dict)
    """Overrides of `vimpo_kernels.VIMPOConfig` fields (beta, actor_coeff, clip_ratio_high, ...)."""
    backend: str = "auto"
    """Kernel backend of `fused_vimpo_loss`."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 32
    micro_batch_size: int = 64
    """Responses per forward/backward; gradients accumulate over the step's mini-batch."""
    mini_batches: int = 1
    """Optimizer steps per training step; > 1 (or ppo_epochs > 1) makes the update off-policy."""
    ppo_epochs: int = 1
    seed: int = 0
    eval_every: int = 10
    eval_prompts: Optional[int] = None
    """Evaluate on the first N held-out prompts (None = all)."""
    output_dir: str = "runs/default"
    checkpoint_every: int = 25
    keep_last: int = 2
    resume: bool = False
    progress: bool = True
    stop_on_collapse: bool = False
    """Stop with exit status 3 when the collapse monitor fires (vimpo/monitor.py), keeping
    the checkpoints written before it; otherwise it warns once and training goes on."""
    collapse_kl_per_token: float = 1.0
    """The monitor's limit on the KL to the reference per token (nats)."""
    cpu_threads: Optional[int] = None
    """torch intra-op threads on CPU (None = torch's default). Tiny models run fastest on 1:
    thread synchronisation costs more than their matrix products."""


@dataclass
class SFTConfig:
    """Supervised warm start on (prompt, answer) pairs, run before RL when steps > 0."""

    steps: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def loss_config(self, beta: Optional[float] = None) -> VIMPOConfig:
        """The `VIMPOConfig` of the loss; sampling temperature is shared with the rollout.

        `beta`: the `default` recipe's length-scaled beta once the trainer has measured the
        response length (before that, and under `paper`, the paper's)."""
        overrides: dict[str, Any] = {"temperature": self.rollout.temperature}
        if self.algorithm.name == "vimpo" and self.algorithm.recipe == "default":
            overrides.update(DEFAULT_RECIPE)
            if beta is not None:
                overrides["beta"] = beta
        overrides.update(self.algorithm.loss)
        return VIMPOConfig.for_algorithm(self.algorithm.name, **overrides)

    @property
    def length_scaled_beta(self) -> bool:
        """Whether the trainer sets beta from the first step's response length."""
        return (self.algorithm.name == "vimpo" and self.algorithm.recipe == "default"
                and "beta" not in self.algorithm.loss)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What the `default` recipe changes in `VIMPOConfig()` (the paper's recipe), besides beta.
DEFAULT_RECIPE: dict[str, Any] = {"adaptive_actor_coeff": True}

# The embedded default: the task of docs/study.md where VIMPO's advantage shows within a few
# minutes on 2 CPU cores. Written-out column addition (`carry`, 28-31 token answers where one
# wrong carry token spoils the answer), a warm start imitating a sloppy teacher who forgets
# every carry on 60% of the pairs, then 30 steps of VIMPO with its default recipe (beta scaled
# by the response length, adaptive actor coefficient; no hand-set coefficient) on an exact
# verifier whose group rewards are flipped with probability 0.2 (the authors' noise rule; the
# held-out evaluation is clean). In the study's grid, from the same warm starts, GRPO-family
# runs lose much of their lift at this noise level and VIMPO keeps it (docs/study.md).
# `configs/addition.yaml` is the previous default (two-number addition, clean rewards).
DEFAULT_TOY = {
    "model": {"name_or_path": "toy"},
    "data": {"train": "toy", "toy_task": "carry", "toy_teacher_error": 0.6, "max_prompt_length": 16,
             "toy_eval_size": 200},
    "rollout": {"n": 8, "max_new_tokens": 40},
    "reward": {"fn": "toy", "noise_flip_prob": 0.2, "noise_seed": 0},
    "algorithm": {"name": "vimpo", "recipe": "default"},
    "optim": {"lr": 1e-4, "warmup_steps": 5, "weight_decay": 0.0},
    "train": {"steps": 30, "prompts_per_step": 16, "micro_batch_size": 128, "eval_every": 5,
              "checkpoint_every": 10, "output_dir": "runs/toy", "cpu_threads": 1},
    "sft": {"steps": 300, "batch_size": 128, "lr": 2e-3},
}


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Config from the embedded default (no path) or a YAML file, then `key=value` overrides."""
    if path is None:
        raw: dict = _deep_copy(DEFAULT_TOY)
    else:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def validate(cfg: Config) -> None:
    """Cross-field and range checks; every message names the key."""
    _choice("algorithm.name", cfg.algorithm.name, tuple(ALGORITHMS))
    _choice("rollout.backend", cfg.rollout.backend, ROLLOUT_BACKENDS)
    _choice("rollout.old_logprobs", cfg.rollout.old_logprobs, OLD_LOGPROB_SOURCES)
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("data.toy_task", cfg.data.toy_task, TOY_TASKS)
    for key in ("train.steps", "train.prompts_per_step", "train.micro_batch_size", "train.mini_batches",
                "train.ppo_epochs", "train.eval_every", "train.checkpoint_every", "train.keep_last",
                "rollout.n", "rollout.max_new_tokens", "data.max_prompt_length", "model.toy_hidden_size",
                "model.toy_layers", "model.toy_heads", "sft.batch_size"):
        _positive(key, _get(cfg, key), allow_zero=key == "train.steps")
    _positive("sft.steps", cfg.sft.steps, allow_zero=True)
    _positive("optim.warmup_steps", cfg.optim.warmup_steps, allow_zero=True)
    _positive("sft.warmup_steps", cfg.sft.warmup_steps, allow_zero=True)
    for key in ("optim.lr", "sft.lr", "rollout.temperature"):
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key} must be > 0, got {_get(cfg, key)!r}")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p must lie in (0, 1], got {cfg.rollout.top_p!r}")
    if not 0 <= cfg.reward.noise_flip_prob <= 1:
        raise ConfigError(f"reward.noise_flip_prob must lie in [0, 1], got {cfg.reward.noise_flip_prob!r}")
    _noise_rates("reward.noise_fp_rate", "reward.noise_fn_rate", cfg.reward.noise_fp_rate, cfg.reward.noise_fn_rate)
    _choice("reward.correction", cfg.reward.correction, CORRECTIONS)
    _correction_rates(cfg.reward)
    if not 0 <= cfg.reward.error_value <= 1:
        raise ConfigError(f"reward.error_value must lie in [0, 1], got {cfg.reward.error_value!r}")
    if not 0 < cfg.data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must lie in (0, 1), got {cfg.data.eval_fraction!r}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas!r}")
    if cfg.rollout.is_cap is not None and not cfg.rollout.is_cap > 0:
        raise ConfigError(f"rollout.is_cap must be > 0 or null, got {cfg.rollout.is_cap!r}")
    if cfg.model.toy_hidden_size % cfg.model.toy_heads:
        raise ConfigError("model.toy_hidden_size must be a multiple of model.toy_heads")
    responses = cfg.train.prompts_per_step * cfg.rollout.n
    if responses % cfg.train.mini_batches:
        raise ConfigError(f"train.mini_batches={cfg.train.mini_batches} must divide the step's "
                          f"{responses} responses (train.prompts_per_step x rollout.n)")
    if ":" in cfg.reward.fn and cfg.reward.fn.count(":") != 1:
        raise ConfigError(f"reward.fn must be 'toy', 'math' or 'module:function', got {cfg.reward.fn!r}")
    if cfg.reward.fn not in ("toy", "math") and ":" not in cfg.reward.fn:
        raise ConfigError(f"reward.fn must be 'toy', 'math' or 'module:function', got {cfg.reward.fn!r}")
    _appeals(cfg.reward)
    try:
        loss = cfg.loss_config()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"algorithm.loss: {exc}") from None
    _choice("algorithm.recipe", cfg.algorithm.recipe, RECIPES)
    if not cfg.algorithm.beta_per_sequence > 0:
        raise ConfigError(f"algorithm.beta_per_sequence must be > 0, got {cfg.algorithm.beta_per_sequence!r}")
    if "temperature" in cfg.algorithm.loss and cfg.algorithm.loss["temperature"] != cfg.rollout.temperature:
        # The loss must score the tokens under the distribution they were sampled from.
        raise ConfigError(f"algorithm.loss.temperature={cfg.algorithm.loss['temperature']!r} differs from "
                          f"rollout.temperature={cfg.rollout.temperature!r}: the loss uses the sampling "
                          "temperature; set rollout.temperature instead")
    if loss.adaptive_actor_coeff and loss.is_grpo_family:
        raise ConfigError("algorithm.loss.adaptive_actor_coeff=true applies to algorithm.name=vimpo only")
    if cfg.algorithm.name == "gn_ivo":
        # GN-IVO's softmax runs over the members of each group inside one loss call: micro-batches
        # (and mini-batches) of the step's group-ordered rows must hold whole groups.
        n = cfg.rollout.n
        if cfg.train.micro_batch_size % n:
            raise ConfigError(f"algorithm.name=gn_ivo needs whole groups in every micro-batch: "
                              f"train.micro_batch_size={cfg.train.micro_batch_size} must be a multiple of "
                              f"rollout.n={n}")
        if cfg.train.prompts_per_step % cfg.train.mini_batches:
            raise ConfigError(f"algorithm.name=gn_ivo needs whole groups in every mini-batch: "
                              f"train.mini_batches={cfg.train.mini_batches} must divide "
                              f"train.prompts_per_step={cfg.train.prompts_per_step}")
    if cfg.train.collapse_kl_per_token <= 0:
        raise ConfigError(f"train.collapse_kl_per_token must be > 0, got {cfg.train.collapse_kl_per_token!r}")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with type checks
# ---------------------------------------------------------------------------------------------

def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(prefix + str(key), names, prefix))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, hint)
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X], or a choice of types tried in order (Union[float, str])
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) > 1:
            for option in options:
                try:
                    return _coerce(key, value, option)
                except ConfigError:
                    pass
            raise ConfigError(f"{key} must be {' or '.join(o.__name__ for o in options)}, got {value!r} "
                              f"({type(value).__name__})")
        hint = options[0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (bool, int, float, str):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
        return value
    if hint is list or typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return list(value)
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported type {hint!r}")  # pragma: no cover - a bug in this file


def _unknown_key_message(key: str, names: list[str], prefix: str) -> str:
    leaf = key[len(prefix):]
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(prefix + n for n in names)}"
    return f"unknown config key '{key}'{hint}"


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=10)")
    key, text = item.split("=", 1)
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse the value ({exc})") from None
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}")


def _noise_rates(fp_key: str, fn_key: str, fp: float, fn: float) -> None:
    for key, rate in ((fp_key, fp), (fn_key, fn)):
        if not 0 <= rate <= 1:
            raise ConfigError(f"{key} must lie in [0, 1], got {rate!r}")
    try:
        check_noise_rates(fp, fn)
    except ValueError:
        raise ConfigError(f"{fp_key} + {fn_key} must be < 1 (at 1 the verifier carries no information), "
                          f"got {fp!r} + {fn!r}") from None


def _correction_rates(r: RewardConfig) -> None:
    fn = r.correction_fn_rate
    if isinstance(fn, str):
        if fn != "auto":
            raise ConfigError(f"reward.correction_fn_rate must be a number in [0, 1] or 'auto', got {fn!r}")
        fn = 0.0  # the estimate is capped at run time (rewards.appealed_fn_rate)
    _noise_rates("reward.correction_fp_rate", "reward.correction_fn_rate", r.correction_fp_rate, fn)


def _appeals(r: RewardConfig) -> None:
    """The appeals estimate of rho1 (`correction_fn_rate: auto`, `appeal_fn`, `appeal_prob`,
    `appeal_ema_decay`)."""
    if r.appeal_fn is not None and not _is_reward_spec(r.appeal_fn):
        raise ConfigError(f"reward.appeal_fn must be 'toy', 'math' or 'module:function', got {r.appeal_fn!r}")
    if not 0 < r.appeal_prob <= 1:
        raise ConfigError(f"reward.appeal_prob must lie in (0, 1], got {r.appeal_prob!r}")
    if not 0 <= r.appeal_ema_decay < 1:
        raise ConfigError(f"reward.appeal_ema_decay must lie in [0, 1), got {r.appeal_ema_decay!r}")
    if r.correction_fn_rate == "auto":
        if r.appeal_fn is None:
            raise ConfigError("reward.correction_fn_rate=auto estimates rho1 from appeals and needs "
                              "reward.appeal_fn (the re-check function: 'toy', 'math' or 'module:function')")
        if r.correction == "none":
            warnings.warn("reward.correction_fn_rate=auto with reward.correction=none: the appeals' estimate "
                          "of rho1 is logged (fn_rate_estimate) but corrects nothing; set reward.correction="
                          "backward or forward to use it", UserWarning, stacklevel=3)


def _is_reward_spec(spec: str) -> bool:
    return spec in ("toy", "math") or (spec.count(":") == 1 and all(spec.partition(":")[::2]))


def _positive(key: str, value: int, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
