"""`evaluate`: measure a saved SAE on held-out documents or on a store's rows.

Three targets:
- texts given by the caller (`texts=`): packed into windows as the harvester packs documents;
  a tail shorter than a window is scored as a shorter window of its own. Measured as below.
- held-out documents of the config's dataset (no store): windows of documents that harvest and
  training never see (`data.holdout_fraction`), cut at the SAE's context size. Pass 1 runs the
  prefix of the model once per batch (a forward cut short at the hook), scores the SAE on the rows
  it was trained on (positions from its seqpos_slice start, special tokens skipped) and keeps the
  suffix's input; pass 2 runs only the rest of the model (the blocks after the hook, the final
  norm and the head: activations/suffix.py) four times per batch, clean, SAE spliced in, zero-
  and mean-ablated, for the downstream figures. The mean ablation needs the mean over every row,
  so pass 2 follows pass 1; the kept suffix inputs are bounded (PREFIX_CACHE_BYTES), and batches
  past the bound run their prefix again in pass 2.
- a store: reconstruction and sparsity on its kept rows (the model is not needed), downstream on
  its first windows with the model and dtype the store was harvested with: one prefix forward and
  four suffix forwards per batch.

The suffix forwards give the logits of full forwards with the same edit, bit for bit
(tests/test_eval_prefix.py). A model whose forward cannot skip its first blocks that way is run
with four full forwards per batch instead, which a log line says.

Positions before the seqpos_slice start are never rewritten nor scored (eval/metrics.py); every
position from it on is rewritten in the downstream forwards, special tokens included, while the
reconstruction figures and the ablation mean skip special-token rows, as training did.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saeworks.activations.config import DataConfig, ModelConfig
from saeworks.activations.hooks import HookFn, capture_activations, hooks_attached, resolve_hook
from saeworks.activations.model import (
    check_context_size,
    load_model,
    load_tokenizer,
    model_config_of_store,
    model_name,
)
from saeworks.activations.rows import RowSelection, iter_kept_rows
from saeworks.activations.store import TOKEN_IDS, ActivationStore
from saeworks.activations.suffix import SuffixError, SuffixPlan, plan_suffix, suffix_head_input, suffix_logits
from saeworks.activations.text import iter_windows, pack_windows, separator_ids
from saeworks.eval.config import EvaluateConfig
from saeworks.eval.head import OutputHead
from saeworks.eval.metrics import (
    DownstreamAccumulator,
    ReconstructionAccumulator,
)
from saeworks.sae.atomic import write_text_atomic
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.distributed import rank_info
from saeworks.sae.errors import SaeworksError
from saeworks.sae.interventions import ablate_mean, ablate_zero, splice_sae
from saeworks.sae.io import load_sae, read_cfg
from saeworks.sae.precision import resolve_dtype
from saeworks.sae.sparse import release_workspace, sparse_decode
from saeworks.sae.topk import encodes_top_k
from saeworks.sae.version import package_version

log = logging.getLogger(__name__)

PREFIX_CACHE_BYTES = 2 << 30
"""Most bytes of suffix inputs pass 1 keeps for pass 2 (16k tokens of a 4096-wide float32 model
take 256 MiB); batches past it run their prefix forward again."""
METRICS_FILE = "metrics.json"
DESCRIPTIONS = {
    "mse": "squared error per token, summed over dimensions",
    "fvu": "fraction of variance unexplained",
    "cosine": "mean cosine(x, x_hat)",
    "relative_norm": "mean ||x_hat|| / ||x|| (< 1: shrinkage)",
    "l0": "mean active latents per token",
    "l1": "mean sum of latent activations per token",
    "dead_fraction": "latents never active on these tokens",
    "dense_fraction": "latents active on more than dense_threshold of tokens",
    "ce_clean": "next-token CE, clean model",
    "ce_spliced": "next-token CE, SAE reconstruction spliced in",
    "ce_zero": "next-token CE, hook zero-ablated",
    "ce_mean": "next-token CE, hook mean-ablated",
    "ce_recovered": "(ce_zero - ce_spliced) / (ce_zero - ce_clean)",
    "ce_recovered_mean": "(ce_mean - ce_spliced) / (ce_mean - ce_clean)",
    "kl": "mean KL(p_clean || p_spliced) per prediction",
}


class EvaluationError(SaeworksError, ValueError):
    """An SAE that cannot be evaluated on the given target (other model, width, context...)."""


@dataclass(frozen=True)
class SAEMetadata:
    """What evaluation needs from an SAE's cfg.json `metadata` (SAELens names)."""

    hook: str
    model_name: str | None
    context_size: int | None
    first_kept: int
    """Start of seqpos_slice: earlier positions were never trained on, so never rewritten nor scored."""
    special_token_ids: list[int] | None
    """Token ids whose rows are skipped; None: the target's own special tokens (metadata `true`)."""
    prepend_bos: bool | None

    @classmethod
    def read(cls, sae_dir: str | Path) -> SAEMetadata:
        """Parse the metadata of `sae_dir` (SAEFormatError if it is not an SAE directory)."""
        meta = read_cfg(sae_dir).get("metadata") or {}
        hook = meta.get("hook_name")
        if not hook:
            raise EvaluationError(f"SAE {str(sae_dir)!r}: cfg.json metadata lacks hook_name, so the "
                                  "hook point to evaluate it at is unknown; add it")
        seqpos = list(meta.get("seqpos_slice") or [None])
        if len(seqpos) > 1 and seqpos[1] is not None:
            raise EvaluationError(f"SAE {str(sae_dir)!r}: seqpos_slice {seqpos} ends before the window "
                                  "end; only [start, null] is supported")
        special = meta.get("exclude_special_tokens")
        return cls(
            hook=str(hook),
            model_name=meta.get("model_name"),
            context_size=int(meta["context_size"]) if meta.get("context_size") else None,
            first_kept=int(seqpos[0] or 0),
            special_token_ids=None if special is True else [int(t) for t in special or []],
            prepend_bos=meta.get("prepend_bos") if isinstance(meta.get("prepend_bos"), bool) else None,
        )


