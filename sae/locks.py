"""One writer at a time: an OS lock per artifact that a stage writes.

A stage that writes into a run directory (harvest per store, train per checkpoint directory,
analyze per dictionary) holds `fcntl.flock` on a hidden lock file beside the artifact,
`.<name>.lock`, for as long as it runs. A second writer is refused at once with one line naming
the holder (PID, host, command, start time, which the holder writes into the lock file). The OS
drops the lock when the holder's process ends, however it ends (kill -9 included), so a dead
writer never blocks the next; the lock file itself stays (removing it would race).

In a distributed run rank 0 takes the lock for all ranks and tells them the outcome, so the ranks
of one run are one writer and all of them raise the same error when another run holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from saeworks.sae.atomic import this_host
from saeworks.sae.distributed import all_gather_objects
from saeworks.sae.errors import SaeworksError
from saeworks.sae.oserrors import OutputPathError, require_writable_dir


class WriterBusyError(SaeworksError, RuntimeError):
    """Another process is writing the same artifact."""


def lock_path(artifact: str | Path) -> Path:
    """The lock file of an artifact: `.<name>.lock` beside it."""
    artifact = Path(artifact)
    return artifact.parent / f".{artifact.name}.lock"


@dataclass
class WriterLock:
    """A held lock; `release` (or process exit) frees it."""

    path: Path
    fd: int

    @classmethod
    def acquire(cls, artifact: str | Path, stage: str) -> WriterLock:
        """Take the artifact's lock without waiting, or raise WriterBusyError naming the holder."""
        path = lock_path(artifact)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise WriterBusyError(
                f"{artifact} is being written by another process ({holder}); wait for it to "
                f"finish or stop it, then rerun this {stage}: the lock goes with that process"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        record = {"pid": os.getpid(), "host": this_host(), "stage": stage,
                  "command": shlex.join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


def _holder(fd: int) -> str:
    """Who holds the lock, as its lock file says (written just after it was taken)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        record = {}
    if not record.get("pid"):
        return "holder unknown: it is just starting"
    return (f"pid {record['pid']} on {record.get('host', '?')}, {record.get('stage', 'a stage')} "
            f"started {record.get('started', '?')}: {record.get('command', '?')}")


@contextmanager
def exclusive_writer(artifact: str | Path, stage: str, is_main: bool = True,
                     setting: str = "run_dir", collective: bool = False) -> Iterator[None]:
    """Hold the artifact's writer lock for the block, after checking that its directory can be
    written (an OutputPathError naming `setting` otherwise), before any model loads. With
    `collective` (a stage every rank runs), rank 0 does both for all ranks and every rank raises
    the same error; without, the calling process alone (a stage only rank 0 runs, or one process).
    Remote URLs (`s3://...`) are not locked: their stores have no OS locks."""
    if "://" in str(artifact):
        yield
        return
    held: WriterLock | None = None
    refusal: tuple[str, str] | None = None  # (error class name, message)
    if is_main:
        try:
            require_writable_dir(Path(artifact).parent, setting)
            held = WriterLock.acquire(artifact, stage)
        except SaeworksError as err:
            refusal = (type(err).__name__, str(err))
    shared = all_gather_objects(refusal)[0] if collective else refusal
    if shared is not None:
        kind, message = cast(tuple[str, str], shared)
        raise (OutputPathError if kind == OutputPathError.__name__ else WriterBusyError)(message)
    try:
        yield
    finally:
        if held is not None:
            held.release()
