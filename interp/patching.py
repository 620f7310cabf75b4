"""Activation patching on SAE features and on hook points, and attribution patching.

Denoising patching (Heimersheim & Nanda, "How to use and interpret activation patching", 2024):
run the *corrupted* prompt, copy some activations from the *clean* run into it, and measure how
much of the clean metric comes back:

    fraction recovered = (patched − corrupted) / (clean − corrupted)

The metric is the logit difference of two tokens at the last position by default (`LogitDiff`),
or any callable `metric(logits [pos, vocab]) -> scalar tensor` of one sequence.

- `patch_features`: chosen SAE features at chosen positions, error-preserving (the corrupted run's
  SAE error term is kept): h ← h + Σ_f (a_clean_f − a_corr_f)·W_dec[f], `set_latents` semantics.
  With `error=True` the clean error term is copied too, so every feature plus the error at every
  position turns the corrupted activation into the clean one.
- `patch_hook`, `layer_sweep`: the whole activation of a hook; the sweep patches every hook of
  each kind (resid_pre, attn_out, mlp_out of every block) at every position, one position per row
  of a batch, into a [layers × positions] grid.
- `attribution_patching` (Nanda 2023; Syed, Rager & Conmy 2023): one clean forward, one corrupted
  forward and backward. score(f, p) = (a_clean − a_corr)[p, f] · ∂metric/∂a[p, f] on the corrupted
  run, the first-order estimate of patching feature f alone at position p. `check_attribution`
  compares the top estimates with real patching.

Prompts are tokenised as steering tokenises them (`steer.generate.prompt_ids`: BOS first when the
SAE's training prepended one), and must be of equal length: positions are compared one to one.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from saeworks.activations.hooks import HOOK_KINDS, HookFn, blocks_of, hooks_attached, resolve_hook
from saeworks.interp.readout import InterpError, check_position, token_id, token_text
from saeworks.sae.atomic import write_bytes_atomic
from saeworks.sae.interventions import set_latents
from saeworks.steer.generate import prompt_ids
from saeworks.steer.interventions import FeatureSource

Metric = Callable[[torch.Tensor], torch.Tensor]
"""logits [pos, vocab] of one sequence (float32) -> scalar tensor (differentiable for attribution)."""

SWEEP_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")
"""What a layer sweep patches by default: the residual stream entering each block, and what each
attention and MLP adds to it."""


class PatchingError(InterpError):
    """A prompt pair or sweep setting that patching cannot use (bad positions and tokens are
    refused by interp/readout.py's checks, as InterpError)."""


# --- inputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptPair:
    """A clean and a corrupted prompt of the same token length."""

    clean: tuple[int, ...]
    corrupted: tuple[int, ...]
    tokens: tuple[str, ...]
    """The clean prompt's tokens as text: the position labels."""

    def __post_init__(self) -> None:
        if len(self.clean) != len(self.corrupted):
            raise PatchingError(
                f"the clean prompt is {len(self.clean)} tokens and the corrupted one {len(self.corrupted)}: "
                "patching compares them position by position, so they must be the same length; rephrase "
                "one (e.g. swap words that are one token each) or pad the shorter")
        if not self.clean:
            raise PatchingError("the prompts are empty: give text to patch")

    @classmethod
    def from_text(cls, tokenizer: Any, clean: str, corrupted: str, *, prepend_bos: bool = True) -> PromptPair:
        """Tokenise both prompts as steering does (BOS first when `prepend_bos`, as the SAE saw)."""
        clean_ids = prompt_ids(tokenizer, clean, prepend_bos)
        return cls.from_ids(clean_ids, prompt_ids(tokenizer, corrupted, prepend_bos), tokenizer)

    @classmethod
    def from_ids(cls, clean: Sequence[int], corrupted: Sequence[int], tokenizer: Any = None) -> PromptPair:
        """A pair of token-id lists (position labels decoded when a tokenizer is given)."""
        labels = tuple(token_text(tokenizer, int(t)) for t in clean)
        return cls(tuple(int(t) for t in clean), tuple(int(t) for t in corrupted), labels)

    def __len__(self) -> int:
        return len(self.clean)

    def position(self, p: int) -> int:
        """`p` as an index from the start (negative counts back from the end), checked."""
        return check_position(p, len(self))

    def positions(self, chosen: Sequence[int] | None) -> tuple[int, ...]:
        """Checked positions, sorted and unique; None means every position."""
        if chosen is None:
            return tuple(range(len(self)))
        return tuple(sorted({self.position(p) for p in chosen}))

    def differing(self) -> list[int]:
        """Positions where the clean and corrupted tokens differ."""
        return [p for p, (a, b) in enumerate(zip(self.clean, self.corrupted, strict=True)) if a != b]

    def ids(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, corrupted) token ids, each [1, pos]."""
        return (torch.tensor([self.clean], device=device), torch.tensor([self.corrupted], device=device))


@dataclass(frozen=True)
class LogitDiff:
    """The default metric: logit[correct] − logit[incorrect] at `position` (-1: the last)."""

    correct: int
    incorrect: int
    position: int = -1
    names: tuple[str, str] = ("", "")
    """The two tokens as text, for reports."""

    @classmethod
    def of_tokens(cls, tokenizer: Any, correct: str | int, incorrect: str | int,
                  position: int = -1) -> LogitDiff:
        """Each token given as text (one token, e.g. " Mary" with its leading space) or an id."""
        ids = (token_id(tokenizer, correct, len(tokenizer), "correct"),
               token_id(tokenizer, incorrect, len(tokenizer), "incorrect"))
        return cls(ids[0], ids[1], position, (token_text(tokenizer, ids[0]), token_text(tokenizer, ids[1])))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # [pos, vocab] -> []
        return logits[self.position, self.correct] - logits[self.position, self.incorrect]

    def __str__(self) -> str:
        correct, incorrect = (name or str(i) for name, i in zip(self.names, (self.correct, self.incorrect),
                                                                strict=True))
        return f"logit({correct!r}) - logit({incorrect!r}) at position {self.position}"


def describe_metric(metric: Metric) -> str:
    if isinstance(metric, LogitDiff):
        return str(metric)
    return getattr(metric, "__name__", type(metric).__name__)


def fraction_recovered(patched: float, clean: float, corrupted: float) -> float:
    """(patched − corrupted) / (clean − corrupted); NaN when the pair does not move the metric."""
    gap = clean - corrupted
    return (patched - corrupted) / gap if abs(gap) > 1e-12 else math.nan


def _check_pair(pair: PromptPair, metric: Metric) -> None:
    if isinstance(metric, LogitDiff):
        pair.position(metric.position)


def _check_source(model: nn.Module, source: FeatureSource) -> None:
    width = resolve_hook(model, source.hook).d
    if width != source.sae.d_in:
        raise PatchingError(f"{source.hook} is {width} wide in this model and the SAE {source.name} reads "
                            f"{source.sae.d_in}: it was trained on another model")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --- forwards ---------------------------------------------------------------------------------


@torch.no_grad()
def _metric_rows(model: nn.Module, ids: torch.Tensor, metric: Metric,
                 fns: Mapping[str, HookFn] | None = None) -> list[float]:
    """The metric of every row of `ids` [rows, pos] with `fns` attached."""
    with hooks_attached(model, fns or {}):
        logits = model(input_ids=ids, use_cache=False).logits  # [rows, pos, vocab]
    return [float(metric(row.float())) for row in logits]


def _clean_run(model: nn.Module, ids: torch.Tensor, metric: Metric,
               hooks: Sequence[str]) -> tuple[float, dict[str, torch.Tensor]]:
    """The metric of one prompt [1, pos] and its activations {hook: [pos, d]}, in one forward."""
    captured: dict[str, torch.Tensor] = {}

    def record(name: str, activation: torch.Tensor) -> None:
        captured[name] = activation.detach()[0]

    (value,) = _metric_rows(model, ids, metric, {name: partial(record, name) for name in hooks})
    return value, captured


RowEdit = Callable[[torch.Tensor, slice], torch.Tensor]
"""(activation [rows, pos, d] of the rows `slice` of a batch) -> the patched activation."""


def _patched_rows(model: nn.Module, corrupted: torch.Tensor, metric: Metric, hook: str, edit: RowEdit,
                  n_rows: int, batch_size: int) -> list[float]:
    """The metric of `n_rows` copies of the corrupted prompt [1, pos], row i patched by `edit`."""
    values: list[float] = []
    for start in range(0, n_rows, batch_size):
        rows = slice(start, min(start + batch_size, n_rows))
        ids = corrupted.expand(rows.stop - rows.start, -1)
        values += _metric_rows(model, ids, metric, {hook: _for_rows(edit, rows)})
    return values


def _for_rows(edit: RowEdit, rows: slice) -> HookFn:
    return lambda h: edit(h, rows)


def _hook_edit(clean: torch.Tensor, masks: torch.Tensor, h: torch.Tensor, rows: slice) -> torch.Tensor:
    """Clean activation `clean` [pos, d] where masks[rows] [rows, pos] is set, else h."""
    return torch.where(masks[rows].unsqueeze(-1).to(h.device), clean.to(h.device, h.dtype), h)


@dataclass(frozen=True)
class FeaturePatch:
    """Features to copy from the clean run, at positions, optionally with the SAE's error term."""

    features: tuple[int, ...] | None = None
    """None: every feature."""
    positions: tuple[int, ...] | None = None
    """None: every position."""
    error: bool = False
    """Also copy the clean error term h − SAE(h) at those positions."""


class _FeatureEdit:
    """Patches rows of a batch, row i by patches[i], error-preserving (`set_latents`)."""

    def __init__(self, source: FeatureSource, clean: torch.Tensor, patches: Sequence[FeaturePatch],
                 n_positions: int) -> None:
        sae = self.sae = source.sae
        device = sae.W_dec.device
        if any(p.features is None for p in patches):
            self.features = torch.arange(sae.d_sae, device=device)
        else:
            self.features = torch.tensor(sorted({f for p in patches for f in p.features or ()}),
                                         dtype=torch.long, device=device)
        column = {int(f): j for j, f in enumerate(self.features.tolist())}
        x_clean = clean.to(device, torch.float32)  # [pos, d]
        with torch.no_grad():
            latents_clean = sae.encode(x_clean)  # [pos, d_sae]
            self.error_clean = x_clean - sae.decode(latents_clean)  # [pos, d]
        self.latents_clean = latents_clean[:, self.features]  # [pos, n]
        self.latent_masks = torch.zeros(len(patches), n_positions, len(self.features), dtype=torch.bool,
                                        device=device)  # [rows, pos, n]
        self.error_masks = torch.zeros(len(patches), n_positions, dtype=torch.bool, device=device)
        for i, patch in enumerate(patches):
            where = list(range(n_positions)) if patch.positions is None else list(patch.positions)
            cols = (list(range(len(self.features))) if patch.features is None
                    else [column[f] for f in patch.features])
            if where and cols:
                self.latent_masks[i, torch.tensor(where).unsqueeze(1), torch.tensor(cols)] = True
            if where and patch.error:
                self.error_masks[i, where] = True

    def __call__(self, h: torch.Tensor, rows: slice) -> torch.Tensor:  # [rows, pos, d]
        x = h.to(self.sae.W_dec.device, torch.float32)
        latents = self.sae.encode(x)  # [rows, pos, d_sae]
        old = latents[..., self.features]  # [rows, pos, n]
        mask, error_mask = self.latent_masks[rows], self.error_masks[rows]
        new = torch.where(mask, self.latents_clean, old)
        patched = set_latents(self.sae, x, self.features, new, old)
        error_live = x - self.sae.decode(latents)  # the corrupted run's error term
        patched = torch.where(error_mask.unsqueeze(-1), patched + self.error_clean - error_live, patched)
        touched = (mask.any(dim=-1) | error_mask).unsqueeze(-1).to(h.device)  # others stay bit for bit
        return torch.where(touched, patched.to(h.device, h.dtype), h)


def _feature_patch(source: FeatureSource, pair: PromptPair, features: Sequence[int] | None,
                   positions: Sequence[int] | None, error: bool) -> FeaturePatch:
    chosen = None if features is None else tuple(sorted({source.check_feature(f) for f in features}))
    where = None if positions is None else pair.positions(positions)
    return FeaturePatch(chosen, where, error)


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchResult:
    """One patched run: the metric clean, corrupted and patched."""

    what: str
    """What was patched, in words."""
    metric: str
    clean: float
    corrupted: float
    patched: float

    @property
    def fraction_recovered(self) -> float:
        return fraction_recovered(self.patched, self.clean, self.corrupted)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (non-finite numbers as null)."""
        return {"what": self.what, "metric": self.metric, "clean": self.clean, "corrupted": self.corrupted,
                "patched": self.patched, "fraction_recovered": _finite_or_none(self.fraction_recovered)}

    def table(self) -> str:
        return (f"{self.what}\n  metric: {self.metric}\n  clean {self.clean:+.4f}  corrupted "
                f"{self.corrupted:+.4f}  patched {self.patched:+.4f}  "
                f"recovered {self.fraction_recovered:.3f}")


@dataclass(frozen=True)
class LayerSweep:
    """Whole-hook patching of every (kind, layer, position): the metric grids, [layers, positions]."""

    kinds: tuple[str, ...]
    layers: tuple[int, ...]
    tokens: tuple[str, ...]
    metric: str
    clean: float
    corrupted: float
    patched: dict[str, np.ndarray]
    """kind -> [layers, positions] metric with blocks.{layer}.{kind} patched at that position."""

    def recovered(self, kind: str) -> np.ndarray:
        """[layers, positions] fraction of the clean metric recovered."""
        gap = self.clean - self.corrupted
        if abs(gap) <= 1e-12:
            return np.full_like(self.patched[kind], math.nan)
        return (self.patched[kind] - self.corrupted) / gap

    def best(self, n: int = 5) -> list[tuple[str, int, int, float]]:
        """The `n` cells that recover most: (kind, layer, position, fraction)."""
        cells = [(kind, layer, p, float(value)) for kind in self.kinds
                 for layer, row in zip(self.layers, self.recovered(kind), strict=True)
                 for p, value in enumerate(row)]
        return sorted(cells, key=lambda c: -c[3] if math.isfinite(c[3]) else math.inf)[:n]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (non-finite numbers as null)."""
        def grid(values: np.ndarray) -> list[list[float | None]]:
            return [[_finite_or_none(float(v)) for v in row] for row in values]

        return {"metric": self.metric, "clean": self.clean, "corrupted": self.corrupted,
                "kinds": list(self.kinds), "layers": list(self.layers), "tokens": list(self.tokens),
                "patched": {k: grid(self.patched[k]) for k in self.kinds},
                "fraction_recovered": {k: grid(self.recovered(k)) for k in self.kinds}}

    def table(self, width: int = 6) -> str:
        """Fraction recovered, one grid per kind: a row per layer, a column per position."""
        labels = [repr(t)[1:-1][: width - 1] for t in self.tokens]
        lines = [f"metric: {self.metric}   clean {self.clean:+.4f}   corrupted {self.corrupted:+.4f}",
                 "fraction of the clean metric recovered by patching the clean activation at one position"]
        for kind in self.kinds:
            lines += ["", f"{kind:<12}" + "".join(f"{label:>{width}}" for label in labels)]
            for layer, row in zip(self.layers, self.recovered(kind), strict=True):
                lines.append(f"{'L' + str(layer):<12}" + "".join(f"{v:>{width}.2f}" for v in row))
        best = ", ".join(f"{k} L{layer} pos {p} {self.tokens[p]!r} {v:.2f}"
                         for k, layer, p, v in self.best(3))
        return "\n".join([*lines, "", f"most recovered: {best}"])

    def figure(self) -> Figure:
        """Heatmaps of the fraction recovered, one panel per kind (layers × positions)."""
        fig = Figure(figsize=(1.5 + 0.32 * len(self.tokens) * len(self.kinds), 2.2 + 0.2 * len(self.layers)),
                     layout="constrained")
        axes = fig.subplots(1, len(self.kinds), squeeze=False, sharey=True)[0]
        image = None
        for ax, kind in zip(axes, self.kinds, strict=True):
            image = ax.imshow(self.recovered(kind), cmap="RdBu", vmin=-1.0, vmax=1.0, aspect="auto",
                              interpolation="nearest")
            ax.set_title(kind, fontsize=9)
            ax.set_xticks(range(len(self.tokens)), [repr(t)[1:-1] for t in self.tokens], rotation=90,
                          fontsize=7)
            ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers], fontsize=7)
            ax.set_xlabel("position")
        axes[0].set_ylabel("layer")
        if image is not None:
            fig.colorbar(image, ax=list(axes), label="fraction recovered", shrink=0.8)
        fig.suptitle(f"{self.metric}: clean {self.clean:+.3f}, corrupted {self.corrupted:+.3f}", fontsize=9)
        return fig

    def png(self) -> bytes:
        """The heatmap as PNG bytes (Agg, whatever matplotlib's backend)."""
        buffer = io.BytesIO()
        self.figure().savefig(buffer, dpi=100, format="png")
        return buffer.getvalue()

    def save_png(self, path: str | Path) -> Path:
        return write_bytes_atomic(path, self.png())


