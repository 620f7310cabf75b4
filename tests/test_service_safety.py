"""Who may reach the service and what it refuses: loopback by default, a flag and a token for any
other address, Host and CORS closed, the model's queue bounded (503 + Retry-After), read-only
unless --writable; `saeworks serve` started for real as a user would."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from saeworks.eval.dictionary import DB_FILE
from saeworks.service.app import TOKEN_COOKIE, create_app
from saeworks.service.gate import ModelGate, QueueFull
from saeworks.service.server import TOKEN_ENV, ServeError, is_loopback, plan_binding
from tests.helpers import REPO, run_cli
from tests.service_helpers import serving


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False)])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_exposed_address_needs_the_flag_and_gets_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ServeError, match="--allow-remote"):
        plan_binding("0.0.0.0", 8000)
    generated = plan_binding("0.0.0.0", 8000, allow_remote=True)
    assert generated.generated_token and len(generated.token or "") >= 24 and generated.allowed_hosts is None
    assert plan_binding("0.0.0.0", 8000, allow_remote=True).token != generated.token
    given = plan_binding("0.0.0.0", 8000, allow_remote=True, token="abc")
    assert given.token == "abc" and not given.generated_token
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert plan_binding("0.0.0.0", 8000, allow_remote=True).token == "from-env"
    local = plan_binding("127.0.0.1", 8000)
    assert local.allowed_hosts is not None and "localhost" in local.allowed_hosts
    with pytest.raises(ServeError, match="port"):
        plan_binding("127.0.0.1", 70000)


def test_every_request_needs_the_token(tiny_dictionary: Path) -> None:
    app = create_app([tiny_dictionary], token="s3cret-token")
    with serving(app) as url:
        with httpx.Client(base_url=url) as anonymous:
            for path in ("/api/dictionaries", "/api/dictionary/features/0", "/", "/openapi.json", "/docs",
                         "/static/app.js"):
                response = anonymous.get(path)
                assert response.status_code == 401, path
                assert "Bearer" in response.json()["detail"]
            for header in ("Bearer wrong", "s3cret-token", "Bearer", "Basic czNjcmV0LXRva2Vu"):
                response = anonymous.get("/api/dictionaries", headers={"Authorization": header})
                assert response.status_code == 401, header
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer s3cret-token"}) as bearer:
            assert bearer.get("/api/dictionaries").status_code == 200
        with httpx.Client(base_url=url) as browser:  # the page: ?token= once, then the cookie
            first = browser.get("/", params={"token": "s3cret-token"})
            assert first.status_code == 200 and TOKEN_COOKIE in first.headers["set-cookie"]
            assert "httponly" in first.headers["set-cookie"].lower()
            assert browser.get("/api/dictionary/features/0").status_code == 200


def test_host_header_and_cors_are_closed_by_default(tiny_dictionary: Path) -> None:
    app = create_app([tiny_dictionary])
    with serving(app) as url, httpx.Client(base_url=url) as client:
        port = url.rsplit(":", 1)[1]
        for path in ("/", "/api/dictionaries", "/static/app.js", "/api/nope/features/0"):
            headers = client.get(path).headers
            assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"
        refused = client.get("/api/dictionaries", headers={"Host": "attacker.example"})
        assert refused.status_code == 400 and refused.headers["x-frame-options"] == "DENY"
        assert client.get("/api/dictionaries", headers={"Host": f"localhost:{port}"}).status_code == 200
        response = client.get("/api/dictionaries", headers={"Origin": "http://attacker.example"})
        assert "access-control-allow-origin" not in response.headers
        preflight = client.options("/api/dictionary/steer", headers={
            "Origin": "http://attacker.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers


def test_cors_opens_only_to_the_origins_named(tiny_dictionary: Path) -> None:
    app = create_app([tiny_dictionary], cors_origins=["http://notebook.example:8888"])
    with serving(app) as url, httpx.Client(base_url=url) as client:
        allowed = client.get("/api/dictionaries", headers={"Origin": "http://notebook.example:8888"})
        assert allowed.headers["access-control-allow-origin"] == "http://notebook.example:8888"
        other = client.get("/api/dictionaries", headers={"Origin": "http://attacker.example"})
        assert "access-control-allow-origin" not in other.headers


def test_gate_admits_one_call_and_a_bounded_queue() -> None:
    gate = ModelGate("m", max_waiting=1, retry_after=7)
    entered = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def holder() -> None:
        with gate.call():
            entered.set()
            release.wait(30)
            order.append("first")

    def waiter() -> None:
        with gate.call():
            order.append("second")

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    assert entered.wait(30)
    threads.append(threading.Thread(target=waiter))
    threads[1].start()
    while gate.admitted < 2:
        time.sleep(0.01)
    with pytest.raises(QueueFull, match="busy") as refused, gate.call():
        pass
    assert refused.value.retry_after == 7
    release.set()
    for thread in threads:
        thread.join(30)
    assert order == ["first", "second"] and gate.admitted == 0
    with gate.call():  # free again
        pass


def test_full_model_queue_answers_503_with_retry_after(tiny_dictionary: Path) -> None:
    app = create_app([tiny_dictionary], max_waiting=1)
    gate = app.state.catalog["dictionary"].gate
    with serving(app) as url, httpx.Client(base_url=url, timeout=300) as client:
        results: dict[str, httpx.Response] = {}

        def inspect(key: str) -> None:
            results[key] = client.post("/api/dictionary/inspect", json={"text": "Hello there"})

        with gate.call():  # the model is busy: one request may wait, the next is refused
            waiting = threading.Thread(target=inspect, args=("waiting",))
            waiting.start()
            deadline = time.monotonic() + 60
            while gate.admitted < 2:
                assert time.monotonic() < deadline, "the first request never reached the gate"
                time.sleep(0.01)
            refused = client.post("/api/dictionary/inspect", json={"text": "Hello there"})
            steer = client.post("/api/dictionary/steer", json={"prompt": "Hi", "features": [
                {"index": 0, "strength": 1}]})
            assert client.get("/api/dictionary/features/0").status_code == 200  # no model: not queued
        waiting.join(300)
        for response in (refused, steer):
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) >= 1
            assert "busy" in response.json()["detail"]
        assert results["waiting"].status_code == 200


def test_read_only_service_changes_nothing(tiny_dictionary: Path) -> None:
    before = hashlib.sha256((tiny_dictionary / DB_FILE).read_bytes()).hexdigest()
    app = create_app([tiny_dictionary])
    with serving(app) as url, httpx.Client(base_url=url) as client:
        for i in range(0, 256, 37):
            assert client.get(f"/api/dictionary/features/{i}").status_code == 200
        assert client.put("/api/dictionary/features/1/label", json={"label": "x"}).status_code == 403
        assert client.get("/api/dictionary/search", params={"q": "the"}).status_code == 200
    assert hashlib.sha256((tiny_dictionary / DB_FILE).read_bytes()).hexdigest() == before
    assert not list(tiny_dictionary.glob("*-journal")) and not list(tiny_dictionary.glob("*-wal"))


def test_cli_refuses_an_exposed_address_and_a_missing_dictionary(tiny_dictionary: Path,
                                                                  tmp_path: Path) -> None:
    exposed = run_cli(["serve", str(tiny_dictionary), "--host", "0.0.0.0"], timeout=120)
    assert exposed.returncode == 2
    (line,) = exposed.stderr.strip().splitlines()
    assert "--allow-remote" in line and "0.0.0.0" in line
    missing = run_cli(["serve", str(tmp_path / "nothing")], timeout=120)
    assert missing.returncode == 2 and "no feature dictionary" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_cli_serves_the_page_and_the_api(tiny_dictionary: Path) -> None:
    command = [sys.executable, "-m", "saeworks", "serve", str(tiny_dictionary), "--port", "0"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        url = None
        lines = []
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "serve exited: " + "".join(lines)
            lines.append(line)
            found = re.search(r"open (http://127\.0\.0\.1:\d+)/", line)
            url = found.group(1) if found else None
        assert url is not None and "read-only" in "".join(lines)
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(url + "/api/dictionaries", timeout=10)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
        assert response.json()["dictionaries"][0]["name"] == "dictionary"
        page = httpx.get(url + "/dictionary/features/3", timeout=10)
        assert page.status_code == 200 and "<script" in page.text
    finally:
        process.terminate()
        process.wait(60)
