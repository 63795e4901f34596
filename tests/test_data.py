"""Dataset loading: tarballs and ImageFolders decode once into a reusable uint8 cache; bad data
stops with a message naming the problem."""

import tarfile
from pathlib import Path

import pytest
import torch

from common import data as data_mod
from common.data import DataError, load_split
from conftest import write_image


def test_cifar_tarball(cifar_tar):
    tr = load_split(cifar_tar, "train")
    te = load_split(cifar_tar, "test")
    assert tr.images.shape == (50000, 32, 32, 3) and tr.images.dtype == torch.uint8
    assert te.images.shape == (10000, 32, 32, 3)
    assert tr.labels.bincount().tolist() == [5000] * 10
    assert tr.classes[0] == "airplane" and tr.classes[-1] == "truck"
    assert all(0.4 < m < 0.5 for m in tr.mean) and all(0.2 < s < 0.3 for s in tr.std)
    sub = tr.subset(1000, seed=1)
    assert len(sub) == 1000 and torch.equal(sub.images, tr.subset(1000, seed=1).images)


def test_folder_modes_sizes_and_stray_files(image_folder, tmp_path):
    cache = tmp_path / "cache"
    tr = load_split(image_folder, "train", cache_dir=cache)
    te = load_split(image_folder, "test", cache_dir=cache)
    assert tr.images.shape == (10, 32, 32, 3)  # the .txt file skipped, 48x40 resized to 32
    assert te.images.shape == (4, 32, 32, 3)
    assert tr.classes == ["cat", "dog"] and tr.labels.tolist() == [0] * 5 + [1] * 5


def test_cache_is_reused_and_invalidated(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_split(image_folder, "train", cache_dir=cache)

    def no_decode(*a):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(data_mod, "_decode", no_decode)
    again = load_split(image_folder, "train", cache_dir=cache)
    assert torch.equal(first.images, again.images)
    write_image(image_folder / "train" / "dog" / "new.png", (32, 32))  # the source changed
    with pytest.raises(AssertionError, match="decoded again"):
        load_split(image_folder, "train", cache_dir=cache)


def test_tarball_with_top_folder(image_folder, tmp_path):
    tar_path = tmp_path / "set.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(image_folder, arcname="myset")
    tr = load_split(tar_path, "train", cache_dir=tmp_path / "c")
    assert tr.images.shape == (10, 32, 32, 3) and tr.classes == ["cat", "dog"]
    folder = load_split(image_folder, "train", cache_dir=tmp_path / "c2")
    assert torch.equal(tr.images, folder.images)


def test_bad_data_messages(image_folder, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "nope", "train", cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="does not exist or is empty"):
        load_split(tmp_path / "empty", "train", cache_dir=cache)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="no dataset found"):
        load_split(tmp_path / "junk", "train", cache_dir=cache)
    bad = image_folder / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_split(image_folder, "train", cache_dir=cache)
    bad.unlink()
    (image_folder / "train" / "bird").mkdir()
    with pytest.raises(DataError, match="bird holds no images"):
        load_split(image_folder, "train", cache_dir=cache)


def test_image_size_is_the_most_common_not_the_first(tmp_path, capsys):
    """One odd image sorting first (a 1x1 icon) neither sets the size nor goes unnoticed: the
    most common size of a sample wins, and one warning counts the resized images; in a
    tarball too (its sample is read without consuming the bytes)."""
    root = tmp_path / "set"
    for i in range(6):
        write_image(root / "train" / "a" / f"{i}.png", (24, 24), seed=i)
        write_image(root / "test" / "a" / f"{i}.png", (24, 24), seed=10 + i)
    write_image(root / "train" / "a" / "!icon.png", (1, 1))
    tr = load_split(root, "train", cache_dir=tmp_path / "c")
    te = load_split(root, "test", cache_dir=tmp_path / "c")
    assert tr.image_size == te.image_size == 24 and len(tr) == 7
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "1 of 13 images" in warnings[0] and "24x24" in warnings[0]
    tar_path = tmp_path / "set.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(root, arcname="set")
    tr_tar = load_split(tar_path, "train", cache_dir=tmp_path / "c2")
    assert torch.equal(tr_tar.images, tr.images)


