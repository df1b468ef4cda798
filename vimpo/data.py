"""Prompt data: records {prompt, answer} from the toy task, a local JSONL/Parquet file or a
`datasets` name, and a deterministic sampler whose position is two integers (exact resume).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import toy
from .train_config import DataConfig


def load_splits(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(train records, eval records), each record {"prompt": str, "answer": str}."""
    if cfg.train == "toy":
        train = toy.problems("train", cfg.toy_max_operand, cfg.toy_teacher_error, task=cfg.toy_task)
        evals = toy.eval_problems(cfg.toy_max_operand, cfg.toy_eval_size, task=cfg.toy_task)
        return train, evals
    train = load_records(cfg.train, cfg.train_split, cfg, "data.train")
    if cfg.eval is not None:
        return train, load_records(cfg.eval, cfg.eval_split, cfg, "data.eval")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(cfg.eval_fraction * len(train))))
    if n_eval >= len(train):
        raise ValueError(f"data.train has {len(train)} record(s): too few to hold out an eval split; "
                         "give data.eval")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def load_records(source: str, split: str, cfg: DataConfig, key: str) -> list[dict]:
    """Records from a .jsonl / .parquet file, a local dataset folder (read by `datasets`, split
    `split`) or a `datasets` hub name (`name` or `name:config`)."""
    path = Path(source)
    if path.is_dir():
        rows = _read_hub(source, split, key)
        return [_normalise(row, i, cfg, key, source) for i, row in enumerate(rows)]
    looks_local = path.suffix in (".jsonl", ".json", ".parquet") or source.startswith((".", "/", "~"))
    if looks_local or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"{key}: dataset file {source!r} does not exist")
        rows = _read_jsonl(path, key) if path.suffix in (".jsonl", ".json") else _read_parquet(path)
    else:
        rows = _read_hub(source, split, key)
    return [_normalise(row, i, cfg, key, source) for i, row in enumerate(rows)]


def _read_jsonl(path: Path, key: str) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{key}: {str(path)!r} line {lineno} is not valid JSON ({exc.msg})") from None
    if not rows:
        raise ValueError(f"{key}: {str(path)!r} holds no records")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_hub(name: str, split: str, key: str) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - `datasets` is in the [trainer] extra
        raise ImportError(f"{key}={name!r} looks like a `datasets` name, but `datasets` is not installed") from exc
    repo, _, subset = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, subset or None, split=split)
    except Exception as exc:
        raise ValueError(f"{key}: could not load dataset {name!r} split {split!r} "
                         f"({type(exc).__name__}: {exc})") from None
    return list(ds)


def _normalise(row: dict, index: int, cfg: DataConfig, key: str, source: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{key}: record {index} of {source!r} is not an object")
    missing = [k for k in (cfg.prompt_key, cfg.answer_key) if k not in row]
    if missing:
        raise ValueError(f"{key}: record {index} of {source!r} has no field {missing[0]!r} "
                         f"(set data.prompt_key / data.answer_key); fields: {sorted(row)}")
    return {"prompt": str(row[cfg.prompt_key]), "answer": str(row[cfg.answer_key])}


@dataclass
class PromptSampler:
    """Walks a per-epoch permutation of the records; (epoch, index) is the whole state."""

    size: int
    seed: int
    epoch: int = 0
    index: int = 0

    def next_indices(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            order = self._order(self.epoch)
            take = min(count - len(out), self.size - self.index)
            out.extend(order[self.index:self.index + take])
            self.index += take
            if self.index == self.size:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"resume: the checkpoint was taken on {state['size']} training prompts, "
                             f"the data now has {self.size}")
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]


def check_prompt_lengths(lengths: list[int], limit: int, records: list[dict], name: str,
                         context: Optional[int] = None, max_new_tokens: int = 0) -> None:
    """Raise with the record index when a prompt (plus the response budget) does not fit."""
    for i, n in enumerate(lengths):
        if n > limit:
            raise ValueError(f"{name} prompt {i} is {n} tokens long, over data.max_prompt_length={limit}: "
                             f"{records[i]['prompt'][:60]!r}...")
        if context is not None and n + max_new_tokens > context:
            raise ValueError(f"{name} prompt {i} is {n} tokens long; with rollout.max_new_tokens="
                             f"{max_new_tokens} it exceeds the model context of {context} tokens")