@dataclass
class EvalReport:
    """The figures of one SAE on one target, and where they came from."""

    metrics: dict[str, float]
    """Flat: RECONSTRUCTION_KEYS, then DOWNSTREAM_KEYS when downstream was measured."""
    info: dict[str, Any] = field(default_factory=dict)
    """SAE, hook, model, target, token counts, dead/dense counts, timing, saeworks version."""
    density: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    """[d_sae] float64: fraction of evaluated tokens on which each latent is active."""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (non-finite figures as null)."""
        return {"metrics": {k: v if math.isfinite(v) else None for k, v in self.metrics.items()},
                "info": self.info, "density": self.density.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalReport:
        metrics = {k: float("nan") if v is None else float(v) for k, v in data["metrics"].items()}
        return cls(metrics, dict(data["info"]), torch.tensor(data["density"], dtype=torch.float64))

    def write(self, path: str | Path) -> Path:
        """Write the JSON to `path` atomically (temporary sibling, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, json.dumps(self.to_json(), indent=2, default=str))

    def __repr__(self) -> str:
        info, target = self.info, self.info.get("target", {})
        return (f"EvalReport({info.get('sae_name')!r} on {target.get('kind', '?')}, "
                f"{info.get('n_tokens')} tokens: {headline(self.metrics)})")

    def table(self) -> str:
        """The figures as an aligned, readable table with one-line descriptions."""
        info, target = self.info, self.info.get("target", {})
        lines = [f"SAE {info.get('sae_name')} at {info.get('hook')} of {info.get('model')}",
                 f"on {target.get('kind', '?').replace('_', ' ')}: {info.get('n_tokens')} tokens, "
                 f"{info.get('n_predictions')} predictions, positions >= {info.get('first_kept')}"]
        width = max(len(key) for key in self.metrics)
        for key, value in self.metrics.items():
            note = DESCRIPTIONS.get(key, "")
            if key == "dead_fraction":
                note += f" ({info.get('dead_count')} latents)"
            elif key == "dense_fraction":
                note = note.replace("dense_threshold", str(info.get("dense_threshold")))
                note += f" ({info.get('dense_count')} latents)"
            lines.append(f"  {key:<{width}}  {value:>12.6g}  {note}")
        lines.append(f"{info.get('seconds', 0):.1f} s, {info.get('tokens_per_s', 0):,.0f} tokens/s")
        return "\n".join(lines)


