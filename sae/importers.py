"""Importers: SAEs trained elsewhere, as this package's SAE classes (inference on raw activations).

SAELens (`import_saelens`): a directory with cfg.json + sae_weights.safetensors, architectures
standard / topk / jumprelu. Version 6 nests the model facts under "metadata"; older versions keep
them flat, and name a TopK SAE `architecture: standard` with `activation_fn_str: topk` and
`activation_fn_kwargs: {k: ...}` (SAELens' own handle_pre_6_0_config reads it so). Only the
architecture, d_in, d_sae, k and apply_b_dec_to_input matter for inference here.

EleutherAI sparsify (`import_sparsify`), as its sparsify/sparse_coder.py saves and runs it:
cfg.json holds the SparseCoderConfig fields plus d_in (num_latents, or expansion_factor * d_in
when num_latents is 0; k; activation "topk" or "groupmax"; skip_connection; transcode), and
sae.safetensors holds encoder.weight [d_sae, d_in], encoder.bias [d_sae], W_dec [d_sae, d_in],
b_dec [d_in] (W_skip [d_in, d_in] with skip_connection). Its encoder computes
topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias), k) (no b_dec subtraction when
transcoding) and decodes sum_j acts_j * W_dec[idx_j] + b_dec: this package's TopK SAE with
W_enc = encoder.weight.T and apply_b_dec_to_input (relu before or after the top-k selection
gives the same latents).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.io import WEIGHTS_FILE, SAEFormatError, read_cfg, read_tensors, sae_from_parts

SPARSIFY_CFG_FILE = "cfg.json"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"


def saelens_cfg(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """A SAELens cfg of any version reduced to the keys sae_from_parts reads."""
    architecture = str(cfg.get("architecture", "standard"))
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    k = cfg.get("k")
    if architecture == "standard" and activation == "topk":  # SAELens < 6 TopK
        architecture, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k")
    elif architecture == "standard" and activation not in (None, "relu"):
        raise SAEFormatError(f"{where}: activation function {activation!r} is not supported (relu, topk)")
    normalize = cfg.get("normalize_activations")
    if normalize not in (None, False, "none"):
        raise SAEFormatError(f"{where}: normalize_activations={normalize!r} needs a run-time input "
                             "normalisation this package does not apply; fold it into the weights first")
    return {"architecture": architecture, "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"), "k": k,
            "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True)}


def import_saelens(directory: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load a SAELens SAE directory (version 6 or older) for inference."""
    cfg = read_cfg(directory)
    tensors = read_tensors(Path(directory) / WEIGHTS_FILE)
    scaling = tensors.pop("scaling_factor", None)  # SAELens < 4 fine-tuning scale; all ones = unused
    if scaling is not None and not torch.equal(scaling, torch.ones_like(scaling)):
        raise SAEFormatError(f"{directory}: a fine-tuning scaling_factor other than 1 is not supported")
    return sae_from_parts(saelens_cfg(cfg, str(directory)), tensors, str(directory)).to(device).eval()


def _sparsify_cfg(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise SAEFormatError(f"no sparsify SAE directory at {str(directory)!r}")
    names = (SPARSIFY_CFG_FILE, SPARSIFY_WEIGHTS_FILE)
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        layers = sorted(p.name for p in directory.iterdir() if (p / SPARSIFY_CFG_FILE).is_file())
        hint = f"; it holds one per hookpoint, pass one of: {', '.join(layers)}" if layers else ""
        raise SAEFormatError(f"{str(directory)!r} is not a sparsify SAE directory: it lacks "
                             f"{' and '.join(missing)}{hint}")
    try:
        cfg = json.loads((directory / SPARSIFY_CFG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEFormatError(f"{directory / SPARSIFY_CFG_FILE} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict) or "d_in" not in cfg:
        raise SAEFormatError(f"{directory / SPARSIFY_CFG_FILE} lacks d_in")
    unsupported = {"activation": cfg.get("activation", "topk") != "topk",
                   "skip_connection": bool(cfg.get("skip_connection")),
                   "transcode": bool(cfg.get("transcode"))}
    if any(unsupported.values()):
        bad = ", ".join(f"{key}={cfg.get(key)!r}" for key, flag in unsupported.items() if flag)
        raise SAEFormatError(f"{directory}: sparsify coders with {bad} are not supported "
                             "(a plain TopK SAE is)")
    return cfg


def import_sparsify(directory: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an EleutherAI sparsify SAE directory as a TopK SAE with the same outputs."""
    directory = Path(directory)
    cfg = _sparsify_cfg(directory)
    tensors = read_tensors(directory / SPARSIFY_WEIGHTS_FILE)
    absent = [name for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if name not in tensors]
    if absent:
        raise SAEFormatError(f"{directory / SPARSIFY_WEIGHTS_FILE} lacks {', '.join(absent)}")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    weights = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"],
               "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    saelens_form = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": cfg.get("k", 32),
                    "apply_b_dec_to_input": True}
    return sae_from_parts(saelens_form, weights, str(directory)).to(device).eval()
