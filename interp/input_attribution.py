"""Input attribution of a feature: which prompt tokens make it fire at a position.

F(x) is the feature's value at one position of the hook's activation h, as a function of the input
embeddings x [T, d_model], read as `quantity`:

- `ungated` (default): relu(pre-activation), pre = (h − b_dec)·W_enc[:, f] + b_enc[f]. Wherever the
  feature fires this is its activation, but it ignores the TopK competition and the JumpReLU
  threshold, so it is continuous along a path (for a ReLU SAE it is the activation itself).
- `activation`: exactly the SAE's `encode` (zero unless among the top k / above the threshold).
- `pre_activation`: pre itself (linear in h).

The methods, over the input embeddings x (attributions summed over the embedding dimension):

- gradient × input: attribution of token t = Σ_i x[t, i] · ∂F/∂x[t, i].
- integrated gradients (Sundararajan et al. 2017): attribution of token t =
  Σ_i (x − b)[t, i] · ∫₀¹ ∂F/∂x[t, i](b + α(x − b)) dα, the integral taken as a **midpoint Riemann
  sum** of `steps` gradients, Σ_k w_k ∂F/∂x(α_k), α_k the midpoints and w_k the widths of a
  partition of [0, 1]:
  - `uniform`: equal intervals (the textbook rule);
  - `adaptive` (default): F is first read, forward only (about a third of a gradient's cost), at
    4·steps + 1 evenly spaced points, and the intervals share out F's variation between them (2/3)
    and the path's length (1/3) equally, so they are short where F changes fast.
  Completeness: the attributions add up to F(x) − F(b) in the limit; `completeness_gap` is how
  far a run is from it (raise `steps` until it is small). Why adaptive: on a pre-norm model with
  the zero baseline, F does much of its changing in the first few percent of the path
  (RMSNorm(αe) turns from 0 into e/rms(e) as α passes sqrt(ε)/rms(e), ≈ 0.03 for SmolLM2), often
  overshooting and coming back. On the tiny test SAE (SmolLM2 layer 3, 8 feature/prompt pairs,
  64 steps) the uniform rule missed completeness by 4-82% (median ~10%), the adaptive one by
  0.01-11% (median ~2%) at about twice the cost.

"Input" is what `model.get_input_embeddings()(input_ids)` returns, and the model is run on it with
`inputs_embeds=`, which reproduces the forward on the ids for every supported family: Gemma 1/2
multiply by sqrt(d_model) inside the model after this point, Gemma 3 inside its embedding module
before it, GPT-2 adds its position embeddings after it. The gradient and the baseline both live in
that one space; since those scalings are linear, the attributions are the same as in the scaled
space. The baseline is zero embeddings by default; with `keep_bos` (default) the BOS position keeps
its real embedding in the baseline (so it gets no attribution): zeroing the attention sink would
take the whole path far off the model's distribution.

The model runs only up to the hook: a hook raises once the activation is in hand (with its graph),
so later blocks, the final norm and the LM head never run.

Why `ungated` is the default: `activation` jumps (TopK: from 0 to the value of pre when the feature
enters the top k; JumpReLU: from 0 to the threshold), and an integral of gradients misses the jump,
so its attributions fall short of F(x) − F(baseline) by the jump (`completeness_gap` shows it).
Gradient × input is the same for both wherever the feature fires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from saeworks.activations.hooks import HookError, HookFn, hooks_attached
from saeworks.activations.text import separator_ids
from saeworks.eval.dictionary import SAE_DIR, FeatureDictionary, FeatureNotFoundError
from saeworks.eval.evaluate import SAEMetadata
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.errors import SaeworksError
from saeworks.sae.io import load_sae

QUANTITIES = ("ungated", "activation", "pre_activation")
RULES = ("adaptive", "uniform")
SCAN_POINTS_PER_STEP = 4
"""The adaptive rule first reads F (forward only) at 4·steps + 1 evenly spaced points of the path."""
Prompt = str | Sequence[int] | torch.Tensor
"""Text (tokenised without special tokens, BOS prepended when the site says so) or token ids as given."""


class AttributionError(SaeworksError, ValueError):
    """An input attribution that cannot be computed as asked (position, steps, baseline, prompt)."""


@dataclass(frozen=True)
class FeatureSite:
    """A model, its tokenizer and an SAE at one hook: where a feature's activation is read."""

    model: nn.Module
    tokenizer: Any
    sae: SparseAutoencoder
    hook: str
    prepend_bos: bool = True
    first_kept: int = 0
    """The SAE's seqpos_slice start: it was trained on positions from here on."""
    dictionary: FeatureDictionary | None = None
    """Where the SAE's feature labels are (None: no labels)."""

    @classmethod
    def from_dictionary(cls, dictionary: FeatureDictionary, model: nn.Module | None = None,
                        tokenizer: Any = None) -> FeatureSite:
        """The dictionary's SAE and hook, on its model (`model`/`tokenizer`: already loaded ones)."""
        if model is None or tokenizer is None:
            model, tokenizer, sae = dictionary._load_runtime()
        else:
            sae = load_sae(dictionary.path / SAE_DIR, next(model.parameters()).device)
        meta = SAEMetadata.read(dictionary.path / SAE_DIR)
        return cls(model, tokenizer, sae, str(dictionary.info["hook"]),
                   bool(dictionary.info.get("prepend_bos", True)), meta.first_kept, dictionary)