@dataclass(frozen=True)
class FeatureAttribution:
    """One (feature, position) of an attribution-patching ranking."""

    feature: int
    position: int
    token: str
    score: float
    """(a_clean − a_corrupted) · ∂metric/∂a: the estimated change of the metric when patched alone."""
    clean_activation: float
    corrupted_activation: float
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"feature": self.feature, "position": self.position, "token": self.token, "score": self.score,
                "clean_activation": self.clean_activation,
                "corrupted_activation": self.corrupted_activation, "label": self.label}


@dataclass
class AttributionPatching:
    """Attribution-patching scores of every feature at every position of one SAE's hook."""

    hook: str
    sae_name: str
    metric: str
    tokens: tuple[str, ...]
    clean: float
    corrupted: float
    scores: torch.Tensor
    """[pos, d_sae] (a_clean − a_corrupted) · ∂metric/∂a on the corrupted run."""
    error_scores: torch.Tensor
    """[pos] the same for the SAE's error term: (e_clean − e_corrupted) · ∂metric/∂h."""
    hook_scores: torch.Tensor
    """[pos] the same for the whole activation, (h_clean − h_corrupted) · ∂metric/∂h: the sum of the
    position's feature scores and its error score, the decoder being linear."""
    clean_latents: torch.Tensor
    """[pos, d_sae]"""
    corrupted_latents: torch.Tensor
    """[pos, d_sae]"""
    labels: dict[int, str] = field(default_factory=dict)
    """Feature labels for reports (e.g. from the dictionary), by feature id."""

    @property
    def estimate(self) -> float:
        """The linear estimate of patching the whole hook at every position (patched − corrupted)."""
        return float(self.hook_scores.sum())

    def ranking(self, n: int = 20) -> list[FeatureAttribution]:
        """The `n` (feature, position) pairs with the largest |score|, largest first (non-zero only)."""
        flat = self.scores.flatten()
        order = flat.abs().argsort(descending=True)[:n]
        d_sae = self.scores.shape[1]
        found = []
        for index in order.tolist():
            if flat[index] == 0:
                break
            p, f = divmod(index, d_sae)
            found.append(FeatureAttribution(
                f, p, self.tokens[p], float(flat[index]), float(self.clean_latents[p, f]),
                float(self.corrupted_latents[p, f]), self.labels.get(f, "")))
        return found

    def to_json(self, n: int = 50) -> dict[str, Any]:
        return {"hook": self.hook, "sae": self.sae_name, "metric": self.metric, "tokens": list(self.tokens),
                "clean": self.clean, "corrupted": self.corrupted, "estimate": self.estimate,
                "error_scores": [float(v) for v in self.error_scores],
                "hook_scores": [float(v) for v in self.hook_scores],
                "ranking": [a.to_json() for a in self.ranking(n)]}

    def table(self, n: int = 20) -> str:
        lines = [f"attribution patching at {self.hook} ({self.sae_name}); metric: {self.metric}",
                 f"clean {self.clean:+.4f}  corrupted {self.corrupted:+.4f}  estimated patched - corrupted "
                 f"{self.estimate:+.4f} (features {float(self.scores.sum()):+.4f}, error "
                 f"{float(self.error_scores.sum()):+.4f})",
                 f"{'feature':>8} {'pos':>4} {'token':<12} {'score':>9} {'clean':>8} {'corrupt':>8}  label"]
        for a in self.ranking(n):
            lines.append(f"{a.feature:>8} {a.position:>4} {repr(a.token)[1:-1][:12]:<12} {a.score:>+9.4f} "
                         f"{a.clean_activation:>8.3f} {a.corrupted_activation:>8.3f}  {a.label[:40]}")
        return "\n".join(lines)


