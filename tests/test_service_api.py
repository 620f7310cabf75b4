"""The service's JSON API, served for real by uvicorn on a loopback port over the tiny dictionary:
each endpoint's answer equals what the dictionary (or the steering API) says in-process, with
Neuronpedia's field names; every bad input is a 4xx with a message, never a 500."""

from __future__ import annotations

import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from saeworks.eval.dictionary import DB_FILE, FeatureDictionary
from saeworks.service.app import create_app
from saeworks.service.schemas import MAX_COMPLETION_TOKENS, MAX_LOGPROBS, MAX_STEER_FEATURES, MAX_TEXT_CHARS
from tests.service_helpers import serving, wait_for_context_index

TEXT = "The capital of France is Paris. def main(x):\n    return x + 1"
NEURONPEDIA_FEATURE_FIELDS = ("modelId", "layer", "index", "maxActApprox", "frac_nonzero", "pos_str",
                              "pos_values", "neg_str", "neg_values", "freq_hist_data_bar_heights",
                              "freq_hist_data_bar_values", "topkCosSimIndices", "topkCosSimValues",
                              "activations")
NEURONPEDIA_ACTIVATION_FIELDS = ("tokens", "values", "maxValue", "maxValueTokenIndex")


@pytest.fixture(scope="module")
def service(tiny_dictionary: Path) -> Iterator[tuple[httpx.Client, Any]]:
    """(client, app) of a read-only service over the tiny dictionary."""
    app = create_app([tiny_dictionary])
    with serving(app) as url, httpx.Client(base_url=url, timeout=300) as client:
        yield client, app


@pytest.fixture(scope="module")
def client(service: tuple[httpx.Client, Any]) -> httpx.Client:
    return service[0]


@pytest.fixture(scope="module")
def name(tiny_dictionary: Path) -> str:
    return tiny_dictionary.name


@pytest.fixture(scope="module")
def opened(tiny_dictionary: Path) -> Iterator[FeatureDictionary]:
    with FeatureDictionary.open(tiny_dictionary, readonly=True) as d:
        yield d


@pytest.fixture(scope="module")
def live(opened: FeatureDictionary) -> int:
    """The densest feature: alive, with contexts and neighbours."""
    return opened.top_features(1)[0].id


def test_dictionaries_lists_what_is_served(client: httpx.Client, name: str,
                                           opened: FeatureDictionary) -> None:
    body = client.get("/api/dictionaries").json()
    assert body["writable"] is False
    (entry,) = body["dictionaries"]
    assert entry["name"] == name
    assert entry["d_sae"] == len(opened) and entry["hookName"] == opened.info["hook"]
    assert entry["counts"] == opened.counts()
    assert entry["metrics"] == (opened.metrics or {}).get("metrics")
    assert entry["size_bytes"] > (opened.path / DB_FILE).stat().st_size
    layer = re.findall(r"\d+", opened.info["hook"])[0]
    assert entry["layer"] == f"{layer}-res-{opened.info['sae_name']}"


def test_feature_equals_the_dictionary_with_neuronpedia_names(client: httpx.Client, name: str,
                                                              opened: FeatureDictionary, live: int) -> None:
    record = client.get(f"/api/{name}/features/{live}").json()
    feature = opened.feature(live)
    for field in NEURONPEDIA_FEATURE_FIELDS:
        assert field in record, field
    assert record["index"] == str(live) and record["id"] == live
    assert record["frac_nonzero"] == pytest.approx(feature.density)
    assert record["maxActApprox"] == pytest.approx(feature.max_activation)
    assert record["count"] == feature.count and sum(record["freq_hist_data_bar_heights"]) == feature.count
    bins = len(feature.histogram)
    assert record["freq_hist_data_bar_values"] == pytest.approx(
        [(i + 0.5) * feature.max_activation / bins for i in range(bins)])
    assert record["pos_str"] == [t for t, _ in feature.logit_positive]
    assert record["neg_values"] == pytest.approx([v for _, v in feature.logit_negative])
    assert record["topkCosSimIndices"] == [j for j, _ in feature.neighbours]
    assert set(record["neighbour_labels"]) == {str(j) for j, _ in feature.neighbours}
    assert record["label"] == feature.label == record["explanations"][0]["description"]
    assert len(record["activations"]) == len(feature.contexts) > 0
    for got, context in zip(record["activations"], feature.contexts, strict=True):
        for field in NEURONPEDIA_ACTIVATION_FIELDS:
            assert field in got, field
        assert got["tokens"] == context.tokens and got["values"] == pytest.approx(context.activations)
        assert got["maxValue"] == pytest.approx(max(context.activations))
        assert got["values"][got["maxValueTokenIndex"]] == got["maxValue"]
        assert got["qualifyingTokenIndex"] == context.focus and got["kind"] == context.kind
        if context.kind == "band":
            assert got["binMin"] <= context.activation <= got["binMax"] + 1e-6


