"""Feature records kept encoded: the feature endpoint's answer, ready to send.

Building a feature's record costs a few milliseconds (its contexts' tokens from SQLite, ~30 kB of
JSON); sending a ready one costs tens of microseconds. The cache holds each record as gzip bytes
(about a fifth of the JSON) up to a memory budget, evicting the least recently used, and a
background thread fills it after the service starts, densest features first, so a browsing
session or a script never waits on SQLite. A label edit drops the edited feature's record and
every record that names it as a neighbour (they show its label).
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

GZIP_LEVEL = 1
"""Fast compression: ~5x smaller than the JSON at a fraction of a millisecond per record."""


def encode_record(record: dict[str, Any]) -> bytes:
    """A record as gzip-compressed compact JSON (what Starlette's JSONResponse would send, gzipped)."""
    body = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)


class RecordCache:
    """Encoded records by feature id, least recently used evicted beyond `budget_bytes`."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[int, tuple[bytes, frozenset[int]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, feature: int) -> bytes | None:
        with self._lock:
            entry = self._entries.get(feature)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(feature)
            self.hits += 1
            return entry[0]

    def put(self, feature: int, body: bytes, neighbours: Iterable[int]) -> bool:
        """Keep `body`; False (and nothing kept) when it alone exceeds the budget."""
        if len(body) > self.budget:
            return False
        with self._lock:
            old = self._entries.pop(feature, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._entries[feature] = (body, frozenset(neighbours))
            self._bytes += len(body)
            while self._bytes > self.budget:
                _, (evicted, _) = self._entries.popitem(last=False)
                self._bytes -= len(evicted)
        return True

    def __contains__(self, feature: object) -> bool:
        return feature in self._entries

    def full(self, headroom: int = 0) -> bool:
        return self._bytes + headroom > self.budget

    def forget_label(self, feature: int) -> int:
        """Drop `feature`'s record and those that show its label (their neighbours); how many."""
        with self._lock:
            stale = [i for i, (_, near) in self._entries.items() if i == feature or feature in near]
            for i in stale:
                self._bytes -= len(self._entries.pop(i)[0])
        return len(stale)


def warm(cache: RecordCache, ids: Iterable[int], build: Callable[[int], tuple[bytes, Iterable[int]]],
         name: str, stop: threading.Event) -> None:
    """Fill `cache` with the records of `ids` in order until it is full (or `stop` is set)."""
    started = time.perf_counter()
    for i in ids:
        if stop.is_set() or cache.full(headroom=64 * 1024):
            break
        if i not in cache:
            body, neighbours = build(i)
            cache.put(i, body, neighbours)
    log.info("%s: %d feature records ready (%.0f MB) in %.1f s", name, len(cache), cache.size_bytes / 2**20,
             time.perf_counter() - started)
