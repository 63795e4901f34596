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
mtime, so later runs and every epoch skip JPEG decoding. All images of a cache share one size
S: `--image-size S` when given, else the most common size among up to SIZE_SAMPLE training
images spread over the split (read from the file headers): its side when square (CIFAR's 32,
Imagenette's 224), else 256. Any image of another size is resized (shorter side) and
centre-cropped to S, and one warning counts them, so one odd file (a 1x1 icon, a 4000x3000
photo) cannot set the size of the whole data set. Files that are not images by their
extension are skipped; an image that cannot be read or decoded (a symlink loop, a broken link,
a corrupt file) stops the run with its name. File and folder names need not be UTF-8.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.outputs import os_error_reason

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CACHE_VERSION = 2  # 2: the plain-named cache is always the data's own size
DEFAULT_DATA = "./data"
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}
SIZE_SAMPLE = 256  # training images whose header sizes decide the cache's image size

# The image size the running script asked for (--image-size; None: decided from the data).
# common.train.setup_run sets it, so that every method script's load_split calls follow the
# flag without passing it; an explicit load_split(image_size=...) wins.
requested_image_size: int | None = None
_warned: set[str] = set()  # caches whose resize warning this process printed (once each)


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
    image_size: int | None = None,
) -> ImageSet:
    """Load `split` ("train" or "test") of the dataset at `path` as uint8 tensors.

    include_unlabeled: for STL-10, append the 100k unlabelled images to "train" (pre-training).
    image_size: the side S of every image (default: `requested_image_size`, else decided from
    the data; module doc).
    download: when `path` holds no dataset, fetch CIFAR-10 there through torchvision. None (the
    default) downloads only into the default `./data`: a mistyped path is an error, not a
    download into a new folder.
    """
    if download is None:
        download = Path(path) == Path(DEFAULT_DATA)
    if split not in SPLIT_DIRS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if download:  # every rank calls this: one fetches what is missing, the others wait
        download_once(lambda: _fetch_cifar(Path(path)), Path(path))
    kind = detect(path)
    if kind == "missing":
        p = Path(path)
        if p.exists() and any(p.iterdir()):
            raise DataError(
                f"--data {path}: no dataset found (expected cifar-10-batches-py/, "
                "cifar-100-python/, stl10_binary/, or train/ and test/ class folders)"
            )
        raise DataError(f"--data {path}: does not exist or is empty")
    size = image_size or requested_image_size
    if kind in ("cifar10", "cifar100", "stl10"):
        data = _load_torchvision(Path(path), kind, split, download, include_unlabeled)
        return _resize_set(data, size) if size and size != data.image_size else data
    root = _build_cache(
        Path(path), kind, Path(cache_dir) if cache_dir else default_cache_dir(), size
    )
    meta = json.loads((root / "meta.json").read_text())
    if split not in meta["splits"]:
        raise DataError(f"--data {path}: has no {'/'.join(SPLIT_DIRS[split])} split")
    _warn_resized(path, root, meta)
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


def _warn_resized(path, root: Path, meta: dict) -> None:
    """One warning per cache and process: how many images were not of the cache's size."""
    resized = meta.get("resized") or {}
    n, total = sum(resized.values()), sum((meta.get("counts") or {}).values())
    if n and str(root) not in _warned:
        _warned.add(str(root))
        s = meta["size"]
        print(
            f"warning: {n} of {total} images in {path} are not {s}x{s} px (the size of most): "
            f"resized (shorter side) and centre-cropped to {s} px; --image-size sets the size",
            file=sys.stderr,
            flush=True,
        )