@dataclass(frozen=True)
class AttributionCheck:
    """Attribution-patching estimates against real patching of each (feature, position) alone."""

    entries: tuple[tuple[FeatureAttribution, float], ...]
    """(estimate, real patched − corrupted), in ranking order."""
    correlation: float
    """Pearson correlation of estimate and real effect (NaN with fewer than two entries)."""
    sign_agreement: float
    """Fraction of entries whose real effect has the estimated sign."""

    def to_json(self) -> dict[str, Any]:
        return {"correlation": _finite_or_none(self.correlation), "sign_agreement": self.sign_agreement,
                "entries": [{**a.to_json(), "real": real} for a, real in self.entries]}

    def table(self) -> str:
        lines = [f"attribution patching vs real patching, top {len(self.entries)}: correlation "
                 f"{self.correlation:.3f}, sign agreement {self.sign_agreement:.2f}",
                 f"{'feature':>8} {'pos':>4} {'token':<12} {'estimate':>9} {'real':>9}  label"]
        for a, real in self.entries:
            lines.append(f"{a.feature:>8} {a.position:>4} {repr(a.token)[1:-1][:12]:<12} {a.score:>+9.4f} "
                         f"{real:>+9.4f}  {a.label[:40]}")
        return "\n".join(lines)


# --- patching ---------------------------------------------------------------------------------


