"""Atomic checkpoints with exact resume.

Layout of `<output_dir>/checkpoints/step_000010/`:
    model.safetensors   policy weights (tied tensors stored once; aliases in the metadata)
    optimizer.pt        optimizer + scheduler state: tensors, numbers, lists only
    rng.pt              torch / python / numpy RNG states
    state.json          step, data sampler position, trainer counters

A checkpoint is written into `step_000010.tmp-<pid>` and renamed into place only when every
file is flushed to disk, so killing the process at any moment leaves either a complete
checkpoint or a `.tmp-*` folder that is ignored (and cleaned) on resume. Nothing is loaded
with unrestricted pickle: `torch.load(weights_only=True)` and safetensors only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses aliased tensors (tied embeddings): store each storage once."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, source in aliases.items():
        tensors[name] = tensors[source]
    return tensors


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def save_checkpoint(root: Path, step: int, *, model_state: dict, optimizer_state: dict, trainer_state: dict,
                    keep_last: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`."""
    ckpt_dir = root / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f"step_{step:06d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model_state, tmp / "model.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
    _fsync_dir_files(tmp)
    if final.exists():  # re-saving the same step (e.g. the final save after a resume)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(ckpt_dir)
    _prune(ckpt_dir, keep_last)
    return final


def latest_checkpoint(root: Path) -> Optional[Path]:
    """Newest complete checkpoint under `root/checkpoints`, or None. Removes stale `.tmp-*`."""
    ckpt_dir = root / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    for stale in ckpt_dir.glob("step_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    steps = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_DIR.match(p.name)))
    return steps[-1][1] if steps else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """{'model', 'optimizer', 'rng', 'state'}; restrictive loaders only."""
    return {
        "model": load_weights(path / "model.safetensors"),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "rng": torch.load(path / "rng.pt", weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
    }


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, path in steps[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir_files(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync(folder)


def _fsync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
