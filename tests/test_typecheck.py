"""mypy really checks the whole `saeworks` namespace, stage folders included.

The stage folders (sae/, activations/, train/, eval/) reach mypy only through the symlinks
saeworks/<stage> -> ../<stage>. If that resolution broke, or a missing import were silenced
globally again, mypy would type every `saeworks.*` import as Any and pass on anything. So a copy
of the source tree gets one deliberate error that is only visible across packages: a function in
saeworks.train calls a function of saeworks.sae with the wrong argument type. mypy must report
exactly that error, at that file and line, and nothing else that the unmodified copy does not.

The copy reuses the repository's mypy cache (.mypy_cache, or $MYPY_CACHE_DIR, when there is one):
mypy revalidates each entry by content hash, so only the changed modules and their importers are
checked again (~10 s with a warm cache, ~1.5 min without).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TREE = ("pyproject.toml", "saeworks", "sae", "activations", "train", "eval", "steer", "interp")
"""What mypy reads: its config and the five folders (saeworks/ with its symlinks as symlinks)."""

CALLEE = "sae/limits.py"
"""Gets a new typed function; imported by no other module of the package, so the recheck stays small."""
CALLER = "train/dead.py"
"""Calls it wrongly; imported by one module (the trainer)."""

ERROR = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): error: (?P<message>.*)$", re.MULTILINE)
MISSING = re.compile(r'(Cannot find implementation or library stub for module named|Skipping analyzing) '
                     r'"(?P<module>[^"]+)"')


def copy_tree(dest: Path) -> None:
    """The five folders and pyproject.toml, symlinks kept; plus the repository's mypy cache."""
    skip = shutil.ignore_patterns("__pycache__")
    for name in TREE:
        source = REPO / name
        if source.is_file():
            shutil.copy2(source, dest / name)
        else:
            shutil.copytree(source, dest / name, symlinks=True, ignore=skip)
    cache = REPO / os.environ.get("MYPY_CACHE_DIR", ".mypy_cache")
    if cache.is_dir():
        # a concurrent mypy run may replace files while they are copied: a stale entry is rechecked
        with contextlib.suppress(shutil.Error):
            shutil.copytree(cache, dest / ".mypy_cache", dirs_exist_ok=True)


def run_mypy(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "MYPY_CACHE_DIR", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-m", "mypy"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, check=False)


def errors(output: str) -> set[tuple[str, int, str]]:
    return {(m["path"], int(m["line"]), m["message"].strip()) for m in ERROR.finditer(output)}


def append(path: Path, text: str) -> int:
    """Append `text` to `path`; returns the 1-based line number of its last line."""
    source = path.read_text()
    if not source.endswith("\n"):
        source += "\n"
    source += text
    path.write_text(source)
    return source.count("\n")


@pytest.mark.slow
def test_mypy_resolves_the_namespace_and_finds_a_cross_package_error(tmp_path: Path) -> None:
    copy_tree(tmp_path)
    assert (tmp_path / "saeworks" / "train").is_symlink(), "the copy must keep saeworks/train a symlink"

    baseline = run_mypy(tmp_path)
    out = baseline.stdout + baseline.stderr
    assert "found twice under different module names" not in out, out
    unresolved = sorted({m["module"] for m in MISSING.finditer(out)
                         if m["module"].split(".")[0] == "saeworks"})
    assert not unresolved, f"mypy cannot resolve {unresolved}:\n{out}"
    checked = re.search(r"(?:checked|in) (\d+) source files?", out)
    sources = [name for _, _, names in os.walk(tmp_path / "saeworks", followlinks=True)
               for name in names if name.endswith(".py")]
    assert checked and int(checked[1]) == len(sources), f"expected {len(sources)} files checked:\n{out}"

    append(tmp_path / CALLEE, "\n\ndef typecheck_probe(count: int) -> int:\n    return count\n")
    line = append(tmp_path / CALLER, "\n\ndef _typecheck_probe() -> int:\n"
                                     "    from saeworks.sae.limits import typecheck_probe\n\n"
                                     '    return typecheck_probe("not an int")\n')
    broken = run_mypy(tmp_path)
    expected = (f"saeworks/{CALLER}", line,
                'Argument 1 to "typecheck_probe" has incompatible type "str"; expected "int"  [arg-type]')
    new = errors(broken.stdout) - errors(baseline.stdout)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert new == {expected}, broken.stdout + broken.stderr
