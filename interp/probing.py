"""Probing: directions at a hook that separate two labelled sets of texts, dense and on SAE features.

Texts to vectors: each text is tokenised without special tokens (BOS first when `prepend_bos`),
cut to `max_tokens`, and its activation at the hook pooled into one vector [d]: `mean` (default)
over the kept positions (from `first_kept` on, 2 by default: BOS and SmolLM2's second attention
sink, whose norms dwarf every other position's, as training and analysis skip them), or `last`
(the last token). SAE latents are computed per token, then pooled the same way.

Split: each class is shuffled by a seeded generator and its first `test_fraction` held out, so the
split is stratified and the same on every run. Everything is fitted on the training split only.

1. Difference of means: d = μ₊ − μ₋; a text is called positive when ⟨x, d⟩ > ⟨(μ₊ + μ₋)/2, d⟩.
2. Logistic regression: scikit-learn's L2-regularised `LogisticRegression` (C = 1) on standardised
   activations (the residual stream has a few dimensions ~100x the others); its weights are
   mapped back to raw activation space as `logistic_direction`.
3. Sparse probing: features ranked by |μ₊ − μ₋| / pooled std (per feature, train split), and a
   logistic regression on only the top k of them, k = 1, 2, 5.

Direction files (`save_direction`): safetensors, one float32 tensor [d] under the key
`direction`, metadata `hook` (and `kind`, `labels`, `unit`, `saeworks_version`). The difference of
means is saved raw, not unit: additive steering with coefficient 1 moves the average negative
example to the average positive one (`VectorIntervention.from_file(path, hook)`); orthogonalisation
normalises it itself.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from torch import nn

from saeworks.activations.config import DataConfig
from saeworks.activations.hooks import architecture_of, blocks_of, capture_activations
from saeworks.activations.text import iter_documents, separator_ids
from saeworks.eval.dictionary import FeatureDictionary
from saeworks.interp.input_attribution import FeatureSite, as_site
from saeworks.sae.atomic import write_bytes_atomic
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.errors import SaeworksError
from saeworks.sae.io import read_vector
from saeworks.sae.version import package_version

DIRECTION_KEY = "direction"
POOLINGS = ("mean", "last")
Texts = str | Path | Sequence[str]
"""A file (one text per line, or .jsonl objects with a text field) or the texts themselves."""
Pooled = dict[str, torch.Tensor]
"""Pooled activations by hook (and `"latents"`), each [n_texts, d]."""


class ProbeError(SaeworksError, ValueError):
    """A probe that cannot be fitted or a direction that cannot be used as given."""


# ---------------------------------------------------------------------------------------------
# Texts in


def read_texts(source: Texts, text_field: str = "text", name: str = "texts") -> list[str]:
    """The texts of a file (.jsonl: `text_field` of each object; else one per non-blank line) or list."""
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ProbeError(f"{name}: no such file {str(source)!r}; give a text file (one text a line), "
                             "a .jsonl file, or a list of texts")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        texts = [_jsonl_text(line, text_field, path, i) for i, line in enumerate(lines, 1)] \
            if path.suffix == ".jsonl" else lines
    else:
        texts = [str(t) for t in source]
    if not texts or not all(t.strip() for t in texts):
        raise ProbeError(f"{name}: {'an empty text' if texts else 'no texts'}; every class needs "
                         "non-empty texts (at least 2, one of them held out)")
    return texts


def _jsonl_text(line: str, field_name: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ProbeError(f"{path}:{number} is not JSON ({err}); a .jsonl file holds one object a "
                         "line") from err
    if not isinstance(record, dict) or not isinstance(record.get(field_name), str):
        raise ProbeError(f"{path}:{number} has no string field {field_name!r}; set text_field")
    return str(record[field_name])


_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)(?:\s*<[^>]*>)?`__?")


def code_vs_prose(n: int = 60, max_chars: int = 240) -> tuple[list[str], list[str]]:
    """A built-in contrast from the embedded corpus (the Python 3.11 docs, in file order): `n`
    snippets of Python code (literal blocks that parse as Python statements) and `n` of English
    prose (top-level paragraphs, reST roles reduced to their text), at most one of each per
    document and no two alike, each cut at a line / word boundary to at most `max_chars`
    characters. The same on every run."""
    code: list[str] = []
    prose: list[str] = []
    for doc in iter_documents(DataConfig(path="embedded", shuffle_seed=None, holdout_fraction=0)):
        lines = doc.splitlines()
        for found, candidates, cut in ((code, _python_blocks(lines), _cut_lines),
                                       (prose, _prose_paragraphs(lines), _cut_words)):
            snippet = next((s for s in (cut(c, max_chars) for c in candidates) if s not in found), None)
            if snippet is not None and len(found) < n:
                found.append(snippet)
        if len(code) == n and len(prose) == n:
            return code, prose
    raise ProbeError(f"the embedded corpus yields only {len(code)} code and {len(prose)} prose snippets; "
                     f"ask for at most that many")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _python_blocks(lines: list[str]) -> Iterator[str]:
    """reST literal blocks (after a line ending in `::`) of at least 60 characters that parse as Python
    and hold a statement (def, class, import, assignment, loop...), not only expressions."""
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        base, body, j = _indent(line), [], i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
            body.append(lines[j])
            j += 1
        block = textwrap.dedent("\n".join(body)).strip("\n")
        if block.lstrip().startswith(":") or len(block) < 60:  # directive options, or too short
            continue
        try:
            statements = ast.parse(block).body
        except (SyntaxError, ValueError):
            continue
        if any(not isinstance(node, ast.Expr) for node in statements):  # not a list of names, nor C
            yield block


def _prose_paragraphs(lines: list[str]) -> Iterator[str]:
    """Unindented paragraphs of at least 120 characters that are no heading, list, table or markup."""
    paragraph: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            paragraph.append(line)
            continue
        if paragraph and all(_indent(p) == 0 for p in paragraph) and not _markup(paragraph):
            text = _ROLE.sub(r"\1", " ".join(p.strip() for p in paragraph))
            text = _LINK.sub(r"\1", text).replace("``", "").replace("**", "")
            text = text[:-1] if text.endswith("::") else text
            if len(text) >= 120:
                yield text
        paragraph = []


def _markup(paragraph: list[str]) -> bool:
    first = paragraph[0]
    underline = any(set(p.strip()) <= set("=-~^*#+`'\".:") for p in paragraph)
    return underline or bool(re.match(r"(\.\.|[*+|#=-]|\d+\.|:\w)", first))


def _cut_lines(text: str, max_chars: int) -> str:
    kept: list[str] = []
    for line in text.splitlines():
        if kept and len("\n".join([*kept, line])) > max_chars:
            break
        kept.append(line)
    return "\n".join(kept)[:max_chars]


def _cut_words(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0]


# ---------------------------------------------------------------------------------------------
# Texts to pooled activations


@dataclass(frozen=True)
class Pooling:
    """How one text's activations become one vector."""

    how: str = "mean"
    """`mean` over the kept positions, or `last` (the last token's)."""
    first_kept: int = 2
    """Positions before this are skipped by `mean` (BOS and the second attention sink)."""
    prepend_bos: bool = True
    max_tokens: int = 128
    """Longer texts are cut to this many tokens (BOS included)."""

    def __post_init__(self) -> None:
        if self.how not in POOLINGS:
            raise ProbeError(f"pooling {self.how!r}: choose one of {', '.join(POOLINGS)}")
        if self.max_tokens <= self.first_kept:
            raise ProbeError(f"max_tokens ({self.max_tokens}) must exceed first_kept ({self.first_kept})")


