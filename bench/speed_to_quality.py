"""SimCLR speed to quality: k-NN and linear top-1 against minutes of training, one line per preset.

Each (preset, budget) pair is one `simclr.py --preset P --time-budget B` run (the step count is
set from the measured step time, so the cosine schedule ends on time), probed with the same
protocol as the README's tables: `linear_probe.py RUN --limit-train 10000` (weighted k-NN with a
10k-image bank, k = 200, T = 0.1, and a linear probe), tested on all 10k test images. The
untrained network, probed alike, is the floor.

    python bench/speed_to_quality.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --plan "cpu=2,5 fast=2,5,7,10" --png docs/speed_to_quality_cpu.png

Runs go to `--runs DIR/<preset>_<budget>min` (rerunning skips runs and probes already done);
the table (Markdown) is printed and written next to the PNG as .md. Run it on an idle machine:
wall-clock budgets measure the machine's load as much as the recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str]) -> str:
    print("+", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return out.stdout


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def probe(run: Path, random_init: bool, probe_args: list[str]) -> dict:
    name = "eval_linear_random_init.json" if random_init else "eval_linear.json"
    if (run / name).exists():
        return json.loads((run / name).read_text())
    cmd = [sys.executable, "linear_probe.py", str(run), *probe_args]
    return last_json(sh(cmd + (["--random-init"] if random_init else [])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 (folder or tarball)")
    p.add_argument(
        "--plan",
        default="cpu=2,5,10 fast=2,5,10",
        help="space-separated PRESET=MINUTES,... (simclr.py presets and training budgets)",
    )
    p.add_argument("--runs", default="runs/speed_to_quality", help="where the runs go")
    p.add_argument("--png", default="docs/speed_to_quality_cpu.png", help="the curve")
    p.add_argument("--extra", default="", help="extra simclr.py flags for every run")
    p.add_argument("--probe-train", type=int, default=10000, help="probe's train images")
    args = p.parse_args()
    plan = {}
    for item in args.plan.split():
        preset, minutes = item.split("=")
        plan[preset] = [float(b) for b in minutes.split(",")]
    presets = list(plan)
    probe_args = ["--limit-train", str(args.probe_train)]
    load = os.getloadavg()[0]

    rows = []
    for preset, budgets in plan.items():
        for budget in budgets:
            run = ROOT / args.runs / f"{preset}_{budget:g}min"
            result_file = run / "result.json"
            if not result_file.exists():
                cmd = [sys.executable, "simclr.py", "--preset", preset, "--data", args.data]
                cmd += ["--out", str(run), "--time-budget", f"{budget:g}", "--fresh"]
                cmd += args.extra.split()
                t0 = time.time()
                res = last_json(sh(cmd))
                res["wall_minutes"] = round((time.time() - t0) / 60, 2)
                res["load_before"] = round(os.getloadavg()[0], 2)
                result_file.write_text(json.dumps(res))
            res = json.loads(result_file.read_text())
            pr = probe(run, False, probe_args)
            rows.append((preset, budget, res, pr))
    floor_run = ROOT / args.runs / f"{presets[0]}_{plan[presets[0]][0]:g}min"
    floor = probe(floor_run, True, probe_args)

    lines = [
        f"SimCLR speed to quality, CIFAR-10, probe: k-NN (10k bank) and linear on "
        f"{args.probe_train} train images; load average {load:.2f} at the start",
        "",
        "| preset | budget min | train min | steps | epochs | img/s | k-NN | linear |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for preset, budget, res, pr in rows:
        lines.append(
            f"| {preset} | {budget:g} | {res['train_minutes']:.2f} | {res['steps']} | "
            f"{res['epochs']} | {res['img_per_s']:.0f} | {pr['knn_top1']:.1f} | "
            f"{pr['linear_top1']:.1f} |"
        )
    lines.append(
        f"| random init | 0 | | | | | {floor['knn_top1']:.1f} | {floor['linear_top1']:.1f} |"
    )
    table = "\n".join(lines)
    print(table)
    png = ROOT / args.png
    png.parent.mkdir(parents=True, exist_ok=True)
    png.with_suffix(".md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for preset in presets:
        pts = sorted((r["train_minutes"], pr["knn_top1"]) for q, _, r, pr in rows if q == preset)
        ax.plot(*zip(*pts), marker="o", label=f"--preset {preset}")
    ax.axhline(floor["knn_top1"], color="grey", ls="--", label="random init")
    ax.set_xlabel("training minutes (wall clock)")
    ax.set_ylabel("k-NN top-1 (%), 10k bank")
    ax.set_title("SimCLR on CIFAR-10: k-NN vs training time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png} and {png.with_suffix('.md')}")


if __name__ == "__main__":
    main()