def _resize_set(data: ImageSet, size: int) -> ImageSet:
    """A torchvision set (all of one size) at size x size (--image-size), with one warning."""
    print(
        f"warning: all {len(data)} images of {data.name} resized from {data.image_size} to "
        f"{size} px (--image-size)",
        file=sys.stderr,
        flush=True,
    )
    from torchvision.transforms.v2 import functional as TF

    out = torch.empty((len(data), size, size, 3), dtype=torch.uint8)
    for i in range(0, len(data), 1024):  # [b, H, W, 3] -> [b, size, size, 3], in chunks
        t = data.images[i : i + 1024].permute(0, 3, 1, 2)
        t = TF.center_crop(TF.resize(t, size, antialias=True), [size, size])
        out[i : i + 1024] = t.permute(0, 2, 3, 1)
    return ImageSet(out, data.labels, data.classes, data.mean, data.std, data.name)


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
    made = not root.exists()
    if kind == "missing":  # (stderr: stdout carries results)
        print(f"no dataset in {root}: downloading CIFAR-10 there (torchvision)", file=sys.stderr)
    cls = tvd.CIFAR100 if kind == "cifar100" else tvd.CIFAR10
    try:
        cls(root, train=True, download=True)  # the archive holds both splits
    except (RuntimeError, OSError) as e:  # network errors: leave no empty folder behind
        if made:
            shutil.rmtree(root, ignore_errors=True)
        raise DataError(
            f"--data {root}: could not download {cls.__name__} ({e}). Without network access, "
            "pass --data pointing at a local copy (a torchvision folder, an ImageFolder or a tarball)"
        ) from e


