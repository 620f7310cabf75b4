"""The feature dictionary: one SAE's features, analysed over a store, in a directory you can query.

    <dictionary>/
      dictionary.json   format version, saeworks version, SAE name and weights hash, d_sae, d_in,
                        hook, model config, tokens analysed, store, analyze settings, created time
      sae/              the SAE (cfg.json, sae_weights.safetensors), so the dictionary stands alone
      features.sqlite   every feature (schema below)
      metrics.json      the SAE's evaluation, {"metrics": {...}, "info": {...}} (when it was given)
      plots/            density_histogram.png, activation_histograms.png
      report.md         headline metrics, the plots, the most frequent features with a context

This module reads a dictionary (FeatureDictionary) and holds the format: the layout, this schema,
FORMAT_VERSION, the file names and SCHEMA. eval/dictionary_build.py writes one (write_dictionary):
in a hidden temporary sibling renamed into place, so a killed build never leaves a directory that
opens as a dictionary. Rebuilding an SAE's dictionary (same weights hash) keeps the labels a user
wrote.

features.sqlite (JSON columns are text; BLOBs are little-endian arrays):

    meta(key TEXT PRIMARY KEY, value TEXT)      format_version, activation_dtype (float16|float32)
    features(id INTEGER PRIMARY KEY,            latent index, 0..d_sae-1
             density REAL,                      fraction of analysed tokens where it is active
             count INTEGER,                     analysed tokens where it is active (0: dead)
             mean_activation REAL,              mean over the tokens where it is active
             max_activation REAL,
             quantiles TEXT,                    JSON [[level, value], ...] of its non-zero activations
             histogram TEXT,                    JSON [count, ...]: bin i of n covers
                                                (i/n, (i+1)/n] * max_activation
             label TEXT, label_source TEXT,     'auto' (eval/labels.py) or 'user' (set_label)
             top_tokens TEXT,                   JSON [[token, count], ...]: its activating tokens in
                                                the top contexts, most frequent first
             logit_positive TEXT,               JSON [[token, logit effect], ...], strongest first
             logit_negative TEXT,               JSON [[token, logit effect], ...], most negative first
             neighbours TEXT)                   JSON [[feature id, decoder cosine], ...]
    contexts(feature_id INTEGER, kind TEXT,     'top' (top-N by activation) or 'band' (samples)
             rank INTEGER,                      slot within its kind: top by activation descending;
                                                band samples band by band
             band INTEGER,                      band index, 0 the highest (NULL for 'top')
             activation REAL,                   the activation on the activating token
             row INTEGER,                       store row of the activating token
             window INTEGER, position INTEGER,  its window and position (NULL if unknown)
             focus INTEGER, length INTEGER,     the context shows store rows row-focus ..
                                                row-focus+length-1; the activating token is at focus
             activations BLOB,                  the feature's activation on each shown token
                                                (meta.activation_dtype)
             PRIMARY KEY (feature_id, kind, rank))
    row_tokens(row INTEGER PRIMARY KEY, token_id INTEGER)   the token of every store row shown in a
                                                context, stored once (contexts overlap heavily)
    tokens(id INTEGER PRIMARY KEY, text TEXT)   decoded text of every token id used; index on text
    feature_tokens(token_id, feature_id, count, max_activation, PRIMARY KEY (token_id, feature_id))
                                                how often a token is the activating token of a
                                                feature's top contexts: lookup by token
    features_fts USING fts5(label, tokens)      rowid = feature id; tokens = its top tokens joined
                                                by U+001F; index features_label on features(label)

A context's tokens in SQL: `SELECT t.text FROM row_tokens r JOIN tokens t ON t.id = r.token_id
WHERE r.row BETWEEN c.row - c.focus AND c.row - c.focus + c.length - 1 ORDER BY r.row`.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import torch

from saeworks.activations.config import ModelConfig
from saeworks.eval.labels import auto_label
from saeworks.sae.errors import SaeworksError
from saeworks.sae.io import CFG_FILE
from saeworks.sae.version import package_version

FORMAT_VERSION = 1
FORMAT_NAME = "saeworks-feature-dictionary"
INFO_FILE = "dictionary.json"
DB_FILE = "features.sqlite"
METRICS_FILE = "metrics.json"
SAE_DIR = "sae"
PLOTS_DIR = "plots"
REPORT_FILE = "report.md"
TOKEN_SEPARATOR = "\x1f"
BUILD_HINT = "`saeworks analyze SAE_DIR` builds one"
HTML_CONTEXTS = 10
"""Top contexts a Feature shows in a notebook (_repr_html_)."""

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (
    id INTEGER PRIMARY KEY, density REAL NOT NULL, count INTEGER NOT NULL,
    mean_activation REAL NOT NULL, max_activation REAL NOT NULL, quantiles TEXT NOT NULL,
    histogram TEXT NOT NULL, label TEXT NOT NULL,
    label_source TEXT NOT NULL CHECK (label_source IN ('auto', 'user')),
    top_tokens TEXT NOT NULL, logit_positive TEXT NOT NULL, logit_negative TEXT NOT NULL,
    neighbours TEXT NOT NULL);
CREATE TABLE contexts (
    feature_id INTEGER NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('top', 'band')),
    rank INTEGER NOT NULL, band INTEGER, activation REAL NOT NULL, row INTEGER NOT NULL,
    window INTEGER, position INTEGER, focus INTEGER NOT NULL, length INTEGER NOT NULL,
    activations BLOB NOT NULL, PRIMARY KEY (feature_id, kind, rank)) WITHOUT ROWID;
CREATE TABLE row_tokens (row INTEGER PRIMARY KEY, token_id INTEGER NOT NULL);
CREATE TABLE tokens (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE feature_tokens (
    token_id INTEGER NOT NULL, feature_id INTEGER NOT NULL, count INTEGER NOT NULL,
    max_activation REAL NOT NULL, PRIMARY KEY (token_id, feature_id)) WITHOUT ROWID;
CREATE VIRTUAL TABLE features_fts USING fts5(label, tokens);
"""
INDEXES = """
CREATE INDEX tokens_text ON tokens(text);
CREATE INDEX features_label ON features(label);
"""
TABLES = ("meta", "features", "contexts", "row_tokens", "tokens", "feature_tokens", "features_fts")


