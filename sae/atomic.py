"""Atomic writes that publish artifacts with ordinary permissions, and never leave a window
without one.

Every artifact (an SAE, a checkpoint, a dictionary, a report, a converted model) is written under
a hidden scratch name next to its destination and renamed into place:

    .<name>.partial@<host>.<pid>.<tag>    being written by process <pid> on <host>
    .<name>.old@<host>.<pid>.<tag>        the previous artifact, moved aside while replacing it

Replacing an existing directory swaps the two in one step where the kernel can (Linux
`renameat2(RENAME_EXCHANGE)`), so the real name always holds the old or the new artifact; where
it cannot, the old one is first moved aside under the `.old@` name, and if the process dies
before the new one is in place, the next write of that artifact (`clean_leftovers`) renames it
back. Scratch names carry their writer's host and PID, so a later run removes what a dead writer
left, and never what a live one is still writing.

The scratch is owner-only: tempfile-style creation makes 0o700 directories and 0o600 files, and
safetensors (>= 0.8) writes its files 0o600 too. A rename keeps modes, so before it,
`publish_modes` gives the scratch the modes an ordinary mkdir / open would have (0o777 / 0o666
less the umask), and other users of a shared machine can read the result as they could any other
file.

`SAEWORKS_FAULT=<point>` kills the process (SIGKILL) at that named step of a publish (or of a
harvest): a test hook to check that a kill at any instant leaves a usable artifact (`fault_point`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCRATCH = "partial"
DISPLACED = "old"
FAULT_ENV = "SAEWORKS_FAULT"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)@(?P<host>[^@/]*)\.(?P<pid>\d+)"
                       r"\.(?P<tag>[0-9a-f]+)$")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


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


def fault_point(name: str) -> None:
    """A test hook: die here, as `kill -9` would, when $SAEWORKS_FAULT names this point; stop
    (SIGSTOP, still holding every lock and file) when it names `<point>:stop`."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"{name}:stop":
        os.kill(os.getpid(), signal.SIGSTOP)


def this_host() -> str:
    """This machine's name as scratch names carry it ('@' and '/' replaced)."""
    return re.sub(r"[@/]", "_", socket.gethostname()) or "localhost"


def scratch_path(target: str | Path, kind: str = SCRATCH) -> Path:
    """A fresh hidden sibling name of `target` owned by this process (see the module docstring)."""
    target = Path(target)
    tag = secrets.token_hex(4)
    return target.parent / f".{target.name}.{kind}@{this_host()}.{os.getpid()}.{tag}"


@dataclass(frozen=True)
class Leftover:
    """A scratch or moved-aside path beside an artifact, and who made it."""

    path: Path
    target: str
    kind: str
    host: str
    pid: int

    @classmethod
    def parse(cls, path: Path) -> Leftover | None:
        found = _LEFTOVER.match(path.name)
        if found is None:
            return None
        return cls(path, found["name"], found["kind"], found["host"], int(found["pid"]))

    def owner_alive(self) -> bool:
        """Whether the writer may still be running: True for another host's (it cannot be asked),
        False when no process has that PID here, or when the one that has it started after the
        leftover was last modified (the PID was reused)."""
        if self.host != this_host():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        started = _process_start_time(self.pid)
        try:
            modified = self.path.lstat().st_mtime
        except FileNotFoundError:
            return False
        return started is None or started <= modified + 1.0


