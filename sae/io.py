"""Saving and loading SAEs in the directory layout SAELens and Neuronpedia read as they are.

    <dir>/cfg.json                  SAELens keys (architecture, d_in, d_sae, k, ..., metadata)
                                    plus a `saeworks` section (version, training architecture,
                                    the folded input scale, the full SAEConfig)
    <dir>/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec,
                                    and `threshold` [d_sae] for JumpReLU-style inference

Training runs on inputs scaled by `input_scale`; saving folds that scale into the weights, so a
saved SAE works on the model's raw activations. A directory is written to a temporary sibling and
renamed into place: a killed save never leaves a half-written SAE that looks complete.

Saved architectures are SAELens': relu saves as "standard", topk as "topk", and jumprelu,
batchtopk and matryoshka_batchtopk as "jumprelu" (the last two with their one running threshold
repeated per latent); loading builds the class of sae.registry.SAVED_ARCHITECTURES. The folded
scale leaves pre-activations (hence thresholds) unchanged: loaded(x) == trained(scale * x) / scale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from saeworks.sae.atomic import atomic_directory
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.config import SAEConfig
from saeworks.sae.configio import ConfigError
from saeworks.sae.errors import SaeworksError
from saeworks.sae.registry import UnknownArchitectureError, saved_architecture_class
from saeworks.sae.version import package_version

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version. SAELens 6 (handle_config_defaulting in
sae_lens/loading/pretrained_sae_loaders.py) treats a cfg.json without a version >= 6.0.0 as the
flat pre-6 layout and rebuilds `metadata` from top-level keys, which would drop ours."""

METADATA_KEYS = ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos",
                 "dataset_path", "exclude_special_tokens", "seqpos_slice", "model_class_name",
                 "model_from_pretrained_kwargs", "neuronpedia_id")
"""SAELens 6 `SAEMetadata` fields, written (None when unknown) so every reader finds them."""


class SAEFormatError(SaeworksError, ValueError):
    """A directory that does not hold a loadable SAE."""


def folded_tensors(sae: SparseAutoencoder, input_scale: float) -> dict[str, torch.Tensor]:
    """Inference tensors acting on raw inputs x when the SAE was trained on input_scale * x."""
    tensors = {name: t.detach().float().cpu().clone() for name, t in sae.inference_tensors().items()}
    tensors["W_enc"] *= input_scale
    tensors["W_dec"] /= input_scale
    tensors["b_dec"] /= input_scale
    return {name: t.contiguous() for name, t in tensors.items()}


def save_sae(sae: SparseAutoencoder, directory: str | Path, input_scale: float = 1.0,
             metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` (scale folded in) atomically to `directory`; returns the directory."""
    directory = Path(directory)
    tensors = folded_tensors(sae, input_scale)
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise SAEFormatError(f"refusing to save {directory}: the SAE has non-finite weights")
    cfg = {
        **sae.inference_cfg(),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {**dict.fromkeys(METADATA_KEYS), "sae_lens_version": SAELENS_FORMAT_VERSION,
                     "sae_lens_training_version": None, **(metadata or {})},
        "saeworks": {"version": package_version(), "training_architecture": sae.architecture,
                     "input_scale": input_scale, "config": vars(sae.cfg)},
    }
    with atomic_directory(directory) as scratch:
        save_file(tensors, str(scratch / WEIGHTS_FILE))
        (scratch / CFG_FILE).write_text(json.dumps(cfg, indent=2, default=str))
    return directory


def read_cfg(directory: str | Path) -> dict[str, Any]:
    """The cfg.json of an SAE directory, or an SAEFormatError saying what is missing."""
    path = Path(directory) / CFG_FILE
    if not Path(directory).is_dir():
        raise SAEFormatError(f"no SAE directory at {str(directory)!r}")
    missing = [name for name in (CFG_FILE, WEIGHTS_FILE) if not (Path(directory) / name).is_file()]
    if missing:
        raise SAEFormatError(f"{str(directory)!r} is not an SAE directory: it lacks {' and '.join(missing)}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEFormatError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{path} holds a JSON {type(cfg).__name__}, not an object")
    return cfg


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or an SAEFormatError."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise SAEFormatError(f"{path} is not a readable safetensors file: {err}") from err


def read_vector(path: str | Path, key: str | None = None) -> tuple[torch.Tensor, str, dict[str, str]]:
    """One vector of a safetensors file (a steering vector, a probe direction): tensor `key`, or
    the file's only tensor, as float32 [d]; with its key and the file's metadata. An SAEFormatError
    naming the file's tensors when the key is missing or ambiguous, or the tensor is not a vector."""
    tensors = read_tensors(path)
    if key is None:
        if len(tensors) != 1:
            raise SAEFormatError(f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); "
                                 f"name one as {path}:KEY")
        (key,) = tensors
    if key not in tensors:
        raise SAEFormatError(f"{path} has no tensor {key!r}; it holds {', '.join(sorted(tensors))}")
    tensor = tensors[key]
    if tensor.numel() != max(tensor.shape, default=1):
        raise SAEFormatError(f"{path}:{key} has shape {tuple(tensor.shape)}; a direction is one [d] vector")
    with safe_open(str(path), "pt") as opened:
        metadata = dict(opened.metadata() or {})
    return tensor.reshape(-1).float(), key, metadata


def sae_from_parts(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> SparseAutoencoder:
    """The inference SAE a SAELens-style cfg and its tensors describe (`where` names them in errors)."""
    try:
        cls = saved_architecture_class(str(cfg.get("architecture", "standard")))
    except UnknownArchitectureError as err:
        raise UnknownArchitectureError(f"{where}: {err}") from err
    required = ("d_in", "d_sae", "k") if cls.architecture == "topk" else ("d_in", "d_sae")
    absent = [key for key in required if key not in cfg]
    if absent:
        raise SAEFormatError(f"{where}: {CFG_FILE} lacks {', '.join(absent)}")
    try:
        sae = cls(SAEConfig(architecture=cls.architecture, d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]),
                            k=int(cfg.get("k") or 1),
                            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True))))
    except (ConfigError, TypeError, ValueError) as err:
        raise SAEFormatError(f"{where}: bad {CFG_FILE} values: {err}") from err
    expected = sae.inference_tensors()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise SAEFormatError(f"{where}: the weights lack {', '.join(missing)}")
    wrong = [f"{name} {tuple(tensors[name].shape)} (expected {tuple(t.shape)})"
             for name, t in expected.items() if tensors[name].shape != t.shape]
    if wrong:
        raise SAEFormatError(f"{where}: wrong tensor shapes: {'; '.join(wrong)}")
    sae.load_inference_tensors({name: tensors[name].float() for name in expected})
    return sae


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE directory (ours or SAELens 6's) for inference on raw activations.

    BatchTopK and Matryoshka SAEs come back as JumpReLU SAEs (their saved, per-token form).
    Older SAELens layouts: sae.importers.import_saelens.
    """
    cfg = read_cfg(directory)
    tensors = read_tensors(Path(directory) / WEIGHTS_FILE)
    return sae_from_parts(cfg, tensors, str(directory)).to(device).eval()
