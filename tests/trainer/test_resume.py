"""Checkpoints: exact resume, a killed run resumes, atomic writes, keep-last-k, safe loading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vimpo import checkpoint as ckpt
from vimpo.train_config import ConfigError
from vimpo.trainer import train

from trainer_testlib import REPO, TINY


def _train_rows(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "step_time_s"} for r in rows if r["kind"] in ("train", "eval")]


def test_resume_equals_uninterrupted_bit_for_bit(tiny, tmp_path, test_rewards_on_path):
    common = ["train.checkpoint_every=2", "reward.fn=reward_fns_for_tests:first_digit_odd", "algorithm.name=vimpo"]
    straight = tiny(*common, "train.steps=4", out=tmp_path / "straight")
    train(straight)
    first_half = tiny(*common, "train.steps=2", out=tmp_path / "split")
    train(first_half)
    second_half = tiny(*common, "train.steps=4", "train.resume=true", out=tmp_path / "split")
    train(second_half)

    a = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_000004")
    b = ckpt.load_checkpoint(tmp_path / "split" / "checkpoints" / "step_000004")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for pa, pb in zip(a["optimizer"]["optimizer"]["state"].values(), b["optimizer"]["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a["state"] == b["state"]
    # The default recipe's state resumed with it: the measured beta, the adaptive actor
    # coefficient's EMAs (advanced once per step from step 2 on: at step 1 the policy is the
    # reference, the implicit advantage is exactly 0, and c_A = 0 leaves the EMAs alone).
    run = a["state"]["run"]
    assert run["beta"] > 0 and run["adaptive"]["updates"] == 3 and run["adaptive"]["ema_actor"] > 0
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # Every logged number (rewards, losses, grad norms, evals) is identical too.
    assert _train_rows(tmp_path / "straight") == _train_rows(tmp_path / "split")


def test_killed_run_resumes(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vimpo.cli", "train", *TINY, f"train.output_dir={out}", "train.steps=500",
           "train.checkpoint_every=1", "train.keep_last=2", "train.eval_every=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step_000003").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: the worst case
        proc.wait()
    latest = ckpt.latest_checkpoint(out)
    step = int(latest.name.split("_")[1])
    assert step >= 3
    ckpt.load_checkpoint(latest)  # complete and loadable
    assert not list((out / "checkpoints").glob("*.tmp-*")), "stale temporary folders are cleaned on resume"


    from vimpo.cli import main

    assert main(["train", *TINY, f"train.output_dir={out}", f"train.steps={step + 2}", "train.eval_every=1000",
                 "--resume"]) == 0
    assert ckpt.latest_checkpoint(out).name == f"step_{step + 2:06d}"
    steps = [r["step"] for r in _train_rows(out) if r["kind"] == "train"]
    assert steps == list(range(1, step + 3)), "metrics after the checkpoint are replayed, not duplicated"
    evals = [r["step"] for r in _train_rows(out) if r["kind"] == "eval"]
    assert evals[-1] == step + 2


def test_refuses_to_overwrite_a_run_without_resume(tiny):
    cfg = tiny("train.steps=1")
    train(cfg)
    with pytest.raises(ConfigError, match="already holds checkpoints .* pass --resume"):
        train(cfg)


def test_interrupted_write_is_ignored_and_keep_last(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model_state=state, optimizer_state={"x": torch.ones(1)},
                             trainer_state={"sampler": {}}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000003"]
    # A crash in the middle of writing step 4 leaves only a temporary folder behind.
    partial = tmp_path / "checkpoints" / "step_000004.tmp-12345"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000003"
    assert not partial.exists()


def test_tied_weights_round_trip(tmp_path):
    emb = torch.nn.Embedding(5, 4)
    head = torch.nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    state = {"embed.weight": emb.weight, "head.weight": head.weight}
    ckpt.save_weights(state, tmp_path / "m.safetensors")
    back = ckpt.load_weights(tmp_path / "m.safetensors")
    assert torch.equal(back["embed.weight"], emb.weight) and torch.equal(back["head.weight"], emb.weight)


def test_no_unrestricted_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"optimizer": Evil(), "scheduler": {}}, tmp_path / "optimizer.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        torch.load(tmp_path / "optimizer.pt", weights_only=True)
