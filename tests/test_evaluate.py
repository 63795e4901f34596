"""evaluate.py's protocols and results_table.py end to end on CPU, on a checkpoint of a tiny
SimCLR run (2 steps) and on an MAE-format ViT checkpoint: each protocol's JSON, its saved
eval_*.json with the command, and the Markdown table with the efficiency columns. (Fine-tuning,
finetune.py, is tests/test_finetune.py's, on the same two checkpoints.)"""

import json
import sys

import pytest
import torch
from PIL import Image

import evaluate
import results_table
from common.data import ImageSet
from conftest import run_main, run_script, write_image

pytestmark = pytest.mark.usefixtures("one_thread")


def ev(*argv):
    return run_main(evaluate, *argv)


def test_cluster(tiny_run):
    res = ev("cluster", tiny_run, "--limit-test", 300, "--restarts", 2)
    assert res["protocol"] == "cluster" and res["method"] == "simclr" and res["k"] == 10
    assert 0 <= res["nmi"] <= 1 and -1 <= res["ari"] <= 1 and 10 <= res["cluster_acc"] <= 100
    assert res["num_test"] == 300
    saved = json.loads((tiny_run / "eval_cluster.json").read_text())
    assert saved == res and res["command"].startswith("python evaluate.py cluster ")


def test_tsne_grid_across_runs(tiny_run, vit_run, tmp_path):
    res = ev("tsne", tiny_run, vit_run, "--limit-test", 120, "--out", tmp_path)
    assert [r["method"] for r in res["runs"]] == ["simclr", "mae"] and res["num_points"] == 120
    with Image.open(tmp_path / "tsne.png") as im:
        assert im.format == "PNG" and im.width > 1.5 * im.height  # two panels side by side
    assert (tmp_path / "eval_tsne.json").exists()


def test_transfer_to_an_image_folder(tiny_run, image_folder, tmp_path, monkeypatch, cifar_tar):
    monkeypatch.setenv("SSL_CACHE_DIR", str(tmp_path / "cache"))
    probe = ["--epochs", 5, "--lrs", 0.1, "--wds", 0]
    res = ev("transfer", tiny_run, "--data", image_folder, *probe)
    assert res["source"] == cifar_tar and res["target_name"] == "folder"
    assert res["num_classes"] == 2 and res["num_train"] == 10 and res["num_test"] == 4
    assert 0 <= res["linear_top1"] <= 100 and 0 <= res["knn_top1"] <= 100
    assert (tiny_run / "eval_transfer_folder.json").exists()
    # Larger target images are resized to the pre-training size (32) unless --native-size.
    big = tmp_path / "big"
    for split, n in (("train", 3), ("test", 1)):
        for c in ("a", "b"):
            for i in range(n):
                write_image(big / split / c / f"{i}.png", (64, 64), seed=i + ord(c))
    assert ev("transfer", tiny_run, "--data", big, *probe, "--no-save")["input_size"] == 32
    native = ev("transfer", tiny_run, "--data", big, *probe, "--no-save", "--native-size")
    assert native["input_size"] == 64