def test_image_size_flag_keeps_its_own_cache(tmp_path):
    root = tmp_path / "set"
    for i in range(3):
        write_image(root / "train" / "a" / f"{i}.png", (16, 16), seed=i)
    auto = load_split(root, "train", cache_dir=tmp_path / "c")
    same = load_split(root, "train", cache_dir=tmp_path / "c", image_size=16)
    big = load_split(root, "train", cache_dir=tmp_path / "c", image_size=20)
    assert auto.image_size == same.image_size == 16 and big.image_size == 20
    assert torch.equal(auto.images, same.images)
    assert len(list((tmp_path / "c").iterdir())) == 2  # the auto cache, reused at 16; one at 20


def test_image_size_flag_first_leaves_the_native_cache_alone(tmp_path):
    # A run with --image-size decodes first (jigsaw at 96 px), then one without it (context):
    # the second must get the data's own size, not the first run's resized images.
    root = tmp_path / "set"
    for i in range(3):
        write_image(root / "train" / "a" / f"{i}.png", (16, 16), seed=i)
    small = load_split(root, "train", cache_dir=tmp_path / "c", image_size=8)
    auto = load_split(root, "train", cache_dir=tmp_path / "c")
    same = load_split(root, "train", cache_dir=tmp_path / "c", image_size=16)
    assert small.image_size == 8 and auto.image_size == same.image_size == 16
    assert torch.equal(auto.images, same.images)
    assert len(list((tmp_path / "c").iterdir())) == 2  # one at 8 px, the native one reused


def test_links_and_names(tmp_path):
    """A symlink loop or a broken link is named; a name that is not UTF-8 is just a name (its
    class shown with escapes)."""
    import os

    root = tmp_path / "set"
    write_image(root / "train" / "a" / "0.png", (8, 8))
    os.mkdir(os.fsdecode(bytes(root / "train") + b"/b\xe9"))
    write_image(Path(os.fsdecode(bytes(root / "train") + b"/b\xe9/\xff.png")), (8, 8))
    tr = load_split(root, "train", cache_dir=tmp_path / "c")
    assert len(tr) == 2 and tr.classes == ["a", "b\\xe9"]
    (root / "train" / "a" / "loop.png").symlink_to("loop.png")
    with pytest.raises(DataError, match="loop.png: a symlink loop"):
        load_split(root, "train", cache_dir=tmp_path / "c")
    (root / "train" / "a" / "loop.png").unlink()
    (root / "train" / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match="gone.png: a broken symlink"):
        load_split(root, "train", cache_dir=tmp_path / "c")


def test_unwritable_cache_is_one_clear_error(tmp_path):
    root = tmp_path / "set"
    write_image(root / "train" / "a" / "0.png", (8, 8))
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="cannot write the decoded-image cache .*SSL_CACHE_DIR"):
        load_split(root, "train", cache_dir=tmp_path / "file" / "cache")


def _download_with_a_slow_first(rank, world, root):
    """Both ranks call download_once; whichever holds the lock first downloads for 6 s, longer
    than the process group's 3 s collective timeout, and the other must wait it out."""
    import time

    from common import dist
    from common.data import download_once

    marker = Path(root) / "cifar.bin"

    def fetch():
        if not marker.exists():  # (a real fetch only verifies what is there)
            time.sleep(6)
            marker.parent.mkdir(exist_ok=True)
            marker.write_text(f"downloaded by rank {rank}")

    download_once(fetch, Path(root))
    dist.barrier()  # the group is healthy after the wait
    return marker.read_text()


def test_a_slow_download_trips_no_collective_timeout(tmp_path):
    """torchrun's other ranks wait for the download on a lock file, not at a barrier with
    --dist-timeout: a download longer than the timeout ends with every rank holding the data."""
    from dist_utils import run_distributed

    got = run_distributed(
        _download_with_a_slow_first, 2, tmp_path, timeout_s=3, root=str(tmp_path / "data")
    )
    assert got[0] == got[1] and got[0].startswith("downloaded by rank ")
