"""Orthogonalisation: a permanent weight edit that stops a model writing a direction into its
residual stream (Arditi et al. 2024, "Refusal in language models is mediated by a single direction").

Every matrix that writes to the residual stream has the unit direction d̂ projected out of its
output side, W ← W − d̂ d̂ᵀ W, and so does its bias, b ← b − d̂ d̂ᵀ b:

- the token embeddings (and GPT-2's position embeddings, which are added to them);
- every attention output projection (o_proj, GPT-2 attn.c_proj, GPT-NeoX attention.dense);
- every MLP down projection (`ArchitectureMap.mlp_down`).

GPT-2's Conv1D stores [in, out] and embeddings [n, d], so the projection acts on their last axis
there and on the first axis of an nn.Linear's [out, in]. Gemma scales its embeddings by √d_model
inside the model; a scale commutes with the projection. The edited model is then the original one
with d̂ projected out of the embedding, attention and MLP outputs by hooks, exactly (float32
rounding only), and its residual stream has no d̂ component at any layer.

Tied embeddings (SmolLM2, GPT-2, Gemma): the unembedding shares the embedding matrix, and editing
one would silently edit the other. The LM head is given its own copy of the ORIGINAL weights and
the config says `tie_word_embeddings: false`, so only what the model writes changes, not how it
reads out its last residual stream (the saved directory is larger by one embedding matrix).

Gemma 2/3 normalise each sublayer's output with a post-norm before adding it to the residual
stream: y = g ⊙ o / rms(o). Projecting d̂ out of o does not remove it from y. What is exact there:
project u = g ⊙ d̂ / ‖g ⊙ d̂‖ out of that layer's o_proj / down_proj, so o ⊥ g ⊙ d̂ and
y · d̂ = (o · (g ⊙ d̂)) / rms(o) = 0: the residual stream has no d̂ component at any layer, as in
the other families. But this model is NOT the original with d̂ projected out of the residual by
hooks: the post-norm divides by the RMS of what remains, so the rest of each output is slightly
rescaled. The record says so (`post_norm_weighted: true`).

The record of what was projected out (source, hook, norm of d, the parameters edited, the
saeworks version) goes into the model's config as `saeworks_orthogonalization`, a list (one entry
per edit, in order), and `save_orthogonalized` writes an HF directory with the tokenizer,
atomically, that `AutoModelForCausalLM.from_pretrained` loads.

In float32 the residual component left is rounding only (~1e-7 relative); in bfloat16 the edited
weights are rounded back to bfloat16 and ~1e-3 of d̂ remains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from saeworks.activations.hooks import ARCHITECTURES, blocks_of, capture_activations
from saeworks.sae.atomic import atomic_directory
from saeworks.sae.errors import SaeworksError
from saeworks.sae.io import read_vector
from saeworks.sae.version import package_version
from saeworks.steer.interventions import FeatureSource

CONFIG_KEY = "saeworks_orthogonalization"
"""The config.json field holding the list of edits."""

ATTENTION_OUTPUT = {
    "llama": "self_attn.o_proj", "mistral": "self_attn.o_proj", "qwen2": "self_attn.o_proj",
    "qwen3": "self_attn.o_proj", "gemma": "self_attn.o_proj", "gemma2": "self_attn.o_proj",
    "gemma3_text": "self_attn.o_proj", "gpt2": "attn.c_proj", "gpt_neox": "attention.dense",
}
"""Block submodule that projects attention's heads back to d_model (the hook map lacks it)."""
POSITION_EMBEDDINGS = {"gpt2": "transformer.wpe"}
"""Learned position embeddings that are added to the token embeddings."""


class OrthogonalizeError(SaeworksError, ValueError):
    """A direction or model that cannot be orthogonalised as asked."""


@dataclass(frozen=True)
class Direction:
    """A direction in the residual stream and where it came from (recorded in the edited model)."""

    vector: torch.Tensor
    """[d_model], as given (not normalised)."""
    source: str
    """A feature's decoder row, a vector file (and key), or `tensor`."""
    hook: str | None = None
    """The hook point it was found at, when known (informational: d̂ leaves every layer)."""


@dataclass(frozen=True)
class Orthogonalization:
    """What one `orthogonalize` call did."""

    source: str
    hook: str | None
    norm: float
    """‖d‖ before normalising."""
    d_model: int
    model_type: str
    edited: tuple[str, ...]
    """Parameter names changed."""
    untied_lm_head: bool
    """The LM head shared the embedding matrix and now holds its own copy of the original."""
    post_norm_weighted: bool
    """Gemma 2/3: each sublayer lost g ⊙ d̂ (its post-norm's scale g), not d̂ (module docstring)."""
    saeworks_version: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "edited": list(self.edited)}


