"""`saeworks`: one console command, a subcommand per stage.

    saeworks harvest CONFIG [key=value ...] [--repair]
    saeworks train CONFIG [key=value ...]
    saeworks evaluate SAE_DIR [CONFIG | STORE] [key=value ...] [--out metrics.json]
    saeworks analyze SAE_DIR [CONFIG | STORE] [key=value ...] [--out DICTIONARY_DIR]
    saeworks run CONFIG [key=value ...]          harvest, train, evaluate, analyze, report
    saeworks steer DICT --prompt TEXT --feature 1931=+2 [--feature 55=clamp:0] [...]
                                                 default and steered completions side by side
    saeworks steer-eval DICT --feature 1931 --coefficients 0,1,2,4,8 [--prompts FILE] [--out DIR]
                                                 concept vs fluency per coefficient, two baselines
    saeworks serve DICT [DICT ...] [--port 8000] [--writable]
                                                 the feature-dictionary service: web page + JSON API
    saeworks verify STORE                        check every chunk of an activation store (exit 1:
                                                 damaged; repair: saeworks harvest CONFIG --repair)
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
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from saeworks import cli_browse, cli_interp
from saeworks.run_config import RunConfig
from saeworks.sae.configdoc import render, section_docs, sections
from saeworks.sae.configio import ConfigError, load_config, to_dict
from saeworks.sae.errors import SaeworksError
from saeworks.sae.oserrors import describe_os_error, require_writable_dir
from saeworks.sae.version import package_version
from saeworks.steer.settings import GenerationSettings
from saeworks.train.errors import TrainingInterrupted

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 143
"""SIGTERM stopped training after a checkpoint (128 + SIGTERM, as a shell reports a killed job):
not a success, since the SAEs are not trained yet; rerun with train.resume=true."""


def _harvest(cfg: RunConfig, repair: bool = False) -> None:
    from saeworks.activations.harvest import harvest

    result = harvest(cfg.model, cfg.data, cfg.harvest, cfg.store_url, repair=repair)
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
    logging.getLogger(__name__).info("trained to %d tokens in %s", result.tokens, result.seconds.describe())
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
        print(f"browse it: saeworks serve {' '.join(str(d) for d in summary.dictionaries)}  "
              "(then open http://127.0.0.1:8000/)")
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


STEER_HELP = "complete a prompt with and without features steered, side by side"


def _add_steer(commands: Any) -> None:
    sub = commands.add_parser("steer", help=STEER_HELP, description=STEER_HELP + ". " + STEER_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("dictionary", type=Path, help="a feature dictionary directory (saeworks analyze)")
    sub.add_argument("--prompt", action="append", default=[], help="text to complete (repeat for a batch)")
    sub.add_argument("--prompts-file", type=Path, help="prompts, one per line")
    sub.add_argument("--feature", action="append", default=[], metavar="ID=VALUE",
                     help="1931=+2 (the --method's value), 55=clamp:0, 12=orthogonal:0, 7=zero|mean|resample")
    sub.add_argument("--vector", action="append", default=[], metavar="FILE[:KEY]@HOOK=VALUE",
                     help="a raw steering vector from a safetensors file")
    sub.add_argument("--method", default="additive", help="method of bare numbers (default additive)")
    sub.add_argument("--positions", default=None,
                     help="kept (default: from the SAE's first kept position), generated, or 3,4,-1")
    sub.add_argument("--raw", action="store_true",
                     help="coefficients are raw, not multiples of the feature's max activation")
    sub.add_argument("--resample-from", default=None, metavar="TEXT",
                     help="the other input of resample ablations")
    defaults = GenerationSettings()
    sub.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    sub.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy")
    sub.add_argument("--top-p", type=float, default=defaults.top_p)
    sub.add_argument("--top-k", type=int, default=defaults.top_k, help="0: off")
    sub.add_argument("--frequency-penalty", type=float, default=defaults.frequency_penalty)
    sub.add_argument("--seed", type=int, default=defaults.seed)
    sub.add_argument("--logprobs", type=int, default=defaults.n_logprobs,
                     help="alternatives per token in --json output")
    sub.add_argument("--device", default="cpu")
    sub.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                     help="the model's dtype (default: as the store was harvested)")
    sub.add_argument("--json", action="store_true",
                     help="print JSON (texts, token ids, log-probabilities) instead of columns")


STEER_EVAL_HELP = ("score steering with one feature per coefficient (concept, fluency, combined) "
                   "against DiffMean and prompt baselines")


def _add_steer_eval(commands: Any) -> None:
    sub = commands.add_parser("steer-eval", help=STEER_EVAL_HELP, description=STEER_EVAL_HELP)
    sub.add_argument("dictionary", type=Path, help="a feature dictionary directory (saeworks analyze)")
    sub.add_argument("--feature", type=int, required=True, help="the feature id to steer with")
    sub.add_argument("--coefficients", default="0,1,2,4,8",
                     help="comma-separated strengths (additive: multiples of the max activation)")
    sub.add_argument("--prompts", type=Path, default=None,
                     help="prompts file, one per line or .jsonl with a 'prompt' field (default: built-in)")
    sub.add_argument("--method", default="additive", help="additive, projection_cap or orthogonal")
    sub.add_argument("--max-new-tokens", type=int, default=32)
    sub.add_argument("--temperature", type=float, default=0.7)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--store", default=None,
                     help="activation store for the DiffMean baseline (default: the dictionary's)")
    sub.add_argument("--out", type=Path, default=None,
                     help="directory for steer_eval.json and steer_eval.png "
                          "(default: DICT/steering/feature-N)")
    sub.add_argument("--device", default="cpu")
    sub.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                     help="the model's dtype (default: as the store was harvested)")


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
        if name == "harvest":
            sub.add_argument("--repair", action="store_true", help=REPAIR_HELP)
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
    _add_steer(commands)
    _add_steer_eval(commands)
    _add_serve(commands)
    sub = commands.add_parser("verify", help=VERIFY_HELP, description=VERIFY_HELP)
    sub.add_argument("store", help="an activation store path or URL (e.g. RUN_DIR/activations.zarr)")
    cli_interp.add_parsers(commands)
    cli_browse.add_parsers(commands)
    return parser


VERIFY_HELP = ("decode and check every chunk of an activation store (checksums, finite values, index "
               "arrays, done flags); exit 1 and one line per damaged chunk if damaged")
REPAIR_HELP = ("verify the existing store first and recompute exactly its damaged shards (those "
               "`saeworks verify` lists), leaving the others as they are")


SERVE_HELP = "serve feature dictionaries: a web page and a JSON API (browse, search, inspect, steer)"


def _add_serve(commands: Any) -> None:
    sub = commands.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP + ". Read-only and "
                              "loopback-only unless told otherwise; API docs at /docs.")
    sub.add_argument("dictionaries", nargs="+", type=Path, metavar="DICT_DIR",
                     help="feature dictionary directories")
    sub.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this machine only)")
    sub.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    sub.add_argument("--writable", action="store_true", help="allow label edits (saved to features.sqlite)")
    sub.add_argument("--allow-remote", action="store_true",
                     help="required to listen on a non-loopback address; every request then needs the token")
    sub.add_argument("--token", default=None,
                     help="access token every request must carry (default: $SAEWORKS_TOKEN; generated and "
                          "printed for --allow-remote)")
    sub.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                     help="a browser origin allowed to call the API from its pages (repeatable; none by "
                          "default)")
    sub.add_argument("--max-waiting", type=int, default=4,
                     help="requests that may wait for a busy model before the next gets 503 (default 4)")
    sub.add_argument("--cache-mb", type=float, default=512,
                     help="memory for ready feature records, filled in the background (default 512; 0: none)")
    sub.add_argument("--device", default="cpu", help="where the model runs for inspect and steer")
    sub.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="the model's dtype (default: as the store was harvested)")


def _serve(args: argparse.Namespace) -> int:
    from saeworks.service.server import serve

    serve(args.dictionaries, host=args.host, port=args.port, writable=args.writable,
          allow_remote=args.allow_remote, token=args.token, cors_origins=args.cors_origin, device=args.device,
          dtype=args.dtype, max_waiting=args.max_waiting, cache_mb=args.cache_mb)
    return 0


def _verify(args: argparse.Namespace) -> int:
    """`saeworks verify STORE`: the report, and exit 0 (no damage) or 1 (damage)."""
    from saeworks.activations.verify import EXIT_DAMAGED, verify_store

    report = verify_store(args.store)
    for line in report.lines():
        print(line)
    return 0 if report.ok else EXIT_DAMAGED


def _add_print_config(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--print-config", action="store_true",
                     help="print the resolved config (file and overrides) as YAML and exit")


OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
"""The key of a `key=value` override: a dotted field name."""


def is_override(text: str) -> bool:
    """Whether a positional argument is a `key=value` override rather than a config file or store:
    a path or URL holding `=` (a Hive-style `s3://bucket/date=2026-12-01/acts.zarr`) has `/` before
    it, and a file that exists is a file."""
    key, sep, _ = text.partition("=")
    if not sep or OVERRIDE_KEY.match(key) is None:
        return False
    try:
        return not Path(text).exists()
    except OSError:  # e.g. a long `train.saes=[...]`: too long for a file name, so no file
        return True


def split_target(target: str | None, overrides: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(config file, store URL, overrides) from the optional TARGET argument of evaluate/analyze."""
    if target is None:
        return None, None, overrides
    if is_override(target):
        return None, None, [target, *overrides]
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        return target, None, overrides
    return None, target, overrides