def headline(metrics: dict[str, float]) -> str:
    """The figures a user looks at first, on one line."""
    names = (("fvu", "FVU"), ("l0", "L0"), ("ce_recovered", "CE recovered"), ("kl", "KL"),
             ("dead_fraction", "dead"))
    return ", ".join(f"{label} {metrics[key]:.3f}" for key, label in names
                     if isinstance(metrics.get(key), float) and math.isfinite(metrics[key]))


def write_metrics(report: EvalReport, sae_dir_or_path: str | Path) -> Path:
    """Write `report` as `<dir>/metrics.json` when given a directory, else to the given file."""
    path = Path(sae_dir_or_path)
    return report.write(path / METRICS_FILE if path.is_dir() else path)


def read_report(path: str | Path) -> EvalReport:
    """An EvalReport written by `write` (a metrics.json file or the directory holding it)."""
    path = Path(path)
    return EvalReport.from_json(json.loads((path / METRICS_FILE if path.is_dir() else path).read_text()))


@torch.no_grad()
def evaluate(sae_dir: str | Path, settings: EvaluateConfig, *, model: ModelConfig | None = None,
             data: DataConfig | None = None, texts: Sequence[str] | None = None,
             store_url: str | None = None) -> EvalReport:
    """Evaluate the SAE in `sae_dir` on exactly one target, as `settings` says: the held-out
    documents of `data`, the given `texts` (both run through `model`), or the store at `store_url`
    (its rows, and the model it was harvested with)."""
    given = [name for name, value in (("data", data), ("texts", texts), ("store_url", store_url))
             if value is not None]
    if len(given) != 1:
        raise EvaluationError(f"evaluate needs exactly one target (held-out documents of a dataset, "
                              f"texts, or a store); got {', '.join(given) or 'none'}")
    start = time.perf_counter()
    meta = SAEMetadata.read(sae_dir)
    device = evaluation_device(settings.device)
    sae = load_sae(sae_dir, device)
    if store_url is not None:
        run = _on_store(sae_dir, sae, meta, settings, store_url, device)
    elif model is None:
        raise EvaluationError("evaluating on documents or texts needs the model to run them through")
    elif data is not None:
        run = _on_held_out_documents(sae_dir, sae, meta, settings, model, data, device)
    else:
        run = _on_texts(sae_dir, sae, meta, settings, model, list(texts or []), device)
    release_workspace()  # the pre-activation buffer of the TopK encodes
    rec, down = run.reconstruction, run.downstream
    if rec.n_tokens == 0:
        raise EvaluationError(f"nothing to evaluate: every row of the {run.target['kind']} target is before "
                              f"position {meta.first_kept} or a special token")
    metrics = rec.result()
    if down is not None:
        metrics.update(down.result())
    seconds = time.perf_counter() - start
    info = {
        "sae_dir": str(sae_dir), "sae_name": Path(sae_dir).name, "architecture": sae.architecture,
        "d_in": sae.d_in, "d_sae": sae.d_sae, "hook": meta.hook, "model": run.model, "target": run.target,
        "n_tokens": rec.n_tokens, "n_predictions": down.n_predictions if down else 0,
        "dead_count": rec.dead_count, "dense_count": rec.dense_count,
        "dense_threshold": settings.dense_threshold, "first_kept": meta.first_kept,
        "special_token_ids": run.special_token_ids, "device": str(device), "seconds": seconds,
        "tokens_per_s": rec.n_tokens / seconds if seconds > 0 else 0.0,
        "saeworks_version": package_version(),
    }
    return EvalReport(metrics, info, rec.density)


@dataclass
class _Run:
    reconstruction: ReconstructionAccumulator
    downstream: DownstreamAccumulator | None
    model: str
    target: dict[str, Any]
    special_token_ids: list[int]


def evaluation_device(name: str) -> torch.device:
    """The device `evaluate.device` names (`auto`: a GPU if there is one, else the CPU)."""
    device = rank_info(name).device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"evaluate.device={name}: no GPU is visible; set evaluate.device=cpu or auto")
    return device


def check_same_model(sae_dir: str | Path, meta: SAEMetadata, actual: str | None, where: str,
                     fix: str) -> None:
    """Refuse an SAE trained on another model than the target's (unknown names are not checked)."""
    if meta.model_name and actual and meta.model_name != actual:
        raise EvaluationError(f"SAE {str(sae_dir)!r} was trained on model {meta.model_name!r}, but {where} "
                              f"is of model {actual!r}; {fix}")


