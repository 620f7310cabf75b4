"""`saeworks show`, `search` and `inspect` as a researcher reads them: the dictionary's numbers and
contexts, plain text with the activating token «marked» off a terminal, tokens shaded by
activation (ANSI background colours) on one, and one-line errors."""

from __future__ import annotations

import ast
import io
import json
import re
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from saeworks.cli import main
from saeworks.eval.dictionary import Context, FeatureDictionary
from saeworks.terminal import (
    context_text,
    make_console,
    shade,
    show_feature,
    show_inspect,
    show_search,
    use_color,
    visible,
)
from tests.helpers import run_cli

ANSI = re.compile(r"\x1b\[[0-9;]*m")
BACKGROUND = re.compile(r"\x1b\[[0-9;]*(?:48;5;\d+|48;2;\d+;\d+;\d+)[0-9;]*m")
VALUE = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")=(\S+)""")
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def dictionary(tiny_dictionary: Path) -> Iterator[FeatureDictionary]:
    with FeatureDictionary.open(tiny_dictionary, readonly=True) as d:
        yield d


def _render(color: bool, draw) -> str:  # type: ignore[no-untyped-def]
    buffer = io.StringIO()
    draw(make_console(color, buffer))
    return buffer.getvalue()


def _plain_context(context: Context) -> str:
    return "".join(f"«{visible(t)}»" if i == context.focus else visible(t)
                   for i, t in enumerate(context.tokens))


def test_show_plain_prints_the_dictionarys_numbers_and_marked_contexts(dictionary: FeatureDictionary) -> None:
    feature = dictionary.feature(dictionary.top_features(1)[0].id)
    assert feature.top_contexts and feature.band_contexts
    out = _render(False, lambda c: show_feature(c, dictionary, feature, color=False, contexts=3))
    assert "\x1b" not in out
    lines = out.splitlines()
    assert lines[0] == f"feature {feature.id} of {len(dictionary)}  {feature.label}  (auto label)"
    assert (f"density {feature.density:.4g} (active on {feature.count:,} tokens) · mean "
            f"{feature.mean_activation:.4g} · max {feature.max_activation:.4g}") in lines
    assert "quantiles  " + " · ".join(f"{q * 100:g}% {v:.4g}" for q, v in feature.quantiles) in lines
    shown = feature.top_contexts[:3] + feature.band_contexts[:3]
    for context in shown:
        (at,) = [i for i, line in enumerate(lines) if line.endswith(f"{context.activation:.4g}  "
                                                                    f"{_plain_context(context)}")]
        values = [(ast.literal_eval(t), float(v)) for t, v in VALUE.findall(lines[at + 1])]
        active = [(t, v) for t, v in zip(context.tokens, context.activations, strict=True) if v > 0]
        assert [t for t, _ in values] == [t for t, _ in active]
        assert [v for _, v in values] == pytest.approx([v for _, v in active], rel=1e-3)
    for token, effect in feature.logit_positive[:3] + feature.logit_negative[:3]:
        assert f"{token!r} {effect:+.4g}" in out
    labels = dictionary.labels([j for j, _ in feature.neighbours])
    for j, cosine in feature.neighbours:
        assert f"  #{j:<6} {cosine:6.3f}  {labels[j]}" in lines


def test_show_in_colour_shades_tokens_by_activation(dictionary: FeatureDictionary) -> None:
    feature = dictionary.feature(dictionary.top_features(1)[0].id)
    out = _render(True, lambda c: show_feature(c, dictionary, feature, color=True, contexts=2))
    assert BACKGROUND.search(out) and "«" not in out
    plain = ANSI.sub("", out)
    for context in feature.top_contexts[:2]:
        assert "".join(map(visible, context.tokens)) in plain
    line = context_text(feature.top_contexts[0], feature.max_activation, color=True)
    focus = [span for span in line.spans if "underline" in str(span.style)]
    assert len(focus) == 1 and focus[0].end - focus[0].start == len(visible(feature.top_contexts[0].tokens[
        feature.top_contexts[0].focus]))
    assert shade(0.0, 10.0) is None and shade(10.0, 10.0) == "black on #ff8000"
    assert shade(5.0, 10.0) == "black on #ffc080" and shade(20.0, 10.0) == shade(10.0, 10.0)


def test_colour_choice_follows_flags_env_and_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not use_color("auto", io.StringIO()) and use_color("auto", Tty())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color("auto", Tty()) and use_color("always", Tty())
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert use_color("auto", io.StringIO()) and not use_color("never", Tty())