def patch_features(model: nn.Module, source: FeatureSource, pair: PromptPair, metric: Metric,
                   features: Sequence[int] | None = None, positions: Sequence[int] | None = None, *,
                   error: bool = False) -> PatchResult:
    """Copy `features` (None: all) at `positions` (None: all) from the clean run into the corrupted
    run at the SAE's hook, keeping the corrupted run's error term unless `error`."""
    _check_pair(pair, metric)
    _check_source(model, source)
    patch = _feature_patch(source, pair, features, positions, error)
    clean_ids, corrupted_ids = pair.ids(_device(model))
    clean, captured = _clean_run(model, clean_ids, metric, [source.hook])
    (corrupted,) = _metric_rows(model, corrupted_ids, metric)
    edit = _FeatureEdit(source, captured[source.hook], [patch], len(pair))
    (patched,) = _patched_rows(model, corrupted_ids, metric, source.hook, edit, 1, 1)
    what = (f"{'all features' if patch.features is None else f'features {list(patch.features)}'}"
            f"{' + SAE error' if error else ''} of {source.name} at {source.hook}, positions "
            f"{'all' if patch.positions is None else list(patch.positions)}")
    return PatchResult(what, describe_metric(metric), clean, corrupted, patched)


def patch_hook(model: nn.Module, pair: PromptPair, metric: Metric, hook: str,
               positions: Sequence[int] | None = None) -> PatchResult:
    """Copy the whole activation of `hook` at `positions` (None: all) from the clean run."""
    _check_pair(pair, metric)
    resolve_hook(model, hook)
    where = pair.positions(positions)
    clean_ids, corrupted_ids = pair.ids(_device(model))
    clean, captured = _clean_run(model, clean_ids, metric, [hook])
    (corrupted,) = _metric_rows(model, corrupted_ids, metric)
    mask = torch.zeros(1, len(pair), dtype=torch.bool)
    mask[0, list(where)] = True
    edit = partial(_hook_edit, captured[hook], mask)
    (patched,) = _patched_rows(model, corrupted_ids, metric, hook, edit, 1, 1)
    what = f"{hook}, positions {'all' if positions is None else list(where)}"
    return PatchResult(what, describe_metric(metric), clean, corrupted, patched)


