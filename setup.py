"""Builds the fused NT-Xent op (csrc/) as the extension module `common._C`.

    python setup.py build_ext --inplace      # puts common/_C.*.so next to common/nt_xent_op.py

CPU kernels are always built. CUDA kernels are added when a usable CUDA toolkit is found *and*
torch is a CUDA build; whether a GPU is visible does not matter. A toolkit root is usable when its
bin/nvcc runs (`nvcc --version`) and it has cuda_runtime.h (include/ or targets/*/include/) and
libcudart.so (lib64/, lib/ or targets/*/lib/). Candidates, first usable wins: $CUDA_HOME,
$CUDA_PATH, the toolkit of the nvcc on PATH (symlinks resolved; a wrapper script is read for the
absolute .../bin/nvcc it execs, else nvcc is asked where it lives; its bin/.. last), then
/usr/local/cuda and /usr/local/cuda-* (newest first). `-v` lists the candidates skipped and why.

The CUDA build is optional: if it fails (compile, link, or a toolkit/torch CUDA version mismatch)
one warning says so and the CPU kernels are built alone, so the install still succeeds.
SSL_BUILD_CUDA=1 forces CUDA (no toolkit, or a failed CUDA build, is an error),
SSL_BUILD_CUDA=0 builds CPU only. With no TORCH_CUDA_ARCH_LIST and no visible GPU the
architectures default to "8.0;9.0" (A100, H100); the tensor-core kernels need sm_80 or newer.
MAX_JOBS bounds ninja's parallelism as usual.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"
# Standard install locations, searched after the environment and PATH; globs newest first.
DEFAULT_ROOTS = ("/usr/local/cuda", "/usr/local/cuda-*")
# A wrapper script is small; anything larger is the real (binary) compiler.
_MAX_SCRIPT_BYTES = 64 * 1024
_NVCC_IN_SCRIPT = re.compile(r"""(/[^\s"'`;|&<>()$]*/bin/nvcc)(?![\w.+-])""")


def _version_key(path: str) -> tuple:
    """Sort key for cuda-12.9 < cuda-12.10: the numbers in the name, compared as numbers."""
    return tuple(int(n) for n in re.findall(r"\d+", os.path.basename(path)))


def _nvcc_roots(nvcc: str) -> Iterator[str]:
    """Toolkit roots that the nvcc found on PATH may belong to, most specific first."""
    real = os.path.realpath(nvcc)  # a symlink into the toolkit (e.g. /usr/bin/nvcc -> ...)
    yield os.path.dirname(os.path.dirname(real))
    # A wrapper script (`exec /opt/cuda-13.0/bin/nvcc "$@"`) lives apart from the toolkit: its
    # own bin/.. is not the root, the compiler it execs is.
    try:
        if os.path.getsize(real) <= _MAX_SCRIPT_BYTES:
            with open(real, "rb") as f:
                head = f.read()
            if head.startswith(b"#!"):
                text = head.decode("utf-8", "replace")
                for path in _NVCC_IN_SCRIPT.findall(text):
                    yield os.path.dirname(os.path.dirname(os.path.realpath(path)))
    except OSError:
        pass
    # Wrappers that compute the path (`exec "$ROOT/bin/nvcc"`): nvcc's dry run names its own
    # directory (`#$ _HERE_=/usr/local/cuda-13.0/bin`) without compiling anything.
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m:
            yield os.path.dirname(os.path.realpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    yield os.path.dirname(os.path.dirname(nvcc))  # torch's own guess, checked like the others


def cuda_candidates(
    env: Mapping[str, str], roots: Sequence[str] = DEFAULT_ROOTS
) -> Iterator[tuple[str, str]]:
    """(where it came from, root) in search order; generated lazily so that nvcc is only run
    (dry run) when the earlier candidates were not usable."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            yield f"${var}", env[var]
    nvcc = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    if nvcc:
        for root in _nvcc_roots(nvcc):
            yield f"nvcc on PATH ({nvcc})", root
    for pattern in roots:
        for root in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            yield "default location", root


def check_cuda_root(root: str) -> str | None:
    """Why `root` cannot build the CUDA kernels, or None when it can."""
    if not os.path.isdir(root):
        return "not a directory"
    nvcc = os.path.join(root, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        return "no executable bin/nvcc"
    if not any(
        os.path.isfile(h)
        for h in [os.path.join(root, "include", "cuda_runtime.h")]
        + glob.glob(os.path.join(root, "targets", "*", "include", "cuda_runtime.h"))
    ):
        return "no include/cuda_runtime.h (not a toolkit root)"
    libs = ["lib64", "lib", os.path.join("lib", "*-linux-gnu"), os.path.join("targets", "*", "lib")]
    if not any(glob.glob(os.path.join(root, d, "libcudart.so")) for d in libs):
        return "no libcudart.so in lib64/, lib/ or targets/*/lib/ (the link would fail)"
    try:
        run = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"bin/nvcc does not run ({type(e).__name__}: {e})"
    if run.returncode != 0:
        return f"`bin/nvcc --version` exited with {run.returncode}"
    return None


def find_cuda_home(
    env: Mapping[str, str] | None = None,
    roots: Sequence[str] = DEFAULT_ROOTS,
    log: Callable[[str], None] | None = None,
) -> str | None:
    """The first usable CUDA toolkit root among cuda_candidates(), or None. Each candidate
    skipped is reported to `log` with the reason. torch's own guess (nvcc's bin/..) is not
    enough: for a wrapper script outside the toolkit it names a directory without libcudart."""
    env = os.environ if env is None else env
    seen: set[str] = set()
    for source, root in cuda_candidates(env, roots):
        key = os.path.realpath(root)
        if key in seen:  # /usr/local/cuda -> cuda-13.0, or several routes to one toolkit
            continue
        seen.add(key)
        why = check_cuda_root(root)
        if why is None:
            return root
        if log is not None:
            log(f"skipped CUDA toolkit candidate {root} from {source}: {why}")
    return None


def build_cuda_setting(env: Mapping[str, str] | None = None) -> str | None:
    """SSL_BUILD_CUDA: "1" (force), "0" (CPU only) or None (automatic)."""
    forced = (os.environ if env is None else env).get("SSL_BUILD_CUDA", "").strip()
    if forced == "":
        return None
    if forced not in ("0", "1"):
        raise ValueError(f"SSL_BUILD_CUDA must be 0 or 1, got {forced!r}")
    return forced


def extension_kwargs(cuda: bool) -> dict:
    """Arguments of CUDAExtension (cuda=True) or CppExtension for `common._C`."""
    # csrc/: the op schemas and module init (*.cpp), the CPU kernels (cpu/), the CUDA kernels
    # (cuda/, only in a CUDA build); csrc/README.md has the table.
    cpp = sorted(
        glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # -fopenmp: at::parallel_for is header-inline and only runs in parallel when the extension
    # itself is compiled with OpenMP (the symbols resolve to torch's own libgomp at load time).
    cxx = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]
    kw = {
        "name": "common._C",
        "sources": cpp,
        "include_dirs": [os.path.join(HERE, "csrc")],
        "extra_compile_args": {"cxx": cxx},
        "extra_link_args": ["-fopenmp"],
    }
    if cuda:
        kw["sources"] = cpp + cu
        kw["extra_compile_args"] = {
            "cxx": cxx + ["-DSSL_WITH_CUDA"],
            "nvcc": ["-O3", "--threads", "2", "-lineinfo"],
        }
    return kw


def _is_cuda(ext) -> bool:
    return any(s.endswith(".cu") for s in ext.sources)


def fallback_warning(err: BaseException, cpu_ok: bool) -> str:
    """The one warning printed when the CUDA build failed and SSL_BUILD_CUDA is not 1."""
    what = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    outcome = (
        "The CPU kernels were built instead: common._C works for CPU tensors, and CUDA tensors "
        "use the pure-PyTorch loss."
        if cpu_ok
        else "Building the CPU kernels alone failed too (the error follows)."
    )
    bar = "=" * 78
    return (
        f"\n{bar}\nWARNING: building the CUDA kernels of common._C failed ({what}); the compiler "
        f"or linker output is above.\n{outcome}\nTo make a failed CUDA build an error (to "
        f"diagnose it, or in CI), run with SSL_BUILD_CUDA=1; SSL_BUILD_CUDA=0 skips CUDA.\n{bar}\n"
    )


def build_ext_class(base: type, cpu_variant: Callable[[str], object]) -> type:
    """`base` (torch's BuildExtension) with a CPU-only retry: when building an extension with
    .cu sources fails and SSL_BUILD_CUDA is not 1, each CUDA extension is turned into
    cpu_variant(name) in place (setuptools keeps private state on the Extension object) and the
    build runs again in a fresh temp dir. The whole build_extensions is retried, not one
    build_extension, because torch also fails there before compiling (CUDA version check)."""

    class FallbackBuildExt(base):
        def build_extensions(self) -> None:
            cuda_exts = [e for e in self.extensions if _is_cuda(e)]
            if not cuda_exts or build_cuda_setting() == "1":
                return super().build_extensions()
            # BuildExtension.build_extensions patches the compiler's compile methods on every
            # call; restore them so the retry does not wrap the wrappers.
            compiler_state = dict(vars(self.compiler))
            try:
                return super().build_extensions()
            except Exception as e:  # CompileError, LinkError, RuntimeError (ninja, version)
                err = e
            vars(self.compiler).clear()
            vars(self.compiler).update(compiler_state)
            for ext in cuda_exts:
                cpu = cpu_variant(ext.name)
                vars(ext).update({k: v for k, v in vars(cpu).items() if not k.startswith("_")})
            # A fresh object dir: no objects or ninja state of the failed CUDA attempt (the same
            # .cpp compiled with -DSSL_WITH_CUDA) can end up in the CPU library.
            self.build_temp = self.build_temp.rstrip(os.sep) + "-cpu"
            shutil.rmtree(self.build_temp, ignore_errors=True)
            try:
                super().build_extensions()
            except Exception:
                print(fallback_warning(err, cpu_ok=False), file=sys.stderr, flush=True)
                raise
            print(fallback_warning(err, cpu_ok=True), file=sys.stderr, flush=True)

    return FallbackBuildExt


def main(roots: Sequence[str] = DEFAULT_ROOTS) -> None:
    """Find the toolkit, then import torch's build helpers (they read CUDA_HOME at import time),
    then setup(). `roots` replaces the default install locations (tests)."""
    verbose = any(a in ("-v", "--verbose") for a in sys.argv[1:])
    skipped: list[str] = []
    setting = build_cuda_setting()
    cuda_home = None if setting == "0" else find_cuda_home(roots=roots, log=skipped.append)
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it

    import torch
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if setting == "1" and (cuda_home is None or torch.version.cuda is None):
        why = (
            "no usable CUDA toolkit was found (set CUDA_HOME to its root)"
            if cuda_home is None
            else "torch is a CPU-only build (torch.version.cuda is None)"
        )
        raise RuntimeError(f"SSL_BUILD_CUDA=1 but {why}" + "".join(f"\n  {s}" for s in skipped))
    # Decided by the toolkit and torch's build, never by a visible GPU.
    cuda = cuda_home is not None and torch.version.cuda is not None
    if verbose or (cuda_home is None and skipped and setting != "0"):
        for s in skipped:
            print(f"setup.py: {s}", file=sys.stderr)
    if cuda:
        print(
            f"setup.py: CUDA toolkit {cuda_home}: building CPU and CUDA kernels",
            file=sys.stderr,
            flush=True,
        )
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Only consulted to pick architectures, never to decide whether to build CUDA.
            if not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        ext = CUDAExtension(**extension_kwargs(cuda=True))
    else:
        why = (
            "SSL_BUILD_CUDA=0"
            if setting == "0"
            else "no usable CUDA toolkit found"
            if cuda_home is None
            else "torch is a CPU-only build"
        )
        print(f"setup.py: {why}: building CPU kernels only", file=sys.stderr, flush=True)
        ext = CppExtension(**extension_kwargs(cuda=False))

    def cpu_variant(name: str) -> object:
        return CppExtension(**{**extension_kwargs(cuda=False), "name": name})

    setup(
        name="ssl_ops",
        version="0.1.0",
        description="Fused NT-Xent (SimCLR) loss: C++/CUDA kernels for the SSL reference repo",
        ext_modules=[ext],
        cmdclass={
            "build_ext": build_ext_class(BuildExtension.with_options(use_ninja=True), cpu_variant)
        },
        packages=[],
    )


# `python setup.py ...` and pip's setuptools backend both run this file as __main__; importing
# it (tests) only defines the functions above.
if __name__ == "__main__":
    main()
