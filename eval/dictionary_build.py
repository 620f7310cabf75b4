"""Writing a feature dictionary: one SAE's analysed features to the directory eval/dictionary.py
reads (the layout and the features.sqlite schema are documented there, with FORMAT_VERSION,
the file names and SCHEMA).

The directory is built in a hidden scratch sibling and published over the old one in one step
(sae/atomic.py), so a killed build never leaves a directory that opens as a half-built dictionary,
and never leaves the real name without a dictionary that was there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sqlite3
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeworks.activations.config import ModelConfig
from saeworks.eval.dictionary import (
    DB_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEXES,
    INFO_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    SAE_DIR,
    SCHEMA,
    TOKEN_SEPARATOR,
    DictionaryError,
    FeatureDictionary,
)
from saeworks.eval.features import Contexts, FeatureAnalysis
from saeworks.eval.labels import auto_label
from saeworks.eval.report import dictionary_report
from saeworks.sae.atomic import atomic_directory
from saeworks.sae.io import CFG_FILE, WEIGHTS_FILE, read_cfg
from saeworks.sae.version import package_version

TOP_TOKENS = 10
"""Top tokens kept per feature (its features.top_tokens and features_fts.tokens)."""
FLOAT16_LIMIT = 60_000.0
"""Context activations are stored as float16 when every one is below this, else float32."""


def write_dictionary(directory: str | Path, analysis: FeatureAnalysis, sae_dir: str | Path, tokenizer: Any,
                     model_cfg: ModelConfig, hook: str, metrics: dict[str, Any] | None = None,
                     info: dict[str, Any] | None = None) -> Path:
    """Write the feature dictionary of the SAE in `sae_dir` to `directory`, atomically.

    `analysis` is eval/analysis.py's pass over a store; `tokenizer` decodes its token ids;
    `metrics` is the SAE's metrics.json content; `info` (e.g. the store URL) joins analysis.info.
    An existing dictionary there is replaced (keeping user labels if the SAE is the same); any
    other existing non-empty directory is refused.
    """
    directory, sae_dir = Path(directory), Path(sae_dir)
    sae_cfg = read_cfg(sae_dir)
    if int(sae_cfg.get("d_sae", -1)) != analysis.d_sae:
        raise DictionaryError(f"the analysis has {analysis.d_sae} features but the SAE in {sae_dir} has "
                              f"d_sae={sae_cfg.get('d_sae')}: they do not belong together")
    sha = _sha256(sae_dir / WEIGHTS_FILE)
    _refuse_foreign(directory)
    user_labels = _user_labels(directory, sha)
    merged = {**analysis.info, **(info or {})}
    with atomic_directory(directory) as scratch:
        (scratch / SAE_DIR).mkdir()
        for name in (CFG_FILE, WEIGHTS_FILE):
            shutil.copy2(sae_dir / name, scratch / SAE_DIR / name)
        header = _header(analysis, sae_dir, sae_cfg, sha, model_cfg, hook, merged)
        labels = _write_sqlite(scratch / DB_FILE, analysis, tokenizer, header, user_labels)
        if metrics is not None:
            (scratch / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
        _write_plots(scratch / PLOTS_DIR, analysis, labels)
        (scratch / INFO_FILE).write_text(json.dumps(header, indent=2, default=str))
        dictionary_report(scratch)
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _refuse_foreign(directory: Path) -> None:
    """Never replace a directory that is not a dictionary (a typo must not delete an SAE)."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) \
            and not (directory / INFO_FILE).is_file():
        raise DictionaryError(f"{directory} exists and is not a feature dictionary; refusing to replace "
                              "it: choose another output directory")


def _user_labels(directory: Path, sha: str) -> dict[int, str]:
    """Labels a user wrote in an existing dictionary of the same SAE weights ({} otherwise)."""
    try:
        with FeatureDictionary.open(directory, readonly=True) as old:
            if old.info.get("sae_sha256") != sha:
                return {}
            rows = old.con.execute("SELECT id, label FROM features WHERE label_source = 'user'")
            return {int(i): str(label) for i, label in rows}
    except (DictionaryError, sqlite3.Error):
        return {}


