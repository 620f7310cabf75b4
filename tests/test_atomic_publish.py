"""Publishing an artifact over an old one: a kill at any step leaves the old or the new one under
its real name (or one the next write restores), and the next write removes what dead writers
left, never what a live one is still writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from saeworks.sae import atomic
from saeworks.sae.atomic import (
    Leftover,
    atomic_directory,
    clean_directory,
    clean_leftovers,
    leftovers_of,
    remove_directory,
    scratch_path,
    write_text_atomic,
)

PUBLISH = """
import sys
from pathlib import Path
from saeworks.sae import atomic
if sys.argv[2] == "fallback":
    atomic._exchange = lambda a, b: False  # a file system without RENAME_EXCHANGE
with atomic.atomic_directory(Path(sys.argv[1])) as scratch:
    (scratch / "payload.txt").write_text("new")
    (scratch / "more.bin").write_bytes(bytes(4096))
"""


def _artifact(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "payload.txt").write_text(text)
    return path


def _publish(target: Path, mode: str, fault: str | None) -> int:
    env = {**os.environ, **({atomic.FAULT_ENV: fault} if fault else {})}
    return subprocess.run([sys.executable, "-c", PUBLISH, str(target), mode], env=env,
                          check=False).returncode


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(("mode", "fault", "right_after"), [
    ("exchange", "publish:ready", "old"),
    ("exchange", "publish:exchanged", "new"),
    ("fallback", "publish:ready", "old"),
    ("fallback", "publish:moved-aside", None),  # nothing under the name until the next write
    ("fallback", "publish:renamed", "new"),
])
def test_a_kill_at_each_step_of_a_publish_leaves_a_usable_artifact(
        tmp_path: Path, mode: str, fault: str, right_after: str | None) -> None:
    target = _artifact(tmp_path / "dictionary", "old")
    assert _publish(target, mode, fault) == -signal.SIGKILL
    if right_after is None:
        assert not target.exists()
    else:
        assert (target / "payload.txt").read_text() == right_after
    assert _hidden(tmp_path), "the killed writer left its scratch behind"

    restored = clean_leftovers(target)  # what the next write of the artifact does first
    assert (target / "payload.txt").read_text() in ("old", "new")
    assert _hidden(tmp_path) == [], restored
    assert _publish(target, mode, None) == 0
    assert (target / "payload.txt").read_text() == "new"
    assert _hidden(tmp_path) == []


def test_the_fallback_restores_the_old_artifact_after_a_kill_between_its_renames(tmp_path: Path) -> None:
    target = _artifact(tmp_path / "sae", "old")
    assert _publish(target, "fallback", "publish:moved-aside") == -signal.SIGKILL
    [aside] = [f for f in leftovers_of(target) if f.kind == atomic.DISPLACED]
    assert not aside.owner_alive()
    clean_leftovers(target)
    assert (target / "payload.txt").read_text() == "old"


def test_publish_replaces_in_place_and_a_failed_write_keeps_the_old(tmp_path: Path) -> None:
    target = _artifact(tmp_path / "ckpt", "old")
    inode = target.stat().st_ino
    with atomic_directory(target) as scratch:
        (scratch / "payload.txt").write_text("new")
    assert (target / "payload.txt").read_text() == "new"
    assert target.stat().st_ino != inode
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as scratch:
        (scratch / "payload.txt").write_text("half")
        raise RuntimeError("boom")
    assert (target / "payload.txt").read_text() == "new"
    assert _hidden(tmp_path) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_leftovers_of_dead_writers_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    host = atomic.this_host()
    live = tmp_path / f".report.md.partial@{host}.{os.getpid()}.aa"
    dead = tmp_path / f".report.md.partial@{host}.{_dead_pid()}.bb"
    other_host = tmp_path / f".report.md.partial@{host}-elsewhere.1.cc"
    other_artifact = tmp_path / f".notes.md.partial@{host}.{_dead_pid()}.dd"
    for path in (live, dead, other_host, other_artifact):
        path.write_text("x")
    assert clean_leftovers(target) == [dead]
    assert live.exists() and other_host.exists() and other_artifact.exists()
    write_text_atomic(target, "done")  # a write cleans its own artifact's leftovers the same way
    assert target.read_text() == "done" and live.exists()
    assert set(clean_leftovers(target, any_owner=True)) == {live, other_host}  # under the lock
    assert other_artifact.exists()


def test_a_reused_pid_does_not_keep_a_leftover_alive(tmp_path: Path) -> None:
    # PID 1 is alive but started long after this leftover was last touched: not its writer.
    leftover = tmp_path / f".x.partial@{atomic.this_host()}.1.ee"
    leftover.mkdir()
    os.utime(leftover, (0, 0))
    found = Leftover.parse(leftover)
    assert found is not None and not found.owner_alive()
    os.utime(leftover, None)
    assert found.owner_alive()


def test_clean_directory_handles_changing_names_and_legacy_scratch(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _artifact(root / "tokens-000000000100", "kept")
    pid = _dead_pid()
    (root / f".tokens-000000000200.partial@{atomic.this_host()}.{pid}.ab").mkdir()
    (root / ".tmp-k2j3h4").mkdir()  # scratch named by an older saeworks: only under the lock
    assert len(clean_directory(root, legacy=(".tmp-*",))) == 1
    assert (root / ".tmp-k2j3h4").exists()
    assert clean_directory(root, any_owner=True, legacy=(".tmp-*",)) == [root / ".tmp-k2j3h4"]
    assert _hidden(root) == [] and (root / "tokens-000000000100" / "payload.txt").exists()


def test_remove_directory_never_leaves_half_a_directory_under_its_name(tmp_path: Path) -> None:
    target = _artifact(tmp_path / "tokens-000000000100", "x")
    remove_directory(target)
    assert not target.exists() and _hidden(tmp_path) == []
    remove_directory(target)  # already gone: nothing to do


def test_scratch_names_parse_back_to_their_owner(tmp_path: Path) -> None:
    path = scratch_path(tmp_path / "a.b-c.zarr")
    found = Leftover.parse(path)
    assert found is not None
    assert (found.target, found.kind, found.pid) == ("a.b-c.zarr", "partial", os.getpid())
    assert found.host == atomic.this_host()
