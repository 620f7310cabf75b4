"""Atomic writes that publish artifacts with ordinary permissions.

Every artifact (an SAE, a checkpoint, a dictionary, a report, a converted model) is written under
a hidden scratch name next to its destination and renamed into place. The scratch is owner-only:
tempfile.mkdtemp makes 0o700 directories, mkstemp 0o600 files, and safetensors (>= 0.8) writes
its files 0o600 too. A rename keeps modes, so before it, `publish_modes` gives the scratch the
modes an ordinary mkdir / open would have (0o777 / 0o666 less the umask), and other users of a
shared machine can read the result as they could any other file.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask: from /proc on Linux, else set and restored (briefly 0o077, so a file
    another thread creates meanwhile is, if anything, more private)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def publish_modes(path: str | Path) -> None:
    """Give `path`, and everything under it if it is a directory, the permission bits of a newly
    created directory (0o777) or file (0o666) less the umask; setuid/setgid/sticky bits (a
    group-shared parent's setgid) are kept, and symlinks are left alone."""
    path, mask = Path(path), current_umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        p.chmod((stat.S_IMODE(mode) & 0o7000) | ((0o777 if stat.S_ISDIR(mode) else 0o666) & ~mask))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a scratch sibling renamed into place, so a reader never sees
    a half-written file; the file gets ordinary permissions (`publish_modes`)."""
    return write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """`write_text_atomic` for bytes (a PNG, a binary blob)."""
    path = Path(path)
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        publish_modes(scratch)
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return path


@contextmanager
def atomic_directory(directory: str | Path, prefix: str | None = None) -> Iterator[Path]:
    """Yield a scratch directory beside `directory`; when the block ends without error, publish it
    (`publish_modes`) and rename it onto `directory`, replacing what was there. The scratch is
    removed in every case, so a failed write leaves the old directory (or none)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=directory.parent, prefix=prefix or f".{directory.name}-"))
    try:
        yield scratch
        publish_modes(scratch)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(scratch, directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
