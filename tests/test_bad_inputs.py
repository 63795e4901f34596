"""Every bad input a user can give, met with one clear line (issue 19): a table of cases, each
run through a real entry point (simclr.py, inpainting.py, linear_probe.py, evaluate.py,
results_table.py, ...) on tiny data this test makes, checking

- the exit code (2; 3 for a non-finite loss; 0 where the input is fine after all);
- exactly one `error:` line on stderr, naming the cause, and no traceback;
- nothing left behind: no run folder that was not there before, no temp file anywhere in the
  case's folder, no decoded-image cache when the case must stop before reading data;
- a previous checkpoint still loadable, at the step it had.

Speed: each case is its own process running the script as `__main__` with its argv, forked
from a "zygote" process that imported torch once (an import costs ~4 s on the shared CPU, a
case ~0.2 s); a few cases run as plain `python script.py` subprocesses too (a script copied
alone, two processes on one run folder). Disk-full and read-only cases mount a small tmpfs
(root only; skipped where mounting is not allowed) and one injects ENOSPC into the checkpoint
writer, which works anywhere.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoint import load_checkpoint
from conftest import ROOT

# --------------------------------------------------------------------------------- the zygote
ZYGOTE = r"""
import json, os, runpy, signal, sys, time, traceback
sys.path.insert(0, os.getcwd())
import numpy, torch, torchvision, PIL.Image  # what every case imports: paid once
import common.train, common.data, common.checkpoint, linear_probe, evaluate, results_table

def inject(kind):
    # Faults a case asks for, patched into this case's process only.
    if kind == "enospc@save":  # the checkpoint writer's disk fills up (torch wraps ENOSPC)
        import errno, common.checkpoint as C
        real = C.torch.save
        def full(obj, f, *a, **k):
            if getattr(C, "_saves", 0) >= 1:
                f.write(b"partial")
                raise RuntimeError("[enforce fail] unexpected pos") from OSError(
                    errno.ENOSPC, "No space left on device")
            C._saves = getattr(C, "_saves", 0) + 1
            return real(obj, f, *a, **k)
        C.torch.save = full

def child(req):
    code = 1
    try:
        fd0 = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd0, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = req["argv"]
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if req.get("inject"):
            inject(req["inject"])
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(req)
    deadline = time.time() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, 9)
        time.sleep(0.02)
    rc = os.waitstatus_to_exitcode(status)
    print(json.dumps({"rc": rc}), flush=True)
"""


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


class Zygote:
    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip

    def run(self, argv, cwd, env, logs: Path, timeout=120, inject=None) -> Result:
        logs.mkdir(parents=True, exist_ok=True)
        req = {
            "argv": [str(a) for a in argv], "cwd": str(cwd), "env": env, "timeout": timeout,
            "stdout": str(logs / "stdout"), "stderr": str(logs / "stderr"), "inject": inject,
        }  # fmt: skip
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        out = Result(json.loads(line)["rc"], (logs / "stdout").read_text(), "")
        out.stderr = (logs / "stderr").read_text(errors="replace")
        return out

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ------------------------------------------------------------------------------- tiny worlds
def make_images(root: Path, n_train=16, n_test=8, size=(16, 16), seed=0) -> Path:
    """train/ and test/ with classes a and b: n random PNGs of `size` each."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


def can_mount(tmp: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    d = tmp / "probe-mount"
    d.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                        capture_output=True).returncode == 0  # fmt: skip
    if ok:
        subprocess.run(["umount", str(d)], check=True)
    d.rmdir()
    return ok


