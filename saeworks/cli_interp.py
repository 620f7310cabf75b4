"""The interpretability subcommands: `saeworks.interp` from the shell.

    saeworks lens DICT|MODEL --prompt TEXT [--target TOKEN]            logit lens per layer
    saeworks attribute DICT --prompt TEXT --target TOKEN [--contrast TOKEN]   direct logit attribution
    saeworks attribute DICT --prompt TEXT --feature N [--method ig|gxi]      input attribution
    saeworks patch DICT --clean TEXT --corrupted TEXT --correct TOK --incorrect TOK
                   [--features 1,2 | --sweep]                          activation patching
    saeworks probe DICT|MODEL [--positive FILE --negative FILE] [--layers 0,3,6] [--save-direction F]
                                                        linear and sparse probes
    saeworks orthogonalize DICT|MODEL (--feature N | --vector FILE[:KEY]) --out MODEL_DIR
                                                        project a direction out of the weights

Each prints a table a researcher reads at a glance; `--json` prints the full result as JSON
instead, and `--out DIR` also writes it as `<command>.json` (and a PNG where a picture reads
better). DICT is a feature dictionary directory (its model, tokenizer and SAE); MODEL a model name
(`embedded`, a hub id or a local directory) for the commands that need no SAE.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saeworks.sae.atomic import write_bytes_atomic, write_text_atomic
from saeworks.sae.errors import SaeworksError
from saeworks.sae.oserrors import require_writable_dir


class InterpCliError(SaeworksError, ValueError):
    """A command-line value an interpretability command cannot use."""


def _common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--out", type=Path, default=None,
                     help="also write the result (JSON, and a PNG where one reads better) into DIR")
    sub.add_argument("--json", action="store_true", help="print the result as JSON, not a table")
    sub.add_argument("--device", default="cpu")
    sub.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="the model's dtype (float32: the identities hold to 1e-4)")


def _opened(target: str, device: str, dtype: str) -> tuple[Any, Any, Any]:
    """(dictionary or None, model, tokenizer) of a dictionary directory or a model name."""
    from saeworks.eval.dictionary import INFO_FILE, FeatureDictionary

    if (Path(target) / INFO_FILE).is_file():
        dictionary = FeatureDictionary.open(target, readonly=True, device=device, dtype=dtype)
        model, tokenizer, _ = dictionary._load_runtime()
        return dictionary, model, tokenizer
    from saeworks.activations.config import ModelConfig
    from saeworks.activations.model import load_model, load_tokenizer

    cfg = ModelConfig(name=target, dtype=dtype, device=device)  # type: ignore[arg-type]
    return None, load_model(cfg, device), load_tokenizer(cfg)


def _dictionary(target: str, device: str, dtype: str) -> Any:
    dictionary, _, _ = _opened(target, device, dtype)
    if dictionary is None:
        raise InterpCliError(f"{target!r} is not a feature dictionary directory (no dictionary.json); "
                             "make one with `saeworks analyze SAE_DIR`")
    return dictionary


def _emit(args: argparse.Namespace, name: str, result: Any, table: str, png: bytes | None = None) -> None:
    """Print the table (or JSON) and write what `--out` asks for."""
    data = json.dumps(result.to_json(), indent=2, ensure_ascii=False, default=str)
    print(data if args.json else table)
    if args.out is not None:
        written = [write_text_atomic(args.out / f"{name}.json", data)]
        if png is not None:
            written.append(write_bytes_atomic(args.out / f"{name}.png", png))
        print("wrote " + ", ".join(map(str, written)), file=sys.stderr)


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an unwritable --out before any model loads."""
    if args.out is not None:
        require_writable_dir(args.out, "--out")


def _lens(args: argparse.Namespace) -> int:
    from saeworks.interp.lens import logit_lens

    _check_out(args)
    if args.top_k < 1:
        raise InterpCliError(f"--top-k must be at least 1, got {args.top_k}")
    dictionary, model, tokenizer = _opened(args.target, args.device, args.dtype)
    lens = logit_lens(dictionary if dictionary is not None else model, args.prompt, tokenizer=tokenizer,
                      target=args.token, top_k=args.top_k)
    _emit(args, "lens", lens, lens.table(args.position), lens.png())
    return 0