class DictionaryError(SaeworksError, RuntimeError):
    """A directory that is not a readable feature dictionary, or a request it cannot answer."""


class FeatureNotFoundError(DictionaryError, IndexError):
    """A feature id outside 0..d_sae-1."""


class SearchSyntaxError(DictionaryError, ValueError):
    """A full-text query that SQLite's FTS5 cannot parse."""


def words_query(query: str) -> str:
    """An FTS5 expression matching every word of `query` as a prefix (empty: no words)."""
    return " ".join('"' + w.replace('"', '""') + '"*' for w in re.findall(r"\w+", query))


@dataclass(frozen=True)
class Context:
    """One sampled activation of a feature with the tokens around it (within its window)."""

    kind: str
    """'top' (top-N by activation) or 'band' (a uniform sample from an activation band)."""
    rank: int
    band: int | None
    activation: float
    row: int
    """Store row of the activating token."""
    window: int | None
    position: int | None
    focus: int
    """Index of the activating token in `tokens`."""
    token_ids: list[int]
    tokens: list[str]
    activations: list[float]
    """The feature's activation on each token (float16 precision in most dictionaries)."""

    def text(self, mark: tuple[str, str] = ("«", "»")) -> str:
        """The context as text with the activating token between `mark`s."""
        left, right = mark
        return "".join(f"{left}{t}{right}" if i == self.focus else t for i, t in enumerate(self.tokens))


