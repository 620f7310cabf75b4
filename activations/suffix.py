"""Run a causal LM from a hook point on: the layers after it, the final norm and the LM head only.

Evaluation compares forwards that differ only from a hook point on (clean, SAE spliced in, zero-
and mean-ablated), so the blocks before it need to run once, not once per variant. A
`SuffixPlan` says where the shared prefix ends for one hook:

- `hook_resid_post` of block L: the suffix starts at block L + 1 (the final norm after the last
  block), whose input *is* the hook's activation; the edit is applied to it directly.
- `hook_resid_pre` of block L: the suffix starts at block L, whose input is the activation.
- `hook_attn_out`, `hook_mlp_out`, `mlp.hook_post` of block L: the edit happens inside block L,
  so the suffix starts at block L from its input (`blocks.L.hook_resid_pre`, captured with the
  hook in the prefix pass) and the edit is attached as a hook, as in a full forward.

`suffix_logits` runs the model's own forward (embedding, masks and position embeddings, every
layer's own keyword arguments, the final norm, the head and any logit soft-capping exactly as the
model computes them) with the blocks before the entry made pass-throughs and the entry module's
input replaced by the captured one. The blocks after it receive bit for bit what a full forward
gives them, so the logits equal the full forward's with the same edit (tests/test_eval_prefix.py),
for every family of `activations.hooks.ARCHITECTURES`. The embedding lookup still runs (a gather,
no arithmetic worth counting). The pass-throughs are instance attributes removed in `finally`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saeworks.activations.hooks import (
    HookError,
    HookFn,
    architecture_of,
    blocks_of,
    hooks_attached,
    resolve_hook,
)


class SuffixError(HookError):
    """The model's forward does not run its blocks the way a suffix-only forward relies on."""


@dataclass(frozen=True)
class SuffixPlan:
    """Where the shared prefix of a forward edited at `hook` ends, and how the suffix starts."""

    hook: str
    start: int
    """Index of the first block the suffix runs (== number of blocks: only the final norm)."""
    entry_hook: str
    """The hook whose activation is the suffix's input (the entry module's input)."""
    direct: bool
    """True: the edit is applied to the suffix input itself; False: attached at `hook` inside
    the entry block while the suffix runs."""
    n_blocks: int

    @property
    def capture_names(self) -> list[str]:
        """Hooks the prefix pass captures: the edited one and, if different, the suffix input."""
        return [self.hook] if self.entry_hook == self.hook else [self.hook, self.entry_hook]


def plan_suffix(model: nn.Module, hook: str) -> SuffixPlan:
    """The SuffixPlan of `hook` in `model` (HookError for a bad name or an unmapped family)."""
    point = resolve_hook(model, hook)
    n_blocks = len(blocks_of(model))
    if point.kind == "hook_resid_post":
        return SuffixPlan(hook, point.layer + 1, hook, True, n_blocks)
    if point.kind == "hook_resid_pre":
        return SuffixPlan(hook, point.layer, hook, True, n_blocks)
    return SuffixPlan(hook, point.layer, f"blocks.{point.layer}.hook_resid_pre", False, n_blocks)


def _entry_module(model: nn.Module, plan: SuffixPlan) -> nn.Module:
    if plan.start < plan.n_blocks:
        return blocks_of(model)[plan.start]
    path = architecture_of(model).final_norm
    for candidate in (path, path.split(".", 1)[1]):  # on the causal LM or its base model
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise SuffixError(f"cannot find the final norm at {path!r} in {type(model).__name__}")