def check_width(sae: SparseAutoencoder, meta: SAEMetadata, width: int, where: str) -> None:
    if sae.d_in != width:
        raise EvaluationError(f"the SAE reads {sae.d_in}-wide activations but {meta.hook} of {where} "
                              f"is {width} wide; it was trained on another model or hook")


def _on_held_out_documents(sae_dir: str | Path, sae: SparseAutoencoder, meta: SAEMetadata,
                           settings: EvaluateConfig, model_cfg: ModelConfig, data: DataConfig,
                           device: torch.device) -> _Run:
    name = model_name(model_cfg)
    check_same_model(sae_dir, meta, name, "the config", "set model.name to the model it was trained on")
    context = meta.context_size or data.context_size
    if context != data.context_size:
        log.info("evaluating on windows of %d tokens, the SAE's context size (data.context_size is %d)",
                 context, data.context_size)
    _check_first_kept(meta, context, settings)
    data = replace(data, context_size=context, exclude_first_positions=meta.first_kept,
                   prepend_bos=data.prepend_bos if meta.prepend_bos is None else meta.prepend_bos)
    n_windows = settings.held_out_tokens // context
    if n_windows == 0:
        raise EvaluationError(f"evaluate.held_out_tokens={settings.held_out_tokens} is less than one "
                              f"window of {context} tokens; raise it")
    tokenizer = load_tokenizer(model_cfg)
    window_list = list(iter_windows(tokenizer, data, n_windows, held_out=True))
    if not window_list:
        raise EvaluationError(f"data.path={data.path!r} has no held-out documents long enough for a "
                              f"window of {context} tokens; raise data.holdout_fraction")
    if len(window_list) < n_windows:
        log.warning("only %d held-out windows of the %d asked for", len(window_list), n_windows)
    target = {"kind": "held_out_documents", "dataset": data.path, "split": data.split,
              "holdout_fraction": data.holdout_fraction, "n_windows": len(window_list),
              "context_size": context, "context_size_from": "sae" if meta.context_size else "config",
              "model_dtype": resolve_dtype(model_cfg.dtype, device)}
    return _on_windows(sae, meta, settings, model_cfg, tokenizer, window_list, target, device)


def _on_texts(sae_dir: str | Path, sae: SparseAutoencoder, meta: SAEMetadata, settings: EvaluateConfig,
              model_cfg: ModelConfig, texts: list[str], device: torch.device) -> _Run:
    """The caller's texts, packed into windows of the SAE's context size (a shorter tail window)."""
    check_same_model(sae_dir, meta, model_name(model_cfg), "the given model",
                     "pass the model it was trained on")
    context = meta.context_size or 1024
    _check_first_kept(meta, context, settings)
    tokenizer = load_tokenizer(model_cfg)
    prepend_bos = True if meta.prepend_bos is None else meta.prepend_bos
    window_list = text_windows(tokenizer, texts, context, prepend_bos)
    window_list = [w for w in window_list if len(w) > meta.first_kept + 1]
    if not window_list:
        raise EvaluationError(f"the {len(texts)} texts give no window longer than the SAE's first kept "
                              f"position {meta.first_kept}; pass more (or longer) text")
    target = {"kind": "texts", "n_texts": len(texts), "n_windows": len(window_list),
              "context_size": context,
              "model_dtype": resolve_dtype(model_cfg.dtype, device)}
    return _on_windows(sae, meta, settings, model_cfg, tokenizer, window_list, target, device)


def text_windows(tokenizer: Any, texts: Sequence[str], context: int, prepend_bos: bool) -> list[np.ndarray]:
    """`texts` packed into windows `[context]` as the harvester packs documents, plus the tail."""
    bos, separator = separator_ids(tokenizer)
    token_lists = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts if text]
    return list(pack_windows(token_lists, context, bos if prepend_bos else None, separator, keep_tail=True))


def _check_first_kept(meta: SAEMetadata, context: int, settings: EvaluateConfig) -> None:
    if meta.first_kept > context - (2 if settings.downstream else 1):
        raise EvaluationError(f"the SAE's seqpos_slice starts at {meta.first_kept}: windows of {context} "
                              "tokens leave nothing to evaluate")