@pytest.mark.parametrize("bad", ["256", "-1", "1e3", "x", "99999999999999999999999"])
def test_feature_id_out_of_range_or_not_a_number_is_422(client: httpx.Client, name: str, bad: str) -> None:
    response = client.get(f"/api/{name}/features/{bad}")
    assert response.status_code == 422, response.text
    if bad == "256":
        assert "ids 0 to 255" in response.json()["detail"]


def test_unknown_dictionary_or_path_like_name_is_404(client: httpx.Client, name: str) -> None:
    for path in ("/api/nope/features/0", "/api/..%2F..%2Fetc/features/0", "/api/%2Fetc%2Fpasswd/features/0",
                 "/nope/features/0", "/nope/search", "/..%2F..%2Fetc/features/0",
                 f"/api/{name}%2F..%2F{name}/features/0"):
        response = client.get(path)
        assert response.status_code == 404, (path, response.text)
    assert "served: " + name in client.get("/api/nope/features/0").json()["detail"]


def test_search_finds_a_feature_by_a_top_token_and_paginates(client: httpx.Client, name: str,
                                                              opened: FeatureDictionary) -> None:
    live, word = next((s.id, t.strip()) for s in opened.top_features(len(opened)) for t, _ in s.top_tokens
                      if re.fullmatch(r"\s*[A-Za-z]{3,}", t))
    pages = [client.get(f"/api/{name}/search", params={"q": word, "per_page": 5, "page": p}).json()
             for p in (1, 2, 3)]
    total = pages[0]["total"]
    found = [r["index"] for page in pages for r in page["results"]]
    assert len(found) == len(set(found)) == min(total, 15)
    everything = client.get(f"/api/{name}/search", params={"q": word, "per_page": 100}).json()
    assert live in [r["index"] for r in everything["results"]]
    assert [r["index"] for r in everything["results"]][:len(found)] == found


def test_search_covers_context_text(service: tuple[httpx.Client, Any], name: str,
                                    opened: FeatureDictionary, live: int) -> None:
    client, app = service
    wait_for_context_index(app)
    feature = opened.feature(live)
    words = re.findall(r"[A-Za-z]{4,}", "".join(feature.top_contexts[0].tokens))
    phrase = f'"{words[0]} {words[1]}"' if len(words) > 1 else words[0]
    found: list[int] = []
    page = 1
    while True:
        body = client.get(f"/api/{name}/search", params={"q": phrase, "mode": "fts", "page": page,
                                                          "per_page": 100}).json()
        assert body["context_text_searched"] is True
        found += [r["index"] for r in body["results"]]
        if not body["results"]:
            break
        page += 1
    assert live in found


@pytest.mark.parametrize("query", ['"unterminated', "AND", "NEAR(", "(((", "*", "nosuchcolumn: x", "^"])
def test_malformed_fts_query_is_400(client: httpx.Client, name: str, query: str) -> None:
    response = client.get(f"/api/{name}/search", params={"q": query, "mode": "fts"})
    assert response.status_code == 400, response.text
    assert "full-text query" in response.json()["detail"]


@pytest.mark.parametrize("query", ['"unterminated', "AND (", "*", "x: y", "%_\\"])
def test_word_search_takes_any_text(client: httpx.Client, name: str, query: str) -> None:
    assert client.get(f"/api/{name}/search", params={"q": query}).status_code == 200


