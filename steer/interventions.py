"""Interventions on features and raw vectors, attached to a model for the length of a block.

    with intervene(model, [FeatureIntervention(source, 1931, "additive", 2.0)]):
        model(input_ids)          # or model.generate(...), or saeworks.steer.generate.generate(...)

Every intervention is written through the same hook mapping as harvesting
(`saeworks.activations.hooks`), and removed in `finally`. Methods:

- `additive`: h ← h + c·v, v the feature's decoder row; c in units of the feature's maximum
  activation in its dictionary (c = 1 adds the feature as if it fired at its observed maximum),
  or a raw coefficient with `raw=True`.
- `clamp`: the feature's activation is set to c (same units) and the SAE's error term is kept:
  h ← SAE(h with f clamped) + (h − SAE(h)) (Anthropic, "Scaling Monosemanticity", 2024).
  Clamping to 0 is zero-ablation.
- `projection_cap`: Neuronpedia's PROJECTION_CAP: the projection of h on the unit direction is
  capped at c (for a feature, c in units of the projection the feature adds at its maximum).
- `orthogonal`: Neuronpedia's ORTHOGONAL_DECOMP: h ← (I − P)h + c·Ph, P the projection on the
  direction (c = 1 changes nothing, c = 0 removes the direction, c = −1 reflects it).
- ablations, error-preserving (only the chosen features' contributions change): `zero`, `mean`
  (the feature's mean activation over all analysed tokens, zeros included: density × its mean when
  active) and `resample` (its activation on another input, position by position).

Neutral settings (the intervention changes nothing, bit for bit): additive c = 0, orthogonal
c = 1, projection_cap above every projection, resample from the same input.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saeworks.activations.hooks import HookFn, capture_activations, hooks_attached, resolve_hook
from saeworks.eval.dictionary import SAE_DIR, FeatureDictionary, FeatureNotFoundError
from saeworks.eval.evaluate import SAEMetadata
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.errors import SaeworksError
from saeworks.sae.interventions import add_direction, cap_projection, scale_projection, set_latents
from saeworks.sae.io import load_sae, read_vector
from saeworks.steer.positions import Positions, PositionTracker

DIRECTION_METHODS = ("additive", "projection_cap", "orthogonal")
"""Methods that move h along one direction: features and raw vectors."""
VALUE_METHODS = ("clamp", "zero", "mean", "resample")
"""Methods that set a feature's activation inside its SAE: features only."""
METHODS = DIRECTION_METHODS + VALUE_METHODS


class InterventionError(SaeworksError, ValueError):
    """An intervention that cannot be applied as asked (method, feature, vector, units)."""


def check_method(method: str, for_vector: bool = False) -> str:
    valid = DIRECTION_METHODS if for_vector else METHODS
    if method not in valid:
        what = "a raw vector" if for_vector and method in METHODS else "steering"
        raise InterventionError(f"unknown method {method!r} for {what}; valid methods: {', '.join(valid)}")
    return method


