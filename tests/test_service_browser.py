"""The service's web page in a real browser: Debian's headless Chromium driven by Playwright, against
the real app (create_app) served by uvicorn on a free loopback port, over the tiny dictionary.

Each test checks what a person sees (the histogram's bars, the shaded tokens and their hover text,
links that load other features, search results, the inspector's features, two completions, the
error box) against the JSON the same server answers. A screenshot of each page is written under
the test's tmp_path (the paths are printed; `pytest -s` shows them).
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.service_helpers import serving

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install chromium)"),
]

MODEL_TIMEOUT_MS = 120_000
"""Inspect and steer load the model on first use and run it on 2 busy cores."""
INSPECT_TEXT = "The capital of France is Paris. def main(x):\n    return x + 1"


@dataclass(frozen=True)
class Service:
    """A running server: its root URL and the served name of its (only) dictionary."""

    url: str
    name: str

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=120) as response:
            return json.load(response)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)

    def feature(self, index: int) -> dict[str, Any]:
        return self.get(f"/api/{self.name}/features/{index}")  # type: ignore[no-any-return]

    def page(self, path: str) -> str:
        return f"{self.url}/{self.name}{path}"


def start_service(paths: list[Path], **options: Any) -> Any:
    from saeworks.service.app import create_app

    return serving(create_app(paths, **options))


@pytest.fixture(scope="module")
def service(tiny_dictionary: Path) -> Iterator[Service]:
    """The read-only service over the tiny dictionary."""
    with start_service([tiny_dictionary]) as url:
        name = Service(url, "").get("/api/dictionaries")["dictionaries"][0]["name"]
        yield Service(url, name)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser tab; an uncaught JavaScript error fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    errors: list[str] = []
    tab.on("pageerror", lambda err: errors.append(str(err)))
    yield tab
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def live_features(service: Service) -> Iterator[dict[str, Any]]:
    """The features that fired, with contexts and neighbours, in id order."""
    d_sae = service.get("/api/dictionaries")["dictionaries"][0]["d_sae"]
    for i in range(d_sae):
        f = service.feature(i)
        if not f["dead"] and f["activations"] and f["topkCosSimIndices"] and f["top_tokens"]:
            yield f


@pytest.fixture(scope="module")
def live(service: Service) -> dict[str, Any]:
    """A live feature whose contexts include band samples (so both kinds are on its page)."""
    return next(f for f in live_features(service) if any(a["kind"] == "band" for a in f["activations"]))


def screenshot(page: Any, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def activation_in(title: str) -> float:
    found = re.search(r"activation (-?[0-9.]+(?:e[-+]?\d+)?)", title)
    assert found, f"no activation in the hover text {title!r}"
    return float(found.group(1))


def alpha_of(css_colour: str) -> float:
    """The alpha of a computed CSS colour (rgb(...) is opaque)."""
    parts = re.findall(r"[0-9.]+", css_colour)
    return float(parts[3]) if css_colour.startswith("rgba") else 1.0


def shading(tokens: Any) -> list[float]:
    """The background alpha of each element `tokens` matches, as the browser computes it."""
    colours = tokens.evaluate_all("ts => ts.map(t => getComputedStyle(t).backgroundColor)")
    return [alpha_of(c) for c in colours]


def test_feature_page_shows_histogram_contexts_and_logit_effects(service: Service, live: dict[str, Any],
                                                                 page: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    index = live["id"]
    page.goto(service.page(f"/features/{index}"))  # the shareable URL, opened directly
    expect(page.locator("#feature-title")).to_have_text(f"Feature {index}")
    expect(page.locator("#label")).to_have_text(live["label"])
    assert page.locator("#label-input").count() == 0, "the label is editable on a read-only server"
    assert page.title().startswith(f"Feature {index}")

    # the histogram: one bar per bin, a bar with height for every non-empty bin, the count on hover
    heights = live["freq_hist_data_bar_heights"]
    bars = page.locator("#histogram rect")
    expect(bars).to_have_count(len(heights))
    assert sum(heights) > 0
    for i, count in enumerate(heights):
        bar = bars.nth(i)
        assert (float(bar.get_attribute("height")) > 0) == (count > 0), f"bin {i} holds {count}"
        assert bar.locator("title").text_content().endswith(f": {count:,} tokens")
    box = page.locator("#histogram").bounding_box()
    assert box["width"] > 100 and box["height"] > 50, f"the histogram is not drawn at a visible size: {box}"

    # top contexts then band samples: every token a span, shaded by value / max, activation on hover
    contexts = live["activations"]
    spans = page.locator("#contexts .context .tokens")
    expect(spans).to_have_count(len(contexts))
    peak = live["max_activation"]
    for k, context in enumerate(contexts):
        tokens = spans.nth(k).locator(".token")
        assert tokens.count() == len(context["tokens"])
        at = context["maxValueTokenIndex"]
        strongest = tokens.nth(at)
        shown_value = activation_in(strongest.get_attribute("title"))
        assert shown_value == pytest.approx(context["values"][at], rel=1e-3)
        colour = strongest.evaluate("span => getComputedStyle(span).backgroundColor")
        assert alpha_of(colour) == pytest.approx(min(context["values"][at] / peak, 1.0), abs=0.01)
        assert alpha_of(colour) > 0, f"the peak token of context {k} is not shaded ({colour})"
        qualifying = spans.nth(k).locator(".token.qualifying")
        expect(qualifying).to_have_count(1)
        assert tokens.nth(context["qualifyingTokenIndex"]).evaluate("s => s.classList.contains('qualifying')")
        shown = "".join(tokens.all_text_contents())
        assert shown == "".join(t.replace("\n", "↵").replace("\t", "⇥") for t in context["tokens"])
    bands = {a["band"] for a in contexts if a["kind"] == "band"}
    expect(page.locator("#contexts .band-heading")).to_have_count(len(bands))
    first_band = next(a for a in contexts if a["kind"] == "band")
    heading = page.locator("#contexts .band-heading").first.text_content()
    assert heading.startswith("Activations ") and "–" in heading
    low, high = (float(x) for x in re.findall(r"-?[0-9.]+(?:e[-+]?\d+)?", heading)[:2])
    assert low == pytest.approx(first_band["binMin"], rel=1e-3)
    assert high == pytest.approx(first_band["binMax"], rel=1e-3)

    # hovering a token shows its activation (the browser's tooltip is the title)
    strongest = spans.nth(0).locator(".token").nth(contexts[0]["maxValueTokenIndex"])
    strongest.hover()
    expect(strongest).to_have_attribute("title", re.compile(r"^activation "))

    # numbers, quantiles, logit effects
    stats = page.locator("#stats").text_content()
    assert f"{live['count']:,} tokens" in stats
    expect(page.locator("#quantiles tr")).to_have_count(len(live["quantiles"]) + 1)
    expect(page.locator("#logits-pos tr")).to_have_count(len(live["pos_str"]))
    expect(page.locator("#logits-neg tr")).to_have_count(len(live["neg_str"]))
    if live["pos_str"]:
        first_token = page.locator("#logits-pos td.tok").first.text_content()
        assert first_token == live["pos_str"][0].replace("\n", "↵").replace("\t", "⇥")
    screenshot(page, tmp_path / "feature.png")


def test_neighbour_links_load_their_feature_and_back_returns(service: Service, live: dict[str, Any],
                                                             page: Any) -> None:
    from playwright.sync_api import expect

    index, neighbour = live["id"], live["topkCosSimIndices"][0]
    assert neighbour != index
    page.goto(service.page(f"/features/{index}"))
    links = page.locator("#neighbours a")
    expect(links).to_have_count(len(live["topkCosSimIndices"]))
    cells = page.locator("#neighbours tr").nth(1).locator("td")
    assert float(cells.nth(1).text_content()) == pytest.approx(live["topkCosSimValues"][0], rel=5e-3)
    assert cells.nth(2).text_content() == live["neighbour_labels"].get(str(neighbour), "")
    links.first.click()
    expect(page).to_have_url(service.page(f"/features/{neighbour}"))
    expect(page.locator("#feature-title")).to_have_text(re.compile(rf"^Feature {neighbour}\b"))
    other = service.feature(neighbour)
    expect(page.locator("#label")).to_have_text(other["label"] or "(no label)")
    expect(page.locator("#histogram rect")).to_have_count(len(other["freq_hist_data_bar_heights"]))
    page.go_back()
    expect(page.locator("#feature-title")).to_have_text(f"Feature {index}")
    page.reload()  # the URL alone brings the page back
    expect(page.locator("#feature-title")).to_have_text(f"Feature {index}")


def test_feature_page_tests_the_feature_on_a_typed_text(service: Service, live: dict[str, Any],
                                                       page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(service.page(f"/features/{live['id']}"))
    page.fill("#activation-text", INSPECT_TEXT)
    page.click("#activation-run")
    tokens = page.locator("#activation-result .token")
    expected = service.post(f"/api/{service.name}/activation", {"text": INSPECT_TEXT, "index": live["id"]})
    expect(tokens).to_have_count(len(expected["tokens"]), timeout=MODEL_TIMEOUT_MS)
    titles = tokens.evaluate_all("ts => ts.map(t => t.title)")
    assert [activation_in(t) for t in titles] == pytest.approx(expected["values"], rel=1e-3, abs=1e-6)
    alphas = shading(tokens)
    assert alphas == pytest.approx([min(max(v / live["max_activation"], 0), 1) for v in expected["values"]],
                                   abs=0.01)
    assert "".join(tokens.all_text_contents()) == "".join(t.replace("\n", "↵") for t in expected["tokens"])


def test_out_of_range_feature_shows_the_api_error(service: Service, page: Any) -> None:
    from playwright.sync_api import expect

    d_sae = service.get("/api/dictionaries")["dictionaries"][0]["d_sae"]
    page.goto(service.page(f"/features/{d_sae + 7}"))
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("422")
    expect(page.locator("#error")).to_contain_text(f"feature {d_sae + 7} does not exist")
    expect(page.locator("#header")).to_be_visible()


def search_case(service: Service) -> tuple[dict[str, Any], str]:
    """A live feature and one of its top tokens (a word) that finds it on the first page of results."""
    for feature in live_features(service):
        for token, _ in feature["top_tokens"]:
            word = token.strip()
            if len(word) >= 2 and word.isalpha():
                query = urllib.parse.urlencode({"q": word})
                found = service.get(f"/api/{service.name}/search?{query}")
                if feature["id"] in [r["index"] for r in found["results"]]:
                    return feature, word
    raise AssertionError("no live feature is found by one of its top tokens")


def test_search_finds_a_feature_by_its_token_and_opens_it(service: Service, page: Any,
                                                           tmp_path: Path) -> None:
    from playwright.sync_api import expect

    feature, word = search_case(service)
    page.goto(service.url + "/")
    expect(page.locator("#dictionaries")).to_be_visible()
    page.fill("#search-input", word)
    page.press("#search-input", "Enter")
    expect(page).to_have_url(re.compile(rf"/{service.name}/search\?q={word}$"))
    found = service.get(f"/api/{service.name}/search?q={word}")
    expect(page.locator("#search-summary")).to_contain_text(f"{found['total']:,} features match")
    results = page.locator("#search-results li")
    expect(results).to_have_count(len(found["results"]))
    hit = page.locator(f"#search-results a[href='/{service.name}/features/{feature['id']}']")
    expect(hit).to_have_count(1)
    screenshot(page, tmp_path / "search.png")
    hit.click()
    expect(page).to_have_url(service.page(f"/features/{feature['id']}"))
    expect(page.locator("#feature-title")).to_have_text(f"Feature {feature['id']}")


def test_search_pages_forward_and_back(service: Service, page: Any) -> None:
    from playwright.sync_api import expect

    _, word = search_case(service)
    every = service.get(f"/api/{service.name}/search?q={word}&per_page=100")
    expected = [r["index"] for r in every["results"]]
    assert 2 <= len(expected) == every["total"] <= 30, f"'{word}' matches {every['total']} features"
    page.goto(service.page(f"/search?q={word}&per_page=1"))
    shown = []
    for n in range(1, len(expected) + 1):  # next → through every page, one result each
        expect(page.locator("#search-summary")).to_contain_text(f"page {n} of {len(expected)}")
        expect(page.locator("#search-results li")).to_have_count(1)
        shown.append(int(page.locator("#search-results li a").first.text_content().removeprefix("#")))
        assert page.locator("#search-prev").count() == (n > 1)
        if n < len(expected):
            page.click("#search-next")
    assert page.locator("#search-next").count() == 0
    assert shown == expected
    page.click("#search-prev")
    expect(page.locator("#search-summary")).to_contain_text(f"page {len(expected) - 1} of")
    expect(page.locator("#search-results li a").first).to_have_text(f"#{expected[-2]}")


def test_inspector_lists_the_features_of_a_typed_text(service: Service, page: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    expected = service.post(f"/api/{service.name}/inspect", {"text": INSPECT_TEXT, "top": 5})
    assert expected["ranked"], "no feature fires on the text"
    page.goto(service.url + "/")
    page.click("#nav-inspect")
    expect(page).to_have_url(service.page("/inspect"))
    page.fill("#inspect-text", INSPECT_TEXT)
    page.click("#inspect-run")
    rows = page.locator("#inspect-ranked tr")
    expect(rows).to_have_count(len(expected["ranked"]) + 1, timeout=MODEL_TIMEOUT_MS)
    shown = [int(a.removeprefix("#")) for a in page.locator("#inspect-ranked a").all_text_contents()]
    assert shown == [f["index"] for f in expected["ranked"]]

    tokens = page.locator("#inspect-tokens .token")
    expect(tokens).to_have_count(len(expected["tokens"]))
    k = max(range(len(expected["tokens"])), key=lambda i: len(expected["tokens"][i]["features"]))
    token = expected["tokens"][k]
    tokens.nth(k).click()
    listed = [int(a.removeprefix("#")) for a in page.locator("#token-features a").all_text_contents()]
    assert listed == [f["index"] for f in token["features"]] and listed
    assert tokens.nth(k).get_attribute("title").startswith(f"#{token['features'][0]['index']} ")
    special = [i for i, t in enumerate(expected["tokens"]) if t["special"]]
    for i in special:
        assert tokens.nth(i).evaluate("s => s.classList.contains('special')")
    assert page.url.endswith("/inspect?" + urllib.parse.urlencode({"text": INSPECT_TEXT}))

    # shading: relative to the strongest top activation over the ordinary tokens; special ones plain
    alphas = shading(tokens)
    tops = [t["features"][0]["activation"] if t["features"] and not t["special"] else 0.0
            for t in expected["tokens"]]
    assert alphas == pytest.approx([v / max(tops) for v in tops], abs=0.01)
    assert all(alphas[i] == 0 for i in special) and max(alphas) == pytest.approx(1.0)
    screenshot(page, tmp_path / "inspector.png")

    # a ranked feature shown on the text: each token's hover text is that feature's activation there
    best = expected["ranked"][0]
    page.locator("#inspect-ranked .inspect-show").first.click()
    titles = tokens.evaluate_all("ts => ts.map(t => t.title)")
    assert [activation_in(t) for t in titles] == pytest.approx(best["values"], rel=1e-3, abs=1e-6)
    assert titles[0].startswith(f"#{best['index']}: ")
    assert shading(tokens)[best["maxValueTokenIndex"]] == pytest.approx(1.0)
    page.click("#inspect-reset")
    assert tokens.nth(k).get_attribute("title").startswith(f"#{token['features'][0]['index']} ")

    first = expected["ranked"][0]["index"]
    page.locator("#inspect-ranked a").first.click()
    expect(page.locator("#feature-title")).to_have_text(re.compile(rf"^Feature {first}\b"))
    page.go_back()  # the inspection's URL runs it again
    expect(rows).to_have_count(len(expected["ranked"]) + 1, timeout=MODEL_TIMEOUT_MS)


def test_steer_panel_shows_default_and_steered_completions(service: Service, live: dict[str, Any], page: Any,
                                                           tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page.goto(service.page(f"/features/{live['id']}"))
    page.get_by_text("Steer with this feature").click()
    expect(page).to_have_url(service.page(f"/steer?feature={live['id']}"))
    expect(page.locator("#steer-features .steer-index")).to_have_value(str(live["id"]))
    page.click("#steer-add")  # a second row, then removed again
    expect(page.locator("#steer-features .steer-feature")).to_have_count(2)
    page.locator("#steer-features .steer-remove").nth(1).click()
    expect(page.locator("#steer-features .steer-feature")).to_have_count(1)

    page.fill("#steer-prompt", "The weather today is")
    page.fill("#steer-features .steer-strength", "8")
    page.fill("#steer-n", "12")
    page.fill("#steer-temperature", "0")
    page.click("#steer-run")
    default = page.locator("#default-completion .generated")
    steered = page.locator("#steered-completion .generated")
    expect(steered).to_have_count(1, timeout=MODEL_TIMEOUT_MS)
    expect(default).to_have_count(1)
    shown_default, shown_steered = default.text_content(), steered.text_content()
    assert shown_default.strip() and shown_steered.strip()
    assert shown_steered != shown_default
    expect(page.locator("#default-completion .prompt")).to_have_text("The weather today is")

    expected = service.post(f"/api/{service.name}/steer", {
        "prompt": "The weather today is", "features": [{"index": live["id"], "strength": 8}],
        "n_completion_tokens": 12, "temperature": 0, "seed": 0})
    assert (shown_default, shown_steered) == (expected["DEFAULT"]["text"], expected["STEERED"]["text"])
    assert page.locator("#error").is_hidden()
    screenshot(page, tmp_path / "steer.png")


def test_steering_an_out_of_range_feature_shows_the_error_box(service: Service, page: Any) -> None:
    from playwright.sync_api import expect

    d_sae = service.get("/api/dictionaries")["dictionaries"][0]["d_sae"]
    page.goto(service.page(f"/steer?feature={d_sae + 3}"))
    page.fill("#steer-prompt", "Hello")
    page.click("#steer-run")
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=MODEL_TIMEOUT_MS)
    expect(error).to_contain_text("422")
    expect(error).to_contain_text(f"feature {d_sae + 3} does not exist")
    expect(page.locator("#steer-prompt")).to_have_value("Hello")  # the form stays, nothing blank
    assert page.locator("#steered-completion").text_content() == ""

    page.fill("#steer-features .steer-index", "0")
    page.fill("#steer-features .steer-strength", "1000")  # past the strength limit: pydantic's list form
    page.click("#steer-run")
    expect(error).to_contain_text("strength", timeout=MODEL_TIMEOUT_MS)


def test_label_edit_when_writable_persists_and_is_shown_as_text(tiny_dictionary: Path, browser: Any,
                                                                 page: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    copy = Path(shutil.copytree(tiny_dictionary, tmp_path / "dictionary"))
    with start_service([copy], writable=True) as url:
        name = Service(url, "").get("/api/dictionaries")["dictionaries"][0]["name"]
        served = Service(url, name)
        index = next(live_features(served))["id"]
        page.goto(served.page(f"/features/{index}"))
        label = "<b>curly</b> & \"quoted\" tokens"  # shown as typed: never parsed as HTML
        page.fill("#label-input", label)
        page.click("#label-save")
        expect(page.locator("#label-status")).to_have_text("Saved")
        expect(page.locator("#label")).to_have_text(label)
        expect(page.locator("#label-source")).to_have_text("user")
        assert page.locator("#label b").count() == 0
        page.reload()
        expect(page.locator("#label")).to_have_text(label)
        expect(page.locator("#label-input")).to_have_value(label)
        assert served.feature(index)["label"] == label
        screenshot(page, tmp_path / "feature-writable.png")

        page.fill("#label-input", "")  # restores the automatic label
        page.click("#label-save")
        expect(page.locator("#label-source")).to_have_text("auto")
        assert served.feature(index)["label_source"] == "auto"


def test_a_token_protected_server_serves_the_page_from_its_cookie(tiny_dictionary: Path, page: Any) -> None:
    from playwright.sync_api import expect

    with start_service([tiny_dictionary], token="s3cret-token") as url:
        response = page.goto(url + "/")
        assert response.status == 401
        page.goto(url + "/?token=s3cret-token")
        expect(page.locator("#dictionaries a").first).to_be_visible()
        assert "token" not in page.url  # dropped from the address bar; the cookie carries it
        page.locator("#dictionaries a").first.click()
        expect(page.locator("#feature-title")).to_have_text(re.compile(r"^Feature 0\b"))
        assert page.locator("#error").is_hidden()


def test_a_busy_model_shows_retry_after_then_the_run_succeeds(tiny_dictionary: Path, page: Any) -> None:
    """Another client holds the model and nobody may wait (max_waiting=0): the page shows the 503
    and its Retry-After; once the model is free the same Run gives both completions."""
    from playwright.sync_api import expect

    from saeworks.service.app import create_app

    app = create_app([tiny_dictionary], max_waiting=0)
    with serving(app) as url:
        name = Service(url, "").get("/api/dictionaries")["dictionaries"][0]["name"]
        page.goto(f"{url}/{name}/steer?feature=0")
        page.fill("#steer-prompt", "Once upon a time")
        page.fill("#steer-n", "4")
        with app.state.catalog[name].gate.call():  # the other client's model call
            page.click("#steer-run")
            expect(page.locator("#error")).to_contain_text("503")
            expect(page.locator("#error")).to_contain_text("try again in 2 s")
        expect(page.locator("#steer-run")).to_be_enabled()
        page.click("#steer-run")
        expect(page.locator("#steered-completion .generated")).to_have_count(1, timeout=MODEL_TIMEOUT_MS)
        assert page.locator("#error").is_hidden()
        assert page.locator("#default-completion .generated").text_content().strip()