def test_search_parameters_are_validated(client: httpx.Client, name: str) -> None:
    for params in ({"q": ""}, {"q": "a", "page": 0}, {"q": "a", "per_page": 1000}, {"q": "a", "mode": "sql"},
                   {"q": "x" * 501}, {}):
        response = client.get(f"/api/{name}/search", params=params)
        assert response.status_code == 422, (params, response.text)


def test_inspect_equals_features_on(client: httpx.Client, name: str, opened: FeatureDictionary) -> None:
    body = client.post(f"/api/{name}/inspect", json={"text": TEXT, "top": 5}).json()
    expected = opened.features_on(TEXT, top=5)
    tokens = body["tokens"]
    assert tokens[0]["special"] is True and not any(t["special"] for t in tokens[1:])
    assert [t["token"] for t in tokens[1:]] == [e.token for e in expected]
    for got, want in zip(tokens[1:], expected, strict=True):
        assert [f["index"] for f in got["features"]] == [f.id for f in want.features]
        expected_values = [f.activation for f in want.features]
        assert [f["activation"] for f in got["features"]] == pytest.approx(expected_values, abs=1e-4)
    assert body["ranked"]
    for ranked in body["ranked"]:
        ordinary = ranked["values"][1:]  # BOS is special: never ranked
        assert ranked["maxValue"] == pytest.approx(max(ordinary))
        assert ranked["maxValueTokenIndex"] == 1 + ordinary.index(max(ordinary))
        assert ranked["maxActApprox"] == pytest.approx(opened.summaries([ranked["index"]])[0].max_activation)
    peaks = [r["maxValue"] for r in body["ranked"]]
    assert peaks == sorted(peaks, reverse=True)


def test_activation_of_one_feature_on_a_text(client: httpx.Client, name: str,
                                             opened: FeatureDictionary) -> None:
    inspected = client.post(f"/api/{name}/inspect", json={"text": TEXT}).json()
    top = inspected["ranked"][0]
    body = client.post(f"/api/{name}/activation", json={"text": TEXT, "index": top["index"]}).json()
    assert body["values"] == pytest.approx(top["values"], abs=1e-5)
    assert body["tokens"] == [t["token"] for t in inspected["tokens"]]
    assert body["special"][0] is True
    assert body["maxValue"] == pytest.approx(max(body["values"][1:]))  # BOS is special: not counted
    assert body["maxActApprox"] == pytest.approx(opened.summaries([top["index"]])[0].max_activation)
    response = client.post(f"/api/{name}/activation", json={"text": TEXT, "index": len(opened)})
    assert response.status_code == 422 and f"ids 0 to {len(opened) - 1}" in response.json()["detail"]


def test_steer_equals_the_steering_api(client: httpx.Client, name: str, tiny_dictionary: Path,
                                       live: int) -> None:
    import saeworks

    request = {"prompt": "The capital of France is", "features": [{"index": live, "strength": 6}],
               "n_completion_tokens": 8, "temperature": 0, "seed": 3, "n_logprobs": 2}
    body = client.post(f"/api/{name}/steer", json=request).json()
    (expected,) = saeworks.steer_completions(tiny_dictionary, request["prompt"], f"{live}=+6",
                                             max_new_tokens=8, temperature=0, seed=3, n_logprobs=2)
    assert body["DEFAULT"]["text"] == expected.default.text
    assert body["STEERED"]["text"] == expected.steered.text
    assert body["STEERED"]["token_ids"] == expected.steered.token_ids
    assert body["DEFAULT"]["text"] != body["STEERED"]["text"]
    assert all(len(step["top"]) == 2 for step in body["STEERED"]["logprobs"])
    only = client.post(f"/api/{name}/steer", json={**request, "types": ["STEERED"]}).json()
    assert "DEFAULT" not in only and only["STEERED"]["text"] == expected.steered.text