def layer_sweep(model: nn.Module, pair: PromptPair, metric: Metric, kinds: Sequence[str] = SWEEP_KINDS,
                layers: Sequence[int] | None = None, batch_size: int = 16) -> LayerSweep:
    """Patch blocks.{L}.{kind} at one position at a time, for every kind, layer (None: all) and
    position: len(kinds) × len(layers) batched forwards of len(pair) rows."""
    _check_pair(pair, metric)
    unknown = [k for k in kinds if k not in HOOK_KINDS]
    if unknown or not kinds:
        raise PatchingError(f"hook kinds {unknown or '(none)'}: choose from {', '.join(HOOK_KINDS)}")
    n_layers = len(blocks_of(model))
    chosen = list(range(n_layers)) if layers is None else list(layers)
    outside = [layer for layer in chosen if not 0 <= layer < n_layers]
    if outside or not chosen:
        raise PatchingError(f"layers {outside or '(none)'}: the model has {n_layers} layers, "
                            f"0..{n_layers - 1}")
    hooks = [f"blocks.{layer}.{kind}" for kind in kinds for layer in chosen]
    clean_ids, corrupted_ids = pair.ids(_device(model))
    clean, clean_acts = _clean_run(model, clean_ids, metric, hooks)
    corrupted, corrupted_acts = _clean_run(model, corrupted_ids, metric, hooks)
    one_position = torch.eye(len(pair), dtype=torch.bool)  # row i patches position i
    patched = {kind: np.full((len(chosen), len(pair)), corrupted) for kind in kinds}  # [layers, positions]
    for kind in kinds:
        for i, layer in enumerate(chosen):
            hook = f"blocks.{layer}.{kind}"
            # Where the clean and corrupted activations are equal (the shared prefix, and after it
            # whatever the difference has not reached), patching changes nothing: not run.
            moved = [p for p in range(len(pair))
                     if not torch.equal(clean_acts[hook][p], corrupted_acts[hook][p])]
            if moved:
                edit = partial(_hook_edit, clean_acts[hook], one_position[moved])
                patched[kind][i, moved] = _patched_rows(model, corrupted_ids, metric, hook, edit, len(moved),
                                                        batch_size)
    return LayerSweep(tuple(kinds), tuple(chosen), pair.tokens, describe_metric(metric), clean, corrupted,
                      patched)


