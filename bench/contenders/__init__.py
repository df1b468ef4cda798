"""The contenders, registered against op names (`ops.py`).

  registry.py     `Contender`, `register`, `contenders(op)`, `get(op, name)`, shared helpers
  materialize.py  `materialize`, the baseline of every op (derived from the op's entry)
  ours.py         `ours:<backend>` on every op; `backend_support`, the one place that says what
                  a backend of ours can do
  liger.py        `liger` (dapo), `liger:flce` (logprobs)
  cce.py          `cce:torch_compile`, `cce:cce` (logprobs)
  torch_lce.py    `torch:lce` (logprobs)

Importing this package registers them all, the baseline first.
"""

from . import materialize, ours, liger, cce, torch_lce  # noqa: F401  (registration order)
from .registry import BASELINE, Contender, contenders, get, register

__all__ = ["BASELINE", "Contender", "contenders", "get", "register"]
