"""Datasets as uint8 tensors: decoded once, cached, then indexed by batch on the training device.

`--data PATH` may be
- a torchvision dataset folder: CIFAR-10 (`cifar-10-batches-py/`), CIFAR-100
  (`cifar-100-python/`) or STL-10 (`stl10_binary/`); the default `./data` downloads CIFAR-10
  there when it holds no dataset and the network allows;
- an ImageFolder root with `train/<class>/*` and `test/<class>/*` (or `val/`);
- a `.tar` / `.tar.gz` / `.tgz` of such a root (a single top folder inside is fine).

ImageFolder and tarball images are decoded once (JPEG, PNG, ...; greyscale, palette, RGBA and
CMYK are converted to RGB) into `[N, H, W, 3]` uint8 arrays saved in a cache directory
(`$SSL_CACHE_DIR`, default `~/.cache/ssl-reference`), keyed by the source's path, size and
mtime, so later runs and every epoch skip JPEG decoding. All images of a cache share one size:
that of the first image when it is square (CIFAR's 32, Imagenette's 224), else 256; any other
image is resized (shorter side) and centre-cropped to it. Files that are not images by their
extension are skipped; an image that cannot be decoded stops the run with its name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CACHE_VERSION = 1
DEFAULT_DATA = "./data"
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}


class DataError(ValueError):
    """A problem with the user's data, reported as one clear message before training starts."""


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, H, W, 3] uint8 (CPU; may be memory-mapped)
    labels: torch.Tensor  # [N] int64; -1 where unlabelled (STL-10's unlabeled split)
    classes: list[str]
    mean: tuple[float, float, float]  # per-channel mean/std of the training images, in [0, 1]
    std: tuple[float, float, float]
    name: str

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, n: int | None, seed: int = 0) -> ImageSet:
        """A fixed random subset of n images (same seed, same images), or self if n is None."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        idx = idx.sort().values
        return ImageSet(
            self.images[idx], self.labels[idx], self.classes, self.mean, self.std, self.name
        )


def default_cache_dir() -> Path:
    return Path(os.environ.get("SSL_CACHE_DIR", Path.home() / ".cache" / "ssl-reference"))


def detect(path: str | Path) -> str:
    """What kind of source `path` is: cifar10 | cifar100 | stl10 | imagefolder | tar | missing."""
    p = Path(path)
    if p.is_file() and p.name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if p.is_file():
        raise DataError(
            f"--data {path}: a file, but not a .tar/.tar.gz/.tgz of an ImageFolder root"
        )
    if not p.is_dir():
        return "missing"
    if (p / "cifar-10-batches-py").is_dir():
        return "cifar10"
    if (p / "cifar-100-python").is_dir():
        return "cifar100"
    if (p / "stl10_binary").is_dir():
        return "stl10"
    if (p / "train").is_dir():
        return "imagefolder"
    return "missing"


def load_split(
    path: str | Path,
    split: str,
    cache_dir: str | Path | None = None,
    download: bool | None = None,
    include_unlabeled: bool = False,
) -> ImageSet:
    """Load `split` ("train" or "test") of the dataset at `path` as uint8 tensors.

    include_unlabeled: for STL-10, append the 100k unlabelled images to "train" (pre-training).
    download: when `path` holds no dataset, fetch CIFAR-10 there through torchvision. None (the
    default) downloads only into the default `./data`: a mistyped path is an error, not a
    download into a new folder.
    """
    if download is None:
        download = Path(path) == Path(DEFAULT_DATA)
    if split not in SPLIT_DIRS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if download:  # every rank calls this: one per node fetches what is missing, others wait
        download_once(lambda: _fetch_cifar(Path(path)))
    kind = detect(path)
    if kind == "missing":
        p = Path(path)
        if p.exists() and any(p.iterdir()):
            raise DataError(
                f"--data {path}: no dataset found (expected cifar-10-batches-py/, "
                "cifar-100-python/, stl10_binary/, or train/ and test/ class folders)"
            )
        raise DataError(f"--data {path}: does not exist or is empty")
    if kind in ("cifar10", "cifar100", "stl10"):
        return _load_torchvision(Path(path), kind, split, download, include_unlabeled)
    root = _build_cache(Path(path), kind, Path(cache_dir) if cache_dir else default_cache_dir())
    meta = json.loads((root / "meta.json").read_text())
    if split not in meta["splits"]:
        raise DataError(f"--data {path}: has no {'/'.join(SPLIT_DIRS[split])} split")
    images = _load_npy(root / f"{split}_images.npy")
    labels = torch.from_numpy(np.load(root / f"{split}_labels.npy")).long()
    return ImageSet(
        images, labels, meta["classes"], tuple(meta["mean"]), tuple(meta["std"]), Path(path).name
    )


def _load_npy(f: Path) -> torch.Tensor:
    # Small caches are read into memory; large ones (ImageNet-sized) are memory-mapped.
    arr = np.load(f, mmap_mode="r" if f.stat().st_size > 4 << 30 else None)
    with warnings.catch_warnings():  # a read-only memmap is fine: we only ever index it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _channel_stats(images: np.ndarray | torch.Tensor) -> tuple[list[float], list[float]]:
    x = torch.as_tensor(np.asarray(images[:: max(1, len(images) // 10000)])).float() / 255
    return x.mean((0, 1, 2)).tolist(), x.std((0, 1, 2)).tolist()


# ---------------------------------------------------------------------------- torchvision sets
def _load_torchvision(root: Path, kind: str, split: str, download: bool, unlabeled: bool):
    import torchvision.datasets as tvd

    try:
        if kind == "stl10":
            ds = tvd.STL10(
                root, split="train+unlabeled" if split == "train" and unlabeled else split
            )
            images, labels = ds.data.transpose(0, 2, 3, 1), ds.labels  # NCHW -> NHWC
            stats = tvd.STL10(root, split="train").data.transpose(0, 2, 3, 1)
        else:
            cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
            ds = cls(root, train=split == "train")  # (downloaded by load_split if asked)
            images, labels = ds.data, ds.targets
            stats = images if split == "train" else cls(root, train=True).data
    except (RuntimeError, OSError) as e:  # torchvision's "Dataset not found" / network errors
        raise DataError(
            f"--data {root}: could not load or download {kind} ({e}). Without network access, "
            "pass --data pointing at a local copy (a torchvision folder, an ImageFolder or a tarball)"
        ) from e
    mean, std = _channel_stats(stats)
    return ImageSet(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.as_tensor(np.asarray(labels), dtype=torch.long),
        list(ds.classes),
        tuple(mean),
        tuple(std),
        kind,
    )


def _fetch_cifar(root: Path) -> None:
    """CIFAR-10 into an empty or missing `root`, or a check (and repair) of a torchvision
    CIFAR-10/100 folder there; any other content is left for load_split to report."""
    import torchvision.datasets as tvd

    kind = detect(root)
    if kind == "missing" and root.exists() and any(root.iterdir()):
        return
    if kind not in ("missing", "cifar10", "cifar100"):
        return
    if kind == "missing":
        print(f"no dataset in {root}: downloading CIFAR-10 there (torchvision)", flush=True)
    cls = tvd.CIFAR100 if kind == "cifar100" else tvd.CIFAR10
    try:
        cls(root, train=True, download=True)  # the archive holds both splits
    except (RuntimeError, OSError) as e:  # network errors
        raise DataError(
            f"--data {root}: could not download {cls.__name__} ({e}). Without network access, "
            "pass --data pointing at a local copy (a torchvision folder, an ImageFolder or a tarball)"
        ) from e


def download_once(fetch: Callable[[], object]) -> None:
    """Run fetch() (a download into the data folder) in one process per node: under torchrun,
    LOCAL_RANK 0 fetches and every other rank waits at a barrier, so that eight processes do
    not download and unpack into the same folder at once. A failed fetch is raised on the
    rank that ran it after the barrier; the others then fail to find the data, so every rank
    stops with a DataError instead of waiting for a rank that died (the barrier's timeout is
    --dist-timeout, 600 s by default: enough for CIFAR's 170 MB on a slow link)."""
    from common import dist as D

    error: BaseException | None = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            fetch()
        except Exception as e:  # raised below, after the others were released
            error = e
    D.barrier()
    if error is not None:
        raise error


# ------------------------------------------------------------------- ImageFolder and tarballs
def _source_key(src: Path) -> str:
    """Identity of the source for the cache: path, sizes and mtimes (any change re-decodes)."""
    h = hashlib.sha1(f"{CACHE_VERSION}:{src.resolve()}".encode())
    if src.is_file():
        st = src.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        for f in sorted(src.rglob("*")):
            st = f.stat()
            h.update(f"{f.relative_to(src)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _build_cache(src: Path, kind: str, cache_dir: Path) -> Path:
    root = cache_dir / f"{src.name.split('.')[0]}-{_source_key(src)}"
    if (root / "meta.json").exists():
        return root
    files = _list_tar(src) if kind == "tar" else _list_folder(src)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by several users
    try:
        classes = sorted({c for (_, c) in files})
        size = None
        meta = {"classes": classes, "splits": [], "source": str(src.resolve())}
        for split in ("train", "test"):
            items = sorted((k, v) for k, v in files.items() if k[0] == split)
            if not items:
                continue
            entries = [(name, classes.index(c)) for (_, c), names in items for name in names]
            out = None  # allocated once the first image gives the size
            for i, (name, _) in enumerate(entries):
                img = _decode(name, files.read(name))
                if size is None:
                    size = img.shape[0] if img.shape[0] == img.shape[1] else 256
                if out is None:
                    out = np.lib.format.open_memmap(
                        tmp / f"{split}_images.npy", "w+", np.uint8, (len(entries), size, size, 3)
                    )
                out[i] = _fit(img, size)
            out.flush()
            np.save(tmp / f"{split}_labels.npy", np.array([y for _, y in entries], np.int64))
            meta["splits"].append(split)
            if split == "train":
                meta["mean"], meta["std"] = _channel_stats(out)
            del out
        if "train" not in meta["splits"]:
            raise DataError(f"--data {src}: no train/ folder with images")
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, root)  # atomic: a concurrent or killed run never sees half a cache
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


class _Files(dict):
    """{(split, class): [names]} plus a way to read a name's bytes."""

    def __init__(self, read):
        super().__init__()
        self.read = read


def _split_of(part: str) -> str | None:
    for split, dirs in SPLIT_DIRS.items():
        if part in dirs:
            return split
    return None


def _list_folder(src: Path) -> _Files:
    files = _Files(lambda name: Path(name).read_bytes())
    for split_dir in sorted(src.iterdir()):
        split = _split_of(split_dir.name)
        if split is None or not split_dir.is_dir():
            continue
        for cdir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
            names = sorted(str(f) for f in cdir.iterdir() if f.suffix.lower() in IMG_EXTENSIONS)
            if not names:
                raise DataError(f"--data {src}: class folder {cdir} holds no images")
            files[(split, cdir.name)] = names
    if not files:
        raise DataError(f"--data {src}: no images under train/<class>/ or test/<class>/")
    return files


def _list_tar(src: Path) -> _Files:
    blobs: dict[str, bytes] = {}
    files = _Files(blobs.pop)  # each image's bytes are read once, then dropped
    try:
        with tarfile.open(src, "r:*") as tar:
            for m in tar:
                parts = Path(m.name).parts
                if not m.isfile() or Path(m.name).suffix.lower() not in IMG_EXTENSIONS:
                    continue
                # .../<split>/<class>/<file>, with any number of top folders before <split>
                split = _split_of(parts[-3]) if len(parts) >= 3 else None
                if split is None:
                    continue
                files.setdefault((split, parts[-2]), []).append(m.name)
                blobs[m.name] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"--data {src}: cannot read the archive ({e})") from e
    if not files:
        raise DataError(f"--data {src}: no images under <split>/<class>/ in the archive")
    return files


def _decode(name: str, data: bytes) -> np.ndarray:
    """Bytes -> [H, W, 3] uint8. torchvision's decoder first (fast), PIL for what it rejects."""
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; this still works
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image

        try:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_image(buf, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
        except Exception:
            pass
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))  # palette, CMYK, RGBA, greyscale -> RGB
    except Exception as e:
        raise DataError(f"cannot decode image {name}: {e}") from e


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` and centre-crop to size x size (no-op if already so)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    from torchvision.transforms.v2 import functional as TF

    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    t = TF.center_crop(TF.resize(t, size, antialias=True), [size, size])
    return t.permute(1, 2, 0).numpy()