def _on_windows(sae: SparseAutoencoder, meta: SAEMetadata, settings: EvaluateConfig, model_cfg: ModelConfig,
                tokenizer: Any, window_list: list[np.ndarray], target: dict[str, Any],
                device: torch.device) -> _Run:
    """Pass 1 (capture, reconstruction figures) and pass 2 (downstream) over token windows."""
    name = model_name(model_cfg)
    model = load_model(model_cfg, device)
    check_width(sae, meta, resolve_hook(model, meta.hook).d, f"model {name!r}")
    check_context_size(model, max(len(w) for w in window_list))
    special = sorted(tokenizer.all_special_ids) if meta.special_token_ids is None else meta.special_token_ids
    rec = ReconstructionAccumulator(sae.d_in, sae.d_sae, settings.dense_threshold)
    special_ids = torch.tensor(special, dtype=torch.long)
    batches = _same_length_batches(window_list, settings.batch_size)
    plan = plan_suffix(model, meta.hook) if settings.downstream else None
    entries: list[torch.Tensor | None] = []  # per batch: the suffix's input [B, T, d], if kept
    kept_bytes = 0
    for batch in tqdm(batches, desc="evaluate: reconstruction", unit="batch", leave=False):
        captured = capture_activations(model, batch.to(device), plan.capture_names if plan else [meta.hook])
        activations = captured[meta.hook]  # [B, T, d]
        keep = ~torch.isin(batch[:, meta.first_kept:], special_ids)  # [B, T - first_kept]
        _add_rows(sae, activations[:, meta.first_kept:][keep.to(device)].float(), rec)
        entry = captured[plan.entry_hook] if plan else None
        if entry is not None and kept_bytes + entry.nbytes <= PREFIX_CACHE_BYTES:
            kept_bytes += entry.nbytes
            entries.append(entry)
        else:
            entries.append(None)
    down = _downstream(model, sae, meta, batches, rec.mean(), device, plan, entries) \
        if settings.downstream else None
    return _Run(rec, down, name, target, list(special))


def _same_length_batches(window_list: list[np.ndarray], batch_size: int) -> list[torch.Tensor]:
    """Consecutive windows of equal length stacked into batches `[<= batch_size, length]` (int64)."""
    batches: list[torch.Tensor] = []
    run: list[np.ndarray] = []
    for window in window_list:
        if run and (len(window) != len(run[0]) or len(run) == batch_size):
            batches.append(torch.from_numpy(np.stack(run)).long())
            run = []
        run.append(window)
    if run:
        batches.append(torch.from_numpy(np.stack(run)).long())
    return batches