@dataclass
class World:
    """What the cases share: the zygote, the tiny data, a finished tiny run, folders."""

    zygote: Zygote
    base: Path
    data: Path
    run: Path  # a finished tiny SimCLR run (1 epoch, 4 steps)
    mounts: list[Path] = field(default_factory=list)
    can_mount: bool = False

    def mount(self, path: Path, size: str, read_only: bool = False) -> Path:
        if not self.can_mount:
            pytest.skip("needs a small tmpfs (root and mount): not available here")
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=True)  # fmt: skip
        self.mounts.append(path)
        return path

    def remount_ro(self, path: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


TRAIN = ["--preset", "tiny", "--batch-size", "8", "--width", "4", "--epochs", "1"]
TRAIN += ["--device", "cpu", "--knn-bank", "32"]


def env_for(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE"))}
    return {**env, "SSL_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    z = Zygote()
    w = World(z, base, make_images(base / "data"), base / "run")
    w.can_mount = can_mount(base)
    r = z.run(
        ["simclr.py", "--data", w.data, "--out", w.run, *TRAIN], ROOT,
        env_for(base / "cache"), base / "logs-run",
    )  # fmt: skip
    assert r.rc == 0, r.stderr[-3000:]
    yield w
    z.close()
    for m in reversed(w.mounts):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


# ------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    """One bad input. argv's strings may hold {data}, {run}, {tmp}, {out}: the tiny data set
    (the case's copy TMP/d when its setup made one), a copy of the finished run (made when
    named), the case's folder and a fresh --out there.
    setup(tmp, world) prepares files (and may return an env update); check(tmp, result)
    asserts more."""

    name: str
    argv: list[str]
    msg: str = ""  # a regex the error line must match (rc != 0)
    rc: int = 2
    setup: Callable | None = None
    check: Callable | None = None
    cwd: str = "{root}"
    inject: str | None = None
    data_read: bool = True  # False: the case must stop before any data is decoded
    keeps: str | None = None  # what a failed case leaves on purpose (a checkpoint it wrote)


def T(*argv):  # a training command on the tiny data
    return [*argv, "--data", "{data}", *TRAIN]


def copy_data(tmp: Path, world: World) -> Path:
    d = tmp / "d"
    shutil.copytree(world.data, d)
    return d


def symlink_loop(tmp, world):
    d = copy_data(tmp, world)
    (d / "train" / "a" / "loop.png").symlink_to("loop.png")


def broken_link(tmp, world):
    d = copy_data(tmp, world)
    (d / "train" / "a" / "gone.png").symlink_to(tmp / "nowhere.png")


def non_utf8_names(tmp, world):
    d = copy_data(tmp, world)
    shutil.copy(d / "train" / "a" / "000.png", os.fsdecode(bytes(d / "train" / "a") + b"/\xff.png"))
    cls = os.fsdecode(bytes(d / "train") + b"/c\xe9")  # a Latin-1 class folder name
    os.mkdir(cls)
    shutil.copy(d / "train" / "a" / "001.png", cls + "/x.png")


def odd_first_image(size):
    def setup(tmp, world):
        d = copy_data(tmp, world)
        Image.new("RGB", size, (200, 30, 30)).save(d / "train" / "a" / "!first.png")

    return setup


def a_file(name):
    def setup(tmp, world):
        (tmp / name).write_text("I am a file")

    return setup


def truncate_checkpoint(tmp, world):
    ck = tmp / "run" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:300])


def malicious_checkpoint(tmp, world):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    torch.save({"format": 1, "x": Evil()}, tmp / "evil.pt")


def hold_lock(tmp, world):
    """This test process holds the run folder's lock, as a live run would."""
    fd = os.open(tmp / "run" / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, f"pid {os.getpid()} on testhost\n".encode(), 0)
    tmp.joinpath("held-fd").write_text(str(fd))


def release_lock(tmp, r):
    os.close(int(tmp.joinpath("held-fd").read_text()))
    assert f"pid {os.getpid()}" in r.errors[0]


def stale_lock_and_temp(tmp, world):
    (tmp / "run" / ".lock").write_text("pid 999999 on deadhost\n")  # its process is gone
    (tmp / "run" / ".ckpt-abc123.tmp").write_bytes(b"half a checkpoint")


def took_over(tmp, r):
    assert "removed 1 temp file" in r.stdout
    assert not list((tmp / "run").glob(".ckpt-*.tmp"))


def relative_data_checkpoint(with_abs: bool):
    def setup(tmp, world):
        ck = tmp / "run" / "checkpoint.pt"
        state = torch.load(ck, weights_only=True)
        state["config"]["data"] = "rel/data"  # --data as typed in another folder
        if not with_abs:
            state["config"].pop("data_path", None)  # a checkpoint from before data_path
        torch.save(state, ck)

    return setup


def corrupt_subset(tmp, world):
    (tmp / "subset_50pct_seed0.json").write_text("{")  # a killed writer's half file


def results_files(tmp, world):
    (tmp / "empty").mkdir()
    (tmp / "garbage").mkdir()
    (tmp / "garbage" / "log.jsonl").write_text("step 1 loss 3\n{not json\n")
    (tmp / "trunc").mkdir()
    (tmp / "trunc" / "log.jsonl").write_text('{"result": {"method": "simclr", "train_min')
    (tmp / "bad.json").write_text("{'single': quotes}")
    (tmp / "list.json").write_text("[1, 2, 3]")
    (tmp / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    (tmp / "good.json").write_text(
        json.dumps({"checkpoint": "runs/x", "method": "simclr", "linear_top1": 50.0})
    )


def disk_full_midway(tmp, world):
    """--out on a tmpfs that holds one checkpoint but not a second: the second save fails."""
    size = (world.run / "checkpoint.pt").stat().st_size
    world.mount(tmp / "disk", f"{(size * 3 // 2) // 4096 * 4096 + 16384}")


def disk_full_at_start(tmp, world):
    world.mount(tmp / "disk", "16k")


def read_only(tmp, world):
    world.mount(tmp / "ro", "1m")
    shutil.copytree(world.run, tmp / "ro" / "run")
    world.remount_ro(tmp / "ro")


def full_disk_with_run(tmp, world):
    """The run folder on a tmpfs filled to the last byte: the probe's result JSON cannot go."""
    world.mount(tmp / "disk", "2m")
    shutil.copytree(world.run, tmp / "disk" / "run", ignore=shutil.ignore_patterns(".lock"))
    with open(tmp / "disk" / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def cache_under_file(tmp, world):
    (tmp / "file").write_text("x")
    return {"SSL_CACHE_DIR": str(tmp / "file" / "cache")}


def cache_full(tmp, world):
    world.mount(tmp / "cachedisk", "16k")
    return {"SSL_CACHE_DIR": str(tmp / "cachedisk" / "cache")}


def no_network(tmp, world):
    dead = "http://127.0.0.1:9"  # nothing listens: the download fails at once, offline or not
    return {"http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead}


def config_of(run: Path) -> dict:
    return load_checkpoint(run)["config"]


def expect_warning(pattern):
    def check(tmp, r):
        warnings = [x for x in r.stderr.splitlines() if x.startswith("warning:")]
        assert len([w for w in warnings if re.search(pattern, w)]) == 1, r.stderr

    return check


def check_size(size, pattern=None):
    def check(tmp, r):
        assert config_of(tmp / "out")["image_size"] == size
        if pattern:
            expect_warning(pattern)(tmp, r)

    return check


def check_counts(tmp, r):
    assert config_of(tmp / "out")["image_size"] == 16
    assert '"knn_top1"' in r.stdout


def check_printed_then_error(tmp, r):
    assert '"linear_top1"' in r.stdout  # the numbers are not lost with the file
    assert not list((tmp / "disk" / "run").glob("eval_*.json"))


def check_disk_full_kept_checkpoint(tmp, r):
    state = load_checkpoint(tmp / "disk" / "out")
    assert state["step"] == 1  # the first save; the second did not fit


def check_injected(tmp, r):
    assert load_checkpoint(tmp / "out")["step"] == 1


def check_epoch_wording(tmp, r):
    # the epochs trained (steps / 8 steps per epoch; the budget sets the steps), not --epochs 2
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["epochs"] == round(result["steps"] / 8, 2) < 2, result
    assert re.search(rf"^epoch {result['epochs']:g} k-NN top-1", r.stdout, re.M), r.stdout


def check_no_download_left(tmp, r):
    assert not (tmp / "data").exists() and r.stdout == ""


def check_not_pwned(tmp, r):
    assert not (tmp / "pwned").exists() and "weights_only=False" not in r.stderr


def check_table_names(*names, rc0=False):
    def check(tmp, r):
        for n in names:
            assert any(n in w for w in r.stderr.splitlines() if w.startswith("warning:")), n

    return check


CASES = [
    # 1. a symlink loop / a broken link in an ImageFolder, in every entry point
    Case("symlink-loop-train", T("simclr.py", "--out", "{out}"), "loop.png: a symlink loop",
         setup=symlink_loop, data_read=False),
    Case("symlink-loop-probe", ["linear_probe.py", "{run}", "--data", "{tmp}/d"],
         "loop.png: a symlink loop", setup=symlink_loop, data_read=False),
    Case("symlink-loop-evaluate", ["evaluate.py", "cluster", "{run}", "--data", "{tmp}/d"],
         "loop.png: a symlink loop", setup=symlink_loop, data_read=False),
    Case("broken-symlink", T("simclr.py", "--out", "{out}"), "gone.png: a broken symlink",
         setup=broken_link, data_read=False),
    # 2. file and class folder names that are not UTF-8: just names
    Case("non-utf8-names-train", T("simclr.py", "--out", "{out}"), rc=0, setup=non_utf8_names,
         check=check_counts),
    Case("non-utf8-names-probe", ["linear_probe.py", "{run}", "--data", "{tmp}/d", "--epochs",
         "2", "--no-save"], rc=0, setup=non_utf8_names),
    # 3. --out a file, under a file, read-only: before any data is read
    Case("out-is-file", T("simclr.py", "--out", "{tmp}/f"), r"--out .*/f: is a file",
         setup=a_file("f"), data_read=False),
    Case("out-under-file", T("simclr.py", "--out", "{tmp}/f/run"), r"/f is a file, not a folder",
         setup=a_file("f"), data_read=False),
    Case("out-is-checkpoint", T("simclr.py", "--out", "{run}/checkpoint.pt"), "is a file",
         data_read=False),
    Case("out-read-only", T("simclr.py", "--out", "{tmp}/ro/new"), "read-only file system",
         setup=read_only, data_read=False),
    Case("resume-on-read-only", T("simclr.py", "--out", "{tmp}/ro/run"), "read-only file system",
         setup=read_only, data_read=False),
    # 4. the same for evaluate.py's, finetune.py's and results_table.py's outputs
    Case("tsne-out-file", ["evaluate.py", "tsne", "{run}", "--out", "{tmp}/f"], "--out .*: is a file",
         setup=a_file("f"), data_read=False),
    Case("finetune-subset-under-file", ["finetune.py", "{run}", "--subset-dir",
         "{tmp}/f/s"], "--subset-dir .*f is a file", setup=a_file("f"), data_read=False),
    Case("table-out-under-file", ["results_table.py", "{run}", "--out", "{tmp}/f/t.md"],
         "--out .*f is a file", setup=a_file("f")),
    Case("table-out-is-folder", ["results_table.py", "{run}", "--out", "{tmp}"], "is a folder"),
    Case("table-update-missing", ["results_table.py", "{run}", "--update", "{tmp}/README.md",
         "--marker", "x"], "no such file"),
    # 5./6. a truncated checkpoint in --out, a malicious pickle to --resume: before any data
    Case("truncated-checkpoint-auto-resume", T("simclr.py", "--out", "{run}"),
         r"cannot resume: .*checkpoint.pt is not a loadable checkpoint .*--fresh",
         setup=truncate_checkpoint, data_read=False),
    Case("malicious-resume", T("simclr.py", "--out", "{out}", "--resume", "{tmp}/evil.pt"),
         r"evil.pt is not a loadable checkpoint: it holds objects other than tensors .*GLOBAL",
         setup=malicious_checkpoint, check=check_not_pwned, data_read=False),
    Case("malicious-probe", ["linear_probe.py", "{tmp}/evil.pt"], "refused without running",
         setup=malicious_checkpoint, check=check_not_pwned, data_read=False),
    Case("resume-missing", T("simclr.py", "--out", "{out}", "--resume", "{tmp}/nope.pt"),
         "--resume: no checkpoint at", data_read=False),
    # 7. disk full during a save / from the start (a real tmpfs), and injected
    Case("disk-full-midway", T("simclr.py", "--out", "{tmp}/disk/out", "--ckpt-every", "1"),
         r"cannot write checkpoint .*disk/out/checkpoint.pt: no space left on device \(the "
         r"previous one is intact\)", setup=disk_full_midway, check=check_disk_full_kept_checkpoint,
         keeps="disk/out"),
    Case("disk-full-at-start", T("simclr.py", "--out", "{tmp}/disk/out"),
         r"checkpoint.pt: no space left on device \(none was written before\)",
         setup=disk_full_at_start),
    Case("disk-full-injected", T("simclr.py", "--out", "{out}", "--ckpt-every", "1"),
         r"cannot write checkpoint .*: no space left on device \(the previous one is intact\)",
         inject="enospc@save", check=check_injected, keeps="out"),
    Case("cache-disk-full", T("simclr.py", "--out", "{out}"),
         "cannot write the decoded-image cache .*no space left on device", setup=cache_full,
         keeps="cachedisk/cache"),
    # 9. the run folder read-only / the disk full when a probe saves its result
    Case("probe-run-read-only", ["linear_probe.py", "{tmp}/ro/run"],
         "read-only file system \\(--no-save prints", setup=read_only, data_read=False),
    Case("cluster-run-read-only", ["evaluate.py", "cluster", "{tmp}/ro/run"],
         "read-only file system", setup=read_only, data_read=False),
    Case("probe-disk-full-at-save", ["linear_probe.py", "{tmp}/disk/run", "--epochs", "2"],
         r"cannot write .*eval_linear.json: no space left on device", setup=full_disk_with_run,
         check=check_printed_then_error),
    # 10./14. evaluate.py's and finetune.py's float flags: ranges, NaN
    Case("finetune-label-smoothing", ["finetune.py", "{run}", "--label-smoothing",
         "2"], r"--label-smoothing must be in \[0, 1\), got 2.0", data_read=False),
    Case("finetune-crop-min", ["finetune.py", "{run}", "--crop-min", "5"],
         r"--crop-min must be in \(0, 1\]", data_read=False),
    Case("finetune-lr-nan", ["finetune.py", "{run}", "--lr", "nan"],
         r"--lr must be in \(0, inf\), got nan", data_read=False),
    Case("finetune-lr-negative", ["finetune.py", "{run}", "--lr", "-1"],
         r"--lr must be in \(0, inf\)", data_read=False),
    Case("finetune-wd-nan", ["finetune.py", "{run}", "--weight-decay", "nan"],
         r"--weight-decay must be in \[0, inf\)", data_read=False),
    Case("finetune-warmup-negative", ["finetune.py", "{run}", "--warmup-epochs",
         "-5"], r"--warmup-epochs must be in \[0, inf\)", data_read=False),
    Case("finetune-layer-decay-nan", ["finetune.py", "{run}", "--layer-decay",
         "nan"], r"--layer-decay must be in \(0, 1\]", data_read=False),
    Case("finetune-pcts-nan", ["finetune.py", "{run}", "--pcts", "nan"],
         r"--pcts must be in \(0, 100\]", data_read=False),
    Case("tsne-perplexity-nan", ["evaluate.py", "tsne", "{run}", "--perplexity", "nan"],
         r"--perplexity must be in \(0, inf\)", data_read=False),
    Case("robustness-knn-t-inf", ["evaluate.py", "robustness", "{run}", "--knn-t", "inf"],
         r"--knn-t must be in \(0, inf\), got inf", data_read=False),
    Case("probe-upsample-nan", ["linear_probe.py", "{run}", "--upsample", "nan"],
         r"--upsample must be in \(0, inf\)", data_read=False),
    Case("finetune-corrupt-subset", ["finetune.py", "{run}", "--pcts", "50",
         "--subset-dir", "{tmp}"], r"subset_50pct_seed0.json: not a subset list",
         setup=corrupt_subset),
    Case("evaluate-finetune-moved", ["evaluate.py", "finetune", "{run}", "--pcts", "10"],
         r"fine-tuning moved to finetune.py", data_read=False),
    # 11./12. one odd image that sorts first no longer sets the size of the data set
    Case("tiny-image-first", T("simclr.py", "--out", "{out}"), rc=0, setup=odd_first_image((1, 1)),
         check=check_size(16, r"1 of 49 images .* not 16x16 px")),
    Case("huge-image-first", T("simclr.py", "--out", "{out}"), rc=0,
         setup=odd_first_image((4000, 3000)), check=check_size(16, r"1 of 49 images")),
    Case("image-size-flag", T("simclr.py", "--out", "{out}", "--image-size", "8"), rc=0,
         check=check_size(8, r"48 of 48 images .* not 8x8 px")),
    Case("image-size-zero", T("simclr.py", "--out", "{out}", "--image-size", "0"),
         "--image-size must be > 0", data_read=False),
    # 13. SimCLR with fewer than 2 images per step
    Case("simclr-batch-1", T("simclr.py", "--out", "{out}") + ["--batch-size", "1"],
         "SimCLR needs at least 2 images per step", data_read=False),
    # 15. inpainting's float flags, and the other scripts' own (NaN everywhere)
    Case("inpainting-adv-nan", T("inpainting.py", "--out", "{out}", "--adv-weight", "nan"),
         r"--adv-weight must be in \[0, inf\), got nan", data_read=False),
    Case("inpainting-band-nan", T("inpainting.py", "--out", "{out}", "--band-weight", "nan"),
         r"--band-weight must be in \[0, inf\)", data_read=False),
    Case("inpainting-hole-1", T("inpainting.py", "--out", "{out}", "--hole-frac", "1"),
         r"--hole-frac must be in \(0, 1\)", data_read=False),
    Case("rotnet-momentum-1", T("rotnet.py", "--out", "{out}", "--momentum", "1"),
         r"--momentum must be in \[0, 1\)", data_read=False),
    Case("mae-mask-ratio-nan", T("mae.py", "--out", "{out}", "--mask-ratio", "nan"),
         "--mask-ratio must be a finite number, got nan", data_read=False),
    Case("jigsaw-gray-p-inf", T("jigsaw.py", "--out", "{out}", "--gray-p", "inf"),
         "--gray-p must be a finite number", data_read=False),
    # (smaller point) "[0, inf], got inf" no longer contradicts itself
    Case("lr-inf", T("simclr.py", "--out", "{out}", "--lr", "inf"),
         r"--lr must be in \[0, inf\), got inf", data_read=False),
    Case("time-budget-nan", T("simclr.py", "--out", "{out}", "--time-budget", "nan"),
         r"--time-budget must be in \(0, inf\), got nan", data_read=False),
    # 16. results_table.py: unusable files named; nothing usable: exit 2
    Case("table-empty-folder", ["results_table.py", "{tmp}/empty"], "no usable results",
         setup=results_files, check=check_table_names("empty: no result in it")),
    Case("table-garbage-log", ["results_table.py", "{tmp}/garbage", "{tmp}/trunc"],
         "no usable results", setup=results_files,
         check=check_table_names("garbage/log.jsonl: no JSON object", "trunc/log.jsonl")),
    Case("table-bad-files", ["results_table.py", "{tmp}/bad.json", "{tmp}/list.json",
         "{tmp}/binary.json"], "no usable results", setup=results_files,
         check=check_table_names("bad.json", "list.json: a JSON list", "binary.json: not a "
                                 "results file (not UTF-8")),
    Case("table-some-usable", ["results_table.py", "{tmp}/good.json", "{tmp}/list.json"], rc=0,
         setup=results_files, check=check_table_names("list.json")),
    # 17. a non-finite loss before the first checkpoint: exit 3, no run folder left
    Case("nonfinite-before-checkpoint", ["tests/inject.py", "nan@step3",
         *T("simclr.py", "--out", "{out}")], "non-finite loss at step 3 .*before the first "
         "checkpoint, so nothing was saved", rc=3),
    # 18. the run lock: a live holder is named; a stale lock and a killed save's temp file
    Case("lock-held", T("simclr.py", "--out", "{run}"), r"--out .*run is in use by another run "
         r"\(pid \d+ on testhost\)", setup=hold_lock, check=release_lock, data_read=False),
    Case("stale-lock-taken-over", T("simclr.py", "--out", "{run}"), rc=0,
         setup=stale_lock_and_temp, check=took_over),
    # smaller points
    Case("download-no-network", ["simclr.py", *TRAIN], r"(?i)could not (load or )?download cifar10",
         cwd="{tmp}", setup=no_network, check=check_no_download_left),
    Case("relative-data-from-checkpoint", ["linear_probe.py", "{run}"],
         r"the checkpoint's dataset --data 'rel/data' \(as given to the training run\) is not "
         r"found from .*: pass --data", setup=relative_data_checkpoint(False), data_read=False),
    Case("relative-data-absolute-kept", ["linear_probe.py", "{run}", "--epochs", "2",
         "--no-save"], rc=0, setup=relative_data_checkpoint(True)),
    Case("cache-dir-under-file", T("simclr.py", "--out", "{out}"),
         r"cannot write the decoded-image cache in .*file/cache: a part of the path is a file",
         setup=cache_under_file),
    Case("time-budget-epoch-wording", T("simclr.py", "--out", "{out}") + ["--batch-size", "4",
         "--epochs", "2", "--time-budget", "0.001"], rc=0, check=check_epoch_wording),
]  # fmt: skip


def expand(argv, tmp: Path, world: World) -> list[str]:
    data = tmp / "d" if (tmp / "d").is_dir() else world.data  # a case's own copy, if made
    subs = {"{data}": str(data), "{tmp}": str(tmp), "{out}": str(tmp / "out")}
    subs["{run}"] = str(tmp / "run")
    subs["{root}"] = str(ROOT)
    out = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    return out


def leftovers(folder: Path) -> list[Path]:
    """Temp files of a save or a cache build, anywhere under folder."""
    pats = (".ckpt-*.tmp", ".tmp-*", ".*.tmp")
    return [p for pat in pats for p in folder.rglob(pat) if "held-fd" not in p.name]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, world: World, tmp_path: Path):
    tmp = tmp_path
    if "{run}" in " ".join(case.argv) or case.setup in (truncate_checkpoint, hold_lock,
                                                          stale_lock_and_temp):  # fmt: skip
        shutil.copytree(world.run, tmp / "run", ignore=shutil.ignore_patterns(".lock"))
    cache = tmp / "cache"
    env = env_for(cache)
    if case.setup:
        env.update(case.setup(tmp, world) or {})
    loadable = (tmp / "run").is_dir() and case.setup is not truncate_checkpoint
    before = load_checkpoint(tmp / "run")["step"] if loadable else None
    runs_before = {p for p in tmp.rglob("*")}
    argv = expand(case.argv, tmp, world)
    argv[0] = str(ROOT / argv[0])  # (the case may run in another folder)
    cwd = expand([case.cwd], tmp, world)[0]
    r = world.zygote.run(argv, cwd, env, tmp / "logs", inject=case.inject)

    assert r.rc == case.rc, f"exit {r.rc}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if case.rc == 0:
        assert not r.errors, r.stderr
    else:
        assert len(r.errors) == 1, r.stderr
        assert re.search(case.msg, r.errors[0]), r.errors[0]
    if case.rc != 0:
        # nothing new but the logs and the cache: no run folder, lock or download folder
        new = {p for p in tmp.rglob("*")} - runs_before
        kept = [tmp / "logs", cache] + ([tmp / case.keeps] if case.keeps else [])
        new = {p for p in new if not any(p.is_relative_to(k) for k in kept)}
        assert not new, f"left behind: {sorted(map(str, new))}"
    assert not leftovers(tmp), leftovers(tmp)
    if not case.data_read:
        assert not cache.exists() or not any(cache.iterdir()), "data was read before the error"
    if before is not None:  # the run's checkpoint: still there, loadable, not older
        assert load_checkpoint(tmp / "run")["step"] >= before
    if case.check:
        case.check(tmp, r)


# ------------------------------------------------------------------ real separate processes
def test_second_process_on_the_same_out_names_the_first(world, tmp_path):
    """Two real `python simclr.py` processes on one --out: the second stops at once, naming
    the first's pid; the first is not disturbed (its folder, lock and log are its own)."""
    out = tmp_path / "out"
    env = env_for(tmp_path / "cache")
    cmd = [sys.executable, "simclr.py", "--data", str(world.data), "--out", str(out), *TRAIN]
    first = subprocess.Popen(cmd + ["--epochs", "200"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        t0 = time.time()
        while not (out / ".lock").exists() or not (out / ".lock").read_text().strip():
            assert first.poll() is None and time.time() - t0 < 120, first.communicate()
            time.sleep(0.2)
        r = world.zygote.run(cmd[1:], ROOT, env, tmp_path / "logs")
        assert r.rc == 2 and len(r.errors) == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"is in use by another run (pid {first.pid} on " in r.errors[0]
        assert first.poll() is None  # still running
    finally:
        first.kill()
        first.wait()
    # the killed run's lock is stale now: the next run takes it over and resumes or starts
    r = world.zygote.run(cmd[1:] + ["--max-steps", "1", "--fresh"], ROOT, env, tmp_path / "l2")
    assert r.rc == 0, r.stderr[-2000:]


def test_script_copied_without_common_says_what_to_copy(tmp_path):
    shutil.copy(ROOT / "simclr.py", tmp_path)
    r = subprocess.run([sys.executable, "simclr.py", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.search(r"^error: .*common/", r.stderr, re.M)
