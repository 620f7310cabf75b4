"""Starting the service: where it listens, who may call it, then uvicorn.

Loopback (127.0.0.1, the default) serves this machine only, and answers only requests whose Host
is a loopback name. Any other address exposes the dictionaries, and the model behind them, to the
network: it needs `allow_remote=True` (`--allow-remote`) and a token that every request carries,
given or generated here and printed once.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from saeworks.sae.errors import SaeworksError

TOKEN_ENV = "SAEWORKS_TOKEN"


class ServeError(SaeworksError, ValueError):
    """A way of starting the service that is refused (an exposed address without the flag)."""


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name) only ever reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Binding:
    """Where the service listens and what every request must carry."""

    host: str
    port: int
    token: str | None
    generated_token: bool
    allowed_hosts: list[str] | None

    def url(self, path: str = "/") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?token={self.token}" if self.token else ""
        return f"http://{host}:{self.port}{path}{query}"


def plan_binding(host: str, port: int, *, allow_remote: bool = False, token: str | None = None) -> Binding:
    """Check the address and settle the token (argument, else $SAEWORKS_TOKEN, else generated for
    a remote binding)."""
    if not 0 <= port <= 65535:
        raise ServeError(f"--port {port} is not a port number (0-65535; 0 picks a free one)")
    token = token or os.environ.get(TOKEN_ENV) or None
    if is_loopback(host):
        return Binding(host, port, token, False, ["127.0.0.1", "localhost", "::1", "[::1]"])
    if not allow_remote:
        raise ServeError(f"--host {host} is reachable from other machines: the dictionaries and the model "
                         "behind them would be open to the network; pass --allow-remote to mean it (every "
                         f"request then needs a token: --token TOKEN, ${TOKEN_ENV}, or one is generated)")
    generated = token is None
    return Binding(host, port, token or secrets.token_urlsafe(24), generated, None)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (for tests and `--port 0` reporting)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(paths: Sequence[str | Path], *, host: str = "127.0.0.1", port: int = 8000, writable: bool = False,
          allow_remote: bool = False, token: str | None = None, cors_origins: Sequence[str] = (),
          device: str = "cpu", dtype: str | None = None, max_waiting: int = 4, cache_mb: float = 512,
          log_level: str = "info") -> None:
    """Serve the dictionaries at `paths` until interrupted (Ctrl-C)."""
    import uvicorn

    from saeworks.service.app import create_app

    binding = plan_binding(host, port, allow_remote=allow_remote, token=token)
    if max_waiting < 0:
        raise ServeError(f"--max-waiting {max_waiting} must be >= 0 (0: a busy model refuses at once)")
    if cache_mb < 0:
        raise ServeError(f"--cache-mb {cache_mb} must be >= 0 (0: build every feature record on request)")
    if binding.port == 0:
        binding = Binding(binding.host, free_port(binding.host), binding.token, binding.generated_token,
                          binding.allowed_hosts)
    app = create_app(paths, writable=writable, token=binding.token, allowed_hosts=binding.allowed_hosts,
                     cors_origins=cors_origins, device=device, dtype=dtype, max_waiting=max_waiting,
                     cache_mb=cache_mb)
    names = ", ".join(app.state.catalog)
    mode = "read-write (label edits saved to features.sqlite)" if writable else "read-only"
    print(f"saeworks serve: {names} ({mode})", flush=True)
    if binding.generated_token:
        print(f"saeworks serve: access token (every request needs it): {binding.token}", flush=True)
    print(f"saeworks serve: open {binding.url()}  (API docs: {binding.url('/docs')})", flush=True)
    uvicorn.run(app, host=binding.host, port=binding.port, log_level=log_level)
