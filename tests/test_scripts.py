"""scripts/: the digits transfer target (scikit-learn's digits as an ImageFolder) and
lecture.sh, the README's every-method x every-protocol pipeline, checked by what it would run
(DRY=1) for an empty and for a partly done results folder."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import digits_folder  # noqa: E402


def test_digits_folder_is_a_stratified_fixed_split(tmp_path):
    from sklearn.datasets import load_digits

    counts = digits_folder.write_digits(tmp_path / "d")
    assert counts == {"train": 1198, "test": 599}
    files = {s: sorted((tmp_path / "d" / s).rglob("*.png")) for s in ("train", "test")}
    assert len(files["train"]) + len(files["test"]) == 1797
    names = {s: {f.name for f in fs} for s, fs in files.items()}
    assert not names["train"] & names["test"]  # every image in one split only
    target = load_digits().target
    for c in range(10):  # a third of every class is test
        n_test = len(list((tmp_path / "d" / "test" / str(c)).iterdir()))
        assert abs(n_test - (target == c).sum() / 3) <= 1
    f = files["test"][0]
    img = Image.open(f)
    assert img.size == (32, 32) and img.mode == "RGB"
    # the picture is the digit's: the 8x8 original, scaled up, matches its 32 px copy
    i = int(f.stem)
    small = np.asarray(img.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=float)
    truth = load_digits().images[i] * 255 / 16
    assert np.corrcoef(small.ravel(), truth.ravel())[0, 1] > 0.9
    assert f.parent.name == str(target[i])  # filed under its own class
    mtime = f.stat().st_mtime_ns
    assert digits_folder.write_digits(tmp_path / "d") == counts  # the same split again
    assert f.stat().st_mtime_ns == mtime  # and nothing rewritten


def lecture(stage, runs, **env):
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "lecture.sh"), stage],
        # `python` in the script is this interpreter (a venv's, even if not activated)
        env={**os.environ, "DRY": "1", "RUNS": str(runs), **env}
        | {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if line.startswith("python ")]


def test_lecture_script_is_valid_bash():
    script = str(ROOT / "scripts" / "lecture.sh")
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", script], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout


def test_lecture_pretrain_runs_every_method_once(tmp_path):
    cmds = lecture("pretrain", tmp_path)
    scripts = [c.split()[1] for c in cmds]
    for m in ("simclr", "rotnet", "jigsaw", "context", "colorize", "inpainting"):
        assert f"{m}.py" in scripts
    assert scripts.count("mae.py") == 4 and scripts.count("context.py") == 2
    assert all("--fresh" in c and f"--out {tmp_path}/" in c for c in cmds)
    budgeted = [c for c in cmds if "mae.py" not in c]
    assert all("--time-budget 6" in c for c in budgeted)  # the same --time-budget flag on every run
    mae = [c for c in cmds if "mae.py" in c]  # the ablation: equal epochs, four maskings
    assert all("--epochs 3" in c for c in mae)
    masks = {
        (c.split("--mask-type ")[1].split()[0], c.split("--mask-ratio ")[1].split()[0]) for c in mae
    }
    assert masks == {("random", "0.75"), ("block", "0.5"), ("block", "0.75"), ("grid", "0.75")}


def test_lecture_evaluate_covers_what_is_pretrained_and_skips_what_is_done(tmp_path):
    assert lecture("evaluate", tmp_path) == []  # nothing pre-trained: nothing to evaluate
    for m in ("simclr", "rotnet"):
        (tmp_path / m).mkdir()
        (tmp_path / m / "log.jsonl").write_text(json.dumps({"result": {"method": m}}) + "\n")
    (tmp_path / "rotnet" / "eval_cluster.json").write_text("{}")  # done before
    cmds = lecture("evaluate", tmp_path)
    sim = [c for c in cmds if f"{tmp_path}/simclr" in c and "--random-init" not in c]
    base = [c for c in cmds if f"{tmp_path}/simclr" in c and "--random-init" in c]
    rot = [c for c in cmds if f"{tmp_path}/rotnet" in c]
    kinds = ["linear_probe.py", "cluster", "finetune.py", "--pcts 100", "robustness", "imagenette"]
    kinds += ["digits"]
    for group in (sim, base):
        assert len(group) == 7 and all(any(k in c for c in group) for k in kinds), group
    assert len(rot) == 6 and not any("cluster" in c for c in rot)
    assert not any("--random-init" in c for c in rot)  # simclr's baseline is rotnet's too


def test_lecture_seeds_stage_reruns_the_mae_ablation_with_two_more_seeds(tmp_path):
    cmds = lecture("seeds", tmp_path)
    assert len(cmds) == 8  # 4 maskings x seeds 1, 2: train then probe
    assert all(" && python linear_probe.py " in c and "--limit-train 10000" in c for c in cmds)
    seeds = sorted(c.split("--seed ")[1].split()[0] for c in cmds)
    assert seeds == ["1"] * 4 + ["2"] * 4
    assert all(f"--out {tmp_path}/mae_" in c and "_s" in c.split("--out ")[1] for c in cmds)
    # a finished run is only probed, a probed one skipped
    done = tmp_path / "mae_grid0.75_s2"
    done.mkdir()
    (done / "log.jsonl").write_text(json.dumps({"result": {"method": "mae"}}) + "\n")
    cmds = lecture("seeds", tmp_path)
    assert len(cmds) == 8 and f"python linear_probe.py {done} --limit-train 10000" in cmds
    (done / "eval_linear.json").write_text("{}")
    assert len(lecture("seeds", tmp_path)) == 7


def test_lecture_method_seeds_reruns_the_close_orders_with_three_seeds(tmp_path):
    cmds = lecture("method-seeds", tmp_path)
    trains = [c for c in cmds if "--time-budget" in c]
    untrained = [c for c in cmds if "--random-init" in c]
    assert len(trains) == 12 and len(untrained) == 6 and len(cmds) == 18
    # each method's seed-0 command is the pretrain stage's, byte for byte (then probed)
    pretrain = lecture("pretrain", tmp_path)
    for m in ("simclr", "rotnet", "jigsaw", "context"):
        runs = [c for c in trains if c.startswith(f"python {m}.py ")]
        seeds = sorted(c.split("--seed ")[1].split()[0] if "--seed" in c else "0" for c in runs)
        assert seeds == ["0", "1", "2"], runs
        seed0 = next(c for c in runs if "--seed" not in c)
        first, probe = seed0.split(" && ")
        assert (
            first in pretrain
            and probe == f"python linear_probe.py {tmp_path}/{m} --limit-train 10000"
        )
    # the untrained nets: init seeds 0-2 for the RGB ResNet (simclr's) and context's input
    pairs = sorted((c.split()[2].rsplit("/", 1)[1], c.split("--seed ")[1]) for c in untrained)
    expect = [("context", "0"), ("context_s1", "1"), ("context_s2", "2")]
    assert pairs == sorted(expect + [(a.replace("context", "simclr"), b) for a, b in expect])


def simclr_ablations(stage, runs):
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "simclr_ablations.sh"), stage],
        env={**os.environ, "DRY": "1", "RUNS": str(runs)}
        | {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_simclr_ablations_cover_each_table_with_three_seeds(tmp_path):
    lines = simclr_ablations("run", tmp_path)
    trains = [c.split(" && ")[0] for c in lines]
    assert len(trains) == 48  # (4 heads + 5 batches + 8 compositions - 1 shared) x 3 seeds
    assert all("--preset fast --limit-train 10000 --epochs 2" in c for c in trains)
    flags = {c.split("--epochs 2")[1].split("--seed")[0].strip() for c in trains}
    for f in ("--proj-layers 0", "--proj-layers 1", "--proj-layers 3", "--aug crop",
              "--aug color", "--aug crop,color,blur", "--aug crop,sobel", "--aug crop,rotate",
              "--aug crop,cutout", "--aug crop,noise", ""):  # fmt: skip
        assert f in flags, f
    assert sum("--batch-size" in f for f in flags) == 5
    for setting in flags:  # every setting with seeds 0, 1, 2
        seeds = [c.split("--seed ")[1].split()[0] for c in trains if f"2 {setting} --seed" in c]
        assert sorted(seeds) == ["0", "1", "2"], setting
    head_rows = [c for c in lines if "--proj-layers" in c or "/base " in c]
    assert all("--head" in c for c in head_rows)  # h and z probes for the head table
    assert sum("--random-init" in c for c in lines) == 1
