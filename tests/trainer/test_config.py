"""Config loading: YAML + key=value overrides, and errors that name the offending key."""

from __future__ import annotations

import pytest

from vimpo.train_config import ConfigError, load_config


def test_embedded_default_is_the_toy_run():
    cfg = load_config()
    assert cfg.model.name_or_path == "toy" and cfg.data.train == "toy" and cfg.reward.fn == "toy"
    assert cfg.sft.steps > 0, "the default run includes the supervised warm start"
    assert cfg.loss_config().algorithm == "vimpo"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\nalgorithm:\n  name: grpo\n  loss: {clip_ratio_high: 0.3}\n")
    cfg = load_config(path, ["train.steps=9", "optim.lr=1e-3", "optim.betas=[0.9, 0.95]", "rollout.is_cap=null"])
    assert cfg.train.steps == 9 and cfg.optim.lr == 1e-3 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.algorithm.name == "grpo" and cfg.loss_config().clip_ratio_high == 0.3
    assert cfg.model.name_or_path == "toy", "keys absent from the file keep the dataclass defaults"


@pytest.mark.parametrize("overrides, message", [
    (["train.stpes=3"], "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
    (["trian.steps=3"], "unknown config key 'trian'"),
    (["train.steps=three"], "train.steps must be int, got 'three'"),
    (["train.steps=-1"], "train.steps must be >= 0"),
    (["train.resume=3"], "train.resume must be bool"),
    (["algorithm.name=ppo"], "algorithm.name must be one of"),
    (["rollout.backend=sglang"], "rollout.backend must be one of"),
    (["reward.noise_flip_prob=1.5"], "reward.noise_flip_prob must lie in [0, 1]"),
    (["reward.fn=nocolon"], "reward.fn must be 'toy', 'math' or 'module:function'"),
    (["algorithm.loss={beta: -1}"], "algorithm.loss: beta must lie in"),
    (["algorithm.loss={not_a_knob: 1}"], "algorithm.loss:"),
    (["train.mini_batches=3"], "train.mini_batches=3 must divide"),
    (["train.steps"], "must look like key=value"),
    (["algorithm.name=grpo", "algorithm.loss={adaptive_actor_coeff: true}"], "applies to algorithm.name=vimpo"),
], ids=["typo-suggests", "unknown-section", "wrong-type", "negative", "bool", "algorithm", "backend",
        "flip-prob", "reward-spec", "loss-range", "loss-unknown", "mini-batches", "no-equals", "adaptive-grpo"])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(listy)


def test_yaml_is_safe_loaded(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_shipped_example_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs, "configs/*.yaml examples are part of the trainer"
    for path in configs:
        load_config(path)


def test_configs_toy_yaml_is_the_embedded_default():
    from pathlib import Path

    written = load_config(Path(__file__).resolve().parents[2] / "configs" / "toy.yaml")
    assert written.to_dict() == load_config().to_dict()


def test_flash_attention_without_gpu_is_a_clear_error():
    import torch

    from vimpo.model import check_attention

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the error under test is the CPU one")
    with pytest.raises(ValueError, match="flash_attention_2 needs a CUDA GPU; use sdpa"):
        check_attention("flash_attention_2")
    check_attention("sdpa")


def test_recipes():
    """The embedded default sets no coefficient by hand; `paper` is VIMPOConfig() verbatim."""
    from vimpo_kernels import VIMPOConfig

    cfg = load_config(None, [])
    assert cfg.algorithm.recipe == "default" and cfg.algorithm.loss == {} and cfg.length_scaled_beta
    default = cfg.loss_config(beta=0.25)
    assert default.beta == 0.25 and default.adaptive_actor_coeff
    assert default == VIMPOConfig(beta=0.25, adaptive_actor_coeff=True)
    paper = load_config(None, ["algorithm.recipe=paper"])
    assert not paper.length_scaled_beta and paper.loss_config(beta=0.25) == VIMPOConfig()
    explicit = load_config(None, ["algorithm.loss={beta: 0.01}"])
    assert not explicit.length_scaled_beta and explicit.loss_config(beta=0.25).beta == 0.01, "loss overrides win"
    assert load_config(None, ["algorithm.name=grpo"]).loss_config(beta=0.25) == VIMPOConfig.for_algorithm("grpo")
    with pytest.raises(ConfigError, match="algorithm.recipe must be one of"):
        load_config(None, ["algorithm.recipe=fast"])


def test_a_loss_temperature_other_than_the_sampling_one_is_refused(tiny):
    """The loss scores tokens under the distribution they were sampled from: a different
    algorithm.loss.temperature is an error naming both keys, not a silent override."""
    from vimpo.train_config import ConfigError

    with pytest.raises(ConfigError, match="algorithm.loss.temperature=0.5 differs from rollout.temperature"):
        tiny("algorithm.loss={temperature: 0.5}")
    assert tiny("rollout.temperature=0.7", "algorithm.loss={temperature: 0.7}").loss_config().temperature == 0.7
