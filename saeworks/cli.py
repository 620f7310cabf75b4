"""`saeworks`: one console command, a subcommand per stage.

    saeworks harvest CONFIG [key=value ...]
    saeworks train CONFIG [key=value ...]
    saeworks evaluate SAE_DIR [CONFIG | STORE] [key=value ...] [--out metrics.json]
    saeworks analyze SAE_DIR [CONFIG | STORE] [key=value ...] [--out DICTIONARY_DIR]
    saeworks run CONFIG [key=value ...]          harvest, train, evaluate, analyze, report
    saeworks config [SECTION]                    every config field: type, default, meaning
    saeworks --version

Every stage takes `--print-config`: print the config it would run with (file and overrides
resolved) as YAML, and exit without running.

Every expected failure (bad config, unknown hook, missing data, a store from another run) ends
with one line saying what was wrong and how to fix it, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from saeworks.run_config import RunConfig
from saeworks.sae.configdoc import render, section_docs, sections
from saeworks.sae.configio import ConfigError, load_config, to_dict
from saeworks.sae.errors import SaeworksError
from saeworks.sae.version import package_version
from saeworks.train.errors import TrainingInterrupted

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 143
"""SIGTERM stopped training after a checkpoint (128 + SIGTERM, as a shell reports a killed job):
not a success, since the SAEs are not trained yet; rerun with train.resume=true."""


def _harvest(cfg: RunConfig) -> None:
    from saeworks.activations.harvest import harvest

    result = harvest(cfg.model, cfg.data, cfg.harvest, cfg.store_url)
    print(f"rank {result.rank}/{result.world_size} harvested shards {result.shards}", flush=True)
    if result.tokens_harvested:
        rate = result.tokens_harvested / max(result.seconds, 1e-9)
        logging.getLogger(__name__).info(
            "harvested %d tokens in %.1f s (%.0f tokens/s on this rank)",
            result.tokens_harvested, result.seconds, rate)
    print(f"activation store: {result.store_url} ({result.n_tokens} tokens)")


def _train(cfg: RunConfig) -> None:
    from saeworks.train.run import train

    result = train(cfg.train_job())
    if result.rank != 0:
        return
    for sae in result.saes:
        if sae.path is not None:
            print(f"saved SAE {sae.name} to {sae.path} (FVU {sae.fvu:.4f}, L0 {sae.l0:.1f})")
    if not result.finished:
        print(f"stopped after {result.tokens} tokens (train.stop_after_tokens); checkpoint "
              f"{result.checkpoint}; rerun with train.resume=true to continue")


def _run(cfg: RunConfig) -> None:
    from saeworks.eval.evaluate import headline
    from saeworks.pipeline import run_pipeline

    summary = run_pipeline(cfg)
    if not summary.is_main:
        return
    print(f"\nactivation store: {summary.store}")
    for path in summary.saes:
        name = path.name
        values = summary.metrics.get(name, {}).get("metrics", {})
        print(f"SAE {name}: {path}")
        print(f"  metrics: {path / 'metrics.json'}  " + headline(values))
    for directory in summary.dictionaries:
        print(f"feature dictionary: {directory}  (report: {directory / 'report.md'})")
    if summary.report is not None:
        print(f"run report: {summary.report}")
    print("times: " + ", ".join(f"{t.stage} {t.seconds:.0f} s" for t in summary.times)
          + f" (total {sum(t.seconds for t in summary.times):.0f} s)")
    if summary.dictionaries:
        print(f"open it: python -c \"import saeworks; "
              f"print(saeworks.open_dictionary('{summary.dictionaries[0]}').feature(0))\"")


STAGES: dict[str, tuple[Callable[[RunConfig], None], str]] = {
    "harvest": (_harvest, "run the model over the dataset and write activations to a Zarr store"),
    "train": (_train, "train the SAEs of the `train:` section on stored (or on-the-fly) activations"),
    "run": (_run, "harvest, train, evaluate and analyze from one config, then write the run report"),
}


def _evaluate(sae_dir: Path, cfg: RunConfig, store: str | None, out: Path | None) -> None:
    from saeworks.pipeline import evaluate_sae

    report, path = evaluate_sae(sae_dir, cfg, store, out)
    print(report.table())
    print(f"metrics: {path}")


def _analyze(sae_dir: Path, cfg: RunConfig, store: str | None, out: Path | None) -> None:
    from saeworks.pipeline import build_dictionary

    built = build_dictionary(sae_dir, cfg, store, out)
    for line in built.summary:
        print(line)
    print(f"analysed {built.tokens_per_s:,.0f} tokens/s ({built.seconds:.1f} s)")
    print(f"feature dictionary: {built.directory} (report: {built.directory / 'report.md'})")


SAE_STAGES: dict[str, tuple[Callable[[Path, RunConfig, str | None, Path | None], None], str]] = {
    "evaluate": (_evaluate, "measure an SAE (reconstruction, sparsity, CE-loss recovered, KL) and "
                            "write metrics.json"),
    "analyze": (_analyze, "analyse every feature of an SAE over a store and write its feature "
                          "dictionary"),
}


def _print_config(cfg: RunConfig, store: str | None = None) -> int:
    """`--print-config`: the resolved config as YAML (the store URL a TARGET gave, as a comment)."""
    if store is not None:
        print(f"# store: {store}")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _config_reference(section: str | None) -> int:
    """`saeworks config [SECTION]`: every field's name, type, default and docstring."""
    try:
        docs = section_docs(RunConfig, section)
    except ConfigError as err:
        print(f"saeworks config: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(render(docs, width=min(100, shutil.get_terminal_size().columns)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeworks", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"saeworks {package_version()}")
    commands = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    config_help = "describe every config field (name, type, default, meaning), or one section's"
    sub = commands.add_parser("config", help=config_help, description=config_help)
    sub.add_argument("section", nargs="?", metavar="SECTION",
                     help=f"one of: {', '.join(sections(RunConfig))}")
    for name, (_, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", nargs="?", help="YAML run config (defaults: the embedded demo)")
        sub.add_argument("overrides", nargs="*", metavar="key=value",
                         help="override any config field, dotted for sections: harvest.max_tokens=20000")
        _add_print_config(sub)
    for name, (_, help_text) in SAE_STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("sae_dir", type=Path, help="an SAE directory (cfg.json + sae_weights.safetensors)")
        sub.add_argument("target", nargs="?",
                         help="a YAML run config (held-out documents of its dataset; its run's store) "
                              "or an activation store URL (its rows; the model it was made with)")
        sub.add_argument("overrides", nargs="*", metavar="key=value",
                         help="override config fields, e.g. evaluate.held_out_tokens=32768")
        sub.add_argument("--out", type=Path, default=None,
                         help="where to write (default: SAE_DIR/metrics.json for evaluate, "
                              "<run_dir>/dictionaries/<sae name> for analyze)")
        _add_print_config(sub)
    return parser


def _add_print_config(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--print-config", action="store_true",
                     help="print the resolved config (file and overrides) as YAML and exit")


def split_target(target: str | None, overrides: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(config file, store URL, overrides) from the optional TARGET argument of evaluate/analyze."""
    if target is None:
        return None, None, overrides
    if "=" in target and not Path(target).exists():
        return None, None, [target, *overrides]
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        return target, None, overrides
    return None, target, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; the exit status (0, 2 for a user error, 143 after SIGTERM)."""
    try:
        return _run_command(argv)
    except BrokenPipeError:  # `saeworks config | head`: the reader stopped reading, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run_command(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage == "config":
        return _config_reference(args.section)
    overrides = list(args.overrides)
    if getattr(args, "config", None) is not None and "=" in args.config:  # only overrides were given
        overrides.insert(0, args.config)
        args.config = None
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.stage in SAE_STAGES:
            config, store, overrides = split_target(args.target, overrides)
            cfg = load_config(RunConfig, config, overrides)
            if args.print_config:
                return _print_config(cfg, store)
            SAE_STAGES[args.stage][0](args.sae_dir, cfg, store, args.out)
        else:
            cfg = load_config(RunConfig, args.config, overrides)
            if args.print_config:
                return _print_config(cfg)
            STAGES[args.stage][0](cfg)
    except SaeworksError as err:
        print(f"saeworks {args.stage}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingInterrupted as err:
        print(f"saeworks {args.stage}: {err}; a checkpoint was written: rerun with "
              "train.resume=true to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