def _on_store(sae_dir: str | Path, sae: SparseAutoencoder, meta: SAEMetadata, settings: EvaluateConfig,
              store_url: str, device: torch.device) -> _Run:
    store = ActivationStore.open(store_url)
    store.require_complete()
    name = store.attrs.get("model")
    check_same_model(sae_dir, meta, name, f"store {store_url!r}",
                     "evaluate it on a store harvested from that model")
    if meta.hook not in store.hooks:
        raise EvaluationError(f"the SAE reads hook {meta.hook}, which store {store_url!r} does not hold "
                              f"(it holds {', '.join(store.hooks)}); harvest that hook or evaluate on "
                              "held-out documents")
    check_width(sae, meta, store.d(meta.hook), f"store {store_url!r}")
    context = store.context_size
    excluded = store.attrs.get("excluded", {})
    special = [int(t) for t in excluded.get("token_ids", [])] if meta.special_token_ids is None \
        else meta.special_token_ids
    selection = RowSelection(meta.first_kept, tuple(special), settings.max_rows)
    rec = ReconstructionAccumulator(sae.d_in, sae.d_sae, settings.dense_threshold)
    for batch in iter_kept_rows(store, meta.hook, selection, settings.row_batch_size):
        _add_rows(sae, batch.activations.to(device), rec)
    n_windows = min(settings.held_out_tokens // context, store.geometry.n_windows)
    target: dict[str, Any] = {"kind": "store", "url": store_url, "context_size": context,
                              "max_rows": settings.max_rows, "n_windows": 0}
    down = None
    if settings.downstream:
        if n_windows == 0 or meta.first_kept > context - 2:
            raise EvaluationError(f"no downstream predictions: evaluate.held_out_tokens="
                                  f"{settings.held_out_tokens} with windows of {context} tokens from "
                                  f"position {meta.first_kept}; raise it or set evaluate.downstream=false")
        token_ids = store.read(TOKEN_IDS, 0, n_windows * context).astype(np.int64)
        windows = torch.from_numpy(token_ids.reshape(n_windows, context))  # [windows, context]
        model_cfg = model_config_of_store(store.attrs.get("identity", {}), settings.device)
        model = load_model(model_cfg, device)
        check_width(sae, meta, resolve_hook(model, meta.hook).d, f"model {name!r}")
        down = _downstream(model, sae, meta, list(windows.split(settings.batch_size)), rec.mean(), device,
                           plan_suffix(model, meta.hook))
        target.update(n_windows=n_windows, model_dtype=model_cfg.dtype)
    return _Run(rec, down, str(name), target, special)


def _add_rows(sae: SparseAutoencoder, x: torch.Tensor, rec: ReconstructionAccumulator) -> None:
    """Encode rows x [rows, d_in] (float32) and add them to the figures.

    A TopK SAE (its own `encode`) goes through its k active latents only: the pre-activations into
    the reused buffer, the same top-k, a sparse decode; no dense [rows, d_sae] latents and no dense
    decoder product (pass 1 of the demo evaluation: 1.9 s of SAE and figures for 8,063 rows)."""
    if encodes_top_k(sae):
        values, indices = sae.encode_active(x)  # [rows, k]
        x_hat = sparse_decode(indices, values, sae.W_dec.detach()) + sae.b_dec.detach()
        rec.update_active(x, x_hat, indices, values)
        return
    latents = sae.encode(x)  # [rows, d_sae]
    rec.update(x, sae.decode(latents), latents)


def _downstream(model: Any, sae: SparseAutoencoder, meta: SAEMetadata, batches: list[torch.Tensor],
                mean: torch.Tensor, device: torch.device, plan: SuffixPlan | None,
                entries: Sequence[torch.Tensor | None] = ()) -> DownstreamAccumulator:
    """Next-token CE of the clean, spliced, zero- and mean-ablated forwards over the window batches:
    per batch one prefix forward (none where `entries` holds the batch's suffix input) and four
    suffix forwards; four full forwards where `plan` is None or the model cannot skip its prefix."""
    down = DownstreamAccumulator(meta.first_kept)
    rewrites = {"spliced": splice_sae(sae, meta.first_kept), "zero": ablate_zero(meta.first_kept),
                "mean": ablate_mean(mean, meta.first_kept)}
    head = OutputHead.of(model) if plan is not None else None
    head_checked = False  # the model's own logits of one window, checked against `head`
    for index, batch in enumerate(tqdm(batches, desc="evaluate: downstream", unit="batch", leave=False)):
        ids = batch.to(device)
        if plan is not None:
            try:
                entry = entries[index] if index < len(entries) else None
                if entry is None:
                    entry = capture_activations(model, ids, [plan.entry_hook])[plan.entry_hook]
                if head is not None and not head_checked:  # one window's clean suffix, both ways
                    head_checked = True
                    window_logits = suffix_logits(model, ids[:1], plan, entry[:1], None)
                    window_input = suffix_head_input(model, ids[:1], plan, entry[:1], None)
                    if not head.matches(window_input, window_logits):
                        log.info("evaluate: %s's output head is not a plain linear map of its input "
                                 "here; scoring its full logits", type(model).__name__)
                        head = None
                if head is not None:
                    clean = suffix_head_input(model, ids, plan, entry, None)  # [B, T, d]
                    edited = {variant: suffix_head_input(model, ids, plan, entry, fn)
                              for variant, fn in rewrites.items()}
                    down.update_head_inputs(ids, clean, edited, head)
                    continue
                clean_logits = suffix_logits(model, ids, plan, entry, None)
                down.update(ids, clean_logits, ((variant, suffix_logits(model, ids, plan, entry, fn))
                                                for variant, fn in rewrites.items()))
                continue
            except SuffixError as err:  # raised by the first suffix forward, before any figure is added
                log.warning("evaluate: %s; running four full forwards per batch instead", err)
                plan = None
        variants = ((variant, _logits(model, ids, {meta.hook: fn})) for variant, fn in rewrites.items())
        down.update(ids, _logits(model, ids, {}), variants)
    return down


def _logits(model: Any, input_ids: torch.Tensor, fns: dict[str, HookFn]) -> torch.Tensor:
    """[windows, context, vocab] logits of one full forward with `fns` attached."""
    with hooks_attached(model, fns):
        return model(input_ids=input_ids, use_cache=False).logits
