"""Hook points: TransformerLens names mapped onto Hugging Face module trees, in this one place.

Reading a hook point (harvest, analysis) and writing one (splice, steer, ablate) both go through
`hooks_attached`, so they agree on where every name lives. Hooks exist only inside that context
manager and are removed in `finally`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saeworks.sae.errors import SaeworksError
from saeworks.sae.interventions import HookFn

HOOK_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_post")
_HOOK_NAME = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in HOOK_KINDS) + r")$")



class HookError(SaeworksError, ValueError):
    """A hook name that does not exist in the model."""


@dataclass(frozen=True)
class ArchitectureMap:
    """Where one model family keeps the pieces that the hook names refer to."""

    layers: str
    """Dotted path from the causal-LM module to the list of transformer blocks."""
    attn_out: str
    """Block submodule whose output is exactly what attention adds to the residual stream."""
    mlp_out: str
    """Block submodule whose output is exactly what the MLP adds to the residual stream."""
    mlp_down: str
    """The MLP's output projection: its input is the MLP's hidden activation (`mlp.hook_post`)."""
    final_norm: str
    """Dotted path from the causal-LM module to the norm applied before the unembedding."""


_LLAMA_LIKE = ArchitectureMap("model.layers", "self_attn", "mlp", "mlp.down_proj", "model.norm")
# Gemma 2/3 normalise each sublayer's output before adding it to the residual stream.
_GEMMA2_LIKE = ArchitectureMap(
    "model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "mlp.down_proj", "model.norm"
)
ARCHITECTURES: dict[str, ArchitectureMap] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "gpt2": ArchitectureMap("transformer.h", "attn", "mlp", "mlp.c_proj", "transformer.ln_f"),
    "gpt_neox": ArchitectureMap(
        "gpt_neox.layers", "attention", "mlp", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"
    ),
}


@dataclass(frozen=True)
class HookPoint:
    """A parsed hook name bound to the module that carries it in one model."""

    name: str
    layer: int
    kind: str
    module: nn.Module
    reads_input: bool
    """True when the activation is the module's input (resid_pre, mlp.hook_post)."""
    d: int
    """Width of the activation."""


def architecture_of(model: nn.Module) -> ArchitectureMap:
    """The module map of this model's family, or a HookError naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise HookError(
            f"model type {model_type!r} has no hook-point map; supported: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (works on the causal LM or on its base model)."""
    path = architecture_of(model).layers
    for candidate in (path, path.split(".", 1)[1]):
        try:
            blocks = model.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise HookError(f"cannot find the transformer blocks at {path!r} in {type(model).__name__}")


def valid_hook_names(n_layers: int) -> str:
    """Human-readable list of every valid hook name for a model with `n_layers` blocks."""
    kinds = ", ".join(f"blocks.{{L}}.{kind}" for kind in HOOK_KINDS)
    return f"{kinds} with L in 0..{n_layers - 1}"


def resolve_hook(model: nn.Module, name: str) -> HookPoint:
    """Bind a TransformerLens hook name to this model's module, or explain what the valid names are."""
    blocks = blocks_of(model)
    match = _HOOK_NAME.match(name)
    if match is None:
        raise HookError(f"unknown hook point {name!r}; valid names: {valid_hook_names(len(blocks))}")
    layer, kind = int(match.group(1)), match.group(2)
    if layer >= len(blocks):
        raise HookError(
            f"hook point {name!r}: layer {layer} is out of range, the model has {len(blocks)} "
            f"layers; valid names: {valid_hook_names(len(blocks))}"
        )
    arch, block = architecture_of(model), blocks[layer]
    d_model = int(model.config.hidden_size)  # type: ignore[union-attr,arg-type]
    if kind in ("hook_resid_pre", "hook_resid_post"):
        return HookPoint(name, layer, kind, block, kind == "hook_resid_pre", d_model)
    if kind in ("hook_attn_out", "hook_mlp_out"):
        module = block.get_submodule(arch.attn_out if kind == "hook_attn_out" else arch.mlp_out)
        return HookPoint(name, layer, kind, module, False, d_model)
    down = block.get_submodule(arch.mlp_down)
    return HookPoint(name, layer, kind, down, True, _input_width(down))


def _input_width(linear: nn.Module) -> int:
    if isinstance(linear, nn.Linear):
        return linear.in_features
    weight: torch.Tensor = linear.weight  # type: ignore[assignment]
    return int(weight.shape[0])  # GPT-2's Conv1D stores its weight as [in, out]


def resolve_hooks(model: nn.Module, names: Sequence[str]) -> list[HookPoint]:
    """Resolve several names; the first bad one raises."""
    return [resolve_hook(model, name) for name in names]


@contextmanager
def hooks_attached(model: nn.Module, fns: Mapping[str, HookFn]) -> Iterator[list[HookPoint]]:
    """Attach `fns[name]` at each named hook point for the duration of the block."""
    points = resolve_hooks(model, list(fns))
    handles = []
    try:
        for point in points:
            handles.append(_register(point, fns[point.name]))
        yield points
    finally:
        for handle in handles:
            handle.remove()


def _register(point: HookPoint, fn: HookFn) -> Any:
    if point.reads_input:

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            from_kwargs = not args
            activation = kwargs["hidden_states"] if from_kwargs else args[0]
            replaced = fn(activation)
            if replaced is None:
                return None
            if from_kwargs:
                return args, {**kwargs, "hidden_states": replaced}
            return (replaced, *args[1:]), kwargs

        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        is_tuple = isinstance(output, tuple)
        replaced = fn(output[0] if is_tuple else output)
        if replaced is None:
            return None
        return (replaced, *output[1:]) if is_tuple else replaced

    return point.module.register_forward_hook(post_hook)


class _AllCaptured(Exception):
    """Raised from inside the forward once every requested activation is in hand."""


@torch.no_grad()
def capture_activations(
    model: nn.Module,
    input_ids: torch.Tensor,
    hook_names: Sequence[str],
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run the model just far enough to read every named hook: `{name: [batch, pos, d]}`.

    The forward pass is abandoned as soon as the last requested activation is captured, so later
    blocks, the final norm and the LM head never run.
    """
    captured: dict[str, torch.Tensor] = {}
    wanted = len(hook_names)

    def recorder(name: str) -> HookFn:
        def record(activation: torch.Tensor) -> None:
            captured[name] = activation.detach()
            if len(captured) == wanted:
                raise _AllCaptured

        return record

    with hooks_attached(model, {name: recorder(name) for name in hook_names}), suppress(_AllCaptured):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    missing = [name for name in hook_names if name not in captured]
    if missing:
        raise HookError(f"the forward pass never reached hook points {missing}")
    return captured
