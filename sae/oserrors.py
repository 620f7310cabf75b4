"""Operating-system failures told as user errors: the path, what went wrong, how to fix it.

Permission denied, a read-only file system, a full disk, a missing or non-directory parent: each
is the user's to fix, so the CLI prints `describe_os_error`'s one line (exit 2) instead of a
traceback. `require_writable_dir` checks an output directory before a stage loads its model, so
the failure comes in the first second, not after minutes of work.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from saeworks.sae.errors import SaeworksError

_ADVICE = {
    errno.EACCES: "permission denied; choose a directory you can write (run_dir=..., --out) or fix "
                  "its permissions",
    errno.EPERM: "operation not permitted; choose a directory you can write (run_dir=..., --out) or "
                 "fix its permissions",
    errno.EROFS: "read-only file system; point run_dir (or --out) at a writable disk",
    errno.ENOSPC: "no space left on device; free space there or point run_dir at a larger disk, then "
                  "rerun the same command (finished work is kept)",
    errno.EDQUOT: "disk quota exceeded; free space or point run_dir at a disk with room, then rerun "
                  "the same command (finished work is kept)",
    errno.ENOENT: "no such file or directory; check the path, or create its parent directory",
    errno.ENOTDIR: "a part of this path is a file, not a directory; choose another path",
    errno.EISDIR: "this is a directory where a file was expected; choose another path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.EMFILE: "too many open files; raise the limit (`ulimit -n`) and rerun",
}
"""The OS errors a user can fix, and the fix."""


class OutputPathError(SaeworksError, OSError):
    """An output directory that cannot be written."""


def describe_os_error(err: BaseException) -> str | None:
    """One line for an OS error a user can fix (the path first), or None for any other error.
    Also recognises errors that wrap an OS error: safetensors' and sqlite's."""
    code, path = _os_error_code(err)
    if code not in _ADVICE:
        return None
    where = f"{path}: " if path else ""
    return f"{where}{_ADVICE[code]}"


def _os_error_code(err: BaseException) -> tuple[int | None, str | None]:
    """(errno, path) of `err`, or of the OS error it wraps or was raised from."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno, seen.filename and str(seen.filename)
        text = str(seen)
        if "No space left on device" in text or "StorageFull" in text or "disk is full" in text:
            return errno.ENOSPC, None
        if "Read-only file system" in text or "ReadOnlyFilesystem" in text or "readonly database" in text:
            return errno.EROFS, None
        if "PermissionDenied" in text:
            return errno.EACCES, None
        seen = seen.__cause__ or seen.__context__
    return None, None


def require_writable_dir(directory: str | Path, setting: str = "run_dir") -> Path:
    """Make `directory` (and missing parents) and prove it writable by creating and removing a
    file in it; an OutputPathError naming the path, the setting and the fix otherwise."""
    directory = Path(directory)
    probe = directory / f".saeworks-write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        reason = _ADVICE.get(err.errno or 0, err.strerror or str(err))
        raise OutputPathError(f"{setting}: cannot write to {directory}: {reason}") from err
    return directory
