"""One model call at a time per model, with a bounded queue.

A forward or a generation holds the model; requests that arrive meanwhile wait in line, at most
`max_waiting` of them. One more is refused at once (the API answers 503 with Retry-After) rather
than piling up threads, memory and latency behind a slow generation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from saeworks.sae.errors import SaeworksError


class QueueFull(SaeworksError, RuntimeError):
    """The model is busy and its queue is full: try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelGate:
    """Admits one call at a time to a model; `max_waiting` more may wait; the rest are refused."""

    def __init__(self, name: str, max_waiting: int = 4, retry_after: int = 2) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting={max_waiting} must be >= 0")
        self.name, self.max_waiting, self.retry_after = name, max_waiting, retry_after
        self._model = threading.Lock()
        self._counter = threading.Lock()
        self._admitted = 0
        """Calls running or waiting."""

    @property
    def admitted(self) -> int:
        return self._admitted

    @contextmanager
    def call(self) -> Iterator[None]:
        """Hold the model for the block, after the calls ahead; QueueFull if the line is full."""
        with self._counter:
            if self._admitted >= 1 + self.max_waiting:
                raise QueueFull(f"the model {self.name} is busy and {self.max_waiting} requests are already "
                                f"waiting for it; retry in {self.retry_after} s", self.retry_after)
            self._admitted += 1
        try:
            with self._model:
                yield
        finally:
            with self._counter:
                self._admitted -= 1
