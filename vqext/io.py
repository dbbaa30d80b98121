"""File writes that a reader, or a process killed mid-write, never sees half done.

Every file vqext writes goes through :func:`atomic_write_bytes`: the bytes land in a temporary
file in the same directory, are flushed to disk, get the permissions a plain ``open`` would give
under the user's umask, and replace the target with ``os.replace`` (atomic on POSIX).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from .errors import DataError, VqextError


class OutputError(VqextError, OSError):
    """A file or folder that cannot be written (full disk, no permission, not a directory)."""


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (threads may be writing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere it can only be read by setting it; put it straight back
    os.umask(mask)
    return mask


def make_dirs(path: str, what: str = "output folder") -> None:
    """``os.makedirs(path, exist_ok=True)`` with one clear error when a part of it is a file."""
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{what} {path} is not a directory (a file of that name is in the way)") from None
    except OSError as exc:
        raise OutputError(f"cannot create {what} {path}: {exc.strerror or exc}") from None


# Like config.new_run_dir's loop, but claims a file with O_EXCL; the two differ in what they create.
def reserve_name(directory: str, stem: str, ext: str) -> str:
    """A stem, ``stem`` or ``stem-2``, ``stem-3`` ..., whose ``stem.ext`` this call created empty
    (exclusively), so that concurrent writers never pick the same files."""
    make_dirs(directory)
    for n in range(1, 10_000):
        candidate = stem if n == 1 else f"{stem}-{n}"
        try:
            os.close(os.open(os.path.join(directory, candidate + ext), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot write in {directory}: {exc.strerror or exc}") from None
    raise OutputError(f"cannot find a free name for {stem}{ext} in {directory}")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` all at once: a reader sees the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        make_dirs(directory)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        # mkstemp creates the file 0600; results are meant to be shared like any other file.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def atomic_savefig(fig, path: str, **kwargs) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: str, what: str = "file") -> Any:
    """Parsed JSON; a missing or corrupted file is one DataError naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {path} is corrupted ({exc})") from None