def _attribute(args: argparse.Namespace) -> int:
    _check_out(args)
    if (args.token is None) == (args.feature is None):
        raise InterpCliError("give --target TOKEN (direct logit attribution) or --feature N (input "
                             "attribution of a feature), not both or neither")
    dictionary = _dictionary(args.target, args.device, args.dtype)
    if args.token is not None:
        from saeworks.interp.dla import direct_logit_attribution

        result = direct_logit_attribution(dictionary, args.prompt, args.token, position=args.position,
                                          contrast=args.contrast, top=args.top)
        _emit(args, "dla", result, result.table(), result.png())
        return 0
    return _input_attribution(args, dictionary)


def _input_attribution(args: argparse.Namespace, dictionary: Any) -> int:
    from saeworks.interp.input_attribution import FeatureSite, gradient_x_input, integrated_gradients

    site = FeatureSite.from_dictionary(dictionary)
    if args.method == "gxi":
        result = gradient_x_input(site, args.prompt, args.feature, args.position)
    else:
        result = integrated_gradients(site, args.prompt, args.feature, args.position, steps=args.steps)
    _emit(args, "input_attribution", result, result.table(args.top))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from saeworks.interp.probing import Pooling, code_vs_prose, probe, probe_layers, read_texts, sparse_probe

    _check_out(args)
    if (args.positive is None) != (args.negative is None):
        raise InterpCliError("give both --positive and --negative text files (or neither, for the "
                             "built-in Python code vs English prose contrast)")
    if args.positive is None:
        positive, negative = code_vs_prose(args.n)
        labels = ("code", "prose")
    else:
        positive = read_texts(args.positive, name="--positive")
        negative = read_texts(args.negative, name="--negative")
        labels = (Path(args.positive).stem, Path(args.negative).stem)
    dictionary, model, tokenizer = _opened(args.target, args.device, args.dtype)
    pooling = Pooling(how=args.pooling)
    layers = _ints(args.layers, "--layers")
    if layers is not None:
        sweep = probe_layers(model, tokenizer, positive, negative, layers, labels=labels, pooling=pooling)
        _emit(args, "probe_layers", sweep, sweep.table())
        return 0
    hook = args.hook or (dictionary.info["hook"] if dictionary is not None else None)
    if hook is None:
        raise InterpCliError("give --hook (e.g. blocks.15.hook_resid_post) or --layers for a model")
    result = probe(model, tokenizer, positive, negative, hook, labels=labels, pooling=pooling)
    parts: dict[str, Any] = {"probe": result}
    tables = [result.table()]
    if dictionary is not None and hook == dictionary.info["hook"]:
        sparse = sparse_probe(dictionary, positive, negative, labels=labels, pooling=pooling)
        parts["sparse"] = sparse
        tables.append(sparse.table())
    if args.save_direction is not None:
        saved = result.save_direction(args.save_direction, args.direction)
        tables.append(f"saved the {args.direction} direction to {saved} (steer with "
                      f"--feature {saved}@{hook}=VALUE, or orthogonalize --vector {saved})")
    _emit(args, "probe", _Combined(parts), "\n\n".join(tables))
    return 0


def _add_probe(commands: Any) -> None:
    text = ("probe two labelled text sets at a hook: a difference-of-means direction and a logistic "
            "probe with held-out accuracy, and (with a dictionary) the SAE features that separate them")
    sub = commands.add_parser("probe", help=text, description=text)
    sub.add_argument("target", metavar="DICT|MODEL",
                     help="a feature dictionary (its model and SAE), or a model (embedded, hub id, dir)")
    sub.add_argument("--positive", default=None, help="texts of one class (.txt one per line, or .jsonl)")
    sub.add_argument("--negative", default=None, help="texts of the other class")
    sub.add_argument("--n", type=int, default=60, help="snippets per class of the built-in contrast")
    sub.add_argument("--hook", default=None, help="the hook (default: the dictionary's)")
    sub.add_argument("--layers", default=None, help="probe resid_post of these layers instead (0,3,6)")
    sub.add_argument("--pooling", default="mean", choices=("mean", "last"))
    sub.add_argument("--save-direction", type=Path, default=None, help="write the direction (safetensors)")
    sub.add_argument("--direction", default="diff_means", choices=("diff_means", "logistic"))
    _common(sub)


