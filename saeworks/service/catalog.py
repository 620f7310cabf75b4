"""The dictionaries a service serves: names, per-thread database handles, the shared model, and
the full-text index of every feature's context text.

SQLite connections belong to the thread that opened them, and the server answers from a pool of
threads, so each thread opens its own read handle of each dictionary (cheap: a file open and
three integrity counts). The model, tokenizer and SAE are loaded once per dictionary, on first
use, inside that model's gate (gate.py), and shared by every handle.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saeworks.eval.dictionary import FeatureDictionary, SearchSyntaxError, words_query
from saeworks.service import records
from saeworks.service.cache import RecordCache, encode_record, warm
from saeworks.service.gate import ModelGate
from saeworks.steer.interventions import FeatureSource

log = logging.getLogger(__name__)

RESERVED_NAMES = frozenset({"api", "static", "static-offline-docs", "docs", "redoc", "openapi.json",
                            "favicon.ico"})
"""First path segments the service uses itself: a dictionary never gets one of these names."""
SEARCHES_KEPT = 256
"""Search results kept per dictionary (all their ids), for paging through them."""


def served_names(paths: Sequence[Path]) -> list[str]:
    """A URL-safe, unique name per dictionary: its directory name (`-2`, `-3`... on a clash)."""
    names: list[str] = []
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().name).strip("-.") or "dictionary"
        name, n = base, 1
        while name in names or name in RESERVED_NAMES:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


class ContextIndex:
    """An in-memory FTS5 index of every feature's top-context text, built in a background thread
    when the service starts (a few seconds for ten thousand features); until it is ready, search
    covers labels and top tokens only."""

    def __init__(self, dictionary_path: Path) -> None:
        self.path = dictionary_path
        self.ready = threading.Event()
        self.error: str | None = None
        self.seconds: float | None = None
        self._lock = threading.Lock()
        self._con = sqlite3.connect(":memory:", check_same_thread=False)
        self._thread = threading.Thread(target=self._build, name=f"context-index:{dictionary_path.name}",
                                        daemon=True)

    def start(self) -> ContextIndex:
        self._thread.start()
        return self

    def _build(self) -> None:
        started = time.perf_counter()
        try:
            with FeatureDictionary.open(self.path, readonly=True) as d, self._lock:
                self._con.execute("CREATE VIRTUAL TABLE contexts_fts USING fts5(text, content='', "
                                  "columnsize=0)")
                with self._con:
                    self._con.executemany("INSERT INTO contexts_fts(rowid, text) VALUES (?, ?)",
                                          d.context_texts("top"))
            self.seconds = time.perf_counter() - started
            log.info("indexed the context text of %s in %.1f s", self.path, self.seconds)
        except Exception as err:  # the service still serves everything else; search says why
            self.error = f"{type(err).__name__}: {err}"
            log.warning("could not index the context text of %s: %s", self.path, self.error)
        finally:
            self.ready.set()

    def search(self, expression: str, limit: int) -> list[int] | None:
        """Feature ids whose context text matches the FTS5 `expression`, best first; None while
        the index is not built."""
        if not self.ready.is_set() or self.error is not None:
            return None
        with self._lock:
            try:
                rows = self._con.execute("SELECT rowid FROM contexts_fts WHERE contexts_fts MATCH ? "
                                         "ORDER BY rank LIMIT ?", (expression, limit)).fetchall()
            except sqlite3.OperationalError as err:
                raise SearchSyntaxError(f"cannot read the full-text query {expression!r}: {err}") from err
        return [int(r[0]) for r in rows]


@dataclass
class ServedDictionary:
    """One dictionary of the service."""

    name: str
    path: Path
    info: dict[str, Any]
    d_sae: int
    writable: bool
    device: str
    dtype: str | None
    gate: ModelGate
    contexts: ContextIndex
    cache: RecordCache
    _local: threading.local = field(default_factory=threading.local)
    _summary: dict[str, Any] | None = None
    _searches: OrderedDict[tuple[str, str], tuple[tuple[int, ...], bool]] = field(default_factory=OrderedDict)
    _searches_lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _runtime: tuple[Any, Any, Any] | None = None
    _source: FeatureSource | None = None

    def handle(self) -> FeatureDictionary:
        """This thread's open handle of the dictionary (read-only unless the service is writable)."""
        handle: FeatureDictionary | None = getattr(self._local, "handle", None)
        if handle is None:
            handle = FeatureDictionary.open(self.path, readonly=not self.writable, device=self.device,
                                            dtype=self.dtype)
            self._local.handle = handle
        if self._runtime is not None:
            handle._runtime = self._runtime
        return handle

    def summary(self) -> dict[str, Any]:
        """What /api/dictionaries says of it (counts, metrics, size: read once, they do not change
        while it is served)."""
        if self._summary is None:
            self._summary = records.dictionary_record(self.name, self.handle())
        return self._summary

    def search(self, query: str, syntax: str, limit: int) -> tuple[tuple[int, ...], bool]:
        """(ids of the features matching `query`, best first: label and top-token matches, then
        context-text ones; whether context text was searched). The last SEARCHES_KEPT results are
        kept, so the next page of a search costs nothing."""
        key = (query, syntax)
        with self._searches_lock:
            kept = self._searches.get(key)
            if kept is not None:
                self._searches.move_to_end(key)
                return kept
        ids = self.handle().search_ids(query, limit, syntax=syntax)
        expression = query if syntax == "fts" else words_query(query)
        from_contexts = self.contexts.search(expression, limit) if expression else []
        seen = set(ids)
        ids += [i for i in from_contexts or [] if i not in seen]
        result = (tuple(ids), from_contexts is not None)
        if from_contexts is not None:  # a search made before the index was ready is not kept
            with self._searches_lock:
                self._searches[key] = result
                while len(self._searches) > SEARCHES_KEPT:
                    self._searches.popitem(last=False)
        return result

    def readiness(self) -> dict[str, Any]:
        """How far the background work is: the context-text index, the prepared feature records."""
        return {"context_text_indexed": self.contexts.ready.is_set() and self.contexts.error is None,
                "records_ready": len(self.cache), "records_bytes": self.cache.size_bytes}

    def feature_body(self, index: int) -> bytes:
        """Feature `index`'s record, gzip-compressed JSON, from the cache or built now (and kept)."""
        body = self.cache.get(index)
        if body is None:
            body, neighbours = self._build(self.handle(), index)
            self.cache.put(index, body, neighbours)
        return body

    @staticmethod
    def _build(handle: FeatureDictionary, index: int) -> tuple[bytes, list[int]]:
        feature = handle.feature(index)
        return encode_record(records.feature_record(handle, feature)), [j for j, _ in feature.neighbours]

    def set_label(self, index: int, label: str) -> None:
        self.handle().set_label(index, label)
        self.cache.forget_label(index)
        with self._searches_lock:
            self._searches.clear()

    def start_warming(self) -> threading.Thread:
        """Fill the record cache in the background, densest features first, once the context index
        is built (the two would only slow each other)."""
        def run() -> None:
            self.contexts.ready.wait()
            try:
                with FeatureDictionary.open(self.path, readonly=True) as handle:
                    ids = [s.id for s in handle.top_features(len(handle))]
                    warm(self.cache, ids, lambda i: self._build(handle, i), self.name, self._stop)
            except Exception as err:  # requests still build records themselves
                log.warning("%s: feature records not prepared: %s", self.name, err)

        thread = threading.Thread(target=run, name=f"records:{self.name}", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def model_handle(self) -> FeatureDictionary:
        """This thread's handle with the model, tokenizer and SAE loaded (call inside `gate.call()`)."""
        handle = self.handle()
        if self._runtime is None:
            self._runtime = handle._load_runtime()
        return handle

    def feature_source(self) -> FeatureSource:
        """The SAE with its dictionary's units, for steering (call inside `gate.call()`)."""
        handle = self.model_handle()
        if self._source is None:
            _, _, sae = handle._load_runtime()
            self._source = FeatureSource.from_dictionary(handle, handle.device, sae=sae)
        return self._source


def open_catalog(paths: Sequence[str | Path], *, writable: bool = False, device: str = "cpu",
                 dtype: str | None = None, max_waiting: int = 4, cache_mb: float = 512,
                 warm_cache: bool = True) -> dict[str, ServedDictionary]:
    """Open every dictionary (each checked now, so a bad path fails before the server starts),
    name it, start indexing its context text and preparing its feature records (`cache_mb` of
    them, split between the dictionaries; 0: none kept). Dictionaries of the same model share a
    gate."""
    if not paths:
        raise ValueError("give at least one feature dictionary directory")
    resolved = [Path(p) for p in paths]
    catalog: dict[str, ServedDictionary] = {}
    gates: dict[str, ModelGate] = {}
    for name, path in zip(served_names(resolved), resolved, strict=True):
        with FeatureDictionary.open(path, readonly=not writable, device=device, dtype=dtype) as d:
            info, d_sae, model_key = d.info, len(d), repr(sorted(d.model_config().__dict__.items()))
        gate = gates.setdefault(model_key, ModelGate(str(info.get("model", {}).get("name")), max_waiting))
        budget = int(cache_mb * 2**20 / len(resolved))
        catalog[name] = ServedDictionary(name, path, info, d_sae, writable, device, dtype, gate,
                                         ContextIndex(path).start(), RecordCache(budget))
        if warm_cache and budget > 0:
            catalog[name].start_warming()
    return catalog