def test_show_cli_colour_flags_json_and_errors(tiny_dictionary: Path, dictionary: FeatureDictionary,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    args = ["show", str(tiny_dictionary), "7", "--contexts", "1"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert "«" in plain and "\x1b" not in plain  # captured stdout is not a terminal
    assert main([*args, "--color", "always"]) == 0
    assert BACKGROUND.search(capsys.readouterr().out)
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert main(args) == 0
    assert BACKGROUND.search(capsys.readouterr().out)
    assert main([*args, "--plain"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*args, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    feature = dictionary.feature(7)
    assert record["index"] == "7" and record["label"] == feature.label
    assert [a["tokens"] for a in record["activations"]] == [c.tokens for c in feature.contexts]
    assert main(["show", str(tiny_dictionary), str(len(dictionary))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("saeworks show: error: feature 256 does not exist")
    assert f"ids 0 to {len(dictionary) - 1}" in err
    assert main(["show", str(tiny_dictionary / "nope"), "1"]) == 2
    assert "no feature dictionary" in capsys.readouterr().err


def test_show_in_a_real_process_is_plain_when_piped(tiny_dictionary: Path,
                                                    dictionary: FeatureDictionary) -> None:
    feature = dictionary.feature(dictionary.top_features(1)[0].id)
    done = run_cli(["show", str(tiny_dictionary), str(feature.id), "--contexts", "1"], timeout=300)
    assert done.returncode == 0, done.stderr
    assert feature.label in done.stdout and _plain_context(feature.top_contexts[0]) in done.stdout
    assert "\x1b" not in done.stdout


def test_search_finds_a_feature_by_its_top_token(tiny_dictionary: Path, dictionary: FeatureDictionary,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    fid, token = next((s.id, t) for s in dictionary.top_features(len(dictionary)) for t, _ in s.top_tokens
                      if re.fullmatch(r" ?[A-Za-z]{4,}", t))
    out = _render(False, lambda c: show_search(c, dictionary, token, limit=len(dictionary)))
    head, _, on_token = out.partition("features whose top contexts fire on the token")
    assert f"  #{fid:<6} density" in head and f"  #{fid:<6} " in on_token
    assert main(["search", str(tiny_dictionary), token, "--limit", str(len(dictionary)), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert fid in [r["index"] for r in found["results"]]
    assert fid in [r["index"] for r in found["token_matches"]]
    assert main(["search", str(tiny_dictionary), "qqzzxxyy"]) == 0
    assert "no feature's label or top tokens match 'qqzzxxyy'" in capsys.readouterr().out


def test_inspect_lists_each_tokens_top_features(tiny_dictionary: Path, dictionary: FeatureDictionary,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    tokens = dictionary.features_on(TEXT, top=3)
    assert main(["inspect", str(tiny_dictionary), "--text", TEXT, "--top", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["tokens"]
    expected = [asdict(t) for t in tokens]
    assert [(t["position"], t["token"]) for t in printed] == [(t["position"], t["token"]) for t in expected]
    for got, want in zip(printed, expected, strict=True):
        assert [f["id"] for f in got["features"]] == [f["id"] for f in want["features"]]
        assert [f["activation"] for f in got["features"]] == pytest.approx(
            [f["activation"] for f in want["features"]], abs=1e-4)
    out = _render(False, lambda c: show_inspect(c, dictionary, tokens, color=False))
    blocks = re.split(r"^\s*\d+ (?='|\")", out, flags=re.M)[1:]
    assert len(blocks) == len(tokens)
    for block, token in zip(blocks, tokens, strict=True):
        head, *rows = block.splitlines()
        assert ast.literal_eval(head) == token.token
        listed = [(int(i), float(v)) for i, v in (re.findall(r"^\s+#(\d+)\s+(\S+)", r)[0] for r in rows)]
        assert [i for i, _ in listed] == [f.id for f in token.features]
        assert [v for _, v in listed] == pytest.approx([f.activation for f in token.features], rel=1e-3)
    coloured = _render(True, lambda c: show_inspect(c, dictionary, tokens, color=True))
    assert BACKGROUND.search(coloured) and ANSI.sub("", coloured) == out


def test_show_says_a_dead_feature_is_dead(tmp_path: Path) -> None:
    from tests.dictionary_helpers import build

    directory, analysis = build(tmp_path)  # feature 1 never fired
    assert int(analysis.count[1]) == 0
    with FeatureDictionary.open(directory, readonly=True) as d:
        out = _render(False, lambda c: show_feature(c, d, d.feature(1), color=False))
    assert "dead: it was active on none of the analysed tokens" in out
    assert "«" not in out  # no contexts to show