def _process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def leftovers_of(target: str | Path) -> list[Leftover]:
    """Scratch and moved-aside paths of `target` that sit beside it, of any writer."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    found = (Leftover.parse(p) for p in target.parent.glob(f".{glob_escape(target.name)}.*@*"))
    return [f for f in found if f is not None and f.target == target.name]


def glob_escape(name: str) -> str:
    """`name` with glob metacharacters made literal."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def clean_leftovers(target: str | Path, *, any_owner: bool = False,
                    legacy: tuple[str, ...] = ()) -> list[Path]:
    """Finish what interrupted writes of `target` left: put a moved-aside artifact back when the
    real name is empty, then remove scratch and moved-aside copies whose writer is dead (every
    one with `any_owner`, which a caller holding the artifact's writer lock may pass). `legacy`
    names glob patterns beside `target` of scratch made before scratch names carried their owner
    (removed only with `any_owner`). The user is told once, in one log line; returns what went."""
    target = Path(target)
    stale = [f for f in leftovers_of(target) if any_owner or not f.owner_alive()]
    displaced = sorted((f for f in stale if f.kind == DISPLACED),
                       key=lambda f: f.path.lstat().st_mtime, reverse=True)
    if displaced and not os.path.lexists(target):
        os.rename(displaced[0].path, target)
        log.warning("restored %s from %s (a replace was interrupted)", target, displaced[0].path.name)
        stale.remove(displaced[0])
    paths = [f.path for f in stale]
    if any_owner:
        paths += [p for pattern in legacy for p in target.parent.glob(pattern) if p != target]
    size = sum(_size(p) for p in paths)
    removed = [p for p in paths if _remove(p)]
    if removed:
        log.warning("removed %d leftover(s) of interrupted writes of %s: %s", len(removed), target,
                    ", ".join(p.name for p in removed) + (f" ({size / 1e6:.1f} MB)" if size else ""))
    return removed


def clean_directory(directory: str | Path, *, any_owner: bool = False,
                    legacy: tuple[str, ...] = ()) -> list[Path]:
    """`clean_leftovers` for every artifact that has leftovers in `directory` (checkpoints, whose
    names change with each write), plus the `legacy` patterns in it (only with `any_owner`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    targets = sorted({f.target for p in directory.glob(".*@*") if (f := Leftover.parse(p))})
    removed = [p for name in targets for p in clean_leftovers(directory / name, any_owner=any_owner)]
    if any_owner and legacy:
        old = [p for pattern in legacy for p in directory.glob(pattern) if _remove(p)]
        if old:
            log.warning("removed %d leftover(s) of interrupted writes in %s: %s", len(old), directory,
                        ", ".join(p.name for p in old))
        removed += old
    return removed


def remove_directory(path: str | Path) -> None:
    """Remove an artifact so that a kill midway leaves no half-deleted copy under its real name:
    it is renamed to a scratch name first (which the next write of it cleans up)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    doomed = scratch_path(path)
    os.rename(path, doomed)
    _remove(doomed)


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    return True


def _size(path: Path) -> int:
    """Bytes under `path` (0 if it vanished meanwhile)."""
    try:
        return sum(p.lstat().st_size for p in [path, *path.rglob("*")] if not p.is_dir())
    except OSError:
        return 0


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish_directory(scratch: Path, target: Path) -> None:
    """Put the finished `scratch` at `target`, replacing what is there, with no moment at which
    `target` names nothing that the next write cannot restore (module docstring)."""
    publish_modes(scratch)
    fault_point("publish:ready")
    if not os.path.lexists(target):
        try:
            os.rename(scratch, target)
            return
        except OSError as err:  # made meanwhile by someone else: replace it as below
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if _exchange(scratch, target):
        fault_point("publish:exchanged")
        _remove(scratch)  # now the old artifact
        return
    aside = scratch_path(target, DISPLACED)
    os.rename(target, aside)
    fault_point("publish:moved-aside")
    try:
        os.rename(scratch, target)
    except OSError:
        os.rename(aside, target)
        raise
    fault_point("publish:renamed")
    _remove(aside)


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a scratch directory beside `directory`; when the block ends without error, publish it
    onto `directory` (`publish_directory`). The scratch is removed in every other case, so a
    failed write leaves the old directory (or none); leftovers of dead writers are removed first."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(directory)
    scratch = scratch_path(directory)
    scratch.mkdir(mode=0o700)
    try:
        yield scratch
        publish_directory(scratch, directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a scratch sibling renamed into place, so a reader never sees
    a half-written file; the file gets ordinary permissions (`publish_modes`)."""
    return write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """`write_text_atomic` for bytes (a PNG, a binary blob)."""
    path = Path(path)
    clean_leftovers(path)
    scratch = scratch_path(path)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        publish_modes(scratch)
        os.replace(scratch, path)
    finally:
        if os.path.lexists(scratch):
            os.unlink(scratch)
    return path