def download_once(fetch: Callable[[], object], root: Path) -> None:
    """Run fetch() (a download into `root`) one process at a time, so that torchrun's processes
    do not download and unpack into one folder at once: each takes an flock on a lock file for
    `root` (below); the first to hold it downloads, the others find the data and only verify it.
    They wait on the lock file, not at a collective, so a slow download trips no collective
    timeout, and a process that dies releases the lock (the kernel does). A failed download is
    noted beside the lock: the processes that waited for it fail with its error instead of each
    trying again. The lock lives in the cache folder (per node), not in the data's parent. Where
    no lock can be had (an unwritable cache, no flock) each process fetches alone."""
    name = hashlib.sha1(os.fsencode(root.absolute())).hexdigest()[:16]
    lock, failed = (default_cache_dir() / "downloads" / f"{name}{x}" for x in (".lock", ".failed"))
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return fetch()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is downloading: wait for it
            since = time.time()
            print(f"waiting for another process's download into {root}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(OSError):
                if failed.stat().st_mtime >= since:
                    raise DataError(failed.read_text()) from None
        except OSError:
            pass  # no locks on this filesystem
        try:
            fetch()
        except DataError as e:
            with contextlib.suppress(OSError):
                failed.write_text(str(e))
            raise
        failed.unlink(missing_ok=True)
    finally:
        os.close(fd)  # (releases the lock)


# ------------------------------------------------------------------- ImageFolder and tarballs
def _source_key(src: Path) -> str:
    """Identity of the source for the cache: path, sizes and mtimes (any change re-decodes).
    Names are hashed as bytes (os.fsencode): a name that is not UTF-8 is still a name."""
    h = hashlib.sha1(f"{CACHE_VERSION}:".encode() + os.fsencode(src.resolve()))
    if src.is_file():
        st = src.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        for f in sorted(src.rglob("*")):
            try:
                st = f.stat()
            except OSError as e:  # a symlink loop (ELOOP), a link to nothing (ENOENT), ...
                raise DataError(f"--data {src}: cannot read {_show(f)}: {_why(e)}") from None
            h.update(os.fsencode(f.relative_to(src)) + f":{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _show(name) -> str:
    """A file name fit to print: bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(str(name)).decode("utf-8", "backslashreplace")


def _why(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "a symlink loop (too many levels of symbolic links)"
    if e.errno == errno.ENOENT:
        return "a broken symlink (its target does not exist)"
    return os_error_reason(e) or str(e)


def _cached_size(root: Path) -> int | None:
    """The image side of a finished cache, or None when there is none."""
    if not (root / "meta.json").exists():
        return None
    meta = json.loads((root / "meta.json").read_text())
    if "size" in meta:
        return meta["size"]
    return int(np.load(root / "train_images.npy", mmap_mode="r").shape[1])  # older caches


def _common_size(files: _Files) -> int:
    """The most common (width, height) among up to SIZE_SAMPLE training images spread evenly
    over the split (from the headers: nothing is decoded); its side when square, else 256."""
    names = [n for (split, _), ns in sorted(files.items()) if split == "train" for n in ns]
    step = max(1, len(names) / SIZE_SAMPLE)
    sizes = Counter()
    for name in (names[int(i * step)] for i in range(min(len(names), SIZE_SAMPLE))):
        try:
            from PIL import Image

            with Image.open(io.BytesIO(files.peek(name))) as im:
                sizes[im.size] += 1
        except Exception:  # unreadable: the decode names it below
            continue
    if not sizes:
        return 256
    (w, h), _ = sizes.most_common(1)[0]
    return w if w == h else 256


def _build_cache(src: Path, kind: str, cache_dir: Path, size: int | None = None) -> Path:
    # The plain name holds the data at its own size (decided from the headers), the cache a run
    # without --image-size reads; any other size lives beside it under NAME-{size}px, whichever
    # run decodes first (a run at 96 px must not leave 96 px images where 224 px ones belong).
    base = cache_dir / f"{src.name.split('.')[0]}-{_source_key(src)}"
    sized = base.with_name(f"{base.name}-{size}px")  # used only when size is given
    base_size = _cached_size(base)  # None: not decoded yet
    if base_size is not None and size in (None, base_size):
        return base
    if size is not None and _cached_size(sized) == size:
        return sized
    files = _list_tar(src) if kind == "tar" else _list_folder(src)
    native = _common_size(files)
    size = size or native
    root = base if size == native else sized
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by several users
    except OSError as e:
        raise DataError(
            f"cannot write the decoded-image cache in {cache_dir}: {_why(e)}; "
            "set SSL_CACHE_DIR to a writable folder"
        ) from None
    try:
        # Class names as displayed (results, legends): bytes that are not UTF-8 escaped.
        raw_classes = sorted({c for (_, c) in files})
        classes = [_show(c) for c in raw_classes]
        meta = {"classes": classes, "splits": [], "source": _show(src.resolve()), "size": size}
        meta["resized"], meta["counts"] = {}, {}
        for split in ("train", "test"):
            items = sorted((k, v) for k, v in files.items() if k[0] == split)
            if not items:
                continue
            entries = [(name, raw_classes.index(c)) for (_, c), names in items for name in names]
            out = np.lib.format.open_memmap(
                tmp / f"{split}_images.npy", "w+", np.uint8, (len(entries), size, size, 3)
            )
            _reserve(tmp / f"{split}_images.npy")
            resized = 0
            for i, (name, _) in enumerate(entries):
                img = _decode(name, files.read(name))
                resized += img.shape[:2] != (size, size)
                out[i] = _fit(img, size)
            out.flush()
            np.save(tmp / f"{split}_labels.npy", np.array([y for _, y in entries], np.int64))
            meta["splits"].append(split)
            meta["resized"][split], meta["counts"][split] = resized, len(entries)
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
    except OSError as e:  # writing the cache: disk full, quota, ...
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"cannot write the decoded-image cache in {cache_dir}: {_why(e)}; "
            "set SSL_CACHE_DIR to a folder with space"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _reserve(f: Path) -> None:
    """Allocate the memory-mapped file's blocks now: a disk that cannot hold it fails here
    with ENOSPC, not later as a SIGBUS when a write through the map finds no space."""
    fd = os.open(f, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # (not every filesystem can)
            raise
    finally:
        os.close(fd)


class _Files(dict):
    """{(split, class): [names]} plus a way to read a name's bytes (once: `read`, which may
    drop them) or look at them (`peek`: the image-size sample)."""

    def __init__(self, read, peek=None):
        super().__init__()
        self.read = read
        self.peek = peek or read


def _split_of(part: str) -> str | None:
    for split, dirs in SPLIT_DIRS.items():
        if part in dirs:
            return split
    return None


def _list_folder(src: Path) -> _Files:
    files = _Files(_read_file)
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


def _read_file(name: str) -> bytes:
    try:
        return Path(name).read_bytes()
    except OSError as e:  # a symlink loop, a broken link, no permission, an I/O error
        raise DataError(f"cannot read image {_show(name)}: {_why(e)}") from None


def _list_tar(src: Path) -> _Files:
    blobs: dict[str, bytes] = {}
    files = _Files(blobs.pop, blobs.__getitem__)  # read once, then dropped
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
        raise DataError(f"cannot decode image {_show(name)}: {e}") from None


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` and centre-crop to size x size (no-op if already so)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    from torchvision.transforms.v2 import functional as TF

    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    t = TF.center_crop(TF.resize(t, size, antialias=True), [size, size])
    return t.permute(1, 2, 0).numpy()
