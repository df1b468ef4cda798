#!/usr/bin/env bash
# Compile-and-link check of the CUDA backend (no GPU needed): builds vimpo_kernels._C with
# VIMPO_BUILD_CUDA=1 against torch==2.14.1 (local CUDA 13.0 wheel) in a cached venv, imports
# it, checks built_with_cuda(), and prints per-kernel register/shared-memory usage.
#
# Environment:
#   VIMPO_CUDA_VENV   venv to create or reuse (default $HOME/.cache/vimpo/venv-cuda, outside
#                     the clone so it survives fresh clones on the same machine)
#   VIMPO_CUDA_ARCHS  compute capabilities (default "80;90")
#   CUDA_HOME         toolkit (default /usr/local/cuda)
#   MAX_JOBS          parallel compile jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VIMPO_CUDA_VENV:-$HOME/.cache/vimpo/venv-cuda}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-2}"
export VIMPO_CUDA_ARCHS="${VIMPO_CUDA_ARCHS:-80;90}"
BUILD_DIR="${VIMPO_CUDA_BUILD_DIR:-$(mktemp -d /tmp/vimpo-cuda-build.XXXXXX)}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  echo "== installing torch==2.14.1 (CUDA 13.0 build)"
  "$VENV/bin/pip" install -q "torch==2.14.1" ninja setuptools wheel numpy
fi
"$VENV/bin/pip" install -q ninja setuptools wheel numpy
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# torch's CUDA headers include library headers (cuSPARSE, cuBLAS) that the pip wheels ship
# under site-packages/nvidia/*/include; a toolkit without them still builds with these.
NV_INC=$("$VENV/bin/python" -c "import glob, os, site; print(':'.join(sorted(glob.glob(os.path.join(site.getsitepackages()[0], 'nvidia', '*', 'include')))))")
export CPATH="${NV_INC}${CPATH:+:$CPATH}"

# Build out of tree so the CPU-only `_C` of the main venv in this clone is left alone.
echo "== building into $BUILD_DIR (archs $VIMPO_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
VIMPO_BUILD_CUDA=1 "$VENV/bin/python" setup.py -q build_ext --build-lib "$BUILD_DIR/lib" \
  --build-temp "$BUILD_DIR/tmp"
echo "== build took $(( $(date +%s) - start )) s"
SO=$(ls "$BUILD_DIR"/lib/vimpo_kernels/_C*.so)

# Import the built module by path (no GPU is needed to load it: CUDA is loaded lazily).
"$VENV/bin/python" - "$SO" <<'PY'
import importlib.util, sys
import torch  # noqa: F401  (loads libtorch / libc10_cuda the extension links against)
spec = importlib.util.spec_from_file_location("vimpo_kernels._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert mod.built_with_cuda(), "extension built without CUDA"
for op in ("token_stats_forward", "token_stats_backward", "grpo_forward_grad"):
    assert hasattr(mod, op), op
print("== import ok: built_with_cuda() =", mod.built_with_cuda())
PY

if command -v cuobjdump >/dev/null; then
  echo "== per-kernel resource usage"
  cuobjdump --dump-resource-usage "$SO" 2>/dev/null | grep -E "Function|REG|arch" | sed -e 's/^ *//' | head -60 || true
fi
echo "== CUDA build check passed"
