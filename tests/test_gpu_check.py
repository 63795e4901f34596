"""bench/gpu_check.sh, checked without a GPU (its --dry-run), so that a GPU session cannot be
lost to a typo: every command it would run parses (the benchmark's --dry-run, pytest
--collect-only, simclr.py's argument parser), the steps come in the promised order, and a CUDA
version mismatch between nvcc and torch is reported clearly."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _fake_cuda_home(tmp_path: Path, release: str) -> Path:
    """A CUDA_HOME whose bin/nvcc only answers --version with `release` (with the header and
    library that make it look like a toolkit root)."""
    home = tmp_path / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
        f"echo 'Cuda compilation tools, release {release}, V{release}.1'\n"
    )
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    # what setup.py's toolkit search requires of a root (so the script takes this one)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    (home / "lib64").mkdir()
    (home / "lib64" / "libcudart.so").write_text("")
    return home


def _run(tmp_path: Path, release: str, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path / "out"
    full_env = dict(
        os.environ,
        OUT=str(out),
        CUDA_HOME=str(_fake_cuda_home(tmp_path, release)),
        PYTHON=sys.executable,
        **env,
    )
    res = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=tmp_path,
        timeout=300,
    )
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    return res, summary


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch: no CUDA version to match")
def test_dry_run_checks_every_command(tmp_path):
    res, summary = _run(tmp_path, torch.version.cuda)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "cuda_version ok" in summary
    order = [
        "build",
        "test_cuda",
        "bench_targets",
        "bench_256k",
        "bench_multi",
        "simclr",
        "bench_square",
        "bench_compile",
    ]
    lines = [ln.split()[0] for ln in summary.splitlines() if " dry-run" in ln]
    assert [x for x in lines if x in order] == order
    # every command that can be checked without a GPU was (rc=0), not just printed
    for name in order[1:]:
        assert f"{name} dry-run rc=0" in summary, summary
    assert "--sizes 256k" in summary and "1024x8192" in summary


def test_dry_run_reports_a_cuda_version_mismatch(tmp_path):
    torch_major = int((torch.version.cuda or "13.0").split(".")[0])
    res, summary = _run(tmp_path, f"{torch_major - 1}.8", GPU_CHECK_STOP_AFTER_ENV="1")
    assert res.returncode != 0
    if torch.version.cuda is None:
        assert "CPU-only build" in summary
    else:
        assert "CUDA VERSION MISMATCH" in summary
        assert f"nvcc is CUDA {torch_major - 1}.8" in summary


def test_bench_dry_run_rejects_bad_arguments():
    """The checking command itself can fail: an unknown implementation is an error."""
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_nt_xent.py"),
            "--impls",
            "op,fast",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert res.returncode != 0 and "fast" in res.stderr


@pytest.mark.parametrize(
    "summary,gpu,ok",
    [
        ("39 skipped in 2.1s", 1, False),  # every CUDA test skipped on a GPU machine: a failure
        ("38 passed, 1 skipped in 9.0s", 1, False),
        ("39 passed in 9.0s", 1, True),
        ("39 skipped in 2.1s", 0, True),  # no GPU: skipping is right
        ("2 failed, 37 passed in 9.0s", 1, False),
        ("no tests ran in 0.1s", 1, False),
    ],
)
def test_cuda_test_verdict(tmp_path, summary, gpu, ok):
    """test_cuda's verdict on a pytest log (GPU_CHECK_VERDICT hook: the script's own function)."""
    log = tmp_path / "test_cuda.log"
    log.write_text(f"sss\n{summary}\n")
    res = subprocess.run(
        ["bash", str(SCRIPT)],
        capture_output=True,
        text=True,
        env=dict(os.environ, GPU_CHECK_VERDICT=str(log), GPU_VISIBLE=str(gpu)),
        timeout=60,
    )
    assert (res.returncode == 0) == ok, res.stdout


def test_dry_run_names_the_install_and_toolkit_steps(tmp_path):
    """A Python without a CUDA torch gets one installed; without a toolkit, the nvcc wheels
    (said in the dry run); the venv's bin directory is searched first."""
    res, summary = _run(tmp_path, torch.version.cuda or "13.0", GPU_CHECK_STOP_AFTER_ENV="1")
    assert "gpu visible:" in summary
    if torch.version.cuda is None:
        assert "would pip install torch --index-url" in summary
    assert "toolkit" in summary
