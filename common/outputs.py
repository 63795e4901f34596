"""Output paths: checked before any work, written atomically, and a failed write reported as
one line naming the path and the cause (disk full, read-only, ...). No torch here: the
results table uses it too.

Every script checks its output folders and files with `check_output_dir` / `check_output_file`
before it reads any data (a path that is a file, under a file, or in a read-only folder stops
it at once with exit code 2), and reports a write that fails later (the disk fills up) with
`WriteError`: `error: cannot write PATH: no space left on device`, exit code 2.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

# Why a write failed, in the words a user needs (the cause, not the errno's number).
_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder",
}


class WriteError(Exception):
    """An output could not be written (disk full, read-only folder, ...): one line naming the
    path and the cause. Scripts report it as `error: ...` with exit code 2."""


def os_error_reason(e: BaseException | None) -> str | None:
    """The cause of the first OSError in e's chain ("no space left on device", ...), or None
    when no OSError is in it. torch.save reports ENOSPC as a RuntimeError ("unexpected pos")
    whose cause is the OSError, hence the walk along __cause__ / __context__."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return _REASONS.get(e.errno, e.strerror or str(e))
        e = e.__cause__ or e.__context__
    return None


def _not_writable(folder: Path) -> str | None:
    """Why files cannot be created in the existing folder, or None when they can."""
    if os.access(folder, os.W_OK | os.X_OK):  # (False on a read-only mount, even for root)
        return None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return "read-only file system" if read_only else "permission denied"


def _dir_problem(path: Path) -> str | None:
    """Why `path` cannot be (or become) a folder to write in, or None when it can."""
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    p = path.absolute()
    while not p.exists() and not p.is_symlink():
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    why = _not_writable(p)
    return f"cannot write in {p}: {why}" if why else None


def check_output_dir(path: str | Path, flag: str) -> None:
    """WriteError unless `path` is a writable folder or can be created as one (nothing is
    created here). `flag` names it in the message (e.g. "--out")."""
    why = _dir_problem(Path(path))
    if why:
        raise WriteError(f"{flag} {path}: {why}")


def check_output_file(path: str | Path, flag: str) -> None:
    """WriteError unless the file `path` can be written (its folder checked as above)."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"{flag} {path}: is a folder, not a file")
    why = _dir_problem(path.parent)
    if why is None and path.exists() and not os.access(path, os.W_OK):
        why = _not_writable(path.parent) or "permission denied"
    if why:
        where = f"{path.parent} " if why.startswith("is a file") else ""
        raise WriteError(f"{flag} {path}: {where}{why}")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename (a reader never sees half a
    file, and a full disk leaves the old file as it was); WriteError naming path and cause."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise WriteError(f"cannot write {path}: {os_error_reason(e)}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
