"""Multi-node training as a cluster runs it: two `torchrun` agents on this machine play two
nodes (c10d rendezvous on localhost, gloo, one worker each), writing to one shared --out.

The test checks what docs/multinode.md and scripts/slurm_simclr.sbatch rely on: the global
batch is split between the nodes (disjoint halves of each step's batch, not two copies), only
global rank 0 writes the checkpoint, a SIGTERM that reaches one node's torchrun (torchrun
forwards it to its worker) stops *both* nodes at the same step with a checkpoint, and the same
command resumes both nodes from it.

Each worker runs this file as its entry point (`torchrun ... tests/test_multinode.py RECDIR
simclr.py ARGS`): it records what the worker saw (its ranks, each batch's dataset indices, the
checkpoints it wrote, its exit code) into RECDIR and then runs simclr.py unchanged, as
tests/inject.py does.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import ROOT  # also puts the repository on sys.path (for the workers too)
from dist_utils import free_port

# One thread per worker (2 workers on 2 cores); unbuffered so the log order is the real one.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
EPOCHS, LIMIT_TRAIN, BATCH = 2, 256, 32  # 8 steps per epoch, 16 in all: seconds per phase
STEPS = EPOCHS * LIMIT_TRAIN // BATCH
NODES = ("a", "b")  # the two "machines"; c10d, not this order, decides which hosts rank 0


# ------------------------------------------------------------------------- worker side
def _worker(rec_dir: str, script: str, args: list[str]) -> None:
    from common import checkpoint, feed

    env = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TEST_NODE")
    rec = {k.lower(): os.environ.get(k) for k in env}
    rec.update(batches=[], saves=[], exit=None)
    path = Path(rec_dir) / f"rank{rec['rank']}.json"

    def dump():  # atomic: the test may read it at any moment
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        tmp.replace(path)

    dump()  # now: tells the test which node holds which rank

    feed_epoch = feed.BatchFeed.epoch
    # Phase 1 paces the steps so that the SIGTERM lands mid-run however fast this machine is.
    min_step_s, t_last = float(os.environ.get("TEST_MIN_STEP_S", "0")), time.time()

    def epoch(self, epoch, start_step=0):
        nonlocal t_last
        self.sampler.set_epoch(epoch)  # the same order the real feed uses
        order = list(self.sampler)
        for i, x in enumerate(feed_epoch(self, epoch, start_step), start_step):
            time.sleep(max(0.0, min_step_s - (time.time() - t_last)))
            t_last = time.time()
            idx = order[i * self.local_batch : (i + 1) * self.local_batch]
            rec["batches"].append(
                {
                    "step": epoch * self.steps_per_epoch + i,
                    "shape": list(x.shape),
                    "idx": idx,
                    "match": torch.equal(x, self.images[idx]),  # idx are the images trained on
                }
            )
            yield x

    save = checkpoint.save_checkpoint

    def recording_save(p, **kw):
        rec["saves"].append(kw["step"])
        return save(p, **kw)

    feed.BatchFeed.epoch = epoch
    checkpoint.save_checkpoint = recording_save  # TrainRun.save looks it up at call time
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        rec["exit"] = e.code
        raise
    finally:
        dump()


# --------------------------------------------------------------------------- test side
def _start_nodes(cifar_tar: str, out: Path, rec_dir: Path, logs: Path, **env: str) -> dict:
    rec_dir.mkdir()
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    # What each node of scripts/slurm_simclr.sbatch runs, with gloo on CPU instead of GPUs.
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    agent += ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={run_id}"]
    agent += ["--rdzv_conf=join_timeout=60", "--max_restarts=0"]
    script = ["tests/test_multinode.py", str(rec_dir), "simclr.py", "--preset", "tiny"]
    script += ["--data", cifar_tar, "--out", str(out), "--device", "cpu", "--epochs", str(EPOCHS)]
    script += ["--limit-train", str(LIMIT_TRAIN), "--batch-size", str(BATCH), "--log-every", "2"]
    script += ["--knn-bank", "500", "--limit-test", "200"]
    procs = {}
    for node in NODES:
        name = logs / f"{rec_dir.name}-{node}"
        with open(f"{name}.out", "w") as o, open(f"{name}.err", "w") as e:
            procs[node] = subprocess.Popen(
                agent + script,
                cwd=ROOT,
                env={**ENV, **env, "TEST_NODE": node},
                stdout=o,
                stderr=e,
                start_new_session=True,  # its own process group: the finally block ends it all
            )
    return procs


def _stop_all(procs: dict) -> None:
    """End every agent still running, and its workers (the agent's process group)."""
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def _wait(procs: dict, timeout: float) -> dict:
    t0 = time.time()
    return {n: p.wait(timeout=max(1.0, timeout - (time.time() - t0))) for n, p in procs.items()}


def _records(rec_dir: Path) -> list[dict]:
    return [json.loads((rec_dir / f"rank{r}.json").read_text()) for r in range(2)]


def _errors(logs: Path, phase: str) -> str:
    """The end of the workers' tracebacks (torchrun prefixes them "[rankN]:"), or else of the
    agents' own stderr."""
    out = []
    for n in NODES:
        lines = (logs / f"{phase}-{n}.err").read_text().splitlines()
        worker = [x for x in lines if x.startswith("[rank")]
        out += [f"--- node {n}:", *(worker or lines)[-15:]]
    return "\n".join(out)


def _wait_for(cond, procs: dict, timeout: float, what: str, errors) -> None:
    t0 = time.time()
    while not cond():
        assert all(p.poll() is None for p in procs.values()), f"ended before {what}: {errors()}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}: {errors()}"
        time.sleep(0.1)


def _logged_step(out: Path) -> int:
    """The last step rank 0 logged (0 before the first; a line being written does not count)."""
    log = out / "log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return max((int(m) for x in lines for m in re.findall(r'"step": (\d+),', x)), default=0)


def _check_split(recs: list[dict], first: int, last: int) -> None:
    """Both ranks trained steps first..last-1, each on half of every step's global batch."""
    for r in recs:
        assert [b["step"] for b in r["batches"]] == list(range(first, last)), r["rank"]
        assert all(b["match"] and b["shape"] == [BATCH // 2, 32, 32, 3] for b in r["batches"])
    for b0, b1 in zip(recs[0]["batches"], recs[1]["batches"]):
        a, b = set(b0["idx"]), set(b1["idx"])
        assert len(a) == len(b) == BATCH // 2 and not a & b  # halves, not copies
        assert a | b <= set(range(LIMIT_TRAIN))


def test_two_nodes_split_the_batch_checkpoint_on_rank0_and_resume(cifar_tar, tmp_path):
    from common.checkpoint import load_checkpoint

    out = tmp_path / "run"  # one --out for both nodes: the cluster's shared filesystem
    logs = tmp_path

    def text(phase, node):  # what the node's torchrun printed: its workers' stdout
        return (logs / f"{phase}-{node}.out").read_text()

    # Phase 1: train; SIGTERM reaches only the node that does not hold rank 0.
    procs = _start_nodes(cifar_tar, out, tmp_path / "p1", logs, TEST_MIN_STEP_S="0.3")
    try:
        _wait_for(lambda: _logged_step(out) >= 2, procs, 120, "step 2", lambda: _errors(logs, "p1"))
        recs = _records(tmp_path / "p1")
        node1 = next(r["test_node"] for r in recs if r["rank"] == "1")
        procs[node1].send_signal(signal.SIGTERM)  # as SLURM signals torchrun, to one node only
        codes = _wait(procs, 120)
    finally:
        _stop_all(procs)
    node0 = next(n for n in NODES if n != node1)
    recs = _records(tmp_path / "p1")
    # torchrun reports 1 for a worker's 75 (and 1 after a SIGTERM): the workers' codes are the
    # evidence; the batch script therefore decides on requeue from the log, not from srun.
    assert codes["a"] != 0 and codes["b"] != 0, _errors(logs, "p1")
    assert [r["exit"] for r in recs] == [75, 75]  # both nodes stopped, not only the signalled
    assert [(r["world_size"], r["local_rank"]) for r in recs] == [("2", "0"), ("2", "0")]
    assert {r["group_rank"] for r in recs} == {"0", "1"}  # one node each
    stopped = load_checkpoint(out)["step"]
    assert 2 <= stopped < STEPS
    assert recs[0]["saves"][-1] == stopped and recs[1]["saves"] == []  # rank 0 alone writes
    _check_split(recs, 0, stopped)
    assert "world_size 2" in text("p1", node0) and '"stopped": "preempted"' in text("p1", node0)
    assert "config:" not in text("p1", node1)  # rank 1 prints neither config nor step lines
    assert not re.search(r"^step \d+/\d+ ", text("p1", node1), re.M)
    assert re.search(rf"^step 2/{STEPS} ", text("p1", node0), re.M)

    # Phase 2: the same command on both nodes resumes both from the shared checkpoint.
    procs = _start_nodes(cifar_tar, out, tmp_path / "p2", logs)
    try:
        codes = _wait(procs, 120)
    finally:
        _stop_all(procs)
    assert codes == {"a": 0, "b": 0}, _errors(logs, "p2")
    recs = _records(tmp_path / "p2")
    assert [r["exit"] for r in recs] == [0, 0]
    node0 = next(r["test_node"] for r in recs if r["rank"] == "0")  # c10d may swap the nodes
    node1 = next(n for n in NODES if n != node0)
    assert f"resumed from {out / 'checkpoint.pt'} at step {stopped}" in text("p2", node0)
    assert "resumed" not in text("p2", node1)
    _check_split(recs, stopped, STEPS)  # rank 1 resumed at the same step, from the same file
    assert recs[0]["saves"][-1] == STEPS and recs[1]["saves"] == []
    result = json.loads(text("p2", node0).strip().splitlines()[-1])
    assert result["steps"] == load_checkpoint(out)["step"] == STEPS
    assert 0 <= result["knn_top1"] <= 100  # the final evaluation ran (k-NN over both ranks)


# ------------------------------------------------------------------- the SLURM batch script
# scripts/slurm_simclr.sbatch with stand-ins for srun, scancel and scontrol (no SLURM here):
# the command it builds, how it gets SIGTERM to the job step, and the requeue decision. The
# stand-in srun acts as the real job step does, seen from the batch shell: SIGUSR2 stands for
# "SLURM delivered SIGTERM to the step's processes" (scancel --signal, or preemption), upon
# which the run checkpoints (the result line simclr.py writes when preempted) and torchrun
# exits 1; a SIGTERM to srun itself makes it SIGKILL its tasks ("forcing job termination",
# Slurm's src/srun/libsrun/srun_job.c), so no checkpoint.
FAKE_SRUN = """#!{python}
import json, os, signal, sys, time
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
env = {{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}}
stopped = []
signal.signal(signal.SIGUSR2, lambda s, f: stopped.append(s))
signal.signal(signal.SIGTERM, lambda s, f: os._exit(137))  # tasks SIGKILLed, nothing written
info = {{"args": args, "env": env, "pid": os.getpid()}}
(Path(os.environ["FAKE_DIR"]) / "srun.json").write_text(json.dumps(info))
t0 = time.time()
while not stopped and os.environ["FAKE_MODE"] != "finish" and time.time() - t0 < 60:
    time.sleep(0.02)
if os.environ["FAKE_MODE"] == "crash":  # e.g. a node failed: no result line
    sys.exit(1)
result = {{"steps": 7, "stopped": "preempted"}} if stopped else {{"steps": 7}}
with open(out / "log.jsonl", "a") as f:
    f.write(json.dumps({{"result": result}}) + "\\n")
sys.exit(1 if stopped else 0)
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_DIR/slurm.log"
[[ $1 == show ]] && printf 'gpu-node7\\ngpu-node8\\n'
exit 0
"""
FAKE_SCANCEL = """#!{python}
import json, os, signal, sys, time
from pathlib import Path
d = Path(os.environ["FAKE_DIR"])
with open(d / "slurm.log", "a") as f:
    f.write("scancel " + " ".join(sys.argv[1:]) + "\\n")
if sys.argv[1:] == ["--signal=TERM", os.environ["SLURM_JOB_ID"]]:  # the job's steps
    pid = json.loads((d / "srun.json").read_text())["pid"]
    os.kill(pid, signal.SIGUSR2)
    # Return only once the step has ended (gone or a zombie), inside the batch shell's trap:
    # the shell's interrupted `wait` must still report srun's own status, not 128 + SIGUSR1.
    stat = Path(f"/proc/{{pid}}/stat")
    for _ in range(500):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.01)
"""


def test_slurm_script_is_valid_bash():
    script = str(ROOT / "scripts" / "slurm_simclr.sbatch")
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):  # optional (apt-get install shellcheck)
        r = subprocess.run(["shellcheck", script], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout


@pytest.mark.parametrize(
    "event, mode, slurm_calls, code",
    [
        # --signal=B:USR1@180 before the time limit: SIGTERM to the step, then requeue
        ("time-limit", "wait", ["scancel --signal=TERM 1234", "scontrol requeue 1234"], 0),
        # preemption or scancel: SLURM signals everything itself; no requeue from the script
        ("preemption", "wait", [], 75),
        ("none", "finish", [], 0),  # the run ends by itself
        # no checkpoint this time: the previous job's "preempted" line must not requeue it
        ("time-limit", "crash", ["scancel --signal=TERM 1234"], 1),
    ],
)
def test_slurm_script_signals_the_step_and_requeues(tmp_path, event, mode, slurm_calls, code):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_ / "scancel").write_text(FAKE_SCANCEL.format(python=sys.executable))
    (bin_ / "scontrol").write_text(FAKE_SCONTROL)
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path)}
    env.update(FAKE_MODE=mode, SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="gpu-node[7-8]")
    env.update(SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="32")
    env.update(SLURM_RESTART_COUNT="1")  # a requeued job: --fresh must not start it over
    out = tmp_path / "run"
    out.mkdir()  # the log of the job before the requeue
    (out / "log.jsonl").write_text('{"result": {"steps": 3, "stopped": "preempted"}}\n')
    args = ["--data", "/shared/cifar", "--out", str(out), "--fresh", "--batch-size", "1024"]
    proc = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "slurm_simclr.sbatch"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        t0 = time.time()
        while not (tmp_path / "srun.json").exists():  # srun runs: the traps are in place
            assert proc.poll() is None and time.time() - t0 < 30, proc.communicate()
            time.sleep(0.02)
        srun = json.loads((tmp_path / "srun.json").read_text())
        if event == "time-limit":
            proc.send_signal(signal.SIGUSR1)
        elif event == "preemption":  # SIGTERM to the batch shell and to the step's processes
            proc.send_signal(signal.SIGTERM)
            os.kill(srun["pid"], signal.SIGUSR2)
        log, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, log
    torchrun = ["torchrun", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d"]
    torchrun += ["--rdzv_endpoint=gpu-node7:16234", "--rdzv_id=1234", "--max_restarts=0"]
    simclr = ["simclr.py", "--data", "/shared/cifar", "--out", str(out), "--batch-size", "1024"]
    assert srun["args"] == [
        "--ntasks-per-node=1",
        "--cpus-per-task=32",
        "--kill-on-bad-exit=0",
        *torchrun,
        *simclr,
    ]
    assert srun["env"] == {"OMP_NUM_THREADS": "4", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "150"}
    calls = (tmp_path / "slurm.log").read_text().splitlines()
    assert calls == ["scontrol show hostnames gpu-node[7-8]", *slurm_calls]


if __name__ == "__main__":  # a torchrun worker: tests/test_multinode.py RECDIR SCRIPT ARGS...
    _worker(sys.argv[1], sys.argv[2], sys.argv[3:])