def _focus_slot(analysis: FeatureAnalysis, info: dict[str, Any]) -> int:
    """Context slot of the activating token: analyze.context_before, else the slot whose per-token
    activation equals the sample's activation most often."""
    analyze = info.get("analyze")
    if dataclasses.is_dataclass(analyze) and not isinstance(analyze, type):
        analyze = asdict(analyze)
    if isinstance(analyze, dict) and "context_before" in analyze:
        return int(analyze["context_before"])
    top = analysis.top
    matches = (top.activations == top.values.unsqueeze(-1)) & (top.rows >= 0).unsqueeze(-1)
    return int(matches.sum(dim=(0, 1)).argmax())


def _context_size(info: dict[str, Any]) -> int | None:
    """Tokens per store window (to give each context its window and position): from the info,
    else from the store it names, else unknown."""
    if info.get("context_size"):
        return int(info["context_size"])
    try:
        from saeworks.activations.store import ActivationStore

        return ActivationStore.open(str(info["store"])).context_size
    except (KeyError, TypeError, ValueError, OSError, RuntimeError):  # no store, or it is gone
        return None


def _header(analysis: FeatureAnalysis, sae_dir: Path, sae_cfg: dict[str, Any], sha: str,
            model_cfg: ModelConfig, hook: str, info: dict[str, Any]) -> dict[str, Any]:
    analyze = info.get("analyze")
    focus = _focus_slot(analysis, info)
    width = int(analysis.top.token_ids.shape[-1])
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "saeworks_version": package_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sae_name": sae_dir.resolve().name, "sae_sha256": sha,
        "architecture": sae_cfg.get("architecture"), "d_sae": analysis.d_sae, "d_in": int(sae_cfg["d_in"]),
        "hook": hook, "model": asdict(model_cfg), "n_tokens": int(analysis.n_tokens),
        "store": info.get("store"),
        "analyze": asdict(analyze) if dataclasses.is_dataclass(analyze) and not isinstance(analyze, type)
        else analyze,
        "context_size": _context_size(info), "prepend_bos": bool(info.get("prepend_bos", True)),
        "context_before": focus, "context_after": width - 1 - focus,
        "quantile_levels": [float(q) for q in analysis.quantile_levels],
        "histogram_bins": int(analysis.histogram.shape[1]),
        "band_edges": [float(e) for e in analysis.band_edges],
        "info": info,
    }


@dataclass
class _ContextRows:
    """The contexts of one kind, flattened to the rows of the contexts table."""

    records: list[tuple[Any, ...]]
    shown_rows: np.ndarray
    """[m] int64 store rows of every shown token, with `shown_tokens` their token ids."""
    shown_tokens: np.ndarray