def _ints(text: str | None, what: str) -> list[int] | None:
    """`1,2,-1` as ints, or a one-line error naming the option."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InterpCliError(f"{what}: {text!r} is not a comma-separated list of integers") from None


class _Combined:
    """Several results printed and written as one (`to_json` of each under its name)."""

    def __init__(self, parts: dict[str, Any]) -> None:
        self.parts = parts

    def to_json(self) -> dict[str, Any]:
        return {name: part.to_json() for name, part in self.parts.items()}


def _patch(args: argparse.Namespace) -> int:
    from saeworks.interp.patching import (
        LogitDiff,
        PromptPair,
        attribution_patching,
        check_attribution,
        layer_sweep,
        patch_features,
    )
    from saeworks.steer.interventions import FeatureSource

    _check_out(args)
    features, positions = _ints(args.features, "--features"), _ints(args.positions, "--positions")
    layers = _ints(args.layers, "--layers")
    kinds = [k if k.startswith("hook_") else f"hook_{k}" for k in args.kinds.split(",")]
    dictionary = _dictionary(args.target, args.device, args.dtype)
    model, tokenizer, sae = dictionary._load_runtime()
    source = FeatureSource.from_dictionary(dictionary, sae=sae)
    pair = PromptPair.from_text(tokenizer, args.clean, args.corrupted, prepend_bos=source.prepend_bos)
    metric = LogitDiff.of_tokens(tokenizer, args.correct, args.incorrect, args.position)
    parts: dict[str, Any] = {}
    tables: list[str] = []
    png = None
    if args.sweep:
        sweep = layer_sweep(model, pair, metric, kinds=kinds, layers=layers)
        parts["layer_sweep"], png = sweep, sweep.png()
        tables.append(sweep.table())
    if features is not None:
        patched = patch_features(model, source, pair, metric, features, positions, error=args.error)
        parts["patch"] = patched
        tables.append(patched.table())
    if not args.sweep and features is None:
        ranked = attribution_patching(model, source, pair, metric)
        ids = sorted({entry.feature for entry in ranked.ranking(args.top)})
        ranked.labels.update(dictionary.labels(ids) if ids else {})
        check = check_attribution(model, source, pair, metric, ranked, top=args.top)
        parts["attribution"], parts["check"] = ranked, check
        tables += [ranked.table(args.top), check.table()]
    _emit(args, "patch", _Combined(parts), "\n\n".join(tables), png)
    return 0


def _add_patch(commands: Any) -> None:
    text = ("activation patching on a clean/corrupted prompt pair: rank every feature at every "
            "position by attribution patching and check the top ones by real patching (default), "
            "patch chosen features (--features), or sweep every layer's hooks (--sweep)")
    sub = commands.add_parser("patch", help=text, description=text)
    sub.add_argument("target", metavar="DICT", help="a feature dictionary directory")
    sub.add_argument("--clean", required=True, help="the clean prompt")
    sub.add_argument("--corrupted", required=True, help="the corrupted prompt (same number of tokens)")
    sub.add_argument("--correct", required=True, help="metric: logit of this token ...")
    sub.add_argument("--incorrect", required=True, help="... minus this token's")
    sub.add_argument("--position", type=int, default=-1, help="the metric's position (default: last)")
    sub.add_argument("--features", default=None, help="patch these features (comma-separated ids)")
    sub.add_argument("--positions", default=None, help="at these positions only (default: all)")
    sub.add_argument("--error", action="store_true", help="also copy the clean SAE error term")
    sub.add_argument("--sweep", action="store_true", help="patch every layer's hooks at every position")
    sub.add_argument("--kinds", default="resid_pre,attn_out,mlp_out", help="hook kinds of the sweep")
    sub.add_argument("--layers", default=None, help="layers of the sweep (default: all)")
    sub.add_argument("--top", type=int, default=20, help="features ranked and checked")
    _common(sub)


def _orthogonalize(args: argparse.Namespace) -> int:
    import torch

    from saeworks.interp.orthogonalize import (
        feature_direction,
        load_direction,
        orthogonalize,
        residual_components,
        save_orthogonalized,
    )
    from saeworks.interp.readout import prompt_token_ids
    from saeworks.steer.interventions import FeatureSource

    if (args.feature is None) == (args.vector is None):
        raise InterpCliError("give --feature N (a dictionary feature's decoder row) or --vector "
                             "FILE[:KEY] (e.g. a probe direction), not both or neither")
    require_writable_dir(args.out.parent, "--out")
    if args.vector is not None:
        direction = load_direction(args.vector)
    dictionary, model, tokenizer = _opened(args.target, args.device, "float32")
    if args.feature is not None:
        if dictionary is None:
            raise InterpCliError(f"--feature needs a feature dictionary, and {args.target!r} is not one")
        direction = feature_direction(FeatureSource.from_dictionary(dictionary), args.feature)
    record = orthogonalize(model, direction)
    ids = torch.tensor([prompt_token_ids(tokenizer, args.check_text)])  # [1, pos]
    worst = max(residual_components(model, ids, direction.vector))
    out = save_orthogonalized(model, tokenizer, args.out)
    print(f"projected {record.source} (norm {record.norm:.4g}) out of {len(record.edited)} weight "
          f"matrices and biases of {record.model_type}"
          + (" (lm_head untied from the edited embeddings)" if record.untied_lm_head else ""))
    print(f"largest |component| along it in any layer's residual stream on the check text: "
          f"{worst:.2e} of the residual's norm")
    print(f"saved {out} (AutoModelForCausalLM.from_pretrained loads it)")
    return 0


def _add_orthogonalize(commands: Any) -> None:
    text = ("project a direction (a feature's decoder row, or a vector file such as a probe) out of "
            "every matrix that writes to the residual stream, and save the edited HF model")
    sub = commands.add_parser("orthogonalize", help=text, description=text)
    sub.add_argument("target", metavar="DICT|MODEL",
                     help="a feature dictionary (its model), or a model (embedded, hub id, directory)")
    sub.add_argument("--feature", type=int, default=None, help="the dictionary feature's decoder row")
    sub.add_argument("--vector", default=None, help="a safetensors vector FILE or FILE:KEY")
    sub.add_argument("--out", type=Path, required=True, help="the edited model's directory")
    sub.add_argument("--check-text", default="The quick brown fox jumps over the lazy dog.",
                     help="text on which the residual's remaining component is reported")
    sub.add_argument("--device", default="cpu")


def _add_lens(commands: Any) -> None:
    text = "logit lens: every layer's residual stream read out through the final norm and unembedding"
    sub = commands.add_parser("lens", help=text, description=text)
    sub.add_argument("target", metavar="DICT|MODEL",
                     help="a feature dictionary directory, or a model (embedded, hub id, directory)")
    sub.add_argument("--prompt", required=True)
    sub.add_argument("--target", dest="token", default=None,
                     help="a single token whose rank and probability are tracked (e.g. ' Paris')")
    sub.add_argument("--top-k", type=int, default=5)
    sub.add_argument("--position", type=int, default=-1, help="the position the table shows")
    _common(sub)


def _add_attribute(commands: Any) -> None:
    text = ("direct logit attribution of a token to the SAE's features (--target), or input "
            "attribution of one feature's activation to the prompt's tokens (--feature)")
    sub = commands.add_parser("attribute", help=text, description=text)
    sub.add_argument("target", metavar="DICT", help="a feature dictionary directory")
    sub.add_argument("--prompt", required=True)
    sub.add_argument("--target", dest="token", default=None, help="the token whose logit is explained")
    sub.add_argument("--contrast", default=None, help="explain target minus this token's logit")
    sub.add_argument("--feature", type=int, default=None, help="attribute this feature's activation")
    sub.add_argument("--position", type=int, default=-1, help="the position (negative: from the end)")
    sub.add_argument("--top", type=int, default=20, help="features shown in the table and chart")
    sub.add_argument("--method", default="ig", choices=("ig", "gxi"),
                     help="input attribution: integrated gradients or gradient x input")
    sub.add_argument("--steps", type=int, default=64, help="integrated-gradient steps")
    _common(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "lens": _lens,
    "attribute": _attribute,
    "patch": _patch,
    "orthogonalize": _orthogonalize,
    "probe": _probe,
}
"""Subcommand name -> handler (each returns the exit status)."""


def add_parsers(commands: Any) -> None:
    """Add every interpretability subcommand to the CLI's subparsers."""
    _add_lens(commands)
    _add_attribute(commands)
    _add_patch(commands)
    _add_orthogonalize(commands)
    _add_probe(commands)
