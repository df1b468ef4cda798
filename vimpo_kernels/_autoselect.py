"""`backend="auto"` on a GPU decides by measurement, once per kind of call.

When more than one GPU backend can run a call (say `triton` and `cuda` for bf16 with the exact
KL), the table cannot say which is faster on this device at this shape: it depends on the
GPU, the vocabulary, the row count and the tiles. So the first call of each kind times every
eligible backend once and keeps the fastest, in memory and on disk, keyed by (device name,
dtype, row-count bucket, H, V, features). Later calls, and later processes on the same machine,
reuse the choice. `VIMPO_BACKEND` overrides the whole mechanism; CPU tensors never come here
(the `cpu` backend is the only compiled CPU backend).

The cache is a JSON file at `$VIMPO_CACHE_DIR/backend_choice.json` (default
`~/.cache/vimpo`); delete it to measure again (e.g. after a driver or library update).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import _env

log = logging.getLogger("vimpo_kernels")


@dataclass(frozen=True)
class Measure:
    """What the planner needs to time a call: its kind (`call_key`) and `seconds(backend)`."""

    key: str
    seconds: Callable[[str], float]

_memory: dict[str, str] = {}


def cache_path() -> Path:
    return Path(_env.CACHE_DIR).expanduser() / "backend_choice.json"


def call_key(device_name: str, dtype, n_rows: int, hidden_size: int, vocab: int, features: Sequence[str]) -> str:
    """One kind of call. Rows are bucketed to the next power of two: the packed token count
    changes every step, the best backend does not."""
    bucket = 1 << max(int(n_rows) - 1, 0).bit_length()
    return f"{device_name}|{str(dtype).replace('torch.', '')}|N{bucket}|H{hidden_size}|V{vocab}|{','.join(sorted(features))}"


def choose(key: str, candidates: Sequence[str], seconds: Callable[[str], float]) -> str:
    """The backend for `key`: remembered, else the fastest of `candidates` by `seconds(name)`
    (which runs the call once on that backend, warmed up, and returns its time). A candidate
    that fails is reported and skipped; if all fail, the first one is returned (its own error
    will then surface on the real call)."""
    if len(candidates) == 1:
        return candidates[0]
    remembered = _memory.get(key) or _load().get(key)
    if remembered in candidates:
        _memory[key] = remembered
        return remembered
    times: dict[str, float] = {}
    for name in candidates:
        try:
            times[name] = float(seconds(name))
        except Exception as exc:  # a backend that cannot run this call loses the race, loudly
            log.warning("vimpo_kernels auto: backend %r failed while being timed for %s: %s", name, key, exc)
    best = min(times, key=times.get) if times else candidates[0]
    _memory[key] = best
    _store(key, best)
    timing = ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in sorted(times.items(), key=lambda kv: kv[1]))
    log.info("vimpo_kernels auto: %s for %s (measured: %s; cached in %s; VIMPO_BACKEND overrides)",
             best, key, timing or "none ran", cache_path())
    return best


def _load() -> dict[str, str]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store(key: str, name: str) -> None:
    """Merge into the file and replace it atomically (concurrent ranks may write at once)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_load(), key: name}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".backend_choice.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not break training: keep the choice in memory
        log.warning("vimpo_kernels auto: could not write %s (%s); the choice is kept for this process", path, exc)
