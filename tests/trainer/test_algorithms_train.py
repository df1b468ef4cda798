"""Every algorithm of the kernels' registry is selectable by `algorithm.name` and trains the
embedded toy end to end (2 RL steps of the tiny config, finite loss)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vimpo.train_config import ConfigError
from vimpo.trainer import train
from vimpo_kernels import ALGORITHMS


def _train_rows(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_two_steps_per_registered_algorithm(tiny, test_rewards_on_path, algorithm):
    cfg = tiny(f"algorithm.name={algorithm}", "train.steps=2", "train.checkpoint_every=100",
               "train.eval_every=100", "reward.fn=reward_fns_for_tests:first_digit_odd")
    train(cfg)
    rows = _train_rows(Path(cfg.train.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]), (algorithm, r)
        assert math.isfinite(r["grad_norm"]), (algorithm, r)


def test_train_config_takes_the_kernels_registry():
    from vimpo import train_config

    assert train_config.ALGORITHMS is ALGORITHMS
    assert {"bnpo", "gspo", "luspo", "cispo", "sapo", "vespo", "gn_ivo"} <= set(ALGORITHMS)


@pytest.mark.parametrize("overrides, message", [
    (["train.micro_batch_size=6"], "train.micro_batch_size=6 must be a multiple of rollout.n=4"),
    (["train.mini_batches=8"], "train.mini_batches=8 must divide train.prompts_per_step=4"),
])
def test_gn_ivo_refuses_split_groups(tiny, overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        tiny("algorithm.name=gn_ivo", *overrides)
    tiny("algorithm.name=grpo", *overrides)  # the other algorithms do not care


def test_reference_model_only_when_needed(tiny):
    from vimpo_kernels.algorithms import needs_reference

    assert needs_reference(tiny("algorithm.name=vimpo").loss_config())
    assert not needs_reference(tiny("algorithm.name=gspo").loss_config())
    assert needs_reference(tiny("algorithm.name=gspo", "algorithm.loss={kl_loss_coeff: 0.04}").loss_config())
