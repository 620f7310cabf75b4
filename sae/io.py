"""Saving and loading SAEs in the directory layout SAELens and Neuronpedia read as they are.

    <dir>/cfg.json                  SAELens keys (architecture, d_in, d_sae, k, ..., metadata)
                                    plus a `saeworks` section (version, training architecture,
                                    the folded input scale, the full SAEConfig)
    <dir>/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec,
                                    and `threshold` [d_sae] for JumpReLU-style inference

Training runs on inputs scaled by `input_scale`; saving folds that scale into the weights, so a
saved SAE works on the model's raw activations. A directory is written to a temporary sibling and
renamed into place: a killed save never leaves a half-written SAE that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae.base import SparseAutoencoder
from sae.config import SAEConfig
from sae.registry import architecture_class
from sae.version import package_version

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


class SAEFormatError(ValueError):
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
        "metadata": {"hook_head_index": None, **(metadata or {})},
        "saeworks": {"version": package_version(), "training_architecture": sae.architecture,
                     "input_scale": input_scale, "config": vars(sae.cfg)},
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        save_file(tensors, str(scratch / WEIGHTS_FILE))
        (scratch / CFG_FILE).write_text(json.dumps(cfg, indent=2, default=str))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(scratch, directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return directory


def read_cfg(directory: str | Path) -> dict[str, Any]:
    """The cfg.json of an SAE directory, or an SAEFormatError saying what is missing."""
    path = Path(directory) / CFG_FILE
    if not Path(directory).is_dir():
        raise SAEFormatError(f"no SAE directory at {str(directory)!r}")
    if not path.is_file() or not (Path(directory) / WEIGHTS_FILE).is_file():
        raise SAEFormatError(f"{str(directory)!r} is not an SAE directory: it needs {CFG_FILE} and "
                             f"{WEIGHTS_FILE}")
    try:
        return dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise SAEFormatError(f"{path} is not valid JSON: {err}") from err


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE directory (ours or SAELens') for inference on raw activations."""
    cfg = read_cfg(directory)
    cls = architecture_class(str(cfg.get("architecture", "standard")))
    sae_cfg = SAEConfig(architecture=cls.architecture, d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]),
                        k=int(cfg.get("k", 1) or 1),
                        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)))
    sae = cls(sae_cfg)
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    missing = set(sae.state_dict()) - set(tensors)
    if missing:
        raise SAEFormatError(f"{directory}: {WEIGHTS_FILE} lacks {sorted(missing)}")
    sae.load_state_dict({name: tensors[name] for name in sae.state_dict()})
    return sae.to(device).eval()