STEER_EPILOG = """Values are multiples of the feature's maximum activation in the dictionary
(--raw: raw units). Examples:
  saeworks steer DICT --prompt "My favourite food is" --feature 1710=+4
  saeworks steer DICT --prompt "def f(x):" --feature 55=clamp:0 --feature 12=orthogonal:0 --seed 1"""


def _steer(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from saeworks.steer.generate import render_side_by_side
    from saeworks.steer.settings import GenerationError
    from saeworks.steering import SteeringSession

    prompts = list(args.prompt)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise GenerationError(f"--prompts-file {str(args.prompts_file)!r} does not exist")
        prompts += [line for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise GenerationError("give a prompt: --prompt TEXT (or --prompts-file FILE)")
    if not args.feature and not args.vector:
        raise GenerationError("nothing to steer: give --feature ID=VALUE (e.g. 1931=+2) or --vector")
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                  args.frequency_penalty, args.seed, args.logprobs)
    session = SteeringSession.open(args.dictionary, device=args.device, dtype=args.dtype)
    interventions = session.interventions(args.feature, args.vector, method=args.method,
                                          positions=args.positions, raw=args.raw,
                                          resample_from=args.resample_from)
    results = session.side_by_side(prompts, interventions, settings)
    if args.json:
        print(json.dumps({"settings": asdict(settings), "features": args.feature, "vectors": args.vector,
                          "results": [asdict(r) for r in results]}, indent=1))
        return 0
    labels = session.dictionary.labels(sorted({iv.feature for iv in interventions if hasattr(iv, "feature")}))
    for spec in args.feature:
        feature = int(spec.partition("=")[0])
        print(f"feature {spec}: {labels.get(feature, '')}")
    width = min(160, shutil.get_terminal_size((120, 24)).columns)
    for result in results:
        print()
        print(render_side_by_side(result, width))
    return 0


def _steer_eval(args: argparse.Namespace) -> int:
    from saeworks.eval.dictionary import FeatureDictionary
    from saeworks.steer.evaluation import SteerEvalSettings, evaluate_steering, parse_coefficients
    from saeworks.steer.prompts import load_prompts

    settings = SteerEvalSettings(
        coefficients=parse_coefficients(args.coefficients),
        prompts=None if args.prompts is None else load_prompts(args.prompts),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, method=args.method)
    out = args.out or args.dictionary / "steering" / f"feature-{args.feature}"
    with FeatureDictionary.open(args.dictionary, readonly=True, device=args.device, dtype=args.dtype) as d:
        require_writable_dir(out, "--out")  # before minutes of generation, not after
        result = evaluate_steering(d, args.feature, settings, store_url=args.store,
                                   progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(result.table())
    written = result.write(out)
    print("wrote " + ", ".join(str(path) for path in written.values()))
    return 0


def _user_errors(stage: str, command: Callable[[], int]) -> int:
    """Run `command`; a SaeworksError, or an OS error the user can fix (permission, read-only,
    full disk, missing directory), becomes one line on stderr and exit status 2."""
    try:
        return command()
    except SaeworksError as err:
        print(f"saeworks {stage}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as err:
        line = describe_os_error(err)
        if line is None:
            raise
        print(f"saeworks {stage}: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR


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
    if args.stage == "steer":
        return _user_errors(args.stage, lambda: _steer(args))
    if args.stage == "steer-eval":
        return _user_errors(args.stage, lambda: _steer_eval(args))
    if args.stage == "verify":
        return _user_errors(args.stage, lambda: _verify(args))
    if args.stage == "serve":
        return _user_errors(args.stage, lambda: _serve(args))
    if args.stage in cli_interp.COMMANDS:
        return _user_errors(args.stage, lambda: cli_interp.COMMANDS[args.stage](args))
    if args.stage in cli_browse.COMMANDS:
        return _user_errors(args.stage, lambda: cli_browse.COMMANDS[args.stage](args))
    overrides = list(args.overrides)
    if getattr(args, "config", None) is not None and is_override(args.config):  # only overrides given
        overrides.insert(0, args.config)
        args.config = None
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _user_errors(args.stage, lambda: _run_stage(args, overrides))
    except TrainingInterrupted as err:
        print(f"saeworks {args.stage}: {err}; a checkpoint was written: rerun with "
              "train.resume=true to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run_stage(args: argparse.Namespace, overrides: list[str]) -> int:
    """Load the config and run one stage (or print its config)."""
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
        if args.stage == "harvest":
            _harvest(cfg, repair=args.repair)
        else:
            STAGES[args.stage][0](cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
