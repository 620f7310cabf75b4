"""Helpers shared by the tests: small harvest configs and a CLI runner in a fresh process."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def small_harvest_overrides(run_dir: Path, **extra: object) -> list[str]:
    """Overrides for a quick harvest of the embedded model: shallow hooks, few tokens, tiny shards."""
    settings: dict[str, object] = {
        "run_dir": run_dir,
        "harvest.hooks": "[blocks.2.hook_resid_post,blocks.3.mlp.hook_post]",
        "harvest.max_tokens": 16 * 64,
        "harvest.batch_size": 4,
        "harvest.chunk_tokens": 128,
        "harvest.chunks_per_shard": 2,
        "data.context_size": 64,
        "model.device": "cpu",
        "model.dtype": "float32",  # the demo config says auto; tests compare against float32 forwards
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def run_cli(args: list[str], launcher: list[str] | None = None, timeout: float = 600
            ) -> subprocess.CompletedProcess:
    """Run `saeworks ARGS` (or `LAUNCHER -m saeworks.activations ARGS`) in a fresh process."""
    command = [*launcher, "-m", "saeworks.activations", *args] if launcher else \
        [sys.executable, "-m", "saeworks", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def shards_printed(stdout: str) -> dict[str, list[int]]:
    """`{"rank R/W": [shards]}` from the lines `saeworks harvest` prints on every rank."""
    pattern = r"(rank \d+/\d+) harvested shards (\[[\d, ]*\])"
    return {rank: list(ast.literal_eval(shards)) for rank, shards in re.findall(pattern, stdout)}


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block under `mask` (the process umask), restoring the old one after."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def unshared_paths(root: Path) -> list[str]:
    """Paths in the tree at `root` (itself included) whose permission bits are not those mkdir and
    open give under umask 022 (0o755, 0o644), i.e. that group and others could not read."""
    modes = {p: p.stat().st_mode & 0o777 for p in [root, *sorted(root.rglob("*"))]}
    return [f"{p}: {oct(mode)}" for p, mode in modes.items() if mode != (0o755 if p.is_dir() else 0o644)]