def with_unlabelled(data: ImageSet, extra: torch.Tensor) -> ImageSet:
    """data with the images `extra` interleaved as unlabelled (label -1), as STL-10's train
    split carries its unlabeled one; the labelled images keep their order."""
    images, labels = [], []
    for i in range(len(data)):
        images.append(data.images[i])
        labels.append(int(data.labels[i]))
        if i % 2 == 0:  # every other labelled image is followed by an unlabelled one
            images.append(extra[(i // 2) % len(extra)])
            labels.append(-1)
    return ImageSet(torch.stack(images), torch.tensor(labels), data.classes, data.mean,
                    data.std, data.name)  # fmt: skip


def test_transfer_ignores_unlabelled_images(tiny_run, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_CACHE_DIR", str(tmp_path / "cache"))
    probe = ["--epochs", 5, "--lrs", 0.1, "--wds", 0, "--knn-k", 3, "--no-save"]
    plain = ev("transfer", tiny_run, "--data", image_folder, *probe)
    load = evaluate.load_split

    def load_split(data, split):
        s = load(data, split)
        gen = torch.Generator().manual_seed(1)  # not the global RNG: the probe's init uses it
        noise = torch.randint(0, 256, (3, *s.images.shape[1:]), dtype=torch.uint8, generator=gen)
        return with_unlabelled(s, noise)  # -1 labels in the train and the test split

    monkeypatch.setattr(evaluate, "load_split", load_split)
    mixed = ev("transfer", tiny_run, "--data", image_folder, *probe)
    keys = ["knn_top1", "linear_top1", "val_top1", "best_lr", "num_train", "num_test"]
    assert {k: mixed[k] for k in keys} == {k: plain[k] for k in keys}
    assert mixed["num_train"] == 10 and mixed["num_test"] == 4  # the labelled images only


def test_probe_flags_are_checked_before_any_work():
    with pytest.raises(ValueError, match="--knn-k must be > 0"):
        ev("transfer", "runs/none", "--data", "x", "--knn-k", 0)
    with pytest.raises(ValueError, match="--lrs needs one or more finite values > 0"):
        ev("robustness", "runs/none", "--lrs", -1)


def test_robustness(tiny_run):
    flags = "--limit-train 300 --limit-test 100 --epochs 5 --lrs 0.1 --wds 0 --severities 1 5"
    res = ev("robustness", tiny_run, *flags.split())
    assert set(res["top1"]) == {"gaussian_noise", "gaussian_blur", "contrast", "jpeg"}
    assert all(len(v) == 2 and all(0 <= a <= 100 for a in v) for v in res["top1"].values())
    flat = [a for v in res["top1"].values() for a in v]
    assert res["corrupted_top1"] == pytest.approx(sum(flat) / len(flat))
    assert 0 <= res["clean_top1"] <= 100 and res["severities"] == [1, 5]


def test_results_table(tiny_run, tmp_path):
    run = tmp_path / "runs" / "simclr"
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text((tiny_run / "log.jsonl").read_text())  # a real result line
    cmd = "python evaluate.py cluster runs/simclr"
    cluster = {"protocol": "cluster", "method": "simclr", "nmi": 0.4321, "ari": 0.2}
    cluster |= {"cluster_acc": 41.0, "command": cmd}
    (run / "eval_cluster.json").write_text(json.dumps(cluster))
    baseline = {"protocol": "finetune", "method": "simclr", "random_init": True}
    baseline |= {"finetune_10pct_top1": 30.0, "finetune_1pct_top1": 20.0}
    (run / "eval_finetune_random_init.json").write_text(json.dumps(baseline))
    # linear_probe.py's output saved anywhere, after a log line: found by its "checkpoint"
    probe = {"checkpoint": str(run), "method": "simclr", "linear_top1": 55.55, "knn_top1": 50.0}
    loose = tmp_path / "linear.json"
    loose.write_text("log line\n" + json.dumps(probe) + "\n")
    # probes of block 2 (--layer 2) or of x3 inputs (--upsample 3) get their own columns
    (run / "eval_linear_layer2.json").write_text(
        json.dumps(probe | {"layer": 2, "linear_top1": 60})
    )
    (run / "eval_linear_x3.json").write_text(json.dumps(probe | {"upsample": 3, "knn_top1": 70}))
    table = results_table.main(
        results_table.get_args_parser().parse_args(
            [str(run), str(loose), "--out", str(tmp_path / "t.md")]
        )
    )
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    expected = ["k-NN (pre-train)", "linear", "NMI", "fine-tune 1%", "fine-tune 10%"]
    expected += ["train min", "img/s", "peak mem GiB", "params M", "command"]  # efficiency
    assert all(col in header for col in expected), header
    assert header.index("fine-tune 1%") < header.index("fine-tune 10%") < header.index("img/s")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(rows) == 2  # the run, and its random-init baseline
    row, base = (dict(zip(header, r)) for r in rows)
    assert row["method"] == "simclr" and row["linear"] == "55.5" and row["NMI"] == "0.432"
    assert row["linear (block 2)"] == "60.0" and row["k-NN (x3 input)"] == "70.0"
    assert header.index("linear") < header.index("linear (block 2)") < header.index("k-NN")
    assert row["command"] == f"`{cmd}`" and float(row["params M"]) > 0
    assert base["method"] == "simclr (random init)" and base["fine-tune 1%"] == "20.0"
    assert base["linear"] == "" and (tmp_path / "t.md").read_text() == table
    # The README's tables are regenerated in place between markers.
    readme = tmp_path / "README.md"
    readme.write_text("# R\n\nRESULTS_CPU\n\nend\n")
    results_table.main(
        results_table.get_args_parser().parse_args(
            [str(run), "--update", str(readme), "--marker", "RESULTS_CPU"]
        )
    )
    results_table.main(
        results_table.get_args_parser().parse_args(
            [str(run), "--update", str(readme), "--marker", "RESULTS_CPU"]
        )
    )
    text = readme.read_text()
    assert text.count("<!-- results:RESULTS_CPU -->") == 1 and text.count("| run |") == 1
    assert text.startswith("# R\n\n<!-- results:") and text.endswith("-->\n\nend\n")


def test_results_table_per_protocol_with_mae_mask_columns(tiny_run, vit_run, tmp_path):
    """--only PROTOCOL: that protocol's columns, rows that have them; MAE rows carry their
    masking (from the checkpoint's config) in every table, the masking ablation's key."""
    mae_run = tmp_path / "mae_block"
    state = torch.load(vit_run / "checkpoint.pt", weights_only=True)
    state["config"] |= {"mask_type": "block", "mask_ratio": 0.5}
    mae_run.mkdir()
    torch.save(state, mae_run / "checkpoint.pt")
    result = {"method": "mae", "epochs": 3, "recon_loss": 0.4, "recon_loss_random75": 0.45}
    result |= {"train_minutes": 1.0, "command": "python mae.py --mask-type block"}
    (mae_run / "log.jsonl").write_text(json.dumps({"result": result}) + "\n")
    cluster = {"protocol": "cluster", "method": "mae", "nmi": 0.25, "ari": 0.1, "cluster_acc": 30}
    (mae_run / "eval_cluster.json").write_text(json.dumps(cluster | {"command": "python c"}))
    sim_run = tmp_path / "simclr"  # a pre-training result alone (no eval_*.json)
    sim_run.mkdir()
    (sim_run / "log.jsonl").write_text((tiny_run / "log.jsonl").read_text())
    table = results_table.main(
        results_table.get_args_parser().parse_args(
            [str(sim_run), str(mae_run), "--only", "cluster"]
        )
    )
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "method", "epochs", "mask", "mask ratio", "NMI", "ARI"] + [
        "cluster acc",
        "command",
    ]
    assert len(lines) == 3  # the SimCLR run has no clustering result: no row
    row = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|"))))
    assert (row["mask"], row["mask ratio"], row["NMI"]) == ("block", "0.50", "0.250")
    assert row["command"] == "`python c`"  # the protocol's command, not pre-training's
    full = results_table.main(
        results_table.get_args_parser().parse_args([str(mae_run)])
    ).splitlines()[0]
    assert "recon loss (random 75%)" in full and "NMI" in full and "train min" in full


def test_cli_prints_one_json_line_and_fails_cleanly(tiny_run, tmp_path):
    cmd = ["evaluate.py", "cluster", tiny_run, "--limit-test", "100"]
    out = run_script(*cmd, "--restarts", "1", "--no-save")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["protocol"] == "cluster"
    bad = run_script("evaluate.py", "cluster", tmp_path / "nothing")
    assert bad.returncode == 2 and "error: no checkpoint" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_launch_command_is_the_scripts_own(monkeypatch):
    # In-process callers (pytest, notebooks) have someone else's argv: record no command then.
    from common.train import launch_command

    monkeypatch.setattr(sys, "argv", ["/x/.venv/bin/pytest", "-q"])
    assert launch_command("simclr") is None
    monkeypatch.setattr(sys, "argv", ["/repo/simclr.py", "--preset", "cpu", "--out", "a b"])
    assert launch_command("simclr") == "python /repo/simclr.py --preset cpu --out 'a b'"


def test_probe_upsample_matches_torchvision_resize():
    # linear_probe.py --upsample s: the prepared batch resized to s x its side, bilinear,
    # the values torchvision's resize gives (no antialias when enlarging).
    from torchvision.transforms.v2 import functional as TF

    import linear_probe

    u8 = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    prepare = lambda x: x.permute(0, 3, 1, 2).float() / 255  # noqa: E731
    got = linear_probe.upsampled(u8, prepare, 3)
    want = TF.resize(prepare(u8), [24, 24], interpolation=TF.InterpolationMode.BILINEAR)
    assert got.shape == (2, 3, 24, 24) and torch.allclose(got, want, atol=1e-6)


def test_tsne_with_random_init_adds_one_untrained_panel_per_architecture(
    tiny_run, vit_run, tmp_path
):
    """--with-random-init: after the trained panels, the untrained twin of each distinct
    architecture (a second run of the same network gets none)."""
    res = ev(
        "tsne", tiny_run, vit_run, tiny_run, "--limit-test", 60, "--out", tmp_path,
        "--with-random-init",
    )  # fmt: skip
    got = [(r["method"], r["random_init"]) for r in res["runs"]]
    assert got == [
        ("simclr", False), ("mae", False), ("simclr", False), ("simclr", True), ("mae", True)
    ]  # fmt: skip
    with Image.open(tmp_path / "tsne.png") as im:
        assert im.format == "PNG" and im.height > 1.2 * im.width / 3 * 1.5  # two rows of panels