@dataclass
class FeatureSource:
    """An SAE at its hook with the per-feature statistics of its dictionary (the units)."""

    sae: SparseAutoencoder
    hook: str
    first_kept: int
    """The SAE's seqpos_slice start: `kept` positions begin here."""
    name: str
    max_activation: torch.Tensor | None = None
    """[d_sae] observed maximum of each feature (None without a dictionary: raw units only)."""
    mean_activation: torch.Tensor | None = None
    """[d_sae] mean over all analysed tokens, zeros included."""
    prepend_bos: bool = True

    @classmethod
    def from_dictionary(cls, dictionary: FeatureDictionary, device: str | torch.device = "cpu",
                        sae: SparseAutoencoder | None = None) -> FeatureSource:
        """The dictionary's SAE (`sae` when already loaded from it) and its statistics."""
        stats = dictionary.statistics()
        sae = sae if sae is not None else load_sae(dictionary.path / SAE_DIR, device)
        meta = SAEMetadata.read(dictionary.path / SAE_DIR)
        return cls(sae, str(dictionary.info["hook"]), meta.first_kept, str(dictionary.info.get("sae_name")),
                   torch.as_tensor(stats["max_activation"], dtype=torch.float32, device=device),
                   torch.as_tensor(stats["density"] * stats["mean_activation"], dtype=torch.float32,
                                   device=device),
                   bool(dictionary.info.get("prepend_bos", True)))

    @classmethod
    def from_sae_dir(cls, sae_dir: str | Path, device: str | torch.device = "cpu") -> FeatureSource:
        """An SAE without a dictionary: coefficients are raw, and `mean` ablation is unavailable."""
        meta = SAEMetadata.read(sae_dir)
        return cls(load_sae(sae_dir, device), meta.hook, meta.first_kept, Path(sae_dir).name,
                   prepend_bos=meta.prepend_bos is not False)

    @property
    def d_sae(self) -> int:
        return int(self.sae.d_sae)

    def check_feature(self, feature: int) -> int:
        if not 0 <= int(feature) < self.d_sae:
            raise FeatureNotFoundError(f"feature {feature} does not exist: {self.name} has {self.d_sae} "
                                       f"features, ids 0 to {self.d_sae - 1}")
        return int(feature)

    def unit(self, feature: int) -> float:
        """The feature's maximum activation: what coefficient 1 means."""
        if self.max_activation is None:
            raise InterventionError(f"{self.name} has no dictionary, so coefficients in units of the "
                                    "feature's maximum are unknown; open its dictionary or pass raw=True")
        peak = float(self.max_activation[feature])
        if peak <= 0:
            raise InterventionError(f"feature {feature} of {self.name} never fired in its dictionary "
                                    "(max activation 0), so it has no unit; pass raw=True")
        return peak


@dataclass(frozen=True)
class FeatureIntervention:
    """One feature of one SAE, edited by `method` (see the module docstring)."""

    source: FeatureSource
    feature: int
    method: str = "additive"
    coefficient: float = 1.0
    """additive, clamp, projection_cap: in units of the feature's maximum activation (raw=True:
    raw); orthogonal: the multiplier of the parallel component; zero/mean/resample: unused."""
    raw: bool = False
    positions: Positions = field(default_factory=Positions)
    resample_from: torch.Tensor | None = None
    """resample: token ids of the other input, [n] for every row or [batch, n] row by row."""

    def __post_init__(self) -> None:
        check_method(self.method)
        self.source.check_feature(self.feature)
        if self.method == "resample" and self.resample_from is None:
            raise InterventionError("resample ablation needs resample_from: the token ids of the input "
                                    "whose activations replace this one's")
        if self.method == "mean" and self.source.mean_activation is None:
            raise InterventionError(f"mean ablation needs the feature's mean activation, which only a "
                                    f"dictionary records; {self.source.name} has none")
        if self.method in ("additive", "clamp", "projection_cap") and not self.raw:
            self.source.unit(self.feature)  # fails early when there is no unit

    @property
    def hook(self) -> str:
        return self.source.hook

    @property
    def first_kept(self) -> int:
        return self.source.first_kept

    def direction(self) -> torch.Tensor:
        """[d_in] the feature's decoder row (raw activation space)."""
        return self.source.sae.W_dec[self.feature].detach().float()

    def scaled_coefficient(self) -> float:
        """The coefficient in raw units of the activation (additive, clamp) or of the projection
        on the unit direction (projection_cap)."""
        if self.raw or self.method not in ("additive", "clamp", "projection_cap"):
            return self.coefficient  # orthogonal's multiplier has no unit; ablations take none
        scale = self.source.unit(self.feature)
        if self.method == "projection_cap":
            scale *= float(self.direction().norm())
        return self.coefficient * scale