def pooled_activations(model: nn.Module, tokenizer: Any, texts: Sequence[str], hooks: Sequence[str],
                       pooling: Pooling | None = None, *, sae: SparseAutoencoder | None = None,
                       batch_size: int = 16, name: str = "texts") -> Pooled:
    """{hook: [n_texts, d]} pooled activations (float32, CPU); with `sae`, also `"latents"`:
    [n_texts, d_sae] its per-token latents at hooks[0], pooled."""
    pooling = pooling or Pooling()
    ids = [_text_ids(tokenizer, text, pooling, name, i) for i, text in enumerate(texts)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator_ids(tokenizer)[1]
    device = next(model.parameters()).device
    pooled: dict[str, list[torch.Tensor]] = {key: [] for key in [*hooks, *(["latents"] if sae else [])]}
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
    for start in range(0, len(ids), batch_size):
        rows = [ids[i] for i in order[start:start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        positions = torch.arange(width, device=device)
        if pooling.how == "mean":  # right padding: real tokens sit at 0..len-1
            weights = ((positions >= pooling.first_kept) & (positions[None] < lengths[:, None])).float()
        else:
            weights = (positions[None] == lengths[:, None] - 1).float()
        weights = weights / weights.sum(1, keepdim=True)  # [batch, T]
        mask = (positions[None] < lengths[:, None]).long()
        captured = capture_activations(model, input_ids, list(hooks), attention_mask=mask)
        for hook in hooks:
            pooled[hook].append(torch.einsum("bt,btd->bd", weights, captured[hook].float()).cpu())
        if sae is not None:
            with torch.no_grad():
                latents = sae.encode(captured[hooks[0]].to(sae.W_dec.device, torch.float32))  # [b, T, d_sae]
            pooled["latents"].append(torch.einsum("bt,btf->bf", weights.to(latents.device), latents).cpu())
    inverse = torch.argsort(torch.tensor(order))
    return {key: torch.cat(parts)[inverse] for key, parts in pooled.items()}


def _read_classes(model: nn.Module, tokenizer: Any, positive: Texts, negative: Texts, hooks: Sequence[str],
                  pooling: Pooling, labels: tuple[str, str], batch_size: int,
                  sae: SparseAutoencoder | None = None) -> tuple[Pooled, Pooled]:
    """Both classes read (all texts checked first) and pooled."""
    texts = read_texts(positive, name=labels[0]), read_texts(negative, name=labels[1])
    pos, neg = (pooled_activations(model, tokenizer, class_texts, hooks, pooling, sae=sae,
                                   batch_size=batch_size, name=name)
                for class_texts, name in zip(texts, labels, strict=True))
    return pos, neg


def _text_ids(tokenizer: Any, text: str, pooling: Pooling, name: str, index: int) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = ([separator_ids(tokenizer)[0], *ids] if pooling.prepend_bos else ids)[:pooling.max_tokens]
    needed = pooling.first_kept + 1 if pooling.how == "mean" else 1
    if len(ids) < needed:
        raise ProbeError(f"{name}[{index}] has {len(ids)} tokens, all before first_kept="
                         f"{pooling.first_kept}; give longer texts, a smaller first_kept, or pooling 'last'")
    return ids


# ---------------------------------------------------------------------------------------------
# Fitting


def split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, test indices) of one class of `n`: a seeded shuffle, the first part held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return order[n_test:], order[:n_test]


def _check_classes(positive: torch.Tensor, negative: torch.Tensor, labels: tuple[str, str],
                   test_fraction: float) -> None:
    for acts, label in zip((positive, negative), labels, strict=True):
        if acts.dim() != 2 or len(acts) < 2:
            raise ProbeError(f"class {label!r} has {len(acts)} examples; each class needs at least 2 "
                             "(one is held out)")
    if positive.shape[1] != negative.shape[1]:
        raise ProbeError(f"the classes have widths {positive.shape[1]} and {negative.shape[1]}; "
                         "read both at the same hook")
    if not 0 < test_fraction < 1:
        raise ProbeError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _train_test(positive: torch.Tensor, negative: torch.Tensor, test_fraction: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train [n, d], y_train [n], x_test, y_test) as float64 / int arrays, label 1 = positive."""
    parts: dict[str, list[np.ndarray]] = {"xtr": [], "ytr": [], "xte": [], "yte": []}
    for acts, label, class_seed in ((positive, 1, seed), (negative, 0, seed + 1)):
        train, test = split(len(acts), test_fraction, class_seed)
        parts["xtr"].append(acts[train].double().numpy())
        parts["xte"].append(acts[test].double().numpy())
        parts["ytr"].append(np.full(len(train), label))
        parts["yte"].append(np.full(len(test), label))
    xtr, ytr, xte, yte = (np.concatenate(parts[k]) for k in ("xtr", "ytr", "xte", "yte"))
    return xtr, ytr, xte, yte


def _logistic(C: float) -> Any:
    """An L2 logistic regression on standardised inputs (scikit-learn, imported on first use)."""
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
    from sklearn.pipeline import make_pipeline  # type: ignore[import-untyped]
    from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))


@dataclass
class ProbeResult:
    """A difference-of-means direction and a logistic probe at one hook, with held-out accuracy."""

    hook: str
    labels: tuple[str, str]
    """(positive, negative) class names: the direction points from negative to positive."""
    n_train: int
    n_test: int
    pooling: str
    diff_means_accuracy: float
    logistic_accuracy: float
    logistic_train_accuracy: float
    direction: torch.Tensor = field(repr=False)
    """[d] μ₊ − μ₋ (train split), raw activation units."""
    logistic_direction: torch.Tensor = field(repr=False)
    """[d] the logistic probe's weights mapped back to raw activation space."""

    def save_direction(self, path: str | Path, which: str = "diff_means") -> Path:
        """Write the `diff_means` (raw) or `logistic` direction as a safetensors vector file."""
        if which not in ("diff_means", "logistic"):
            raise ProbeError(f"which direction {which!r}: choose diff_means or logistic")
        vector = self.direction if which == "diff_means" else self.logistic_direction
        return save_direction(path, vector, self.hook, kind=which, labels=",".join(self.labels))

    def to_json(self) -> dict[str, Any]:
        return {"hook": self.hook, "labels": list(self.labels), "n_train": self.n_train,
                "n_test": self.n_test, "pooling": self.pooling,
                "diff_means_accuracy": self.diff_means_accuracy, "logistic_accuracy": self.logistic_accuracy,
                "logistic_train_accuracy": self.logistic_train_accuracy,
                "direction_norm": float(self.direction.norm())}

    def table(self) -> str:
        return "\n".join([
            f"probe {self.labels[0]!r} vs {self.labels[1]!r} at {self.hook} ({self.pooling} pooling; "
            f"{self.n_train} train, {self.n_test} held out)",
            f"  difference of means  held-out accuracy {self.diff_means_accuracy:.3f}  "
            f"(|direction| {float(self.direction.norm()):.3g})",
            f"  logistic regression  held-out accuracy {self.logistic_accuracy:.3f}  "
            f"(train {self.logistic_train_accuracy:.3f})"])


def fit_probe(positive: torch.Tensor, negative: torch.Tensor, hook: str, *,
              labels: tuple[str, str] = ("positive", "negative"), pooling: str = "mean",
              test_fraction: float = 0.25, seed: int = 0, C: float = 1.0) -> ProbeResult:
    """Both probes on pooled activations [n₊, d] and [n₋, d] (see the module docstring)."""
    _check_classes(positive, negative, labels, test_fraction)
    xtr, ytr, xte, yte = _train_test(positive, negative, test_fraction, seed)
    mean_pos, mean_neg = xtr[ytr == 1].mean(0), xtr[ytr == 0].mean(0)  # [d]
    direction = mean_pos - mean_neg
    threshold = float((mean_pos + mean_neg) @ direction / 2)
    diff_accuracy = float((((xte @ direction) > threshold).astype(int) == yte).mean())
    probe = _logistic(C).fit(xtr, ytr)
    scaler, logistic = probe[0], probe[-1]
    weights = logistic.coef_[0] / scaler.scale_  # [d] in raw activation space
    return ProbeResult(hook, labels, len(ytr), len(yte), pooling, diff_accuracy,
                       float(probe.score(xte, yte)), float(probe.score(xtr, ytr)),
                       torch.from_numpy(direction).float(), torch.from_numpy(weights).float())


def probe(model: nn.Module, tokenizer: Any, positive: Texts, negative: Texts, hook: str, *,
          labels: tuple[str, str] = ("positive", "negative"), pooling: Pooling | None = None,
          test_fraction: float = 0.25, seed: int = 0, batch_size: int = 16) -> ProbeResult:
    """Read both text sets at `hook` and fit the difference-of-means and logistic probes."""
    pooling = pooling or Pooling()
    pos, neg = _read_classes(model, tokenizer, positive, negative, [hook], pooling, labels, batch_size)
    return fit_probe(pos[hook], neg[hook], hook, labels=labels, pooling=pooling.how,
                     test_fraction=test_fraction, seed=seed)


@dataclass
class LayerSweep:
    """One probe per layer (resid_post of each), for an accuracy-by-depth table."""

    layers: list[int]
    results: list[ProbeResult]

    def to_json(self) -> dict[str, Any]:
        return {"layers": [{"layer": layer, **result.to_json()}
                           for layer, result in zip(self.layers, self.results, strict=True)]}

    def table(self) -> str:
        first = self.results[0]
        head = (f"probe {first.labels[0]!r} vs {first.labels[1]!r}, held-out accuracy by layer "
                f"({first.pooling} pooling; {first.n_train} train, {first.n_test} held out)")
        rows = [f"{layer:>5}  {r.hook:<26} {r.diff_means_accuracy:>10.3f} {r.logistic_accuracy:>9.3f}"
                for layer, r in zip(self.layers, self.results, strict=True)]
        return "\n".join([head, f"{'layer':>5}  {'hook':<26} {'diff-means':>10} {'logistic':>9}", *rows])


def probe_layers(model: nn.Module, tokenizer: Any, positive: Texts, negative: Texts,
                 layers: Sequence[int] | None = None, *, kind: str = "hook_resid_post",
                 labels: tuple[str, str] = ("positive", "negative"), pooling: Pooling | None = None,
                 test_fraction: float = 0.25, seed: int = 0, batch_size: int = 16) -> LayerSweep:
    """Probe at `blocks.{L}.{kind}` for every layer L (default: all), one forward for all layers."""
    pooling = pooling or Pooling()
    architecture_of(model)  # a clear error for an unsupported family
    layers = list(range(len(blocks_of(model)))) if layers is None else [int(layer) for layer in layers]
    hooks = [f"blocks.{layer}.{kind}" for layer in layers]
    pos, neg = _read_classes(model, tokenizer, positive, negative, hooks, pooling, labels, batch_size)
    return LayerSweep(layers, [fit_probe(pos[h], neg[h], h, labels=labels, pooling=pooling.how,
                                         test_fraction=test_fraction, seed=seed) for h in hooks])


# ---------------------------------------------------------------------------------------------
# Sparse probing on SAE features


@dataclass(frozen=True)
class RankedFeature:
    feature: int
    score: float
    """|μ₊ − μ₋| / pooled std of its pooled activation (train split)."""
    mean_positive: float
    mean_negative: float
    label: str = ""

    @property
    def favours(self) -> int:
        """+1 if it is stronger on the positive class, −1 if on the negative one."""
        return 1 if self.mean_positive >= self.mean_negative else -1


@dataclass
class SparseProbeResult:
    """The SAE features that best separate the classes alone, and the accuracy of k of them."""

    hook: str
    labels: tuple[str, str]
    n_train: int
    n_test: int
    pooling: str
    features: list[RankedFeature]
    """Best first (the top max(ks), at least 10)."""
    accuracy: dict[int, float]
    """k -> held-out accuracy of a logistic regression on the top k features."""

    def to_json(self) -> dict[str, Any]:
        return {"hook": self.hook, "labels": list(self.labels), "n_train": self.n_train,
                "n_test": self.n_test, "pooling": self.pooling,
                "accuracy": {str(k): v for k, v in self.accuracy.items()},
                "features": [{"feature": f.feature, "score": f.score, "mean_positive": f.mean_positive,
                              "mean_negative": f.mean_negative, "favours": self.labels[f.favours < 0],
                              "label": f.label} for f in self.features]}

    def table(self) -> str:
        accuracies = ", ".join(f"k={k}: {v:.3f}" for k, v in self.accuracy.items())
        rows = [f"{i:>4}  {f.feature:>7} {f.score:>7.2f} {f.mean_positive:>9.3g} {f.mean_negative:>9.3g}  "
                f"{self.labels[f.favours < 0]:<10} {f.label}" for i, f in enumerate(self.features, 1)]
        return "\n".join([
            f"sparse probe {self.labels[0]!r} vs {self.labels[1]!r} at {self.hook} ({self.pooling} pooling; "
            f"{self.n_train} train, {self.n_test} held out): held-out accuracy {accuracies}",
            f"{'rank':>4}  {'feature':>7} {'score':>7} {'mean ' + self.labels[0][:4]:>9} "
            f"{'mean ' + self.labels[1][:4]:>9}  {'favours':<10} label", *rows])


def fit_sparse_probe(positive: torch.Tensor, negative: torch.Tensor, hook: str, *,
                     ks: Sequence[int] = (1, 2, 5), labels: tuple[str, str] = ("positive", "negative"),
                     feature_labels: dict[int, str] | None = None, pooling: str = "mean",
                     test_fraction: float = 0.25, seed: int = 0, C: float = 1.0) -> SparseProbeResult:
    """Rank features of pooled latents [n₊, d_sae], [n₋, d_sae] and probe with the top k of them."""
    _check_classes(positive, negative, labels, test_fraction)
    if not ks or min(ks) < 1 or max(ks) > positive.shape[1]:
        raise ProbeError(f"ks {list(ks)}: each k must be in 1..{positive.shape[1]} (the number of features)")
    xtr, ytr, xte, yte = _train_test(positive, negative, test_fraction, seed)
    mean_pos, mean_neg = xtr[ytr == 1].mean(0), xtr[ytr == 0].mean(0)  # [d_sae]
    pooled_std = np.sqrt((xtr[ytr == 1].var(0) + xtr[ytr == 0].var(0)) / 2)
    score = np.abs(mean_pos - mean_neg) / (pooled_std + 1e-8)  # 0 for a feature silent on both
    order = np.argsort(-score, kind="stable")
    accuracy = {}
    for k in ks:
        top = order[:k]
        accuracy[int(k)] = float(_logistic(C).fit(xtr[:, top], ytr).score(xte[:, top], yte))
    names = feature_labels or {}
    ranked = [RankedFeature(int(j), float(score[j]), float(mean_pos[j]), float(mean_neg[j]),
                            names.get(int(j), "")) for j in order[:max(10, *ks)]]
    return SparseProbeResult(hook, labels, len(ytr), len(yte), pooling, ranked, accuracy)


def sparse_probe(where: FeatureSite | FeatureDictionary, positive: Texts, negative: Texts, *,
                 ks: Sequence[int] = (1, 2, 5), labels: tuple[str, str] = ("positive", "negative"),
                 pooling: Pooling | None = None, test_fraction: float = 0.25, seed: int = 0,
                 batch_size: int = 16) -> SparseProbeResult:
    """Sparse probing with an SAE at its hook (a dictionary also names the top features).
    Default pooling: mean over the SAE's own kept positions (its first_kept), BOS as it was trained."""
    site = as_site(where)
    pooling = pooling or Pooling("mean", site.first_kept, site.prepend_bos)
    pos, neg = _read_classes(site.model, site.tokenizer, positive, negative, [site.hook], pooling, labels,
                             batch_size, site.sae)
    result = fit_sparse_probe(pos["latents"], neg["latents"], site.hook, ks=ks, labels=labels,
                              pooling=pooling.how, test_fraction=test_fraction, seed=seed)
    if site.dictionary is not None:
        names = site.dictionary.labels([f.feature for f in result.features])
        result.features = [RankedFeature(f.feature, f.score, f.mean_positive, f.mean_negative,
                                         names.get(f.feature, "")) for f in result.features]
    return result


# ---------------------------------------------------------------------------------------------
# Direction files


def save_direction(path: str | Path, direction: torch.Tensor, hook: str, *, d_model: int | None = None,
                   **metadata: str) -> Path:
    """Write one float32 [d] vector under `direction`, with `hook` (and `metadata`) in the header.
    A zero, non-finite or (with `d_model`) wrong-width vector is refused."""
    vector = check_direction(direction, d_model)
    header = {"hook": hook, "unit": str(bool(abs(float(vector.norm()) - 1) < 1e-6)).lower(),
              "saeworks_version": package_version(), **{k: str(v) for k, v in metadata.items()}}
    return write_bytes_atomic(Path(path), save({DIRECTION_KEY: vector.contiguous()}, metadata=header))


def load_direction(path: str | Path, d_model: int | None = None) -> tuple[torch.Tensor, dict[str, str]]:
    """(vector [d] float32, metadata) of a direction file, checked as `save_direction` checks it."""
    try:
        vector, _, metadata = read_vector(path, DIRECTION_KEY)
    except SaeworksError as err:
        raise ProbeError(str(err)) from None
    return check_direction(vector, d_model), metadata


def check_direction(direction: torch.Tensor, d_model: int | None = None) -> torch.Tensor:
    """The direction as a float32 [d] CPU tensor, or a one-line ProbeError saying what is wrong."""
    vector = direction.detach().float().cpu()
    if vector.dim() != 1:
        raise ProbeError(f"a direction must be one vector [d], got shape {tuple(direction.shape)}")
    if d_model is not None and len(vector) != d_model:
        raise ProbeError(f"the direction has width {len(vector)}, the model's residual stream {d_model}; "
                         "use a direction read at a hook of this model")
    if not torch.isfinite(vector).all():
        raise ProbeError("the direction has non-finite entries (nan or inf)")
    if float(vector.norm()) == 0:
        raise ProbeError("the direction is the zero vector; a direction needs a non-zero vector")
    return vector
