"""`saeworks`: one console command, a subcommand per stage.

    saeworks harvest CONFIG [key=value ...]
    saeworks train CONFIG [key=value ...]

Every expected failure (bad config, unknown hook, missing data, a store from another run) ends
with one line saying what was wrong and how to fix it, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from sae.configio import ConfigError, load_config
from sae.run_config import RunConfig
from train.errors import TrainingInterrupted

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 143
"""SIGTERM stopped training after a checkpoint (128 + SIGTERM, as a shell reports a killed job):
not a success, since the SAEs are not trained yet; rerun with train.resume=true."""


def _harvest(cfg: RunConfig) -> None:
    from activations.harvest import harvest

    result = harvest(cfg)
    print(f"rank {result.rank}/{result.world_size} harvested shards {result.shards}", flush=True)
    if result.tokens_harvested:
        rate = result.tokens_harvested / max(result.seconds, 1e-9)
        logging.getLogger("saeworks").info(
            "harvested %d tokens in %.1f s (%.0f tokens/s on this rank)",
            result.tokens_harvested, result.seconds, rate)
    print(f"activation store: {result.store_url} ({result.n_tokens} tokens)")


def _train(cfg: RunConfig) -> None:
    from train.run import train

    result = train(cfg)
    if result.rank != 0:
        return
    for sae in result.saes:
        if sae.path is not None:
            print(f"saved SAE {sae.name} to {sae.path} (FVU {sae.fvu:.4f}, L0 {sae.l0:.1f})")
    if not result.finished:
        print(f"stopped after {result.tokens} tokens (train.stop_after_tokens); checkpoint "
              f"{result.checkpoint}; rerun with train.resume=true to continue")


STAGES: dict[str, tuple[Callable[[RunConfig], None], str]] = {
    "harvest": (_harvest, "run the model over the dataset and write activations to a Zarr store"),
    "train": (_train, "train the SAEs of the `train:` section on stored (or on-the-fly) activations"),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from activations.corpus import CorpusError
    from activations.hooks import HookError
    from activations.model import ModelLoadError
    from activations.store import StoreError
    from activations.text import DataError
    from sae.io import SAEFormatError
    from sae.registry import UnknownArchitectureError
    from train.errors import CheckpointError, TrainingDivergedError

    return (ConfigError, HookError, DataError, StoreError, ModelLoadError, CorpusError,
            UnknownArchitectureError, SAEFormatError, CheckpointError, TrainingDivergedError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeworks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", nargs="?", help="YAML run config (defaults: the embedded demo)")
        sub.add_argument("overrides", nargs="*", metavar="key=value",
                         help="override any config field, dotted for sections: harvest.max_tokens=20000")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.config is not None and "=" in args.config:  # only overrides were given
        overrides.insert(0, args.config)
        args.config = None
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    stage, _ = STAGES[args.stage]
    try:
        cfg = load_config(RunConfig, args.config, overrides)
        stage(cfg)
    except _user_errors() as err:
        print(f"saeworks {args.stage}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingInterrupted as err:
        print(f"saeworks {args.stage}: {err}; a checkpoint was written: rerun with "
              "train.resume=true to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