@pytest.mark.parametrize(("change", "field"), [
    ({"features": [{"index": 0, "strength": 1e6}]}, "strength"),
    ({"features": [{"index": 0, "strength": 1}] * (MAX_STEER_FEATURES + 1)}, "features"),
    ({"features": []}, "features"),
    ({"n_completion_tokens": MAX_COMPLETION_TOKENS + 1}, "n_completion_tokens"),
    ({"n_completion_tokens": 0}, "n_completion_tokens"),
    ({"n_logprobs": MAX_LOGPROBS + 1}, "n_logprobs"),
    ({"prompt": "x" * (MAX_TEXT_CHARS + 1)}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"steer_method": "DELETE_EVERYTHING"}, "steer_method"),
    ({"types": ["SIDEWAYS"]}, "types"),
    ({"temperature": -1}, "temperature"),
])
def test_steer_inputs_are_validated(client: httpx.Client, name: str, change: dict, field: str) -> None:
    request = {"prompt": "Hello", "features": [{"index": 0, "strength": 1}], **change}
    response = client.post(f"/api/{name}/steer", json=request)
    assert response.status_code == 422, response.text
    assert field in str(response.json()["detail"])


def test_steer_feature_out_of_range_is_422(client: httpx.Client, name: str) -> None:
    request = {"prompt": "Hi", "features": [{"index": 256, "strength": 1}]}
    response = client.post(f"/api/{name}/steer", json=request)
    assert response.status_code == 422 and "ids 0 to 255" in response.json()["detail"]


