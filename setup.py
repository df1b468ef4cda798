"""Builds `vimpo_kernels._C` from csrc/ with torch's extension builder.

Environment variables (read only here, at build time):
  VIMPO_BUILD_EXT=0        skip the compiled extension entirely (pure-PyTorch + Triton install)
  VIMPO_BUILD_CUDA=0|1     skip / force the CUDA part (default: auto, when torch is a CUDA build
                           and a CUDA toolkit is found)
  VIMPO_CUDA_ARCHS="80;90" compute capabilities to generate SASS for (PTX of the last is kept)
  VIMPO_CPU_NATIVE=0       build the CPU part without -march=native (portable binary)
  MAX_JOBS                 parallel compile jobs (ninja)
"""

import glob
import os

from setuptools import setup


def _flag(name, default):
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if not _flag("VIMPO_BUILD_EXT", "1"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("VIMPO_BUILD_CUDA")
    if force is None:
        build_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    else:
        build_cuda = _flag("VIMPO_BUILD_CUDA", "0")
        if build_cuda and (torch.version.cuda is None or CUDA_HOME is None):
            raise RuntimeError("VIMPO_BUILD_CUDA=1 but torch is not a CUDA build or no CUDA toolkit "
                               f"was found (torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    # torch >= 2.14's headers use C++20 (std::strong_ordering in c10/util/intrusive_ptr.h).
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14) \
        else "-std=c++17"
    # -fno-trapping-math: GCC keeps a float compare that could trap (NaN) as a branch, and the
    # clamp in token_math.h `exp_nonpos` then blocks vectorization of every row pass (3-5x
    # slower). Nothing here reads floating-point exception flags.
    cxx = ["-O3", std, "-fopenmp", "-fno-trapping-math"]
    if _flag("VIMPO_CPU_NATIVE", "1"):
        cxx.append("-march=native")
    sources = sorted(glob.glob("csrc/*.cpp"))
    kwargs = dict(name="vimpo_kernels._C", sources=sources, include_dirs=[os.path.abspath("csrc")],
                  extra_link_args=["-fopenmp"])
    if build_cuda:
        archs = [a.strip() for a in os.environ.get("VIMPO_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
                 if a.strip()]
        nvcc = ["-O3", std, "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        nvcc.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        kwargs["sources"] = sources + sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(define_macros=[("VIMPO_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    try:
        import ninja  # noqa: F401
        use_ninja = True
    except ImportError:
        use_ninja = False
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