def load_direction(spec: str | Path, key: str | None = None) -> Direction:
    """A [d] vector from a safetensors file: `FILE` holding one tensor, `FILE:KEY`, or `key`; the
    hook comes from the file's `hook` metadata when it has one."""
    path = Path(spec)
    if key is None and not path.is_file() and ":" in str(spec):
        head, tail = str(spec).rsplit(":", 1)
        if Path(head).is_file():
            path, key = Path(head), tail
    if not path.is_file():
        raise OrthogonalizeError(f"no vector file at {str(spec)!r}; give a safetensors file, or FILE:KEY")
    try:
        vector, key, metadata = read_vector(path, key)
    except SaeworksError as err:
        raise OrthogonalizeError(str(err)) from None
    return Direction(vector, f"{path}:{key}", metadata.get("hook"))  # probe files name their hook


def feature_direction(source: FeatureSource, feature: int) -> Direction:
    """The decoder row W_dec[feature] of an SAE (a dictionary's `FeatureSource`)."""
    source.check_feature(feature)
    vector = source.sae.W_dec[feature].detach().float().cpu()
    return Direction(vector, f"feature {feature} of {source.name} (decoder row)", source.hook)


def check_direction(model: PreTrainedModel, vector: torch.Tensor) -> torch.Tensor:
    """The unit direction, float32; a one-line error for a wrong width, non-finite or zero vector."""
    d_model = int(model.config.hidden_size)
    if vector.dim() != 1 or vector.numel() != d_model:
        raise OrthogonalizeError(f"the direction has shape {tuple(vector.shape)}, the model's residual "
                                 f"stream is {d_model} wide; give a [{d_model}] vector from this model")
    vector = vector.detach().float()
    if not torch.isfinite(vector).all():
        raise OrthogonalizeError("the direction has NaN or infinite entries; give a finite vector")
    norm = float(vector.norm())
    if norm == 0:
        raise OrthogonalizeError("the direction is the zero vector: there is nothing to project out")
    return vector / norm