@dataclass(frozen=True)
class VectorIntervention:
    """A raw direction at a hook (a steering vector, a DiffMean direction, a probe's weights)."""

    hook: str
    vector: torch.Tensor
    """[d] in raw activation space."""
    method: str = "additive"
    coefficient: float = 1.0
    """additive: h + c·vector; projection_cap: cap on ⟨h, vector/|vector|⟩; orthogonal: multiplier."""
    positions: Positions = field(default_factory=Positions)
    first_kept: int = 1
    """`kept` positions begin here (1: everything but BOS)."""

    def __post_init__(self) -> None:
        check_method(self.method, for_vector=True)
        if self.vector.dim() != 1 or not torch.isfinite(self.vector).all():
            raise InterventionError(f"a steering vector must be one finite [d] tensor, got shape "
                                    f"{tuple(self.vector.shape)}")
        if self.method != "additive" and float(self.vector.norm()) == 0:
            raise InterventionError(f"{self.method} needs a direction, and the vector is zero")

    @classmethod
    def from_file(cls, path: str | Path, hook: str, key: str | None = None,
                  **kwargs: Any) -> VectorIntervention:
        """A vector stored in a safetensors file (`key`, or its only tensor)."""
        vector, _, _ = read_vector(path, key)
        return cls(hook, vector, **kwargs)

    def direction(self) -> torch.Tensor:
        return self.vector.detach().float()

    def scaled_coefficient(self) -> float:
        return self.coefficient


Intervention = FeatureIntervention | VectorIntervention


def _edit_along(h: torch.Tensor, method: str, direction: torch.Tensor, coefficient: float) -> torch.Tensor:
    if method == "additive":
        return add_direction(h, direction, coefficient)
    unit = direction / direction.norm()
    if method == "projection_cap":
        return cap_projection(h, unit, coefficient)
    return scale_projection(h, unit, coefficient)


