"""Prompt data: loading, clear errors, the deterministic sampler; the toy task itself."""

from __future__ import annotations

import json

import pytest

from vimpo import toy
from vimpo.data import PromptSampler, check_prompt_lengths, load_records, load_splits
from vimpo.train_config import DataConfig


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_records_and_held_out_split(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "solution": i} for i in range(20)])
    cfg = DataConfig(train=str(path), prompt_key="question", answer_key="solution", eval_fraction=0.25)
    train, evals = load_splits(cfg, seed=0)
    assert len(train) == 15 and len(evals) == 5
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in evals)
    assert all(isinstance(r["answer"], str) for r in train)


def test_parquet_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", "2"]}), path)
    assert load_records(str(path), "train", DataConfig(), "data.train") == [
        {"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]


@pytest.mark.parametrize("content, message", [
    (None, "dataset file .* does not exist"),
    ('{"prompt": "a"}\n', "record 0 .* has no field 'answer'"),
    ('{"prompt": "a", "answer": "1"}\nnot json\n', "line 2 is not valid JSON"),
    ("", "holds no records"),
], ids=["missing-file", "missing-field", "bad-json", "empty"])
def test_dataset_errors_are_clear(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_records(str(path), "train", DataConfig(), "data.train")


def test_overlong_prompt_names_the_record():
    recs = [{"prompt": "short"}, {"prompt": "a very long prompt"}]
    with pytest.raises(ValueError, match="data.train prompt 1 is 40 tokens long, over data.max_prompt_length=32"):
        check_prompt_lengths([5, 40], 32, recs, "data.train")
    with pytest.raises(ValueError, match="exceeds the model context of 32 tokens"):
        check_prompt_lengths([5, 30], 64, recs, "data.train", context=32, max_new_tokens=4)


def test_sampler_is_a_deterministic_function_of_its_state():
    a = PromptSampler(size=10, seed=1)
    first = a.next_indices(7)
    state = a.state_dict()
    rest = a.next_indices(9)  # crosses the epoch boundary
    b = PromptSampler(size=10, seed=1)
    b.load_state_dict(state)
    assert b.next_indices(9) == rest
    assert sorted(first + rest[:3]) == list(range(10)), "an epoch visits every prompt once"
    with pytest.raises(ValueError, match="checkpoint was taken on 10 training prompts"):
        PromptSampler(size=11, seed=1).load_state_dict(state)


def test_toy_tokenizer_round_trip_and_split():
    tok = toy.build_tokenizer()
    ids = tok("37+58=").input_ids
    assert ids[0] == toy.BOS_ID and len(ids) == 7
    assert tok.decode(tok("95", add_special_tokens=False).input_ids + [toy.EOS_ID], skip_special_tokens=True) == "95"
    train = {r["prompt"] for r in toy.problems("train", 30)}
    held = {r["prompt"] for r in toy.problems("eval", 30)}
    assert train.isdisjoint(held) and len(train) + len(held) == 31 * 31
    assert 0.1 < len(held) / (31 * 31) < 0.3


def test_local_dataset_folder_goes_through_datasets(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)])
    _jsonl(folder / "test.jsonl", [{"prompt": "9+9=", "answer": "18"}])
    cfg = DataConfig(train=str(folder), eval=str(folder), train_split="train", eval_split="test")
    train, evals = load_splits(cfg, seed=0)
    assert len(train) == 6 and evals == [{"prompt": "9+9=", "answer": "18"}]
    with pytest.raises(ValueError, match="could not load dataset .* split 'validation'"):
        load_records(str(folder), "validation", cfg, "data.eval")


def test_carry_task_answers_are_long_exact_and_split():
    assert toy.carry_solution(47, 285) == "7+5+0=12;4+8+1=13;0+2+1=03;332"
    assert toy.carry_solution(47, 285, forget_carries=True) == "7+5+0=12;4+8+0=12;0+2+0=02;222"
    assert toy.carry_solution(999, 999) == "9+9+0=18;9+9+1=19;9+9+1=19;1998"
    train = toy.problems("train", teacher_error=0.6, task="carry")
    held = toy.eval_problems(0, 300, task="carry")
    assert len(train) == toy.CARRY_TRAIN_SIZE and len(held) == 300
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in held)
    assert all(24 <= len(r["answer"]) <= 31 for r in train + held), "answers of >= 24 tokens"
    wrong = sum(r["demo"] != r["answer"] for r in train) / len(train)
    assert 0.3 < wrong < 0.5, "the sloppy teacher forgets carries on 60% of the pairs (those with a carry differ)"
    assert toy.problems("train", teacher_error=0.6, task="carry") == train, "a fixed list"
    tok = toy.build_tokenizer("carry")
    r = train[0]
    ids = tok(r["prompt"] + r["answer"]).input_ids
    assert ids[0] == toy.BOS_ID and len(ids) == 1 + len(r["prompt"]) + len(r["answer"]), "one token per character"
    assert tok.decode(ids, skip_special_tokens=True) == r["prompt"] + r["answer"]
    assert toy.toy_reward([r["prompt"]], [r["answer"]], [r["answer"]]) == [1.0]
