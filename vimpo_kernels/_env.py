"""Every VIMPO_* environment variable the runtime reads, in one place (the build reads its
own in setup.py)."""

import os

# Force the default backend of `backend="auto"` (e.g. "torch" to debug against the reference).
DEFAULT_BACKEND = os.environ.get("VIMPO_BACKEND", "auto")
# Let backend="auto" fall back to the materializing reference on a GPU (it raises otherwise).
ALLOW_MATERIALIZE = os.environ.get("VIMPO_ALLOW_MATERIALIZE", "0") == "1"
# Where `backend="auto"` keeps its measured per-GPU choices (vimpo_kernels/_autoselect.py).
CACHE_DIR = os.environ.get("VIMPO_CACHE_DIR", os.path.join("~", ".cache", "vimpo"))
# Rows per chunk of the compiled CPU/CUDA backends (0 = the backend's own choice).
CHUNK_ROWS = int(os.environ.get("VIMPO_CHUNK_ROWS", "0"))
# Triton's interpreter runs kernels on CPU tensors (slow; for correctness tests only).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