def as_site(where: FeatureSite | FeatureDictionary) -> FeatureSite:
    return where if isinstance(where, FeatureSite) else FeatureSite.from_dictionary(where)


def prompt_ids(tokenizer: Any, prompt: Prompt, prepend_bos: bool = True) -> list[int]:
    """Token ids of a prompt: text is tokenised without special tokens, BOS first if asked."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise AttributionError("a text prompt needs a tokenizer; give token ids or a site with one")
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = [separator_ids(tokenizer)[0], *ids] if prepend_bos else ids
    else:
        ids = [int(t) for t in (prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor) else prompt)]
    if not ids:
        raise AttributionError("the prompt is empty: give some text or token ids")
    return ids


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token id decoded on its own (special tokens shown); the ids as text without a tokenizer."""
    if tokenizer is None:
        return [str(t) for t in ids]
    return list(tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False))


class _HookReached(Exception):
    """Raised from the hook once the activation (with its graph) is captured."""


def activation_from_embeddings(model: nn.Module, hook: str, embeds: torch.Tensor) -> torch.Tensor:
    """The hook's activation [batch, T, d] for input embeddings [batch, T, d_model], with the
    autograd graph back to `embeds`; the forward stops at the hook."""
    captured: list[torch.Tensor] = []

    def grab(activation: torch.Tensor) -> None:
        captured.append(activation)
        raise _HookReached

    fns: dict[str, HookFn] = {hook: grab}
    with hooks_attached(model, fns), suppress(_HookReached):
        model(inputs_embeds=embeds, use_cache=False)
    if not captured:
        raise HookError(f"the forward pass never reached hook point {hook!r}")
    return captured[0]