def writers(model: PreTrainedModel) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """(parameter prefix, module, post-norm or None) of every module writing to the residual stream."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES or model_type not in ATTENTION_OUTPUT:
        raise OrthogonalizeError(f"cannot orthogonalise model type {model_type!r}: no map of the matrices "
                                 f"writing to its residual stream; supported: {', '.join(ATTENTION_OUTPUT)}")
    arch = ARCHITECTURES[model_type]
    names = {id(module): name for name, module in model.named_modules()}
    embeddings = model.get_input_embeddings()
    found: list[tuple[str, nn.Module, nn.Module | None]] = [(names[id(embeddings)], embeddings, None)]
    if model_type in POSITION_EMBEDDINGS:
        path = POSITION_EMBEDDINGS[model_type]
        found.append((path, model.get_submodule(path), None))
    for block in blocks_of(model):
        for path, added in ((ATTENTION_OUTPUT[model_type], arch.attn_out), (arch.mlp_down, arch.mlp_out)):
            # The hook map names the module whose output joins the residual: the projection's
            # parent, or (Gemma 2/3) a norm applied after it.
            norm = None if path.startswith(added + ".") else block.get_submodule(added)
            found.append((names[id(block.get_submodule(path))], block.get_submodule(path), norm))
    for prefix, module, _ in found:
        if not isinstance(module, (nn.Embedding, nn.Linear, Conv1D)):
            raise OrthogonalizeError(f"cannot edit {prefix}, a {type(module).__name__}: expected an "
                                     "embedding, nn.Linear or Conv1D")
    return found


@torch.no_grad()
def norm_scale(norm: nn.Module, d_model: int) -> torch.Tensor:
    """[d] the elementwise scale g of a post-norm y = g ⊙ x / rms(x), up to a positive factor.

    Read off norm(I): row i is e_i · g_i / rms(e_i). A norm that is not a pure per-coordinate
    scale of x / rms(x) (centring, a bias) has off-diagonal entries there and is refused."""
    weight = next(norm.parameters(), torch.empty(0))
    eye = torch.eye(d_model, device=weight.device, dtype=weight.dtype)
    out = norm(eye).float()
    diagonal = torch.diagonal(out).clone()
    if (out - torch.diag(diagonal)).abs().max() > 1e-6 * diagonal.abs().max():
        raise OrthogonalizeError(f"{type(norm).__name__} is not a per-coordinate scale of x / rms(x), so "
                                 "no edit of the matrix before it removes the direction exactly")
    return diagonal


@torch.no_grad()
def project_out(module: nn.Module, unit: torch.Tensor) -> list[str]:
    """Project `unit` out of the output side of an embedding, nn.Linear or Conv1D (and its bias);
    returns the names of the parameters changed."""
    weight = _weight(module)
    exact = weight.dtype in (torch.float32, torch.float64)
    w = weight if exact else weight.float()  # lower precisions: computed in float32, rounded once
    u = unit.to(w.device, w.dtype)
    if isinstance(module, nn.Linear):  # [out, in]: W ← W − u (uᵀ W)
        w.addr_(u, u @ w, alpha=-1)
    elif isinstance(module, (nn.Embedding, Conv1D)):  # [n, out] / [in, out]: W ← W − (W u) uᵀ
        w.addr_(w @ u, u, alpha=-1)
    else:
        raise OrthogonalizeError(f"cannot edit a {type(module).__name__}: expected an embedding, "
                                 "nn.Linear or Conv1D")
    if not exact:
        weight.copy_(w)
    changed = ["weight"]
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        b = bias.to(u.dtype)
        bias.copy_(b - u * (u @ b))
        changed.append("bias")
    return changed


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _untie_lm_head(model: PreTrainedModel) -> bool:
    """Give the LM head its own copy of the embedding matrix if it shares it; config says untied."""
    config = model.config.get_text_config()
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    shared = head is not None and head.weight is embeddings.weight
    if shared:
        head.weight = nn.Parameter(_weight(embeddings).detach().clone(), requires_grad=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    config.tie_word_embeddings = False
    model.config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5: what save/load tie
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return shared or tied


def orthogonalize(model: PreTrainedModel, direction: Direction | torch.Tensor) -> Orthogonalization:
    """Project `direction` out of every matrix that writes to `model`'s residual stream, IN PLACE
    (deep-copy or reload first to keep the original); the record is also appended to the model's
    config. Every check runs before the first change, so a refusal leaves the model as it was."""
    if not isinstance(direction, Direction):
        direction = Direction(direction, "tensor")
    unit = check_direction(model, direction.vector)
    targets = writers(model)
    units = [unit if norm is None else _through_post_norm(unit, norm) for _, _, norm in targets]
    untied = _untie_lm_head(model)
    edited: list[str] = []
    for (prefix, module, _), u in zip(targets, units, strict=True):
        if u is not None:
            edited += [f"{prefix}.{name}" for name in project_out(module, u)]
    record = Orthogonalization(direction.source, direction.hook, float(direction.vector.float().norm()),
                               unit.numel(), str(model.config.model_type), tuple(edited), untied,
                               any(norm is not None for _, _, norm in targets), package_version())
    setattr(model.config, CONFIG_KEY, [*(getattr(model.config, CONFIG_KEY, None) or []), record.to_json()])
    return record


def _through_post_norm(unit: torch.Tensor, norm: nn.Module) -> torch.Tensor | None:
    """The unit direction to project out before a post-norm of scale g: g ⊙ d̂ normalised (None
    when g ⊙ d̂ = 0: the norm already keeps d̂ out of the residual stream)."""
    weighted = norm_scale(norm, unit.numel()).to(unit.device) * unit
    length = float(weighted.norm())
    return None if length == 0 else weighted / length


def save_orthogonalized(model: PreTrainedModel, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write the edited model (its config carrying the edit records) and its tokenizer as an HF
    directory that `AutoModelForCausalLM.from_pretrained` loads, atomically (all or nothing)."""
    if not getattr(model.config, CONFIG_KEY, None):
        raise OrthogonalizeError("this model was not orthogonalised (no record in its config); "
                                 "call orthogonalize(model, direction) first")
    if tokenizer is None:
        raise OrthogonalizeError("save_orthogonalized needs the model's tokenizer, so that the directory "
                                 "loads on its own")
    out = Path(out_dir)
    with atomic_directory(out) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return out


@torch.no_grad()
def residual_components(model: PreTrainedModel, input_ids: torch.Tensor,
                        direction: torch.Tensor) -> list[float]:
    """Per layer, the largest |h · d̂| / ‖h‖ over the positions of `input_ids` [batch, pos], h the
    block's output (resid_post): ~1e-7 in float32 after `orthogonalize`."""
    unit = check_direction(model, direction)
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(len(blocks_of(model)))]
    captured = capture_activations(model, input_ids, names)
    ratios = []
    for name in names:
        h = captured[name].float()
        ratios.append(float(((h @ unit.to(h.device)).abs() / h.norm(dim=-1).clamp_min(1e-30)).max()))
    return ratios
