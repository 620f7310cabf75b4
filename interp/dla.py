"""Direct logit attribution (DLA) of SAE features: how much each active feature writes, directly, into
one logit (or the difference of two) at one position.

With h the hook's activation and x the final residual stream at the position, the final norm's scale
frozen from the clean run (`Readout.freeze`) makes the pre-softcap logit linear in x:

    x = Σ_f a_f W_dec[f]  +  b_dec  +  (h − x̂)  +  (x − h)
        features            b_dec     error        rest
    logit = Σ_terms term · w  +  β · u  +  b_U[t]          w = the frozen norm pulled back along u

with u = W_U[target] (− W_U[contrast]), β the final LayerNorm's bias and b_U the unembedding's bias
(only where the family has them). The terms add up to the clean run's logit (difference) exactly, up
to float rounding: checked to 1e-4 in float32 by tests/test_interp_lens_dla.py.

Hooks: the SAE must read a d_model-wide summand of the final residual stream.
- `hook_resid_post` / `hook_resid_pre`: h is the residual stream; rest = what blocks after the hook
  write (for resid_pre of block L: blocks L..end; for resid_post of the last block: zero).
- `hook_attn_out` / `hook_mlp_out`: h is one sublayer's write (for Gemma 2/3, after its post-norm),
  still an exact summand; rest = everything else in the final residual: the embeddings and every
  other sublayer, earlier and later.
- `mlp.hook_post` is refused: its features reach the residual stream through the down projection
  (and, for Gemma 2/3, a norm that is not frozen here); train an SAE on `hook_mlp_out` instead.
Direct effects only: what a feature does through later layers' attention and MLPs is in `rest`
(activation patching measures total effects). With a final-logit softcap (Gemma 2/3) the
decomposed quantity is the logit before the cap.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from saeworks.activations.hooks import resolve_hook
from saeworks.eval.dictionary import SAE_DIR, FeatureDictionary
from saeworks.interp.readout import (
    InterpError,
    Readout,
    check_position,
    clean_run,
    prompt_token_ids,
    token_id,
    token_text,
)
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.io import load_sae
from saeworks.steer.interventions import FeatureSource

DLA_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
"""Hook kinds whose activation is an exact summand of the final residual stream."""
REST_MEANING = {
    "hook_resid_post": "what later blocks write",
    "hook_resid_pre": "what this block and later ones write",
    "hook_attn_out": "embeddings and every other sublayer's write",
    "hook_mlp_out": "embeddings and every other sublayer's write",
}


@dataclass(frozen=True)
class FeatureContribution:
    feature: int
    activation: float
    contribution: float
    """a_f · (W_dec[f] through the frozen norm) · u."""
    label: str = ""


@dataclass(frozen=True)
class LogitAttribution:
    """The DLA of one logit (difference) at one position of one prompt."""

    prompt: str
    tokens: list[str]
    position: int
    """Index into `tokens` (BOS included when prepended); the logit predicts the token after it."""
    target: int
    target_text: str
    contrast: int | None
    contrast_text: str | None
    hook: str
    sae: str
    features: list[FeatureContribution]
    """Every active feature, largest |contribution| first."""
    terms: dict[str, float]
    """features (their sum), error, b_dec, rest; norm_bias and unembed_bias where the model has them."""
    model_logit: float
    """The clean run's logit (difference) at the unembedding's output, before any softcap."""
    predicted: int
    """The model's top next token at `position`."""
    predicted_text: str
    target_prob: float
    """The model's probability of the target at `position`."""
    softcap: float | None = None
    top: int = 20
    """How many features `table()` and `figure()` show."""

    @property
    def total(self) -> float:
        """Sum of every term: equals `model_logit` (the identity DLA rests on)."""
        return sum(self.terms.values())

    def shares(self) -> dict[str, float]:
        """Each term as a fraction of the total (empty when the total is ~0)."""
        total = self.total
        return {} if abs(total) < 1e-6 else {name: value / total for name, value in self.terms.items()}

    @property
    def quantity(self) -> str:
        target = f"logit[{self.target_text!r}]"
        return target if self.contrast is None else f"{target} − logit[{self.contrast_text!r}]"

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "tokens": self.tokens, "position": self.position,
            "target": self.target, "target_text": self.target_text,
            "contrast": self.contrast, "contrast_text": self.contrast_text,
            "hook": self.hook, "sae": self.sae,
            "features": [vars(f) for f in self.features], "terms": self.terms, "total": self.total,
            "model_logit": self.model_logit, "softcap": self.softcap,
            "predicted": self.predicted, "predicted_text": self.predicted_text,
            "target_prob": self.target_prob,
        }

    def table(self, top: int | None = None) -> str:
        """The top features with their labels, the other terms and the total against the model."""
        top = self.top if top is None else top
        kind = self.hook.split(".", 2)[2]
        lines = [f"DLA of {self.quantity} after {self.tokens[self.position]!r} (position {self.position}) "
                 f"of {self.prompt!r}",
                 f"SAE {self.sae} at {self.hook}; the model predicts {self.predicted_text!r}, "
                 f"P(target) = {self.target_prob:.3f}",
                 f"{'feature':>8}  {'activation':>10}  {'logit':>8}  label"]
        for f in self.features[:top]:
            lines.append(f"{f.feature:>8}  {f.activation:>10.3f}  {f.contribution:>+8.3f}  {f.label}")
        shares = self.shares()
        names = {"features": f"features ({len(self.features)} active)",
                 "error": "SAE error (input − reconstruction)", "b_dec": "b_dec",
                 "rest": f"rest ({REST_MEANING.get(kind, 'the rest')})",
                 "norm_bias": "final norm bias", "unembed_bias": "unembedding bias"}
        lines.append("")
        for name, value in self.terms.items():
            share = f"  {shares[name]:>7.1%}" if shares else ""
            lines.append(f"{names.get(name, name):<48}  {value:>+9.3f}{share}")
        cap = f" (before the softcap at {self.softcap:g})" if self.softcap else ""
        lines.append(f"{'total':<48}  {self.total:>+9.3f}   model's logit{cap}: {self.model_logit:+.3f}")
        return "\n".join(lines)

    def figure(self, top: int | None = None) -> Figure:
        """Horizontal bars: the top features' contributions, then the error, b_dec and rest terms."""
        top = self.top if top is None else top
        shown = self.features[:top]
        labels = [f"#{f.feature} {f.label}"[:40] for f in shown]
        values = [f.contribution for f in shown]
        others = [name for name in self.terms if name != "features"]
        labels += others
        values += [self.terms[name] for name in others]
        colours = ["#3b6ea8" if v >= 0 else "#c44e52" for v in values[: len(shown)]]
        colours += ["#999999"] * len(others)
        fig = Figure(figsize=(7.0, 1.2 + 0.28 * len(values)))
        ax = fig.subplots()
        rows = list(range(len(values)))[::-1]
        ax.barh(rows, values, color=colours)
        ax.set_yticks(rows, labels, fontsize=7, parse_math=False)
        ax.axvline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel(f"direct contribution to {self.quantity}")
        ax.set_title(f"DLA at {self.tokens[self.position]!r} ({self.hook}): total {self.total:+.2f}, "
                     f"model {self.model_logit:+.2f}", fontsize=9, parse_math=False)
        fig.tight_layout()
        return fig

    def png(self, top: int | None = None) -> bytes:
        buffer = io.BytesIO()
        self.figure(top).savefig(buffer, dpi=100, format="png")
        return buffer.getvalue()