def test_text_inputs_are_validated(client: httpx.Client, name: str) -> None:
    for path, body in (("inspect", {"text": ""}), ("inspect", {"text": "x" * (MAX_TEXT_CHARS + 1)}),
                       ("inspect", {"text": "hi", "top": 0}), ("inspect", {}),
                       ("activation", {"text": "hi"}), ("activation", {"text": "hi", "index": -1})):
        response = client.post(f"/api/{name}/{path}", json=body)
        assert response.status_code == 422, (path, body, response.text)
    response = client.post(f"/api/{name}/inspect", content=b"{not json",
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422


def test_label_edit_refused_when_read_only(client: httpx.Client, name: str,
                                           opened: FeatureDictionary) -> None:
    before = opened.feature(3).label
    response = client.put(f"/api/{name}/features/3/label", json={"label": "mine"})
    assert response.status_code == 403 and "--writable" in response.json()["detail"]
    assert opened.feature(3).label == before


def test_label_edit_when_writable_persists(tiny_dictionary: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_dictionary, tmp_path / "dictionary"))
    app = create_app([copy], writable=True)
    with serving(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/api/dictionaries").json()["writable"] is True
        body = client.put("/api/dictionary/features/5/label", json={"label": "  French capitals "}).json()
        assert body == {"index": 5, "label": "French capitals", "label_source": "user"}
        assert client.get("/api/dictionary/features/5").json()["label"] == "French capitals"
        found = client.get("/api/dictionary/search", params={"q": "capitals"}).json()["results"]
        assert [r["index"] for r in found][:1] == [5]
        assert client.put("/api/dictionary/features/999/label", json={"label": "x"}).status_code == 422
        assert client.put("/api/dictionary/features/5/label", json={"label": "x" * 501}).status_code == 422
    with sqlite3.connect(copy / DB_FILE) as con:
        assert con.execute("SELECT label, label_source FROM features WHERE id = 5").fetchone() == \
            ("French capitals", "user")
    with FeatureDictionary.open(copy, readonly=False) as d:
        auto = d._auto_label(5)
    app = create_app([copy], writable=True)
    with serving(app) as url, httpx.Client(base_url=url) as client:
        body = client.put("/api/dictionary/features/5/label", json={"label": ""}).json()
        assert body == {"index": 5, "label": auto, "label_source": "auto"}


def test_openapi_and_offline_docs(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/api/dictionaries", "/api/{name}/features/{index}", "/api/{name}/search", "/api/{name}/inspect",
            "/api/{name}/activation", "/api/{name}/steer",
            "/api/{name}/features/{index}/label"} <= set(schema["paths"])
    steer = schema["components"]["schemas"]["SteerRequest"]["properties"]
    assert {"prompt", "features", "steer_method", "types", "n_completion_tokens", "temperature", "seed",
            "n_logprobs"} <= set(steer)
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert not re.search(r"(src|href)=['\"]https?://", html), html  # nothing from a CDN
        for asset in re.findall(r"(?:src|href)=['\"](/[^'\"]+)['\"]", html):
            assert client.get(asset).status_code == 200, asset


def test_page_routes_serve_the_page_and_its_assets(client: httpx.Client, name: str) -> None:
    for path in ("/", f"/{name}/features/3", f"/{name}/search?q=x", f"/{name}/inspect", f"/{name}/steer"):
        response = client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html"), path
        assert not re.search(r"(src|href)=['\"](https?:)?//", response.text)  # no CDN
        for asset in re.findall(r"(?:src|href)=['\"](/static/[^'\"]+)['\"]", response.text):
            assert client.get(asset).status_code == 200, asset
    assert client.get(f"/{name}/nothing").status_code == 404
    assert client.get("/static/../../pyproject.toml").status_code == 404


def test_a_dead_feature_has_no_contexts_and_says_so(tmp_path: Path) -> None:
    from tests.dictionary_helpers import build

    directory, _ = build(tmp_path)  # feature 1 never fired
    with serving(create_app([directory])) as url, httpx.Client(base_url=url) as client:
        record = client.get("/api/dict/features/1").json()
        assert record["dead"] is True and record["label"] == "dead" and record["activations"] == []
        assert record["frac_nonzero"] == 0 and sum(record["freq_hist_data_bar_heights"]) == 0
        alive = client.get("/api/dict/features/0").json()
        assert alive["dead"] is False and alive["activations"]


def test_feature_records_are_prepared_and_sent_gzipped_when_asked(
        service: tuple[httpx.Client, Any], name: str, opened: FeatureDictionary) -> None:
    import gzip
    import json
    import time

    client, app = service
    served = app.state.catalog[name]
    deadline = time.monotonic() + 120
    alive = opened.counts()["alive"]
    while len(served.cache) < alive:  # the background fill: every live feature, densest first
        assert time.monotonic() < deadline, f"{len(served.cache)} of {alive} records prepared"
        time.sleep(0.1)
    raw = client.get(f"/api/{name}/features/7", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in raw.headers and raw.headers["content-type"] == "application/json"
    with httpx.Client(base_url=str(client.base_url)) as plain:
        zipped = plain.stream("GET", f"/api/{name}/features/7", headers={"Accept-Encoding": "gzip"})
        with zipped as response:
            assert response.headers["content-encoding"] == "gzip"
            body = b"".join(response.iter_raw())
    assert json.loads(gzip.decompress(body)) == raw.json() == json.loads(raw.content)


def test_a_label_edit_refreshes_the_records_that_show_it(tiny_dictionary: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_dictionary, tmp_path / "dictionary"))
    with FeatureDictionary.open(copy, readonly=True) as d:
        i = d.top_features(1)[0].id
        j = d.feature(i).neighbours[0][0]
    app = create_app([copy], writable=True, warm_cache=False)
    with serving(app) as url, httpx.Client(base_url=url) as client:
        before = client.get(f"/api/dictionary/features/{i}").json()
        assert i in app.state.catalog["dictionary"].cache
        client.put(f"/api/dictionary/features/{j}/label", json={"label": "a neighbour's new name"})
        after = client.get(f"/api/dictionary/features/{i}").json()
        renamed = "a neighbour's new name"
        assert after["neighbour_labels"][str(j)] == renamed != before["neighbour_labels"][str(j)]
        assert client.get(f"/api/dictionary/features/{j}").json()["label"] == "a neighbour's new name"


def test_record_cache_keeps_to_its_budget() -> None:
    from saeworks.service.cache import RecordCache

    cache = RecordCache(budget_bytes=100)
    assert cache.put(1, b"x" * 40, [2]) and cache.put(2, b"y" * 40, [3])
    assert cache.get(1) == b"x" * 40  # 1 is now the most recently used
    assert cache.put(3, b"z" * 40, [1])  # over budget: 2, the least recently used, goes
    assert 2 not in cache and 1 in cache and 3 in cache and cache.size_bytes == 80
    assert not cache.put(4, b"w" * 101, [])
    assert cache.forget_label(1) == 2 and len(cache) == 0 and cache.size_bytes == 0
