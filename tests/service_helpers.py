"""Serving the service for real in tests: uvicorn on a free loopback port, in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on a free loopback port; yield its root URL; stop it."""
    import uvicorn

    from saeworks.service.server import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_for_context_index(app: Any, timeout: float = 120) -> None:
    """Block until every served dictionary's context-text index is built."""
    for served in app.state.catalog.values():
        assert served.contexts.ready.wait(timeout), f"{served.name}: context index not built in {timeout} s"
        assert served.contexts.error is None, served.contexts.error