def _context_rows(ctx: Contexts, kind: str, focus: int, context_size: int | None, per_band: int,
                  dtype: str) -> _ContextRows:
    rows, tokens = ctx.rows.numpy(), ctx.token_ids.numpy()
    acts = ctx.activations.numpy().astype(dtype)
    values = ctx.values.numpy()
    f_idx, n_idx = np.nonzero(rows >= 0)
    shown = tokens[f_idx, n_idx] >= 0  # [m, C]: slots inside the window, contiguous
    first = shown.argmax(axis=1)
    last = shown.shape[1] - 1 - shown[:, ::-1].argmax(axis=1)
    records = []
    for f, n, a, b in zip(f_idx.tolist(), n_idx.tolist(), first.tolist(), last.tolist(), strict=True):
        row = int(rows[f, n])
        window, position = (row // context_size, row % context_size) if context_size else (None, None)
        records.append((f, kind, n, n // per_band if kind == "band" else None, float(values[f, n]), row,
                        window, position, focus - a, b - a + 1, acts[f, n, a:b + 1].tobytes()))
    slot_rows = rows[f_idx, n_idx][:, None] - focus + np.arange(shown.shape[1])
    return _ContextRows(records, slot_rows[shown], tokens[f_idx, n_idx][shown].astype(np.int64))


def _token_texts(tokenizer: Any, ids: np.ndarray) -> dict[int, str]:
    unique = np.unique(ids[ids >= 0]).tolist()
    texts = tokenizer.batch_decode([[i] for i in unique], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return dict(zip(unique, texts, strict=True))


def _write_sqlite(path: Path, analysis: FeatureAnalysis, tokenizer: Any, header: dict[str, Any],
                  user_labels: dict[int, str]) -> dict[int, str]:
    """Fill features.sqlite in one transaction; returns every feature's label."""
    focus = int(header["context_before"])
    top_values = analysis.top.activations[analysis.top.rows >= 0]
    band_values = analysis.bands.activations[analysis.bands.rows >= 0]
    peak = max(float(top_values.abs().max()) if top_values.numel() else 0.0,
               float(band_values.abs().max()) if band_values.numel() else 0.0)
    dtype = "<f2" if peak < FLOAT16_LIMIT else "<f4"
    per_band = max(1, int(analysis.bands.rows.shape[1]) // max(1, len(analysis.band_edges) - 1))
    parts = [_context_rows(ctx, kind, focus, header["context_size"], per_band, dtype)
             for ctx, kind in ((analysis.top, "top"), (analysis.bands, "band"))]
    shown_rows = np.concatenate([p.shown_rows for p in parts])
    shown_tokens = np.concatenate([p.shown_tokens for p in parts])
    unique_rows, first = np.unique(shown_rows, return_index=True)
    row_tokens = shown_tokens[first]
    focus_ids = analysis.top.token_ids[:, :, focus].long().masked_fill(analysis.top.rows < 0, -1)
    texts = _token_texts(tokenizer, np.concatenate([
        row_tokens, analysis.logit_positive_ids.flatten().numpy(),
        analysis.logit_negative_ids.flatten().numpy(), focus_ids.flatten().numpy()]))
    features, fts, feature_tokens, labels = _feature_rows(analysis, focus_ids, texts, user_labels)
    con = sqlite3.connect(path)
    try:
        con.executescript("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;" + SCHEMA)
        with con:
            con.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("format_version", str(FORMAT_VERSION)), ("activation_dtype", np.dtype(dtype).name)])
            con.executemany(f"INSERT INTO features VALUES ({', '.join('?' * 13)})", features)
            con.executemany("INSERT INTO features_fts (rowid, label, tokens) VALUES (?, ?, ?)", fts)
            for part in parts:
                con.executemany(f"INSERT INTO contexts VALUES ({', '.join('?' * 11)})", part.records)
            con.executemany("INSERT INTO row_tokens VALUES (?, ?)",
                            zip(unique_rows.tolist(), row_tokens.tolist(), strict=True))
            con.executemany("INSERT INTO tokens VALUES (?, ?)", texts.items())
            con.executemany("INSERT INTO feature_tokens VALUES (?, ?, ?, ?)", feature_tokens)
            con.executescript(INDEXES)
        con.execute("PRAGMA journal_mode = DELETE")
    finally:
        con.close()
    return labels


def _f32_json(values: torch.Tensor) -> list[list[str]]:
    """[rows][cols] JSON numbers: the shortest decimals that read back as the same float32
    (keeps the file small and the values readable: 0.1, not 0.10000000149011612)."""
    text = values.float().numpy().astype(str)
    bad = ~np.isfinite(values.float().numpy())
    text[bad] = [json.dumps(float(v)) for v in values.float().numpy()[bad]]
    return text.tolist()


def _pairs(keys: list[str], numbers: list[str]) -> str:
    """JSON [[key, number], ...] from already-encoded JSON keys and numbers."""
    return "[" + ", ".join(f"[{k}, {n}]" for k, n in zip(keys, numbers, strict=True)) + "]"


def _logit_rows(ids: torch.Tensor, values: torch.Tensor, texts: dict[int, str]) -> list[str]:
    """Per feature, JSON [[token, logit effect], ...] (ids < 0 left out)."""
    numbers, id_rows = _f32_json(values), ids.tolist()
    encoded = {i: json.dumps(t) for i, t in texts.items()}
    return [_pairs([encoded[i] for i in row if i >= 0], [n for i, n in zip(row, nums, strict=True) if i >= 0])
            for row, nums in zip(id_rows, numbers, strict=True)]


def _feature_rows(analysis: FeatureAnalysis, focus_ids: torch.Tensor, texts: dict[int, str],
                  user_labels: dict[int, str]
                  ) -> tuple[list[tuple], list[tuple], list[tuple], dict[int, str]]:
    """Rows of features, features_fts and feature_tokens, and the label of every feature."""
    density, mean = analysis.density.tolist(), analysis.mean_active.tolist()
    count, peak = analysis.count.tolist(), analysis.max.tolist()
    levels = [json.dumps(float(q)) for q in analysis.quantile_levels]
    quantiles, histogram = _f32_json(analysis.quantiles), analysis.histogram.tolist()
    positive = _logit_rows(analysis.logit_positive_ids, analysis.logit_positive_values, texts)
    negative = _logit_rows(analysis.logit_negative_ids, analysis.logit_negative_values, texts)
    near_ids, near_cos = analysis.neighbour_ids.tolist(), _f32_json(analysis.neighbour_cosines)
    top_values = analysis.top.values.tolist()
    features: list[tuple] = []
    fts: list[tuple] = []
    feature_tokens: list[tuple] = []
    labels: dict[int, str] = {}
    for f, ids in enumerate(focus_ids.tolist()):
        counter = Counter(i for i in ids if i >= 0)
        best: dict[int, float] = {}
        for i, value in zip(ids, top_values[f], strict=True):
            if i >= 0:
                best.setdefault(i, value)
        feature_tokens.extend((i, f, c, best[i]) for i, c in counter.items())
        top_tokens = [(texts[i], c) for i, c in counter.most_common(TOP_TOKENS)]
        promoted = [texts[i] for i in analysis.logit_positive_ids[f].tolist() if i >= 0]
        auto = auto_label([t for t, _ in top_tokens], promoted, dead=count[f] == 0)
        label, source = (user_labels[f], "user") if f in user_labels else (auto, "auto")
        labels[f] = label
        neighbours = _pairs([str(i) for i in near_ids[f] if i >= 0],
                            [c for i, c in zip(near_ids[f], near_cos[f], strict=True) if i >= 0])
        features.append((f, density[f], count[f], mean[f], peak[f], _pairs(levels, quantiles[f]),
                         json.dumps(histogram[f]), label, source, json.dumps(top_tokens), positive[f],
                         negative[f], neighbours))
        fts.append((f, label, TOKEN_SEPARATOR.join(t for t, _ in top_tokens)))
    return features, fts, feature_tokens, labels


def _write_plots(directory: Path, analysis: FeatureAnalysis, labels: dict[int, str]) -> None:
    from saeworks.eval import plots

    plots.density_histogram(analysis.density, directory / plots.DENSITY_PLOT)
    plots.activation_histograms(analysis, spread_ids(analysis.density), directory / plots.ACTIVATIONS_PLOT,
                                labels)


def spread_ids(density: torch.Tensor, n: int = 8) -> list[int]:
    """`n` alive features evenly spread over the density ranks, densest first (for small multiples)."""
    order = [i for i in torch.argsort(density, descending=True).tolist() if density[i] > 0]
    if len(order) <= n:
        return order
    return [order[round(j * (len(order) - 1) / (n - 1))] for j in range(n)]