@dataclass(frozen=True)
class FeatureSummary:
    """A feature in a list of results: enough to choose which one to open."""

    id: int
    label: str
    label_source: str
    density: float
    max_activation: float
    top_tokens: list[tuple[str, int]]


@dataclass(frozen=True)
class Feature:
    """Everything the dictionary knows about one feature."""

    id: int
    density: float
    count: int
    mean_activation: float
    max_activation: float
    quantiles: list[tuple[float, float]]
    """(level, value) of its non-zero activations."""
    histogram: list[int]
    label: str
    label_source: str
    top_tokens: list[tuple[str, int]]
    logit_positive: list[tuple[str, float]]
    logit_negative: list[tuple[str, float]]
    neighbours: list[tuple[int, float]]
    contexts: list[Context]
    """Top contexts (by activation, descending), then band samples (highest band first)."""

    @property
    def dead(self) -> bool:
        return self.count == 0

    @property
    def histogram_edges(self) -> list[float]:
        """Bin edges of `histogram`: equal bins over (0, max_activation]."""
        bins = len(self.histogram)
        return [self.max_activation * i / bins for i in range(bins + 1)]

    @property
    def top_contexts(self) -> list[Context]:
        return [c for c in self.contexts if c.kind == "top"]

    @property
    def band_contexts(self) -> list[Context]:
        return [c for c in self.contexts if c.kind == "band"]

    def __repr__(self) -> str:
        """One line: what a notebook prints for a feature (the dataclass repr lists every context)."""
        return (f"Feature(id={self.id}, label={self.label!r}, density={self.density:.3g}, "
                f"max_activation={self.max_activation:.4g})")

    def _repr_html_(self) -> str:
        """The feature in a notebook: label, headline numbers and its top contexts, each token
        shaded by this feature's activation on it (alpha = activation / max_activation)."""
        head = (f"<b>Feature {self.id}</b> <code>{html.escape(self.label)}</code> "
                f"<small>({self.label_source})</small><br><small>density {self.density:.3g} · "
                f"active on {self.count:,} tokens · mean {self.mean_activation:.4g} · "
                f"max {self.max_activation:.4g}</small>")
        rows = "".join(f"<li>{_context_html(c, self.max_activation)}</li>"
                       for c in self.top_contexts[:HTML_CONTEXTS])
        body = f"<ol style='margin: 4px 0'>{rows}</ol>" if rows else "<br><i>no contexts</i>"
        return f"<div class='saeworks-feature'>{head}{body}</div>"


def _context_html(context: Context, peak: float) -> str:
    """A context's tokens as spans shaded by activation / `peak`; the activating token is bold and
    outlined (class 'focus'). Text is HTML-escaped and its whitespace kept (pre-wrap)."""
    spans = []
    for i, (token, value) in enumerate(zip(context.tokens, context.activations, strict=True)):
        alpha = min(max(value / peak, 0.0), 1.0) if peak > 0 else 0.0
        style = f"background-color: rgba(255, 128, 0, {alpha:.3f})"
        mark = ""
        if i == context.focus:
            style, mark = f"{style}; font-weight: bold; outline: 1px solid #b35900", " class='focus'"
        spans.append(f"<span{mark} style='{style}' title='{value:.4g}'>{html.escape(token)}</span>")
    return (f"<span style='white-space: pre-wrap; font-family: monospace'>{''.join(spans)}</span> "
            f"<small>({context.activation:.4g})</small>")


@dataclass(frozen=True)
class TokenFeature:
    """A feature that a token activates: how often it is the activating token of its top contexts."""

    feature: FeatureSummary
    count: int
    max_activation: float


@dataclass(frozen=True)
class FeatureActivation:
    id: int
    activation: float
    label: str


@dataclass(frozen=True)
class TokenActivations:
    """One token of a text and the features most active on it."""

    position: int
    """Position in the model's input (BOS, when prepended, is position 0 and not reported)."""
    token_id: int
    token: str
    features: list[FeatureActivation]