@dataclass
class _ValueEdit:
    intervention: FeatureIntervention
    resampled: torch.Tensor | None = None
    """resample: [rows, n] the feature's activation on the other input at each real position."""

    def targets(self, old: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[batch, T] the activation to set, from the current one `old` [batch, T]."""
        iv = self.intervention
        if iv.method == "clamp":
            return torch.full_like(old, iv.scaled_coefficient())
        if iv.method == "zero":
            return torch.zeros_like(old)
        if iv.method == "mean":
            assert iv.source.mean_activation is not None
            return torch.full_like(old, float(iv.source.mean_activation[iv.feature]))
        assert self.resampled is not None
        source = self.resampled.to(old.device)
        if source.shape[0] == 1:
            source = source.expand(old.shape[0], -1)
        elif source.shape[0] != old.shape[0]:
            raise InterventionError(f"resample_from has {source.shape[0]} rows, the batch has {old.shape[0]}")
        inside = (positions >= 0) & (positions < source.shape[1])
        taken = source.gather(1, positions.clamp(0, source.shape[1] - 1))
        return torch.where(inside, taken, old)  # beyond the other input: unchanged


class _HookEditor:
    """Every intervention at one hook, as one hook function."""

    def __init__(self, hook: str, interventions: list[Intervention], tracker: PositionTracker) -> None:
        self.hook, self.tracker = hook, tracker
        self.value_edits: dict[int, list[_ValueEdit]] = {}
        self.sources: dict[int, FeatureSource] = {}
        self.direction_edits: list[Intervention] = []
        for iv in interventions:
            if isinstance(iv, FeatureIntervention) and iv.method in VALUE_METHODS:
                self.sources[id(iv.source)] = iv.source
                self.value_edits.setdefault(id(iv.source), []).append(_ValueEdit(iv))
            else:
                self.direction_edits.append(iv)
        # Fixed for the life of the hook: computed once, not at every generated token.
        self.directions = [(iv, iv.direction(), iv.scaled_coefficient()) for iv in self.direction_edits]
        self.feature_ids = {key: torch.tensor([e.intervention.feature for e in edits])
                            for key, edits in self.value_edits.items()}

    def __call__(self, activation: torch.Tensor) -> torch.Tensor:  # [batch, T, d]
        where = self.tracker.current
        if where is None:
            raise InterventionError("the position tracker saw no forward; attach it with intervene()")
        h = activation.float()
        touched = torch.zeros(where.positions.shape, dtype=torch.bool, device=activation.device)
        # Feature values first, one encode per SAE, all computed from the incoming activation.
        for key, edits in self.value_edits.items():
            sae = self.sources[key].sae
            x = h.to(sae.W_dec.device)
            features = self.feature_ids[key].to(x.device)
            with torch.no_grad():
                old = sae.encode(x)[..., features]  # [batch, T, n]
            new = old.clone()
            for j, edit in enumerate(edits):
                mask = edit.intervention.positions.mask(where, edit.intervention.first_kept).to(x.device)
                new[..., j] = torch.where(mask, edit.targets(old[..., j], where.positions.to(x.device)),
                                          old[..., j])
                touched |= mask.to(touched.device)
            h = set_latents(sae, x, features, new, old).to(h.device)
        # Then directions, in the order given.
        for iv, direction, coefficient in self.directions:
            mask = iv.positions.mask(where, iv.first_kept).to(h.device)
            edited = _edit_along(h, iv.method, direction.to(h.device), coefficient)
            h = torch.where(mask.unsqueeze(-1), edited, h)
            touched |= mask
        # Untouched positions keep the incoming tensor bit for bit.
        return torch.where(touched.unsqueeze(-1), h.to(activation.dtype), activation)


def _resample_sources(model: nn.Module, interventions: Sequence[Intervention]) -> dict[int, torch.Tensor]:
    """For each resample ablation: the feature's activation on its other input, [rows, n]."""
    found: dict[int, torch.Tensor] = {}
    for iv in interventions:
        if isinstance(iv, FeatureIntervention) and iv.method == "resample":
            assert iv.resample_from is not None
            ids = iv.resample_from.long()
            ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
            device = next(model.parameters()).device
            x = capture_activations(model, ids.to(device), [iv.hook])[iv.hook]
            sae = iv.source.sae
            with torch.no_grad():
                found[id(iv)] = sae.encode(x.float().to(sae.W_dec.device))[..., iv.feature]
    return found


@contextmanager
def intervene(model: nn.Module, interventions: Sequence[Intervention], *,
              prompt_length: int | Sequence[int] | None = None) -> Iterator[PositionTracker]:
    """Apply `interventions` to every forward of `model` inside the block (plain forwards and
    `generate` with its KV cache alike); every hook is removed on exit, even on error. With no
    interventions the model is left alone.

    A sequence's first forward is its prompt (what `generated` positions and negative explicit
    positions refer to); `prompt_length` (one, or one per row) overrides that, to score a finished
    sequence in one forward exactly as it was steered while it was generated."""
    interventions = list(interventions)
    if not interventions:
        yield PositionTracker()
        return
    for iv in interventions:
        point = resolve_hook(model, iv.hook)  # a wrong hook name lists the valid ones
        width = iv.source.sae.d_in if isinstance(iv, FeatureIntervention) else iv.vector.shape[0]
        if width != point.d:
            raise InterventionError(f"{iv.hook} is {point.d} wide in this model, the "
                                    f"{'SAE' if isinstance(iv, FeatureIntervention) else 'vector'} has "
                                    f"{width}: it was made for another model or hook")
    resampled = _resample_sources(model, interventions)
    tracker = PositionTracker(prompt_length)
    by_hook: dict[str, list[Intervention]] = {}
    for iv in interventions:
        by_hook.setdefault(iv.hook, []).append(iv)
    editors = {hook: _HookEditor(hook, ivs, tracker) for hook, ivs in by_hook.items()}
    for editor in editors.values():
        for edits in editor.value_edits.values():
            for edit in edits:
                edit.resampled = resampled.get(id(edit.intervention))
    fns: dict[str, HookFn] = dict(editors)
    handle = tracker.attach(model)
    try:
        with hooks_attached(model, fns):
            yield tracker
    finally:
        handle.remove()

