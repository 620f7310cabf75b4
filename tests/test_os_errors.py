"""Operating-system failures are user errors: a read-only, full, unwritable or impossible run_dir
gives one line naming the path and the fix (exit 2), before the model loads where possible."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from saeworks.cli import main
from tests.eval_helpers import tiny_overrides


@contextmanager
def mounted_tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at `path` (root only; skipped where the machine does not allow mounts)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root and mount(8)")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _refuse_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the run_dir was checked")

    for module in ("saeworks.activations.harvest", "saeworks.pipeline"):
        monkeypatch.setattr(f"{module}.load_model", load_model)


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_a_read_only_run_dir_is_one_line_before_the_model_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_model_load(monkeypatch)
    with mounted_tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        for stage in ("harvest", "train"):
            assert main([stage, *tiny_overrides(ro / "run")]) == 2
            line = _one_line_error(capsys)
            assert f"cannot write to {ro}" in line and "read-only file system" in line, line


def test_a_run_dir_under_a_file_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_model_load(monkeypatch)
    (tmp_path / "notes.txt").write_text("a file, not a directory")
    assert main(["harvest", *tiny_overrides(tmp_path / "notes.txt" / "run")]) == 2
    line = _one_line_error(capsys)
    assert str(tmp_path / "notes.txt" / "run") in line and "is a file, not a directory" in line


def test_a_full_disk_during_harvest_is_one_line_and_keeps_finished_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with mounted_tmpfs(tmp_path / "small", "96k") as small:
        assert main(["harvest", *tiny_overrides(small / "run")]) == 2
        line = _one_line_error(capsys)
        assert "no space left on device" in line and "rerun the same command" in line, line


def test_a_full_disk_during_training_is_one_line(
        tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    with mounted_tmpfs(tmp_path / "small", "64k") as small:
        overrides = tiny_overrides(small / "run", **{"train.store": tiny_run.store_url})
        assert main(["train", *overrides]) == 2
        line = _one_line_error(capsys)
        assert "no space left on device" in line, line


def test_a_dictionary_out_on_a_read_only_disk_is_refused_before_the_model_loads(
        tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _refuse_model_load(monkeypatch)
    with mounted_tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        code = main(["analyze", str(tiny_run.sae_dir), tiny_run.store_url, "--out", str(ro / "dict")])
        assert code == 2
        line = _one_line_error(capsys)
        assert str(ro) in line and "read-only file system" in line, line


def test_permission_denied_is_one_line_before_the_model_loads(tmp_path: Path) -> None:
    """A directory without write permission. Root writes anywhere, so as root the command runs
    without the capabilities that override file permissions (setpriv(1) from util-linux)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("as root this needs setpriv(1) to drop CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
    done = subprocess.run([*prefix, sys.executable, "-m", "saeworks", "harvest",
                           *tiny_overrides(locked / "run")],
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"cannot write to {locked / 'run'}" in lines[0] and "permission denied" in lines[0]
    assert "Loading weights" not in done.stderr  # refused before the model loaded
    assert list(locked.iterdir()) == []