@dataclass(frozen=True)
class TextEncoding:
    """A text as the model read it and the SAE's activations on each of its tokens."""

    token_ids: list[int]
    tokens: list[str]
    """Each token decoded on its own (special tokens kept)."""
    special: list[bool]
    """Whether each token is a special token (BOS, EOS, padding): not text the user wrote."""
    activations: torch.Tensor
    """[n_tokens, d_sae] float32 on the CPU."""


SUMMARY_COLUMNS = "id, label, label_source, density, max_activation, top_tokens"
FEATURE_COLUMNS = ("id, density, count, mean_activation, max_activation, quantiles, histogram, label, "
                   "label_source, top_tokens, logit_positive, logit_negative, neighbours")
ORDERINGS = ("density", "max_activation", "count", "mean_activation")


def _summary(row: tuple) -> FeatureSummary:
    i, label, source, density, peak, top = row
    return FeatureSummary(int(i), label, source, float(density), float(peak),
                          [(t, int(c)) for t, c in json.loads(top)])


class FeatureDictionary:
    """An open feature dictionary: look features up by id, token or text, label them, and read
    which features fire on new text (the model and the SAE load on first use)."""

    def __init__(self, path: Path, con: sqlite3.Connection, info: dict[str, Any], readonly: bool,
                 device: str, dtype: str | None = None) -> None:
        self.path, self.con, self.info, self.readonly, self.device = path, con, info, readonly, device
        self.dtype = dtype
        """The model's dtype when it is loaded (None: the dtype the store was harvested in)."""
        self.activation_dtype = dict(con.execute("SELECT key, value FROM meta"))["activation_dtype"]
        self._runtime: tuple[Any, Any, Any] | None = None
        self._texts: dict[int, str] | None = None

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False, device: str = "cpu",
             dtype: str | None = None) -> FeatureDictionary:
        """Open a dictionary directory, or raise a DictionaryError saying what is wrong with it.
        `device` and `dtype` are where and how the model runs when text is read or steered (dtype
        None: as the store was harvested)."""
        path = Path(path)
        if not path.is_dir():
            raise DictionaryError(f"no feature dictionary at {str(path)!r}: no such directory; {BUILD_HINT}")
        missing = [name for name in (INFO_FILE, DB_FILE) if not (path / name).is_file()]
        if missing:
            what = " (it looks like an SAE directory)" if (path / CFG_FILE).is_file() else ""
            raise DictionaryError(f"{str(path)!r} is not a feature dictionary{what}: it lacks "
                                  f"{' and '.join(missing)}; {BUILD_HINT}")
        info = _read_info(path / INFO_FILE)
        con = _connect(path / DB_FILE, readonly, int(info["d_sae"]))
        return cls(path, con, info, readonly, device, dtype)

    def __len__(self) -> int:
        return int(self.info["d_sae"])

    def __repr__(self) -> str:
        """One line from dictionary.json (no database query, so it works on a closed dictionary)."""
        return (f"FeatureDictionary({str(self.path)!r}, sae={self.info.get('sae_name')!r}, "
                f"hook={self.info.get('hook')!r}, features={len(self)}, "
                f"tokens={int(self.info.get('n_tokens', 0)):,})")

    def __enter__(self) -> FeatureDictionary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    @property
    def metrics(self) -> dict[str, Any] | None:
        """The SAE's metrics.json ({"metrics": {...}, "info": {...}}), or None if not evaluated."""
        path = self.path / METRICS_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def _query(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        try:
            return self.con.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as err:
            raise DictionaryError(f"{self.path / DB_FILE} cannot be read ({err}); rebuild it: "
                                  f"{BUILD_HINT}") from err

    def _check_id(self, i: int) -> int:
        if not 0 <= int(i) < len(self):
            raise FeatureNotFoundError(f"feature {i} does not exist: this dictionary has {len(self)} "
                                       f"features, ids 0 to {len(self) - 1}")
        return int(i)

    def feature(self, i: int) -> Feature:
        """Feature `i` with its contexts decoded to tokens."""
        (row,) = self._query(f"SELECT {FEATURE_COLUMNS} FROM features WHERE id = ?", (self._check_id(i),))
        fid, density, count, mean, peak, quantiles, histogram, label, source, top, pos, neg, near = row
        return Feature(fid, density, count, mean, peak,
                       [(float(q), float(v)) for q, v in json.loads(quantiles)], json.loads(histogram),
                       label, source, [(t, int(c)) for t, c in json.loads(top)],
                       [(t, float(v)) for t, v in json.loads(pos)],
                       [(t, float(v)) for t, v in json.loads(neg)],
                       [(int(j), float(c)) for j, c in json.loads(near)], self._contexts(fid))

    def _contexts(self, i: int) -> list[Context]:
        """Feature `i`'s contexts: two queries (the contexts, then every shown token of all of
        them in one join), token texts from the in-memory table."""
        rows = self._query("SELECT kind, rank, band, activation, row, window, position, focus, length, "
                           "activations FROM contexts WHERE feature_id = ? ORDER BY kind DESC, rank", (i,))
        shown: dict[tuple[str, int], list[int]] = {(kind, rank): [] for kind, rank, *_ in rows}
        for kind, rank, token in self._query(
                "SELECT c.kind, c.rank, r.token_id FROM contexts c JOIN row_tokens r ON r.row BETWEEN "
                "c.row - c.focus AND c.row - c.focus + c.length - 1 WHERE c.feature_id = ? "
                "ORDER BY c.kind DESC, c.rank, r.row", (i,)):
            shown[(kind, rank)].append(token)
        texts = self._token_texts()
        dtype = np.dtype(self.activation_dtype).newbyteorder("<")
        contexts = []
        for kind, rank, band, activation, row, window, position, focus, _, blob in rows:
            ids = shown[(kind, rank)]
            values = np.frombuffer(blob, dtype=dtype).astype(np.float64).tolist()
            contexts.append(Context(kind, rank, band, activation, row, window, position, focus, ids,
                                    [texts[t] for t in ids], values))
        return contexts

    def _token_texts(self) -> dict[int, str]:
        """The tokens table (every token id a context shows, decoded), read once per handle."""
        if self._texts is None:
            self._texts = {int(i): text for i, text in self._query("SELECT id, text FROM tokens")}
        return self._texts

    def summaries(self, ids: list[int]) -> list[FeatureSummary]:
        """Summaries of `ids`, in that order."""
        found = {s.id: s for s in map(_summary, self._query(
            f"SELECT {SUMMARY_COLUMNS} FROM features WHERE id IN ({', '.join('?' * len(ids))})", ids))}
        return [found[i] for i in ids if i in found]

    def top_features(self, n: int = 10, by: str = "density") -> list[FeatureSummary]:
        """The `n` alive features with the highest `by` (density, max_activation, count, mean_activation)."""
        if by not in ORDERINGS:
            raise DictionaryError(f"cannot order features by {by!r}; choose one of {', '.join(ORDERINGS)}")
        return [_summary(r) for r in self._query(
            f"SELECT {SUMMARY_COLUMNS} FROM features WHERE count > 0 ORDER BY {by} DESC, id LIMIT ?", (n,))]

    def search(self, query: str, limit: int = 20) -> list[FeatureSummary]:
        """Features whose label or top tokens match `query`: full-text words first (best match
        first), then plain substring matches (for tokens with spaces or punctuation)."""
        return self.summaries(self.search_ids(query, limit))

    def search_ids(self, query: str, limit: int = 20, *, syntax: str = "words") -> list[int]:
        """Ids of the features whose label or top tokens match `query`, best first.

        syntax "words": every word of the query, each as a prefix (`cat` finds `cats`), best
        match first, then plain substring matches (tokens with spaces or punctuation); "fts": the
        query is an SQLite FTS5 expression (`cat OR dog`, `"new york"`, `label: cat*`), and one
        that does not parse raises SearchSyntaxError."""
        if syntax == "fts":
            return [int(r[0]) for r in self._fts("features_fts", query, limit)]
        if syntax != "words":
            raise DictionaryError(f"unknown search syntax {syntax!r}; choose 'words' or 'fts'")
        words = words_query(query)
        ids = [int(r[0]) for r in self._fts("features_fts", words, limit)] if words else []
        if len(ids) < limit and query:
            pattern = "%" + re.sub(r"([\\%_])", r"\\\1", query) + "%"
            seen = set(ids)
            for (i,) in self._query("SELECT rowid FROM features_fts WHERE label LIKE ?1 ESCAPE '\\' "
                                    "OR tokens LIKE ?1 ESCAPE '\\' ORDER BY rowid", (pattern,)):
                if len(ids) >= limit:
                    break
                if int(i) not in seen:
                    ids.append(int(i))
                    seen.add(int(i))
        return ids

    def _fts(self, table: str, expression: str, limit: int) -> list[tuple]:
        try:
            return self.con.execute(f"SELECT rowid FROM {table} WHERE {table} MATCH ? ORDER BY rank LIMIT ?",
                                    (expression, limit)).fetchall()
        except sqlite3.OperationalError as err:
            if any(word in str(err) for word in ("locked", "I/O", "malformed", "no such table")):
                raise DictionaryError(f"{self.path / DB_FILE} cannot be searched ({err})") from err
            raise SearchSyntaxError(f"cannot read the full-text query {expression!r}: {err} (FTS5 "
                                    "syntax: words, \"a phrase\", prefix*, AND/OR/NOT, NEAR(a b), "
                                    "column: term)") from err

    def context_texts(self, kind: str = "top") -> Iterator[tuple[int, str]]:
        """(feature id, the text of its `kind` contexts, one per line) for every feature with one."""
        yield from self.con.execute(
            "SELECT feature_id, group_concat(text, char(10)) FROM (SELECT c.feature_id, (SELECT "
            "group_concat(t.text, '') FROM row_tokens r JOIN tokens t ON t.id = r.token_id WHERE r.row "
            "BETWEEN c.row - c.focus AND c.row - c.focus + c.length - 1) AS text FROM contexts c "
            "WHERE c.kind = ? ORDER BY c.feature_id, c.rank) GROUP BY feature_id", (kind,))

    def token_ids(self, token: str | int) -> list[int]:
        """Ids of a token given as an id or as text (exact text first, else ignoring case and
        surrounding whitespace)."""
        if isinstance(token, int):
            return [token]
        exact = self._query("SELECT id FROM tokens WHERE text = ?", (token,))
        if not exact and token.strip():
            exact = self._query("SELECT id FROM tokens WHERE lower(trim(text)) = lower(?)", (token.strip(),))
        return [int(r[0]) for r in exact]

    def features_for_token(self, token: str | int, limit: int = 20) -> list[TokenFeature]:
        """Features whose top contexts activate on `token`, most often first."""
        ids = self.token_ids(token)
        if not ids:
            return []
        rows = self._query(
            "SELECT feature_id, sum(count) AS n, max(max_activation) AS m FROM feature_tokens "
            f"WHERE token_id IN ({', '.join('?' * len(ids))}) GROUP BY feature_id "
            "ORDER BY n DESC, m DESC LIMIT ?", [*ids, limit])
        summaries = {s.id: s for s in self.summaries([int(r[0]) for r in rows])}
        return [TokenFeature(summaries[int(f)], int(n), float(m)) for f, n, m in rows]

    def set_label(self, i: int, text: str | None) -> None:
        """Give feature `i` a user label (kept by rebuilds and relabelling); None or "" restores
        its automatic label."""
        i = self._check_id(i)
        if self.readonly:
            raise DictionaryError(f"{self.path} was opened read-only; open it with readonly=False to label")
        text = (text or "").strip()
        label, source = (text, "user") if text else (self._auto_label(i), "auto")
        with self.con:
            self.con.execute("UPDATE features SET label = ?, label_source = ? WHERE id = ?",
                             (label, source, i))
            self.con.execute("UPDATE features_fts SET label = ? WHERE rowid = ?", (label, i))

    def _auto_label(self, i: int) -> str:
        (row,) = self._query("SELECT count, top_tokens, logit_positive FROM features WHERE id = ?", (i,))
        return auto_label([t for t, _ in json.loads(row[1])], [t for t, _ in json.loads(row[2])],
                          dead=row[0] == 0)

    def relabel(self) -> int:
        """Recompute every automatic label (user labels stay); returns how many changed."""
        changed = []
        for i, old in self._query("SELECT id, label FROM features WHERE label_source = 'auto'"):
            new = self._auto_label(int(i))
            if new != old:
                changed.append((new, int(i)))
        with self.con:
            self.con.executemany("UPDATE features SET label = ? WHERE id = ?", changed)
            self.con.executemany("UPDATE features_fts SET label = ? WHERE rowid = ?", changed)
        return len(changed)

    def counts(self, dense_threshold: float = 0.1) -> dict[str, int]:
        """Features alive (active at least once), dead, and dense (density > `dense_threshold`)."""
        ((alive, dense),) = self._query("SELECT count(*) FILTER (WHERE count > 0), count(*) "
                                        "FILTER (WHERE density > ?) FROM features", (dense_threshold,))
        return {"alive": int(alive), "dead": len(self) - int(alive), "dense": int(dense)}

    def statistics(self) -> dict[str, np.ndarray]:
        """Per-feature arrays [d_sae] (float64) of density, mean_activation (over the tokens where
        it is active) and max_activation, indexed by feature id."""
        rows = np.array(self._query("SELECT density, mean_activation, max_activation FROM features "
                                    "ORDER BY id"), dtype=np.float64).reshape(-1, 3)
        return {"density": rows[:, 0], "mean_activation": rows[:, 1], "max_activation": rows[:, 2]}

    def labels(self, ids: list[int]) -> dict[int, str]:
        return {s.id: s.label for s in self.summaries(ids)}

    def encode_text(self, text: str) -> TextEncoding:
        """`text` as the model reads it for this dictionary and the SAE's activations on every
        token: tokenised as the harvester did (BOS first when it prepended one), run through the
        model up to the hook, encoded by the SAE."""
        from saeworks.activations.hooks import capture_activations
        from saeworks.activations.text import separator_ids

        model, tokenizer, sae = self._load_runtime()
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.info.get("prepend_bos", True):
            ids.insert(0, separator_ids(tokenizer)[0])
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and len(ids) > limit:
            raise DictionaryError(f"the text is {len(ids)} tokens; the model reads at most {limit}")
        texts = tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        special = [t in special_ids for t in ids]
        if not ids:
            return TextEncoding([], [], [], torch.zeros(0, len(self)))
        hook = str(self.info["hook"])
        x = capture_activations(model, torch.tensor([ids], device=self.device), [hook])[hook][0]
        with torch.no_grad():
            activations = sae.encode(x.float()).float().cpu()  # [T, d_sae]
        return TextEncoding(ids, texts, special, activations)

    def features_on(self, text: str, top: int = 5) -> list[TokenActivations]:
        """Per token of `text`: its `top` most active features. The text is tokenised as the
        harvester did (BOS first), run through the model up to the hook, and encoded by the SAE.
        The analysis skipped the first positions of every window (attention sinks); their
        features here can be outliers."""
        encoded = self.encode_text(text)
        first = 1 if self.info.get("prepend_bos", True) else 0
        if len(encoded.token_ids) <= first:
            return []
        best = encoded.activations.topk(min(top, len(self)), dim=-1)
        values, latents = best.values.tolist(), best.indices.tolist()
        labels = self.labels(sorted({j for row in latents for j in row}))
        return [TokenActivations(p, encoded.token_ids[p], encoded.tokens[p],
                                 [FeatureActivation(j, v, labels.get(j, ""))
                                  for v, j in zip(values[p], latents[p], strict=True) if v > 0])
                for p in range(first, len(encoded.token_ids))]

    def model_config(self) -> ModelConfig:
        """The config that loads the model this dictionary's store was harvested from, on this
        dictionary's device, in its dtype (default: as harvested)."""
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        recorded = {k: v for k, v in self.info["model"].items() if k in known}
        dtype = self.dtype or recorded.get("dtype", "auto")
        return ModelConfig(**{**recorded, "device": self.device, "dtype": dtype})

    def _load_runtime(self) -> tuple[Any, Any, Any]:
        """The model, tokenizer and SAE, loaded once."""
        if self._runtime is None:
            from saeworks.activations.model import load_model, load_tokenizer
            from saeworks.sae.io import load_sae

            model_cfg = self.model_config()
            self._runtime = (load_model(model_cfg, self.device), load_tokenizer(model_cfg),
                             load_sae(self.path / SAE_DIR, self.device))
        return self._runtime


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DictionaryError(f"{path} is not valid JSON ({err}); {BUILD_HINT}") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise DictionaryError(f"{path} is not a feature dictionary's {INFO_FILE}; {BUILD_HINT}")
    if info.get("format_version") != FORMAT_VERSION:
        raise DictionaryError(f"{path.parent} has dictionary format version {info.get('format_version')}; "
                              f"this saeworks ({package_version()}) reads version {FORMAT_VERSION}: "
                              f"rebuild it, {BUILD_HINT}")
    return info


def _connect(db: Path, readonly: bool, d_sae: int) -> sqlite3.Connection:
    """Open features.sqlite and check it is whole: its tables, format version and feature count."""
    con = sqlite3.connect(f"file:{quote(str(db.resolve()))}?mode={'ro' if readonly else 'rw'}", uri=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in TABLES if t not in tables]
        if missing:
            raise DictionaryError(f"{db} lacks the tables {', '.join(missing)}")
        meta = dict(con.execute("SELECT key, value FROM meta"))
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise DictionaryError(f"{db} has format version {meta.get('format_version')}, expected "
                                  f"{FORMAT_VERSION}")
        (count,) = con.execute("SELECT count(*) FROM features").fetchone()
        if count != d_sae:
            raise DictionaryError(f"{db} holds {count} features, dictionary.json says {d_sae}")
        con.execute("SELECT count(*) FROM contexts").fetchone()
    except sqlite3.DatabaseError as err:
        con.close()
        raise DictionaryError(f"{db} is not a readable SQLite database ({err}); {BUILD_HINT}") from err
    except DictionaryError as err:
        con.close()
        raise DictionaryError(f"{err}; {BUILD_HINT}") from err
    return con


def dictionary_summary(directory: str | Path, top: int = 10, by: str = "density") -> list[str]:
    """Lines to print after `saeworks analyze`: feature counts and the `top` features by `by`."""
    with FeatureDictionary.open(directory, readonly=True) as d:
        counts = d.counts()
        lines = [f"{len(d)} features of {d.info['sae_name']} at {d.info['hook']} over "
                 f"{d.info['n_tokens']:,} tokens: {counts['alive']} alive, {counts['dead']} dead, "
                 f"{counts['dense']} dense (>10% of tokens)",
                 f"top {top} by {by}:"]
        for s in d.top_features(top, by):
            lines.append(f"  #{s.id:<6} density {s.density:.2e}  max {s.max_activation:7.2f}  {s.label}")
    return lines
