"""The `vimpo` command line: clear errors, user data + user reward end to end, sft/eval, bench."""

from __future__ import annotations

import json

from vimpo.cli import main, run_bench

from trainer_testlib import REPO, TINY


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_config_is_a_clear_cli_error(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "train.stpes=3", f"train.output_dir={tmp_path}")
    assert code == 2 and "unknown config key 'train.stpes' (did you mean 'train.steps'?)" in err
    code, _, err = _run(capsys, "train", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml' does not exist" in err


def test_missing_dataset_file_is_a_clear_cli_error(capsys, tmp_path):
    code, _, err = _run(capsys, "train", *TINY, f"train.output_dir={tmp_path}/o",
                        f"data.train={tmp_path}/nope.jsonl")
    assert code == 2 and "data.train: dataset file" in err and "nope.jsonl' does not exist" in err


def test_prompt_longer_than_context_is_a_clear_cli_error(capsys, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" +
                    json.dumps({"prompt": "1" * 40 + "+1=", "answer": "2"}) + "\n" +
                    json.dumps({"prompt": "2+2=", "answer": "4"}) + "\n")
    code, _, err = _run(capsys, "train", *TINY, f"train.output_dir={tmp_path}/o", f"data.train={data}",
                        f"data.eval={data}", "data.max_prompt_length=100")
    # 44 prompt tokens + 4 response tokens do not fit the toy model's 32 positions.
    assert code == 2 and "prompt 1 is 44 tokens long" in err and "model context of 32 tokens" in err


def test_raising_reward_function_does_not_kill_the_run(capsys, tmp_path, test_rewards_on_path):
    out = tmp_path / "o"
    code, stdout, _ = _run(capsys, "train", *TINY, f"train.output_dir={out}", "train.steps=2",
                           "reward.fn=reward_fns_for_tests:always_raises", "reward.error_value=0.0")
    assert code == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["reward_errors"] for r in train_rows] == [16.0, 16.0]  # 4 prompts x 4 samples, all failed
    assert "reward error(s)" in stdout and "this reward function is broken" in stdout


def test_user_jsonl_and_user_reward_end_to_end(capsys, tmp_path, monkeypatch):
    """The README example: examples/tiny_dataset.jsonl + examples/reward_fn.py:digit_match."""
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    monkeypatch.chdir(REPO)
    out = tmp_path / "user"
    code, stdout, _ = _run(capsys, "train", "--config", "configs/user_jsonl.yaml", f"train.output_dir={out}",
                           "train.steps=2", "sft.steps=5", "model.toy_hidden_size=32", "model.toy_layers=1",
                           "model.toy_heads=1", "train.progress=false", "train.prompts_per_step=4",
                           "rollout.n=4")
    assert code == 0, stdout
    assert "held-out accuracy" in stdout and f"{out}/metrics.jsonl" in stdout and f"{out}/curves.png" in stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert {r["eval_prompts"] for r in rows if r["kind"] == "eval"} == {40}  # 10% of 400 records held out
    assert (out / "config.yaml").exists() and (out / "curves.png").exists()


def test_sft_then_eval_then_train_from_the_saved_model(capsys, tmp_path):
    out = tmp_path / "warm"
    code, stdout, _ = _run(capsys, "sft", *TINY, f"train.output_dir={out}", "sft.steps=30", "sft.lr=3e-3")
    assert code == 0 and (out / "sft" / "model.safetensors").exists()
    saved = out / "sft"
    code, stdout, _ = _run(capsys, "eval", *TINY, f"model.name_or_path={saved}")
    assert code == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["eval_prompts"] == 16 and 0.0 <= result["accuracy"] <= 1.0
    code, stdout, _ = _run(capsys, "train", *TINY, f"model.name_or_path={saved}", "train.steps=1",
                           f"train.output_dir={tmp_path}/rl")
    assert code == 0, stdout


def test_bench_delegates_to_the_repository_runner(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__main__.py").write_text(
        "import json, pathlib\n"
        "def main(argv):\n"
        "    pathlib.Path(argv[0]).write_text(json.dumps(argv))\n"
        "    return 3\n")
    marker = tmp_path / "called.json"
    assert run_bench([str(marker), "--quick"], repo_root=tmp_path) == 3
    assert json.loads(marker.read_text()) == [str(marker), "--quick"]


def test_bench_without_runner_is_a_clear_error(tmp_path, capsys):
    assert run_bench([], repo_root=tmp_path) == 2
    assert "bench/__main__.py not found" in capsys.readouterr().err
