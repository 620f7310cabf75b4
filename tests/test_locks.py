"""One writer per artifact: a second writer is refused with the holder's PID and command, and a
lock held by a process that died (kill -9) never blocks the next writer."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from saeworks.sae.locks import WriterBusyError, WriterLock, exclusive_writer, lock_path
from saeworks.sae.oserrors import OutputPathError

HOLD = """
import sys, time
from saeworks.sae.locks import WriterLock
WriterLock.acquire(sys.argv[1], "harvest")
print("held", flush=True)
time.sleep(600)
"""


def _holder(artifact: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(artifact), "--marker-arg"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_second_writer_is_refused_until_the_first_dies(tmp_path: Path) -> None:
    store = tmp_path / "run" / "activations.zarr"
    child = _holder(store)
    try:
        with pytest.raises(WriterBusyError) as refused:
            WriterLock.acquire(store, "harvest")
        message = str(refused.value)
        assert "\n" not in message
        assert f"pid {child.pid}" in message and "--marker-arg" in message and str(store) in message
        with pytest.raises(WriterBusyError), exclusive_writer(store, "harvest"):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    held = WriterLock.acquire(store, "harvest")  # the OS dropped the dead holder's lock
    held.release()
    assert lock_path(store) == store.parent / ".activations.zarr.lock"
    assert str(os.getpid()) in lock_path(store).read_text()


def test_the_lock_is_released_when_the_block_ends_even_by_an_error(tmp_path: Path) -> None:
    target = tmp_path / "dictionaries" / "topk"
    with pytest.raises(KeyError), exclusive_writer(target, "analyze"):
        with pytest.raises(WriterBusyError):
            WriterLock.acquire(target, "analyze")  # a second descriptor, even in this process
        raise KeyError("boom")
    WriterLock.acquire(target, "analyze").release()


def test_an_unwritable_place_is_an_output_error_before_any_lock(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputPathError, match=r"run_dir: cannot write to .*a-file/run: a part of this "
                                              r"path is a file"), \
            exclusive_writer(blocker / "run" / "checkpoints", "train"):
        pass


def test_remote_stores_are_not_locked(tmp_path: Path) -> None:
    with exclusive_writer("s3://bucket/run/activations.zarr", "harvest"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_lock_holder_that_just_started_is_named_unknown(tmp_path: Path) -> None:
    target = tmp_path / "x"
    path = lock_path(target)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(WriterBusyError, match="holder unknown"):
            WriterLock.acquire(target, "train")
    finally:
        os.close(fd)
