"""One writer per artifact: a second writer is refused with the holder's PID and command, and a
lock held by a process that died (kill -9) never blocks the next writer."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saeworks.sae.atomic import FAULT_ENV
from saeworks.sae.locks import WriterBusyError, WriterLock, exclusive_writer, lock_path
from saeworks.sae.oserrors import OutputPathError
from tests.helpers import REPO, run_cli, shards_printed, small_harvest_overrides

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


def _wait_until_stopped(process: subprocess.Popen[str], timeout: float = 300) -> None:
    """Until `process` is stopped (state T): it sent itself SIGSTOP at a fault point."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        state = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.2)
    raise AssertionError("the first harvest never reached its first finished shard")


def test_a_second_harvest_is_refused_while_the_first_runs_and_admitted_after_kill_9(
        tmp_path: Path) -> None:
    overrides = small_harvest_overrides(tmp_path / "run")
    first = subprocess.Popen([sys.executable, "-m", "saeworks", "harvest", *overrides], cwd=REPO,
                             env={**os.environ, FAULT_ENV: "harvest:shard-written:stop"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_stopped(first)  # one shard written, the lock held
        second = run_cli(["harvest", *overrides])
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "Traceback" not in second.stderr
        assert f"pid {first.pid}" in errors[0] and "saeworks harvest" in errors[0], errors[0]
        assert "Loading weights" not in second.stderr
    finally:
        first.kill()
        first.communicate()
    third = run_cli(["harvest", *overrides])
    assert third.returncode == 0, third.stderr[-3000:]
    written = shards_printed(third.stdout)["rank 0/1"]
    assert 0 not in written and written, third.stdout  # it resumed after the killed one's shard


def test_only_a_collective_lock_talks_to_the_other_ranks(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """analyze runs on rank 0 alone (`saeworks run` under torchrun): its lock must not wait for
    ranks that never come; harvest and train share the outcome with every rank."""
    calls: list[object] = []

    def gather(obj: object) -> list[object]:
        calls.append(obj)
        return [obj]

    monkeypatch.setattr("saeworks.sae.locks.all_gather_objects", gather)
    with exclusive_writer(tmp_path / "dictionary", "analyze"):
        pass
    assert calls == []
    with exclusive_writer(tmp_path / "activations.zarr", "harvest", collective=True):
        pass
    assert calls == [None]