# --- attribution patching ---------------------------------------------------------------------


def attribution_patching(model: nn.Module, source: FeatureSource, pair: PromptPair, metric: Metric,
                         labels: Mapping[int, str] | None = None) -> AttributionPatching:
    """Score every feature at every position of the SAE's hook by (a_clean − a_corr) · ∂metric/∂a.

    The gradient is that of the corrupted run with the SAE spliced in and its error term frozen,
    h = a·W_dec + b_dec + e, which equals the original forward; so ∂metric/∂a = ∂metric/∂h · W_decᵀ.
    It is taken through a zero added to h at the hook, so the forward is the original bit for bit."""
    _check_pair(pair, metric)
    _check_source(model, source)
    clean_ids, corrupted_ids = pair.ids(_device(model))
    clean, captured = _clean_run(model, clean_ids, metric, [source.hook])
    h_clean = captured[source.hook]  # [pos, d]
    zero = torch.zeros(h_clean.shape, dtype=torch.float32, device=h_clean.device, requires_grad=True)
    seen: dict[str, torch.Tensor] = {}

    def add_zero(h: torch.Tensor) -> torch.Tensor:  # [1, pos, d]
        seen["h"] = h.detach()[0]
        return h + zero.to(h.dtype)

    with torch.enable_grad(), hooks_attached(model, {source.hook: add_zero}):
        logits = model(input_ids=corrupted_ids, use_cache=False).logits[0]  # [pos, vocab]
        value = metric(logits.float())
        (grad_h,) = torch.autograd.grad(value, zero, allow_unused=True)
    grad_h = torch.zeros_like(zero) if grad_h is None else grad_h  # [pos, d] ∂metric/∂h
    sae = source.sae
    device = sae.W_dec.device
    with torch.no_grad():
        x_clean, x_corr = h_clean.to(device, torch.float32), seen["h"].to(device, torch.float32)
        a_clean, a_corr = sae.encode(x_clean), sae.encode(x_corr)  # [pos, d_sae]
        grad_h = grad_h.to(device, torch.float32)
        grad_a = grad_h @ sae.W_dec.T  # [pos, d_sae]
        scores = (a_clean - a_corr) * grad_a
        error_delta = (x_clean - sae.decode(a_clean)) - (x_corr - sae.decode(a_corr))  # [pos, d]
        error_scores = (error_delta * grad_h).sum(dim=-1)  # [pos]
        hook_scores = ((x_clean - x_corr) * grad_h).sum(dim=-1)  # [pos]
    return AttributionPatching(source.hook, source.name, describe_metric(metric), pair.tokens, clean,
                               float(value.detach()), scores.cpu(), error_scores.cpu(), hook_scores.cpu(),
                               a_clean.cpu(), a_corr.cpu(), dict(labels or {}))