def _feature_fn(sae: SparseAutoencoder, feature: int, quantity: str
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """h [batch, d] -> the feature's value [batch], computed in the SAE's dtype (float32 as loaded)."""
    if quantity not in QUANTITIES:
        raise AttributionError(f"unknown quantity {quantity!r}; choose one of {', '.join(QUANTITIES)}")
    if not 0 <= feature < int(sae.d_sae):
        raise FeatureNotFoundError(f"feature {feature} does not exist: the SAE has {sae.d_sae} features, "
                                   f"ids 0 to {int(sae.d_sae) - 1}")
    dtype = sae.W_enc.dtype
    if quantity == "pre_activation":
        return lambda h: sae.pre_activations(h.to(dtype))[:, feature]
    if quantity == "ungated":
        return lambda h: sae.pre_activations(h.to(dtype))[:, feature].relu()
    return lambda h: sae.encode(h.to(dtype))[:, feature]


@dataclass
class InputAttribution:
    """Per-token attributions of one feature's activation at one position."""

    method: str
    """"gradient_x_input" or "integrated_gradients"."""
    hook: str
    feature: int
    position: int
    quantity: str
    token_ids: list[int]
    tokens: list[str]
    attributions: list[float]
    """One per input token, summed over the embedding dimension."""
    activation: float
    """F(x): the feature's value on the prompt at `position`."""
    baseline_activation: float | None = None
    """F(baseline) (integrated gradients only)."""
    steps: int | None = None
    rule: str | None = None
    baseline: str | None = None
    label: str = ""
    """The feature's label in its dictionary (empty without one)."""

    @property
    def total(self) -> float:
        return float(sum(self.attributions))

    @property
    def completeness_gap(self) -> float | None:
        """Σ attributions − (F(x) − F(baseline)) (integrated gradients; 0 when exactly complete)."""
        if self.baseline_activation is None:
            return None
        return self.total - (self.activation - self.baseline_activation)

    def top(self, n: int = 10) -> list[tuple[int, str, float]]:
        """(position, token, attribution) of the n largest attributions by magnitude."""
        order = sorted(range(len(self.attributions)), key=lambda i: -abs(self.attributions[i]))
        return [(i, self.tokens[i], self.attributions[i]) for i in order[:n]]

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "hook": self.hook, "feature": self.feature, "position": self.position,
                "quantity": self.quantity, "activation": self.activation,
                "baseline_activation": self.baseline_activation, "steps": self.steps, "rule": self.rule,
                "baseline": self.baseline, "label": self.label, "total": self.total,
                "completeness_gap": self.completeness_gap,
                "tokens": [{"position": i, "token_id": t, "token": s, "attribution": a} for i, (t, s, a)
                           in enumerate(zip(self.token_ids, self.tokens, self.attributions, strict=True))]}

    def table(self, n: int | None = None) -> str:
        """Every token in prompt order (or the `n` strongest), with its attribution."""
        named = f" {self.label!r}" if self.label else ""
        head = (f"{self.method} of feature {self.feature}{named} ({self.quantity}) at position "
                f"{self.position} {self.tokens[self.position]!r}, {self.hook}: "
                f"activation {self.activation:.4g}")
        if self.baseline_activation is not None:
            head += (f", baseline {self.baseline_activation:.4g}, sum of attributions {self.total:.4g} "
                     f"({self.steps} steps, {self.rule} rule)")
        every = [(i, s, a) for i, (s, a) in enumerate(zip(self.tokens, self.attributions, strict=True))]
        rows = self.top(n) if n is not None else every
        return "\n".join([head, f"{'pos':>4}  {'token':<20} attribution",
                          *(f"{i:>4}  {s!r:<20} {a:+.4g}" for i, s, a in rows)])


def _prepare(where: FeatureSite | FeatureDictionary, prompt: Prompt, feature: int, position: int,
             quantity: str) -> tuple[FeatureSite, list[int], int, torch.Tensor, Callable]:
    site = as_site(where)
    ids = prompt_ids(site.tokenizer, prompt, site.prepend_bos)
    if not -len(ids) <= position < len(ids):
        raise AttributionError(f"position {position} is out of range: the prompt has {len(ids)} tokens "
                               f"(positions 0 to {len(ids) - 1}, or -1 for the last)")
    fn = _feature_fn(site.sae, int(feature), quantity)
    device = next(site.model.parameters()).device
    embedding: nn.Module = site.model.get_input_embeddings()  # type: ignore[operator]
    with torch.no_grad():
        embeds = embedding(torch.tensor([ids], device=device))  # [1, T, d_model]
    return site, ids, position % len(ids), embeds, fn


