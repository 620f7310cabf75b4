"""The wheel: one top-level package `saeworks`, and it works once installed, away from the checkout.

The wheel is built (pip wheel, no dependencies) from a copy of the files a clone has (`git ls-files`,
plus untracked files that git does not ignore), so the build never writes into the checkout.

It is then installed into a scratch virtual environment made with `python -m venv --without-pip`
(`pip --python` installs into it). saeworks' dependencies (torch, transformers, ...) are not
installed again: a `.pth` file in the scratch site-packages appends the test environment's
site-packages to sys.path as a plain path entry. Python processes `.pth` files only in site
directories, not in directories a `.pth` line adds, so the test environment's editable-install
finder for saeworks (`__editable__.saeworks-*.pth`) never runs, and the checkout is never on
sys.path: the only `saeworks` to be found is the wheel's, which the test checks by its `__file__`.
Every command runs from a directory outside the checkout, with PYTHONPATH cleared.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sae", "activations", "train", "eval", "steer", "interp")


def run(args: list[str | Path], cwd: Path, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    if check:
        assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def copy_checkout(dest: Path) -> None:
    """The checkout's files as a clone would have them (symlinks kept as symlinks)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("builds from the files git lists: needs a git checkout")
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout
    for name in sorted(set(filter(None, listed.split("\0")))):
        source = REPO / name
        if not os.path.lexists(source):  # deleted in the working tree, not yet committed
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


def build_wheel(tmp_path: Path) -> Path:
    source, dist = tmp_path / "src", tmp_path / "dist"
    source.mkdir()
    copy_checkout(source)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, source]
    try:
        setuptools_major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        setuptools_major = 0
    if setuptools_major >= 77:  # pyproject's build-system.requires: build offline with this backend
        command += ["--no-build-isolation", "--check-build-dependencies", "--no-index"]
    run(command, cwd=tmp_path)
    (wheel,) = dist.glob("saeworks-*.whl")
    return wheel


def scratch_environment(root: Path, wheel: Path) -> tuple[Path, dict[str, str]]:
    """A venv with the wheel and, on a plain .pth path line, this environment's site-packages."""
    run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent)
    python = root / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=root.parent).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "test-environment.pth").write_text("".join(f"{path}\n" for path in ours))
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "--quiet", wheel], cwd=root.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return python, env


@pytest.mark.slow
def test_wheel_has_one_top_level_package_and_runs_installed(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    version = wheel.name.split("-")[1]
    dist_info = f"saeworks-{version}.dist-info"

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
        top_level = archive.read(f"{dist_info}/top_level.txt").decode().split()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"saeworks", dist_info}, sorted(tops)
    assert not tops & set(STAGES)
    assert top_level == ["saeworks"]
    for required in ("saeworks/sae/io.py", "saeworks/train/__main__.py", "saeworks/py.typed",
                     "saeworks/cli.py", f"{dist_info}/licenses/LICENSE",
                     # the web page is package data: `saeworks serve` works offline once installed
                     "saeworks/service/static/index.html", "saeworks/service/static/app.js",
                     "saeworks/service/static/style.css",
                     # the native kernels' sources: built on the user's machine at first use
                     *(f"saeworks/{stage}/kernels/{c.name}" for stage in ("sae", "eval")
                       for c in (REPO / stage / "kernels").iterdir() if c.suffix in (".c", ".h"))):
        assert required in names, required
    for stage in STAGES:
        assert f"saeworks/{stage}/__init__.py" in names, stage
    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    assert dict(scripts["console_scripts"]) == {"saeworks": "saeworks.cli:main"}

    outside = tmp_path / "elsewhere"  # the working directory of every command: not the checkout
    outside.mkdir()
    python, env = scratch_environment(tmp_path / "scratch", wheel)

    shown = run([python, "-c", "import saeworks, saeworks.sae.io as io; "
                 "print(saeworks.__version__); print(saeworks.__file__); print(io.__file__)"],
                cwd=outside, env=env).stdout.split("\n")
    assert shown[0] == version
    for path in shown[1:3]:
        assert Path(path).is_relative_to(tmp_path / "scratch"), shown
    for stage in STAGES:  # no generic top-level names installed
        missing = run([python, "-c", f"import {stage}"], cwd=outside, env=env, check=False)
        assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr, (stage, missing)

    console = tmp_path / "scratch" / "bin" / "saeworks"
    assert console.read_text().startswith(f"#!{python}")
    usage = run([console, "--help"], cwd=outside, env=env).stdout
    assert usage.startswith("usage: saeworks"), usage
    assert run([python, "-m", "saeworks", "--help"], cwd=outside, env=env).stdout == usage
