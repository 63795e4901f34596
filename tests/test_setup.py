"""setup.py: finding the CUDA toolkit (wrapper scripts, symlinks, incomplete toolkits) and the
CPU-only fallback when the optional CUDA build fails.

The fast tests run setup.py's functions in-process against fake toolkits (shell scripts as nvcc)
and a fake build_ext base class, so no compiler runs. The end-to-end fallback (a real CPU build
after a real failed CUDA build, ~1-2 min) is marked slow.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from setuptools import Extension

ROOT = Path(__file__).resolve().parents[1]


def _load_setup():
    # Imported under another name: only `python setup.py` (__main__) calls setup().
    spec = importlib.util.spec_from_file_location("ssl_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = _load_setup()


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _fake_toolkit(root: Path, nvcc_rc: int = 0, libs: bool = True, headers: bool = True) -> Path:
    """A directory shaped like a CUDA toolkit: bin/nvcc answers --version (and a dry run naming
    its directory, as the real one does) or exits nvcc_rc."""
    _script(
        root / "bin" / "nvcc",
        f"[ {nvcc_rc} -ne 0 ] && exit {nvcc_rc}\n"
        'case "$*" in *-dryrun*) echo "#\\$ _HERE_=$(dirname "$0")" >&2 ;; '
        "*) echo 'Cuda compilation tools, release 13.0, V13.0.88' ;; esac",
    )
    if libs:
        (root / "lib64").mkdir(parents=True)
        (root / "lib64" / "libcudart.so").write_bytes(b"")
    if headers:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("")
    return root


def _find(env: dict, roots=()):
    log: list[str] = []
    return S.find_cuda_home(env=env, roots=roots, log=log.append), log


def test_wrapper_script_resolves_to_the_toolkit_it_execs(tmp_path):
    # The reported layout: PATH's nvcc is `exec /opt/.../bin/nvcc "$@"` in a bin/ of its own.
    tk = _fake_toolkit(tmp_path / "cuda-13.0")
    _script(tmp_path / "wrap" / "bin" / "nvcc", f'exec {tk}/bin/nvcc "$@"')
    home, log = _find({"PATH": str(tmp_path / "wrap" / "bin")})
    assert home == str(tk)
    # The wrapper's own bin/.. (torch's guess) was tried first and rejected for a reason.
    assert any(str(tmp_path / "wrap") in m and "cuda_runtime.h" in m for m in log), log


def test_wrapper_computing_the_path_asks_nvcc(tmp_path):
    # No absolute .../bin/nvcc in the script: nvcc's dry run (`_HERE_=`) names the toolkit.
    tk = _fake_toolkit(tmp_path / "tk")
    _script(tmp_path / "wrap" / "nvcc", f'D={tmp_path}\nexec "$D/tk/bin/nvcc" "$@"')
    assert _find({"PATH": str(tmp_path / "wrap")})[0] == str(tk)


def test_symlinked_nvcc_resolves(tmp_path):
    tk = _fake_toolkit(tmp_path / "cuda-12.4")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(tk / "bin" / "nvcc")
    assert _find({"PATH": str(tmp_path / "bin")})[0] == str(tk)


def test_wrapper_pointing_nowhere_is_rejected(tmp_path):
    _script(tmp_path / "wrap" / "bin" / "nvcc", 'exec /nonexistent/cuda/bin/nvcc "$@"')
    home, log = _find({"PATH": str(tmp_path / "wrap" / "bin")})
    assert home is None
    assert any("/nonexistent/cuda" in m and "not a directory" in m for m in log), log


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"libs": False}, "libcudart.so"),
        ({"headers": False}, "cuda_runtime.h"),
        ({"nvcc_rc": 1}, "exited with 1"),
    ],
)
def test_incomplete_toolkit_is_rejected(tmp_path, kwargs, reason):
    bad = _fake_toolkit(tmp_path / "bad", **kwargs)
    assert S.check_cuda_root(str(bad)) is not None
    home, log = _find({"CUDA_HOME": str(bad), "PATH": ""})
    assert home is None
    assert len(log) == 1 and reason in log[0] and "$CUDA_HOME" in log[0], log


def test_candidate_order(tmp_path):
    a, b, c = (_fake_toolkit(tmp_path / n) for n in ("a", "b", "c"))
    bad = _fake_toolkit(tmp_path / "bad", libs=False)
    assert S.check_cuda_root(str(a)) is None
    path = str(c / "bin")
    assert _find({"CUDA_HOME": str(a), "CUDA_PATH": str(b), "PATH": path})[0] == str(a)
    assert _find({"CUDA_HOME": str(bad), "CUDA_PATH": str(b), "PATH": path})[0] == str(b)
    assert _find({"CUDA_HOME": str(bad), "PATH": path})[0] == str(c)
    # Environment and PATH before the standard locations.
    assert _find({"PATH": path}, roots=[str(a)])[0] == str(c)
    assert _find({"PATH": ""}, roots=[str(a)])[0] == str(a)


def test_default_globs_pick_the_newest_version(tmp_path):
    for v in ("11.8", "12.9", "12.10"):
        _fake_toolkit(tmp_path / f"cuda-{v}")
    _fake_toolkit(tmp_path / "cuda-13.1", libs=False)  # newest, but unusable
    roots = [str(tmp_path / "cuda"), str(tmp_path / "cuda-*")]
    assert _find({"PATH": ""}, roots=roots)[0] == str(tmp_path / "cuda-12.10")


def test_extension_variants():
    cpu, cuda = S.extension_kwargs(cuda=False), S.extension_kwargs(cuda=True)
    assert cpu["sources"] and not any(s.endswith(".cu") for s in cpu["sources"])
    assert "-DSSL_WITH_CUDA" not in cpu["extra_compile_args"]["cxx"]
    assert any(s.endswith(".cu") for s in cuda["sources"])
    assert "-DSSL_WITH_CUDA" in cuda["extra_compile_args"]["cxx"]
    assert set(cpu["sources"]) < set(cuda["sources"])


class _FakeBuildExtension:
    """Stands in for torch's BuildExtension: patches the compiler like it does, records what
    it builds, and fails like nvcc would for extensions with .cu sources."""

    def __init__(self, build_temp: str, fail_cpu: bool = False):
        cuda = S.extension_kwargs(cuda=True)
        self.ext = Extension(cuda["name"], cuda["sources"], libraries=["cudart"])
        self.ext._full_name = cuda["name"]  # state setuptools keeps on the object
        self.extensions = [self.ext]
        self.compiler = SimpleNamespace(include_dirs=["/x"])
        self.build_temp = build_temp
        self.fail_cpu = fail_cpu
        self.calls: list[dict] = []

    def build_extensions(self):
        # A second call must start from the unpatched compiler (torch would wrap its wrapper).
        self.calls.append({"patched": hasattr(self.compiler, "compile"), "dir": self.build_temp})
        self.compiler.compile = "torch's ninja wrapper"
        Path(self.build_temp).mkdir(parents=True, exist_ok=True)
        assert not (Path(self.build_temp) / "stale.o").exists(), "stale objects reused"
        for ext in self.extensions:
            if any(s.endswith(".cu") for s in ext.sources):
                raise RuntimeError("Error compiling objects for extension\nnvcc failed")
            if self.fail_cpu:
                raise RuntimeError("cpp compile error")
            self.calls[-1]["built"] = (ext.name, list(ext.sources), list(ext.libraries))


def _fallback_builder(tmp_path, **kw):
    def cpu_variant(name):
        return Extension(**{**S.extension_kwargs(cuda=False), "name": name})

    cls = S.build_ext_class(_FakeBuildExtension, cpu_variant)
    return cls(str(tmp_path / "build" / "temp.linux"), **kw)


def test_failed_cuda_build_falls_back_to_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SSL_BUILD_CUDA", raising=False)
    b = _fallback_builder(tmp_path)
    stale = Path(b.build_temp + "-cpu")
    stale.mkdir(parents=True)
    (stale / "stale.o").write_bytes(b"")  # left over from an earlier fallback
    b.build_extensions()
    assert len(b.calls) == 2 and "built" not in b.calls[0]
    retry = b.calls[1]
    assert not retry["patched"], "compiler not restored before the retry"
    assert retry["dir"] != b.calls[0]["dir"]
    name, sources, libs = retry["built"]
    assert name == "common._C" and sources == S.extension_kwargs(cuda=False)["sources"]
    assert "cudart" not in libs
    assert b.extensions[0] is b.ext and b.ext._full_name == "common._C"
    assert "-DSSL_WITH_CUDA" not in b.ext.extra_compile_args["cxx"]
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1
    assert "Error compiling objects" in err and "SSL_BUILD_CUDA=1" in err
    assert "CPU kernels were built" in err


def test_forced_cuda_build_fails_loudly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSL_BUILD_CUDA", "1")
    b = _fallback_builder(tmp_path)
    with pytest.raises(RuntimeError, match="Error compiling objects"):
        b.build_extensions()
    assert len(b.calls) == 1 and "WARNING" not in capsys.readouterr().err


def test_cpu_failure_after_fallback_is_raised(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SSL_BUILD_CUDA", raising=False)
    b = _fallback_builder(tmp_path, fail_cpu=True)
    with pytest.raises(RuntimeError, match="cpp compile error"):
        b.build_extensions()
    assert len(b.calls) == 2
    assert "CPU kernels alone failed too" in capsys.readouterr().err


def test_bad_ssl_build_cuda_value():
    with pytest.raises(ValueError, match="SSL_BUILD_CUDA"):
        S.build_cuda_setting({"SSL_BUILD_CUDA": "yes"})
    assert S.build_cuda_setting({}) is None
    assert S.build_cuda_setting({"SSL_BUILD_CUDA": " 0 "}) == "0"


def _repo_copy(dst: Path) -> Path:
    # Never build in the checkout: other tests load its common/_C*.so.
    shutil.copy(ROOT / "setup.py", dst / "setup.py")
    shutil.copytree(ROOT / "csrc", dst / "csrc")
    (dst / "common").mkdir()
    (dst / "common" / "__init__.py").write_text("")
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("forced", [False, True])
def test_end_to_end_fallback_build(tmp_path, forced):
    """A real build: the toolkit passes the checks but its nvcc cannot compile, no standard
    toolkit is reachable. Without SSL_BUILD_CUDA the install succeeds with CPU kernels only."""
    import torch

    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: setup.py never tries CUDA")
    (tmp_path / "repo").mkdir()
    repo = _repo_copy(tmp_path / "repo")
    tk = _fake_toolkit(tmp_path / "cuda-fake")
    # --version (and the version check) pass, every compile fails
    _script(
        tk / "bin" / "nvcc",
        'case "$*" in *--version*) echo "Cuda compilation tools, release '
        f'{torch.version.cuda}, V{torch.version.cuda}.0" ;; *) echo "nvcc: broken" >&2; exit 1 ;; '
        "esac",
    )
    _script(tmp_path / "wrap" / "nvcc", f'exec {tk}/bin/nvcc "$@"')
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = os.pathsep.join(
        [str(tmp_path / "wrap"), os.path.dirname(sys.executable)] + ["/usr/bin", "/bin"]
    )
    env["TORCH_CUDA_ARCH_LIST"] = "9.0"
    env.pop("SSL_BUILD_CUDA", None)
    if forced:
        env["SSL_BUILD_CUDA"] = "1"
    code = (
        "import sys; sys.argv = ['setup.py', 'build_ext', '--inplace']; "
        "import setup; setup.main(roots=())"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True
    )
    out = run.stdout + run.stderr
    built = list((repo / "common").glob("_C*.so"))
    if forced:
        assert run.returncode != 0 and not built, out[-3000:]
        assert "WARNING" not in out
        return
    assert run.returncode == 0, out[-3000:]
    assert out.count("WARNING: building the CUDA kernels") == 1, out[-3000:]
    assert len(built) == 1
    probe = (
        "import torch, common._C; "
        "has = torch._C._dispatch_has_kernel_for_dispatch_key; "
        "print(has('ssl_ops::nt_xent_fwd', 'CPU'), has('ssl_ops::nt_xent_fwd', 'CUDA'))"
    )
    res = subprocess.run([sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True)
    assert res.stdout.split() == ["True", "False"], res.stdout + res.stderr