def _values_and_grads(site: FeatureSite, fn: Callable, position: int, embeds: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """F at each row of embeds [m, T, d_model] -> (values [m], ∂F/∂embeds [m, T, d_model] in
    float32, or float64 for a float64 model)."""
    with torch.enable_grad():
        embeds = embeds.detach().requires_grad_(True)
        values = fn(activation_from_embeddings(site.model, site.hook, embeds)[:, position])  # [m]
        (grads,) = torch.autograd.grad(values.sum(), embeds)
    return values.detach(), grads.to(_accumulation_dtype(embeds))


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _result(site: FeatureSite, method: str, ids: list[int], feature: int, position: int, quantity: str,
            attributions: torch.Tensor, activation: float, **extra: Any) -> InputAttribution:
    label = site.dictionary.labels([int(feature)]).get(int(feature), "") if site.dictionary else ""
    return InputAttribution(method, site.hook, int(feature), position, quantity, ids,
                            token_texts(site.tokenizer, ids), [float(a) for a in attributions.cpu()],
                            activation, label=label, **extra)


def gradient_x_input(where: FeatureSite | FeatureDictionary, prompt: Prompt, feature: int,
                     position: int = -1, *, quantity: str = "ungated") -> InputAttribution:
    """Per-token Σ_i x[t, i] · ∂F/∂x[t, i] for the feature's value F at `position` (-1: last token)."""
    site, ids, position, embeds, fn = _prepare(where, prompt, feature, position, quantity)
    values, grads = _values_and_grads(site, fn, position, embeds)
    attributions = (grads[0] * embeds[0].to(grads.dtype)).sum(-1)  # [T]
    return _result(site, "gradient_x_input", ids, feature, position, quantity, attributions, float(values[0]))


def integrated_gradients(where: FeatureSite | FeatureDictionary, prompt: Prompt, feature: int,
                         position: int = -1, *, steps: int = 64, rule: str = "adaptive",
                         baseline: torch.Tensor | None = None, keep_bos: bool = True, batch_size: int = 16,
                         quantity: str = "ungated") -> InputAttribution:
    """Integrated gradients of the feature's value at `position` (-1: last token), per input token.

    `steps` gradients, at the midpoints of an `adaptive` or `uniform` partition of the path (see
    the module docstring), run `batch_size` at a time. `baseline`: input embeddings [T, d_model]
    (or [d_model] for every position); None: zeros. With `keep_bos` and a BOS-first site, position
    0 keeps its real embedding in the baseline.
    """
    if steps < 1 or batch_size < 1:
        raise AttributionError(f"steps and batch_size must be at least 1, got steps={steps}, "
                               f"batch_size={batch_size}")
    if rule not in RULES:
        raise AttributionError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    site, ids, position, embeds, fn = _prepare(where, prompt, feature, position, quantity)
    x = embeds[0]  # [T, d_model]
    if baseline is None:
        base, described = torch.zeros_like(x), "zero"
    else:
        if baseline.shape not in (x.shape, x.shape[1:]):
            raise AttributionError(f"the baseline has shape {tuple(baseline.shape)}; give [T, d_model] = "
                                   f"{tuple(x.shape)} or [d_model] = ({x.shape[1]},)")
        base, described = baseline.to(x.device, x.dtype).expand_as(x).clone(), "given"
    if keep_bos and site.prepend_bos:
        base[0], described = x[0], described + ", BOS kept"
    delta = x - base  # [T, d_model]

    def values_at(alphas: torch.Tensor) -> torch.Tensor:  # F along the path, forward only: [n]
        with torch.no_grad():
            return torch.cat([fn(activation_from_embeddings(
                site.model, site.hook, base + chunk.to(x.dtype)[:, None, None] * delta)[:, position]).double()
                for chunk in alphas.split(4 * batch_size)])

    grid = torch.linspace(0, 1, SCAN_POINTS_PER_STEP * steps + 1 if rule == "adaptive" else 2,
                          dtype=torch.float64, device=x.device)
    scanned = values_at(grid)  # [n_grid]; its ends are F(baseline) and F(x)
    alphas, weights = _partition(grid, scanned, steps)  # [steps], [steps]: Σ weights = 1
    grad_sum = torch.zeros(x.shape, dtype=_accumulation_dtype(x), device=x.device)  # Σ_k w_k ∂F/∂x(α_k)
    for chunk, chunk_weights in zip(alphas.split(batch_size), weights.split(batch_size), strict=True):
        grads = _values_and_grads(site, fn, position, base + chunk.to(x.dtype)[:, None, None] * delta)[1]
        grad_sum += (grads * chunk_weights.to(grads.dtype)[:, None, None]).sum(0)
    attributions = (delta.to(grad_sum.dtype) * grad_sum).sum(-1)  # [T]
    return _result(site, "integrated_gradients", ids, feature, position, quantity, attributions,
                   float(scanned[-1]), baseline_activation=float(scanned[0]), steps=steps, rule=rule,
                   baseline=described)


def _partition(grid: torch.Tensor, values: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints [steps], widths [steps]) of a partition of [0, 1] into `steps` intervals that share
    out F's variation between grid points (2/3) and the path's length (1/3) equally. A grid of
    only the two ends, or an F constant along it, gives the uniform partition."""
    variation = (values[1:] - values[:-1]).abs()  # [n_grid - 1]
    total = float(variation.sum())
    if len(grid) == 2 or total == 0:
        edges = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=grid.device)
    else:
        density = variation + 0.5 * total * (grid[1:] - grid[:-1])
        cumulative = torch.cat([density.new_zeros(1), density.cumsum(0)])
        cumulative = cumulative / cumulative[-1]  # strictly increasing from 0 to 1
        targets = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=grid.device)
        edges = torch.from_numpy(np.interp(targets.cpu().numpy(), cumulative.cpu().numpy(),
                                           grid.cpu().numpy())).to(grid.device)  # inverse of the cumulative
        edges[0], edges[-1] = 0.0, 1.0
    return (edges[1:] + edges[:-1]) / 2, edges[1:] - edges[:-1]
