"""Builds the fused NT-Xent op (csrc/) as the extension module `common._C`.

    python setup.py build_ext --inplace      # puts common/_C.*.so next to common/nt_xent_op.py

CPU kernels are always built. CUDA kernels are added when a CUDA toolkit is found (CUDA_HOME, or
nvcc on PATH / the default /usr/local/cuda, as torch.utils.cpp_extension finds it) *and* torch is
a CUDA build; whether a GPU is visible does not matter. SSL_BUILD_CUDA=1 forces CUDA (and fails
loudly without a toolkit), SSL_BUILD_CUDA=0 builds CPU only. With no TORCH_CUDA_ARCH_LIST and no
visible GPU the architectures default to "8.0;9.0" (A100, H100); the tensor-core kernels need
sm_80 or newer. MAX_JOBS bounds ninja's parallelism as usual.
"""

from __future__ import annotations

import glob
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else nvcc's on PATH, else /usr/local/cuda;
    only if it really has bin/nvcc (torch's own guess can be a directory without a compiler)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")):
            return c
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME is not None:
    os.environ["CUDA_HOME"] = CUDA_HOME  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> bool:
    """CUDA kernels or not, decided by the toolkit and torch's build, never by a visible GPU."""
    forced = os.environ.get("SSL_BUILD_CUDA")
    if forced is not None and forced.strip() != "":
        if forced.strip() not in ("0", "1"):
            raise ValueError(f"SSL_BUILD_CUDA must be 0 or 1, got {forced!r}")
        if forced.strip() == "1" and (CUDA_HOME is None or torch.version.cuda is None):
            raise RuntimeError(
                "SSL_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME) or torch is a "
                f"CPU-only build (torch.version.cuda={torch.version.cuda})"
            )
        return forced.strip() == "1"
    return CUDA_HOME is not None and torch.version.cuda is not None


def extensions() -> list:
    csrc = os.path.join("csrc")
    cpp = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    cu = sorted(glob.glob(os.path.join(csrc, "*.cu")))
    # -fopenmp: at::parallel_for is header-inline and only runs in parallel when the extension
    # itself is compiled with OpenMP (the symbols resolve to torch's own libgomp at load time).
    cxx = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]
    ldflags = ["-fopenmp"]
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Only consulted to pick architectures, never to decide whether to build CUDA.
            if not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        nvcc = ["-O3", "--threads", "2", "-lineinfo"]
        return [
            CUDAExtension(
                "common._C",
                cpp + cu,
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": cxx + ["-DSSL_WITH_CUDA"], "nvcc": nvcc},
                extra_link_args=ldflags,
            )
        ]
    return [
        CppExtension(
            "common._C",
            cpp,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=ldflags,
        )
    ]


setup(
    name="ssl_ops",
    version="0.1.0",
    description="Fused NT-Xent (SimCLR) loss: C++/CUDA kernels for the SSL reference repo",
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    packages=[],
)