@torch.no_grad()
def direct_logit_attribution(
    source: FeatureDictionary | FeatureSource | SparseAutoencoder,
    prompt: str | Sequence[int] | torch.Tensor,
    target: str | int,
    *,
    position: int = -1,
    contrast: str | int | None = None,
    top: int = 20,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    hook: str | None = None,
    prepend_bos: bool | None = None,
) -> LogitAttribution:
    """DLA of `target`'s logit (minus `contrast`'s) at `position` (negative: from the end) of `prompt`.

    `source`: a FeatureDictionary (its model, tokenizer, SAE, hook, BOS convention and labels; `model`
    and `tokenizer` given here are used instead of loading its own), a FeatureSource, or a bare SAE
    with `hook`; the last two need `model` (and `tokenizer` for text)."""
    dictionary = source if isinstance(source, FeatureDictionary) else None
    if dictionary is not None and (model is None or tokenizer is None):
        loaded_model, loaded_tokenizer, _ = dictionary._load_runtime()
        model = model if model is not None else loaded_model
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    sae, hook, name = _resolve_source(source, hook)
    if model is None:
        raise InterpError("DLA needs the model: pass model=... (and tokenizer=... for text)")
    if prepend_bos is None:
        prepend_bos = (bool(dictionary.info.get("prepend_bos", True)) if dictionary is not None
                       else getattr(source, "prepend_bos", True))
    kind = resolve_hook(model, hook).kind
    if kind not in DLA_KINDS:
        raise InterpError(f"DLA cannot decompose {hook}: its features reach the residual stream through the "
                          "MLP's down projection; use an SAE at a resid_pre/resid_post/attn_out/mlp_out hook")
    readout = Readout.of(model)
    vocab = int(readout.W_U.shape[0])
    target_id = token_id(tokenizer, target, vocab)
    contrast_id = None if contrast is None else token_id(tokenizer, contrast, vocab, "contrast")
    if contrast_id == target_id:
        raise InterpError(f"contrast {contrast!r} is the target token; give a different token to compare")
    ids = prompt_token_ids(tokenizer, prompt, prepend_bos)
    pos = check_position(position, len(ids))

    run = clean_run(model, ids, [hook])
    frozen = readout.freeze(run.final_resid, run.normed)
    u = readout.direction(target_id, contrast_id)  # [d]
    w = frozen.functional(u, pos)  # [d]: residual at pos -> its direct part of the logit (difference)
    h = run.activations[hook][pos].float()  # [d]
    param = next(sae.parameters())
    latents = sae.encode(h[None].to(param.device, param.dtype))  # [1, d_sae]
    x_hat = sae.decode(latents)[0].float().to(w.device)  # [d]
    latents = latents[0].float().to(w.device)  # [d_sae]
    active = latents.nonzero().flatten()  # [n_active]
    rows = sae.W_dec[active.to(param.device)].float().to(w.device)  # [n_active, d]
    per_feature = latents[active] * (rows @ w)  # [n_active]
    terms = {"features": float(per_feature.sum()), "error": float((h - x_hat) @ w),
             "b_dec": float(sae.b_dec.float().to(w.device) @ w),
             "rest": float((run.final_resid[pos].float() - h) @ w)}
    if frozen.bias is not None:
        terms["norm_bias"] = frozen.constant(u)
    bias = readout.bias_term(target_id, contrast_id)
    if bias is not None:
        terms["unembed_bias"] = bias

    order = per_feature.abs().argsort(descending=True)
    feature_ids = active[order].tolist()
    labels = dictionary.labels(feature_ids) if dictionary is not None and feature_ids else {}
    features = [FeatureContribution(f, float(latents[f]), float(per_feature[i]), labels.get(f, ""))
                for f, i in zip(feature_ids, order.tolist(), strict=True)]
    logits = run.logits[pos]  # [vocab] before the softcap
    model_logit = logits[target_id] - (0.0 if contrast_id is None else logits[contrast_id])
    probs = readout.apply_softcap(logits).softmax(dim=-1)
    predicted = int(probs.argmax())
    texts = [token_text(tokenizer, i) for i in ids]
    return LogitAttribution(
        prompt if isinstance(prompt, str) else " ".join(map(str, ids)), texts, pos, target_id,
        token_text(tokenizer, target_id), contrast_id,
        None if contrast_id is None else token_text(tokenizer, contrast_id), hook, name, features, terms,
        float(model_logit), predicted, token_text(tokenizer, predicted), float(probs[target_id]),
        readout.softcap, top)


def _resolve_source(source: FeatureDictionary | FeatureSource | SparseAutoencoder,
                    hook: str | None) -> tuple[SparseAutoencoder, str, str]:
    """(SAE, hook, SAE name) of any accepted source; a dictionary's SAE is loaded once."""
    if isinstance(source, FeatureDictionary):
        loaded = source._runtime
        sae = loaded[2] if loaded is not None else load_sae(source.path / SAE_DIR, source.device)
        return sae, hook or str(source.info["hook"]), str(source.info.get("sae_name"))
    if isinstance(source, FeatureSource):
        return source.sae, hook or source.hook, source.name
    if isinstance(source, SparseAutoencoder):
        if hook is None:
            raise InterpError("a bare SAE needs its hook: pass hook='blocks.L.hook_resid_post' (or the "
                              "hook it was trained on)")
        return source, hook, source.cfg.display_name
    raise InterpError(f"DLA takes a FeatureDictionary, a FeatureSource or an SAE, "
                      f"not {type(source).__name__}")
