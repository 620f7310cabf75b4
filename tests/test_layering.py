"""Imports point one way: sae <- activations <- train, eval <- steer <- interp <- the application
layer (saeworks/).

Every import statement of the package (module level or inside a function) is parsed, so a lazy
import cannot hide an upward dependency. A stage package's `__main__.py` is a command-line entry
point (`torchrun -m saeworks.train`) and belongs to the application layer, whatever its folder.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sae", "activations", "train", "eval", "steer", "interp")
ALLOWED: dict[str, set[str]] = {
    "sae": {"sae"},
    "activations": {"sae", "activations"},
    "train": {"sae", "activations", "train"},
    "eval": {"sae", "activations", "eval"},
    "steer": {"sae", "activations", "eval", "steer"},
    "interp": {"sae", "activations", "eval", "steer", "interp"},
    "app": {"sae", "activations", "train", "eval", "steer", "interp", "app"},
}
"""Which layers each layer may import (train and eval are siblings: neither imports the other; the
interventions in steer use the dictionary, so they sit above eval; interp builds on steer's)."""


def package_files() -> list[tuple[str, Path]]:
    """(layer, file) for every module of the installed namespace."""
    files = [("app" if path.name == "__main__.py" else stage, path)
             for stage in STAGES for path in sorted((REPO / stage).glob("*.py"))]
    files += [("app", path) for path in sorted((REPO / "saeworks").glob("*.py"))]
    return files


def layer_of(module: str) -> str | None:
    """The layer a `saeworks...` module name belongs to (None for third-party modules)."""
    parts = module.split(".")
    if parts[0] != "saeworks":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else "app"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, including `from x import y` as x.y."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; use saeworks.* names"
            base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names
                      if base == "saeworks"]  # `from saeworks import train` imports a layer
    return found


def violations(files: list[tuple[str, Path]]) -> list[str]:
    problems = []
    for layer, path in files:
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top in STAGES:
                problems.append(f"{shown}:{line} imports {module!r}: the stages are "
                                f"saeworks.{top}, never a top-level {top!r}")
            target = layer_of(module)
            if target is not None and target not in ALLOWED[layer]:
                problems.append(f"{shown}:{line} ({layer}) imports {module} ({target})")
    return problems


def test_imports_point_one_way() -> None:
    files = package_files()
    assert len(files) > 50 and {layer for layer, _ in files} == set(ALLOWED)
    assert violations(files) == []


@pytest.mark.parametrize(("layer", "source", "flagged"), [
    ("sae", "from saeworks.activations.hooks import HookFn\n", True),
    ("sae", "def f():\n    from saeworks.pipeline import run_pipeline\n", True),
    ("train", "from saeworks.eval.metrics import ReconstructionAccumulator\n", True),
    ("eval", "from saeworks import train\n", True),
    ("activations", "import train.run\n", True),
    ("activations", "from saeworks.sae.io import load_sae\nimport torch\n", False),
    ("app", "from saeworks.train.run import train\nfrom saeworks.eval import plots\n", False),
])
def test_the_check_catches_an_upward_import(tmp_path: Path, layer: str, source: str, flagged: bool) -> None:
    scratch = tmp_path / "module.py"
    scratch.write_text(source)
    assert bool(violations([(layer, scratch)])) == flagged
