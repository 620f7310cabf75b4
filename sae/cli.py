"""`saeworks`: one console command, a subcommand per stage.

    saeworks harvest CONFIG [key=value ...]

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

EXIT_USER_ERROR = 2


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


STAGES: dict[str, tuple[Callable[[RunConfig], None], str]] = {
    "harvest": (_harvest, "run the model over the dataset and write activations to a Zarr store"),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from activations.corpus import CorpusError
    from activations.hooks import HookError
    from activations.model import ModelLoadError
    from activations.store import StoreError
    from activations.text import DataError

    return (ConfigError, HookError, DataError, StoreError, ModelLoadError, CorpusError)


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
