"""A feature dictionary in the terminal: `saeworks show`, `search` and `inspect` for scripts and SSH.

In a terminal that takes colour, each token of a context is shaded by the feature's activation on
it (background from none to orange as activation / max activation goes from 0 to 1) and the
activating token is bold and underlined. Otherwise (stdout is not a terminal, NO_COLOR is set,
`--plain` or `--color never`) the output is plain text: the activating token is marked «like
this» and each active token's activation is printed as a number on the line below. `--color
always` (or FORCE_COLOR) colours even a pipe.

Whitespace inside tokens is shown escaped (\\n, \\t, \\r), so a context stays on one line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import IO

from rich.console import Console
from rich.text import Text

from saeworks.eval.dictionary import Context, Feature, FeatureDictionary, TokenActivations
from saeworks.eval.labels import show_token

COLOR_CHOICES = ("auto", "always", "never")
SHADE = (255, 128, 0)
"""The background of a token at the feature's max activation (the notebook view's orange)."""
FOCUS_MARK = ("«", "»")
SPARK = "▁▂▃▄▅▆▇█"
ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def use_color(choice: str, stream: IO[str]) -> bool:
    """Whether to colour: `always`/`never` as said; `auto` colours a terminal unless NO_COLOR is
    set (FORCE_COLOR colours a pipe too)."""
    if choice in ("always", "never"):
        return choice == "always"
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def make_console(color: bool, file: IO[str] | None = None) -> Console:
    """A console that writes ANSI colour, or plain text with no escape codes at all; long lines
    are never wrapped (contexts are read, and parsed by scripts, one per line)."""
    if not color:
        return Console(file=file, force_terminal=False, no_color=True, color_system=None, highlight=False,
                       emoji=False, soft_wrap=True)
    truecolor = os.environ.get("COLORTERM", "").lower() in ("truecolor", "24bit")
    return Console(file=file, force_terminal=True, no_color=False,
                   color_system="truecolor" if truecolor else "256", highlight=False, emoji=False,
                   soft_wrap=True)


def visible(token: str) -> str:
    """A token as shown inside a context: its newlines, tabs and carriage returns escaped."""
    for raw, shown in ESCAPES.items():
        token = token.replace(raw, shown)
    return token


def shade(value: float, peak: float) -> str | None:
    """The rich style of a token with activation `value` when the feature's max is `peak`: black
    on a background from white (just active) to orange (at the max); None when inactive."""
    if peak <= 0 or value <= 0:
        return None
    alpha = min(value / peak, 1.0)
    r, g, b = (round(255 + (c - 255) * alpha) for c in SHADE)
    return f"black on #{r:02x}{g:02x}{b:02x}"


def context_text(context: Context, peak: float, color: bool) -> Text:
    """The context's tokens: shaded by activation / `peak` in colour, the activating token bold
    and underlined; in plain text, the activating token between « and »."""
    text = Text()
    for i, (token, value) in enumerate(zip(context.tokens, context.activations, strict=True)):
        shown = visible(token)
        if not color:
            text.append(f"{FOCUS_MARK[0]}{shown}{FOCUS_MARK[1]}" if i == context.focus else shown)
            continue
        style = shade(value, peak) or ""
        text.append(shown, style=f"{style} bold underline".strip() if i == context.focus else style)
    return text


def context_values(context: Context) -> str:
    """The active tokens of a context and their activations, `' token'=1.234` (plain output)."""
    pairs = zip(context.tokens, context.activations, strict=True)
    return "  ".join(f"{show_token(t)}={v:.4g}" for t, v in pairs if v > 0)


def sparkline(counts: Sequence[int]) -> str:
    """One character per bin, its height ∝ log(1 + count) (a few huge low bins would flatten a
    linear scale); a space for an empty bin."""
    top = math.log1p(max(counts, default=0))
    if top == 0:
        return " " * len(counts)
    return "".join(" " if c == 0 else SPARK[min(len(SPARK) - 1, int(math.log1p(c) / top * len(SPARK)))]
                   for c in counts)


def _number(value: float) -> str:
    return f"{value:.4g}"


def show_feature(console: Console, dictionary: FeatureDictionary, feature: Feature, *, color: bool,
                 contexts: int = 10) -> None:
    """Everything the dictionary says about `feature`: label, numbers, histogram, up to `contexts`
    top contexts and band samples, logit effects and neighbours."""
    info = dictionary.info
    out = _Printer(console)
    out.line(Text.assemble((f"feature {feature.id}", "bold"), f" of {len(dictionary)}  ",
                           (feature.label, "bold cyan" if color else ""),
                           f"  ({feature.label_source} label)"))
    out.line(f"{info.get('sae_name')} at {info.get('hook')}, analysed over {int(info.get('n_tokens', 0)):,} "
             "tokens")
    if feature.dead:
        out.line("dead: it was active on none of the analysed tokens")
    else:
        out.line(f"density {_number(feature.density)} (active on {feature.count:,} tokens) · "
                 f"mean {_number(feature.mean_activation)} · max {_number(feature.max_activation)}")
        out.line("quantiles  " + " · ".join(f"{level * 100:g}% {_number(value)}"
                                            for level, value in feature.quantiles))
        out.line(f"histogram  {sparkline(feature.histogram)}  ({len(feature.histogram)} bins over 0 .. "
                 f"{_number(feature.max_activation)}, height log(1 + count), largest bin "
                 f"{max(feature.histogram, default=0):,})")
    _show_contexts(out, "top contexts", feature.top_contexts[:contexts], feature, color)
    _show_contexts(out, "band samples", _band_sample(feature.band_contexts, contexts), feature, color,
                   info.get("band_edges"))
    for name, effects in (("promotes", feature.logit_positive), ("suppresses", feature.logit_negative)):
        if effects:
            out.line(f"{name:<11}" + " · ".join(f"{show_token(t)} {v:+.4g}" for t, v in effects))
    if feature.neighbours:
        out.line("neighbours (decoder cosine):")
        labels = dictionary.labels([j for j, _ in feature.neighbours])
        for j, cosine in feature.neighbours:
            out.line(f"  #{j:<6} {cosine:6.3f}  {labels.get(j, '')}")


def _band_sample(contexts: list[Context], limit: int) -> list[Context]:
    """Up to `limit` band samples, taken from every band in turn (not all from the highest)."""
    bands: dict[int | None, list[Context]] = {}
    for c in contexts:
        bands.setdefault(c.band, []).append(c)
    picked: list[Context] = []
    for rank in range(max((len(v) for v in bands.values()), default=0)):
        picked += [v[rank] for v in bands.values() if rank < len(v)]
    return sorted(picked[:limit], key=lambda c: (c.band if c.band is not None else -1, c.rank))


def _show_contexts(out: _Printer, title: str, contexts: list[Context], feature: Feature, color: bool,
                   band_edges: list[float] | None = None) -> None:
    if not contexts:
        return
    how = "shaded by activation, activating token underlined" if color else \
        f"activating token {FOCUS_MARK[0]}marked{FOCUS_MARK[1]}, active tokens' activations below"
    out.line(f"{title} ({how}):")
    bands = [_band_label(c, band_edges) for c in contexts]
    width = max(map(len, bands))
    for c, band in zip(contexts, bands, strict=True):
        lead = f"  {band:<{width}}{'  ' if width else ''}"
        shown = context_text(c, feature.max_activation, color)
        out.line(Text.assemble(f"{lead}{c.activation:9.4g}  ", shown))
        if not color:
            out.line(f"{' ' * len(lead)}{'':9}  {context_values(c)}")


def _band_label(context: Context, band_edges: list[float] | None) -> str:
    """'band 1 (0-50% of max)' for a band sample, '' for a top context."""
    if context.band is None:
        return ""
    label = f"band {context.band}"
    if band_edges and context.band + 1 < len(band_edges):
        label += f" ({band_edges[context.band + 1] * 100:g}-{band_edges[context.band] * 100:g}% of max)"
    return label


def show_search(console: Console, dictionary: FeatureDictionary, query: str, limit: int = 20) -> None:
    """Features whose label or top tokens match `query`, then those whose top contexts fire on the
    token `query`."""
    out = _Printer(console)
    found = dictionary.search(query, limit)
    if found:
        out.line(f"{len(found)} feature{'s' if len(found) != 1 else ''} whose label or top tokens match "
                 f"{query!r}:")
        for s in found:
            tokens = ", ".join(f"{show_token(t)}×{n}" for t, n in s.top_tokens[:5])
            out.line(f"  #{s.id:<6} density {s.density:9.3e}  max {s.max_activation:8.4g}  {s.label}")
            if tokens:
                out.line(f"  {'':7} top tokens: {tokens}")
    else:
        out.line(f"no feature's label or top tokens match {query!r}")
    on_token = dictionary.features_for_token(query, limit)
    if on_token:
        out.line(f"features whose top contexts fire on the token {query!r}:")
        for tf in on_token:
            out.line(f"  #{tf.feature.id:<6} {tf.count:>3}× (max {tf.max_activation:.4g})  "
                     f"{tf.feature.label}")


def show_inspect(console: Console, dictionary: FeatureDictionary, tokens: list[TokenActivations], *,
                 color: bool) -> None:
    """Per token of a text, its most active features; in colour, each activation is shaded by the
    feature's max activation over the analysed tokens."""
    out = _Printer(console)
    peaks = {s.id: s.max_activation for s in dictionary.summaries(
        sorted({f.id for t in tokens for f in t.features}))}
    if not tokens:
        out.line("the text has no tokens")
    for t in tokens:
        out.line(Text.assemble((f"{t.position:4d} ", "dim" if color else ""),
                               (show_token(t.token), "bold" if color else "")))
        if not t.features:
            out.line("       no active feature")
        for f in t.features:
            value = Text(f"{f.activation:9.4g}", style=(shade(f.activation, peaks.get(f.id, 0.0)) or "")
                         if color else "")
            out.line(Text.assemble(f"       #{f.id:<6}", value, f"  {f.label}"))


class _Printer:
    """Lines to a console, never parsed as rich markup (tokens hold brackets)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def line(self, text: str | Text) -> None:
        self.console.print(text if isinstance(text, Text) else Text(text), soft_wrap=True)
