"""Files written whole or not at all, copied, compared and hashed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import QesError

COPY_CHUNK = 1 << 20


def make_working_copy(source: os.PathLike | str, dest: os.PathLike | str) -> Path:
    """Copy ``source`` to ``dest`` atomically; the source is only read."""
    source, dest = Path(source), Path(dest)
    if same_file(source, dest):
        raise QesError(f"refusing to use {source} as its own working copy")
    with atomic_output(dest, f"cannot copy {source} to {dest}") as tmp:
        size = source.stat().st_size
        dest.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest.parent).free
        if free < size:
            raise QesError(f"not enough space in {dest.parent} for a working copy: need {size:,} bytes, {free:,} free")
        shutil.copyfile(source, tmp)  # reads the source "rb"; copy_file_range/sendfile where possible
        fsync(tmp)
        if tmp.stat().st_size != size:
            raise QesError(f"copying {source} gave {tmp.stat().st_size:,} bytes, expected {size:,}")
    return dest


@contextlib.contextmanager
def atomic_output(dest: os.PathLike | str, failure: str) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` to write; it becomes ``dest`` only if the block succeeds.

    On any failure the temporary file is removed and ``dest`` is untouched; an
    OSError (full disk, read-only destination) becomes one QesError line
    starting with ``failure``.
    """
    dest = Path(dest)
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    _remove_orphans(dest)
    try:
        yield tmp
        os.replace(tmp, dest)
        fsync(dest.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise QesError(f"{failure}: {describe(e)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_orphans(dest: Path) -> None:
    """Delete temporary files beside ``dest`` left by a process that was killed while writing it."""
    for orphan in dest.parent.glob(f"{dest.name}.tmp*"):
        pid = orphan.name[len(dest.name) + 4:]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            orphan.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            pass


def file_sha256(path: os.PathLike | str, start: int = 0) -> str:
    """sha256 of the file's bytes from ``start`` on."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe(e: BaseException) -> str:
    """An exception as one line of text."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    return " ".join(text.split())
