"""`harvest.compile`: each transformer block's forward through torch.compile (inductor), hooks left
eager, so that the harvest's forward runs fused kernels between the matmuls.

Why per block and not the whole model: the stages attach fresh hooks for every batch and abandon
the forward from a hook once the activations are read (activations/hooks.py). A compiled region
holding a hook would be recompiled for each new hook. Module.__call__ runs a block's own pre- and
post-hooks (`hook_resid_pre`, `hook_resid_post`) around its `forward`, outside the compiled code;
a block with a hook on one of its submodules (attention, MLP, `mlp.hook_post`) runs its eager
forward while that hook is attached. The blocks share one compiled graph where torch inlines the
modules' parameters as inputs (the default from torch 2.5); the first forward compiles it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from saeworks.activations.hooks import blocks_of

log = logging.getLogger(__name__)


class CompileState:
    """What the blocks of one model share: whether compiling has failed (then none tries again)."""

    def __init__(self) -> None:
        self.failed = False


class CompiledForward:
    """A block's `forward`: compiled where no hook is attached inside the block, else eager. A
    compiled call that fails (no C compiler for inductor, an op it cannot lower) logs one warning
    and leaves every block sharing `state` eager; the same call then runs eagerly, so a genuine
    error of the inputs is raised from there."""

    def __init__(self, block: nn.Module, state: CompileState | None = None) -> None:
        self.block = block
        self.state = state or CompileState()
        self.eager = block.forward
        self.compiled: Any = torch.compile(self.eager)
        self.calls = {"compiled": 0, "eager": 0}
        """How many calls took each forward (tests and benchmarks read it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.state.failed and not hooked_inside(self.block):
            try:
                out = self.compiled(*args, **kwargs)
                self.calls["compiled"] += 1
                return out
            except Exception as err:
                first_line = str(err).splitlines()[0][:300] if str(err) else ""
                log.warning("harvest.compile: compiling %s failed, the blocks run eagerly (%s: %s)",
                            type(self.block).__name__, type(err).__name__, first_line)
                self.state.failed = True
        self.calls["eager"] += 1
        return self.eager(*args, **kwargs)


def hooked_inside(block: nn.Module) -> bool:
    """Whether a forward or forward-pre hook is attached to a module inside `block` (not to the
    block itself, whose hooks run outside its forward)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in block.modules() if m is not block)


def compile_blocks(model: nn.Module) -> list[CompiledForward]:
    """Give every transformer block of `model` a CompiledForward (once: a model already compiled
    keeps its own); returns them in block order."""
    forwards, state = [], CompileState()
    for block in blocks_of(model):
        if not isinstance(block.forward, CompiledForward):
            block.forward = CompiledForward(block, state)  # type: ignore[method-assign]
        forwards.append(block.forward)
    return forwards