def check_attribution(model: nn.Module, source: FeatureSource, pair: PromptPair, metric: Metric,
                      attribution: AttributionPatching, top: int = 20,
                      batch_size: int = 16) -> AttributionCheck:
    """Patch each of the `top` ranked (feature, position) pairs alone, for real, and compare."""
    _check_pair(pair, metric)
    _check_source(model, source)
    ranked = attribution.ranking(top)
    if not ranked:
        return AttributionCheck((), math.nan, math.nan)
    clean_ids, corrupted_ids = pair.ids(_device(model))
    _, captured = _clean_run(model, clean_ids, metric, [source.hook])
    (corrupted,) = _metric_rows(model, corrupted_ids, metric)  # the baseline of the patched forwards
    patches = [FeaturePatch((a.feature,), (a.position,)) for a in ranked]
    edit = _FeatureEdit(source, captured[source.hook], patches, len(pair))
    patched = _patched_rows(model, corrupted_ids, metric, source.hook, edit, len(patches), batch_size)
    real = [value - corrupted for value in patched]
    estimates = np.array([a.score for a in ranked])
    effects = np.array(real)
    correlation = (float(np.corrcoef(estimates, effects)[0, 1])
                   if len(ranked) > 1 and estimates.std() > 0 and effects.std() > 0 else math.nan)
    agree = float(np.mean(np.sign(estimates) == np.sign(effects)))
    return AttributionCheck(tuple(zip(ranked, real, strict=True)), correlation, agree)
