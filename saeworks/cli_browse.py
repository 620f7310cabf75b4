"""Browsing and exporting a feature dictionary from the shell.

    saeworks show DICT FEATURE [--contexts N] [--json]       one feature: numbers, histogram,
                                                             contexts shaded by activation
    saeworks search DICT QUERY [--limit N] [--json]          features by label or top token
    saeworks inspect DICT --text TEXT [--top 5] [--json]     each token's most active features
    saeworks export neuronpedia DICT OUT_DIR [--force] [...] a Neuronpedia dump of the dictionary

show, search and inspect colour a terminal and print plain text to a pipe (`--color
auto|always|never`, `--plain`; NO_COLOR and FORCE_COLOR are honoured); `--json` prints the
records the HTTP API serves (saeworks.service.records) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saeworks.sae.errors import SaeworksError


class BrowseError(SaeworksError, ValueError):
    """A command-line value a browsing command cannot use."""


def _color_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--color", default="auto", choices=("auto", "always", "never"),
                     help="shade tokens by activation: auto (when stdout is a terminal and NO_COLOR "
                          "is unset), always, never")
    sub.add_argument("--plain", action="store_true", help="plain text (same as --color never)")
    sub.add_argument("--json", action="store_true", help="print the record as JSON instead")


def _console(args: argparse.Namespace) -> tuple[Any, bool]:
    """(rich console on stdout, whether it colours)."""
    from saeworks.terminal import make_console, use_color

    color = use_color("never" if args.plain else args.color, sys.stdout)
    return make_console(color, sys.stdout), color


def _open(path: Path, **kwargs: Any) -> Any:
    from saeworks.eval.dictionary import FeatureDictionary

    return FeatureDictionary.open(path, readonly=True, **kwargs)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=1, ensure_ascii=False))


def _show(args: argparse.Namespace) -> int:
    from saeworks.service.records import feature_record
    from saeworks.terminal import show_feature

    if args.contexts < 0:
        raise BrowseError(f"--contexts must be at least 0, got {args.contexts}")
    with _open(args.dictionary) as dictionary:
        feature = dictionary.feature(args.feature)
        if args.json:
            _print_json(feature_record(dictionary, feature))
            return 0
        console, color = _console(args)
        show_feature(console, dictionary, feature, color=color, contexts=args.contexts)
    return 0


def _search(args: argparse.Namespace) -> int:
    from saeworks.service.records import summary_record
    from saeworks.terminal import show_search

    if not args.query.strip():
        raise BrowseError("give a non-empty QUERY (words of a label, or a token such as ' the')")
    if args.limit < 1:
        raise BrowseError(f"--limit must be at least 1, got {args.limit}")
    with _open(args.dictionary) as dictionary:
        if args.json:
            _print_json({"query": args.query,
                         "results": [summary_record(s) for s in dictionary.search(args.query, args.limit)],
                         "token_matches": [{**summary_record(t.feature), "token_count": t.count,
                                            "token_max_activation": t.max_activation}
                                           for t in dictionary.features_for_token(args.query, args.limit)]})
            return 0
        console, _ = _console(args)
        show_search(console, dictionary, args.query, args.limit)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from saeworks.terminal import show_inspect

    if args.top < 1:
        raise BrowseError(f"--top must be at least 1, got {args.top}")
    if not args.text:
        raise BrowseError("give a non-empty --text")
    with _open(args.dictionary, device=args.device, dtype=args.dtype) as dictionary:
        tokens = dictionary.features_on(args.text, top=args.top)
        if args.json:
            _print_json({"text": args.text, "tokens": [asdict(t) for t in tokens]})
            return 0
        console, color = _console(args)
        show_inspect(console, dictionary, tokens, color=color)
    return 0


def _export(args: argparse.Namespace) -> int:
    from saeworks.neuronpedia_export import export_neuronpedia

    result = export_neuronpedia(args.dictionary, args.out_dir, creator=args.creator,
                                creator_id=args.creator_id, release_id=args.release_id,
                                release_title=args.release_title, url=args.url, hf_repo_id=args.hf_repo_id,
                                features_per_batch=args.features_per_batch, labels=args.labels,
                                visibility=args.visibility, force=args.force, progress=not args.quiet)
    for line in result.lines():
        print(line)
    return 0


def _add_show(commands: Any) -> None:
    text = ("one feature in the terminal: label, density, quantiles, histogram, top and band contexts "
            "shaded by activation, logit effects, neighbours")
    sub = commands.add_parser("show", help=text, description=text)
    sub.add_argument("dictionary", type=Path, help="a feature dictionary directory (saeworks analyze)")
    sub.add_argument("feature", type=int, help="the feature id")
    sub.add_argument("--contexts", type=int, default=10, help="top contexts and band samples shown (each)")
    _color_options(sub)


def _add_search(commands: Any) -> None:
    text = "features whose label or top tokens match a query, and those that fire on it as a token"
    sub = commands.add_parser("search", help=text, description=text)
    sub.add_argument("dictionary", type=Path, help="a feature dictionary directory (saeworks analyze)")
    sub.add_argument("query", help="words of a label, or a token (' the' with its space)")
    sub.add_argument("--limit", type=int, default=20, help="results of each kind")
    _color_options(sub)


def _add_inspect(commands: Any) -> None:
    text = "each token of a text and its most active features (runs the model and the SAE)"
    sub = commands.add_parser("inspect", help=text, description=text)
    sub.add_argument("dictionary", type=Path, help="a feature dictionary directory (saeworks analyze)")
    sub.add_argument("--text", required=True, help="the text to read")
    sub.add_argument("--top", type=int, default=5, help="features per token")
    sub.add_argument("--device", default="cpu")
    sub.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                     help="the model's dtype (default: as the store was harvested)")
    _color_options(sub)


def _add_export(commands: Any) -> None:
    from saeworks import neuronpedia_export as np_export

    text = ("write a feature dictionary in another tool's format: neuronpedia (its dump layout: "
            "features/ and activations/ batch-N.jsonl.gz, model, source, source set and release)")
    sub = commands.add_parser("export", help=text, description=text)
    sub.add_argument("format", choices=("neuronpedia",), help="the format")
    sub.add_argument("dictionary", type=Path, help="a feature dictionary directory (saeworks analyze)")
    sub.add_argument("out_dir", type=Path, help="the export directory (created; refused if not empty)")
    sub.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    sub.add_argument("--creator", default="saeworks", help="the creator's name on the release")
    sub.add_argument("--creator-id", default=np_export.NEURONPEDIA_BOT_USER,
                     help="the Neuronpedia user id that owns the records (default: its seeded bot user)")
    sub.add_argument("--release-id", default=None, help="release name (default: <model>-<source set>)")
    sub.add_argument("--release-title", default=None, help="release description")
    sub.add_argument("--url", default=None, help="a URL for the release (paper, weights)")
    sub.add_argument("--hf-repo-id", default=None, help="Hugging Face repo of the SAE weights, if uploaded")
    sub.add_argument("--features-per-batch", type=int, default=np_export.FEATURES_PER_BATCH)
    sub.add_argument("--labels", default="all", choices=np_export.LABEL_CHOICES,
                     help="which labels become explanations (all: every one but a dead feature's)")
    sub.add_argument("--visibility", default="PUBLIC", choices=np_export.VISIBILITIES)
    sub.add_argument("--quiet", action="store_true", help="no progress bar")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "show": _show,
    "search": _search,
    "inspect": _inspect,
    "export": _export,
}
"""Subcommand name -> handler (each returns the exit status)."""


def add_parsers(commands: Any) -> None:
    """Add the browsing and export subcommands to the CLI's subparsers."""
    _add_show(commands)
    _add_search(commands)
    _add_inspect(commands)
    _add_export(commands)
