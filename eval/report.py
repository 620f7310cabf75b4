"""Markdown reports: one per feature dictionary, and one per run comparing its SAEs.

Links are relative, so a report keeps working when its directory is moved or copied.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from saeworks.eval import plots
from saeworks.eval.dictionary import (
    METRICS_FILE,
    PLOTS_DIR,
    REPORT_FILE,
    Context,
    FeatureDictionary,
)
from saeworks.sae.atomic import write_text_atomic
from saeworks.sae.paths import DICTIONARIES_DIR, SAES_DIR, RunLayout

TOP_FEATURES = 10
RUN_REPORT_DIR = "report"
HEADLINE = ("fvu", "l0", "ce_recovered", "kl", "mse", "cosine", "dead_fraction", "dense_fraction")
"""Metrics shown first (in this order) and the columns of the run table."""
RUN_COLUMNS = ("fvu", "l0", "ce_recovered", "kl", "dead_fraction")


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "⏎")


def _code(text: str) -> str:
    """Inline code that survives backticks, underscores and asterisks in `text`."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _metric_keys(metrics: dict[str, Any]) -> list[str]:
    return [k for k in HEADLINE if k in metrics] + sorted(k for k in metrics if k not in HEADLINE)


def render_context(context: Context) -> str:
    """A context as a fenced block, the activating token between « and »."""
    return "```text\n" + context.text().replace("```", "'''") + "\n```"


def dictionary_report(directory: str | Path) -> Path:
    """Write `report.md` in a feature dictionary: metrics, plots, its most frequent features."""
    directory = Path(directory)
    with FeatureDictionary.open(directory, readonly=True) as d:
        info = d.info
        lines = [f"# Feature dictionary: {info['sae_name']}", "",
                 f"{len(d):,} features of an SAE on `{info['hook']}` of {info['model'].get('name')}, "
                 f"analysed over {info['n_tokens']:,} tokens"
                 + (f" of `{info['store']}`" if info.get("store") else "") + f" ({info['created']}).", ""]
        counts = d.counts()
        lines += [f"{counts['alive']:,} alive, {counts['dead']:,} dead (never active), {counts['dense']:,} "
                  "dense (active on more than 10% of tokens).", ""]
        lines += _metrics_section(d.metrics)
        lines += _plots_section(directory)
        lines += [f"## Top {TOP_FEATURES} features by density", ""]
        for summary in d.top_features(TOP_FEATURES):
            feature = d.feature(summary.id)
            lines += [f"### Feature {feature.id}: {_code(feature.label)}", "",
                      f"density {feature.density:.3e} · max activation {feature.max_activation:.3g} · "
                      f"mean activation {feature.mean_activation:.3g}", ""]
            if feature.top_contexts:
                lines += [render_context(feature.top_contexts[0]), ""]
    return write_text_atomic(directory / REPORT_FILE, "\n".join(lines))


def _metrics_section(metrics: dict[str, Any] | None) -> list[str]:
    values = (metrics or {}).get("metrics")
    if not values:
        return ["## Metrics", "", "Not evaluated (run `saeworks evaluate SAE_DIR`).", ""]
    rows = [f"| {key} | {_number(values[key])} |" for key in _metric_keys(values)]
    return ["## Metrics", "", "| metric | value |", "|---|---|", *rows, ""]


def _plots_section(directory: Path) -> list[str]:
    lines = ["## Plots", ""]
    for name, title in ((plots.DENSITY_PLOT, "Feature density"),
                        (plots.ACTIVATIONS_PLOT, "Activation histograms")):
        if (directory / PLOTS_DIR / name).is_file():
            lines += [f"![{title}]({PLOTS_DIR}/{name})", ""]
    return lines


def _read_metrics(path: Path) -> dict[str, Any] | None:
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    values = content.get("metrics") if isinstance(content, dict) else None
    return values if isinstance(values, dict) else None


def run_report(run_dir: str | Path) -> Path:
    """Write `<run_dir>/report.md` and `report/l0_fvu_frontier.png`: every SAE of the run, its
    metrics (or "not evaluated"), the L0–FVU frontier and links to each dictionary's report."""
    layout = RunLayout(Path(run_dir))
    saes = sorted(p for p in (layout.root / SAES_DIR).glob("*") if p.is_dir() and not p.name.startswith("."))
    metrics = {p.name: _read_metrics(p / METRICS_FILE) for p in saes}
    points = [(name, float(m["l0"]), float(m["fvu"])) for name, m in metrics.items()
              if m and isinstance(m.get("l0"), int | float) and isinstance(m.get("fvu"), int | float)]
    lines = [f"# Run report: {layout.root.name}", "",
             f"{len(saes)} SAE{'s' if len(saes) != 1 else ''} in `{SAES_DIR}/`, "
             f"{sum(m is not None for m in metrics.values())} evaluated.", ""]
    if points:
        plot = plots.frontier(points, layout.root / RUN_REPORT_DIR / plots.FRONTIER_PLOT)
        lines += ["## L0–FVU frontier", "", f"![L0–FVU frontier]({plot.relative_to(layout.root).as_posix()})",
                  ""]
    header = ["SAE", *RUN_COLUMNS, "dictionary"]
    lines += ["## SAEs", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for sae in saes:
        values = metrics[sae.name]
        cells = ([_number(values[k]) if k in values else "–" for k in RUN_COLUMNS] if values
                 else ["not evaluated", *["–"] * (len(RUN_COLUMNS) - 1)])
        report = layout.dictionary(sae.name) / REPORT_FILE
        link = (f"[report]({DICTIONARIES_DIR}/{sae.name}/{REPORT_FILE})" if report.is_file() else "none")
        lines.append(f"| [{_cell(sae.name)}]({SAES_DIR}/{sae.name}) | " + " | ".join(cells) + f" | {link} |")
    if not saes:
        lines.append("| (no SAEs) |" + " |" * (len(header) - 1))
    return write_text_atomic(layout.root / "report.md", "\n".join(lines) + "\n")