def _pass_through(state: dict[str, int]) -> Any:
    """A block forward that returns its hidden-state input unchanged (a skipped prefix block)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        state["skipped"] += 1
        return args[0] if args else kwargs["hidden_states"]

    return forward


@contextmanager
def _suffix_only(model: nn.Module, plan: SuffixPlan, entry_input: torch.Tensor) -> Iterator[dict[str, int]]:
    """Blocks before plan.start pass their input through; the entry module reads `entry_input`."""
    blocks = blocks_of(model)
    state = {"skipped": 0, "entered": 0}

    def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state["entered"] += 1
        if args:
            return (entry_input, *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else "input"
        return args, {**kwargs, key: entry_input}

    skipped = [blocks[i] for i in range(plan.start)]
    # An instance-level forward may already be there (accelerate's device hooks wrap it so): kept.
    saved = [block.__dict__.get("forward") for block in skipped]
    handle = _entry_module(model, plan).register_forward_pre_hook(inject, with_kwargs=True)
    try:
        for block in skipped:
            block.forward = _pass_through(state)  # type: ignore[method-assign]
        yield state
    finally:
        handle.remove()
        for block, forward in zip(skipped, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward  # type: ignore[method-assign]


@torch.no_grad()
def suffix_logits(model: nn.Module, input_ids: torch.Tensor, plan: SuffixPlan, entry_input: torch.Tensor,
                  edit: HookFn | None = None) -> torch.Tensor:
    """[batch, pos, vocab] logits of the forward on `input_ids` whose activation at the suffix's
    entry is `entry_input` [batch, pos, d] (`capture_activations` of plan.entry_hook), with `edit` applied at
    plan.hook (None: the clean forward), running only the blocks from plan.start on."""
    logits = _run_suffix(model, input_ids, plan, entry_input, edit, stop_at_head=False)
    assert logits is not None
    return logits


@torch.no_grad()
def suffix_head_input(model: nn.Module, input_ids: torch.Tensor, plan: SuffixPlan, entry_input: torch.Tensor,
                      edit: HookFn | None = None) -> torch.Tensor:
    """[batch, pos, d]: what the output head (`get_output_embeddings()`) receives in the forward
    `suffix_logits` runs -- the final norm's output; the head itself never runs, so no [batch,
    pos, vocab] logits are made (the caller applies the head a few rows at a time)."""
    head_input = _run_suffix(model, input_ids, plan, entry_input, edit, stop_at_head=True)
    if head_input is None:
        raise SuffixError(f"{type(model).__name__}'s forward never called its output head")
    return head_input


class _HeadReached(Exception):
    """Raised by the head's pre-hook: the forward has computed everything before the head."""


def _run_suffix(model: nn.Module, input_ids: torch.Tensor, plan: SuffixPlan, entry_input: torch.Tensor,
                edit: HookFn | None, stop_at_head: bool) -> torch.Tensor | None:
    """The suffix forward: its logits, or with stop_at_head its head's input (None if the head
    never ran)."""
    fns: Mapping[str, HookFn] = {}
    if edit is not None and plan.direct:
        edited = edit(entry_input)
        entry_input = entry_input if edited is None else edited
    elif edit is not None:
        fns = {plan.hook: edit}
    head_input: list[torch.Tensor] = []

    def stop(module: nn.Module, args: tuple) -> None:
        head_input.append(args[0])
        raise _HeadReached

    head = model.get_output_embeddings() if stop_at_head else None  # type: ignore[operator]
    handle = head.register_forward_pre_hook(stop) if head is not None else None
    logits = None
    try:
        with _suffix_only(model, plan, entry_input) as state, hooks_attached(model, fns):
            try:
                logits = model(input_ids=input_ids, use_cache=False).logits
            except _HeadReached:
                pass
            except Exception as err:
                if state["entered"]:  # a failure of the real blocks, not of skipping the prefix
                    raise
                raise SuffixError(f"{type(model).__name__} failed before the suffix's entry with its first "
                                  f"{plan.start} blocks skipped: {type(err).__name__}: {err}") from err
    finally:
        if handle is not None:
            handle.remove()
    if state["entered"] != 1 or state["skipped"] != plan.start:
        raise SuffixError(f"{type(model).__name__} ran its entry module {state['entered']} times and "
                          f"skipped {state['skipped']} of {plan.start} blocks in a suffix forward; its "
                          "forward does not call its blocks once each in order")
    if stop_at_head:
        return head_input[0] if head_input else None
    return logits
