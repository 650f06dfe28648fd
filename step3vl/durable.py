"""Writing directories so that a crash at any moment leaves either the old one or the new one, whole.

A checkpoint is written into a sibling `<out>.tmp`, its files and the directory fsynced, then swapped with `<out>`
in one step: Linux's renameat2(RENAME_EXCHANGE) exchanges two directory entries atomically, so `<out>` names a
complete checkpoint at every instant (the old one, then the new one) and the old one is deleted afterwards, from
its new name `<out>.tmp`. Where the exchange is unavailable (another OS, a file system without it) the old
directory is renamed aside first, so the brief gap holds no lost data: `<out>.old` still has it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def append_json_line(path: str | Path, record: dict) -> None:
    """One JSON line appended by a single write and fsynced: a kill leaves the line whole or a torn tail that
    readers skip, never a line merged into the next."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file under `path`, then every directory, flushed to the disk."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for root, dirs, _ in os.walk(path, topdown=False):
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to fsync a directory; the rename is then as durable as they allow
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries a and b atomically; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def replace_dir(tmp: Path, out: Path) -> None:
    """Make the complete directory `tmp` the new `out` (see the module docstring); `tmp` is gone afterwards."""
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(out.name + ".old")
    fsync_tree(tmp)
    if not out.exists():
        tmp.rename(out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp)  # now the old checkpoint
    else:
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)  # this save's, or one a crash left in the gap


def fresh_tmp(out: Path) -> Path:
    """An empty `<out>.tmp` to write into. What a crashed save left there is deleted: `out` itself is always whole,
    so that is at most a half-written new checkpoint or an old one already replaced."""
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp
