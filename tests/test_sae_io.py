"""Saving and loading SAEs: exact round trips with the input scale folded in, the SAELens cfg.json
layout, atomic saves, clear errors, and the SAELens / sparsify importers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from saeworks.sae.base import SparseAutoencoder, TrainContext
from saeworks.sae.batchtopk import BatchTopKSAE
from saeworks.sae.config import SAEConfig
from saeworks.sae.importers import import_saelens, import_sparsify
from saeworks.sae.io import CFG_FILE, WEIGHTS_FILE, SAEFormatError, load_sae, save_sae
from saeworks.sae.jumprelu import JumpReLUSAE
from saeworks.sae.registry import ARCHITECTURES, SAVED_ARCHITECTURES, UnknownArchitectureError, create_sae
from saeworks.sae.relu import ReLUSAE
from saeworks.sae.topk import TopKSAE
from tests.helpers import umask, unshared_paths

D_IN, D_SAE, K = 16, 64, 4
ARCHS = sorted(ARCHITECTURES)
SAVED_AS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
            "matryoshka_batchtopk": "jumprelu"}
METADATA = {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post", "context_size": 128,
            "prepend_bos": True, "dataset_path": "some/dataset", "seqpos_slice": [1, None]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: one thread is fastest


def trained_like(architecture: str) -> SparseAutoencoder:
    """An SAE with non-trivial weights in every tensor (and a batchtopk threshold set)."""
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=K))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if isinstance(sae, JumpReLUSAE):
            sae.log_threshold.copy_(torch.linspace(-3, 0.5, D_SAE))
        sae.normalize_decoder()
        if isinstance(sae, BatchTopKSAE):
            sae.training_forward(torch.randn(64, D_IN) * 4, TrainContext(0.0, None))
    return sae


def inputs(n: int = 32) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("scale", [4.0, 0.25])
@pytest.mark.parametrize("architecture", ARCHS)
def test_round_trip_is_exact_with_the_scale_folded_in(tmp_path: Path, architecture: str,
                                                      scale: float) -> None:
    sae = trained_like(architecture)
    loaded = load_sae(save_sae(sae, tmp_path / "sae", input_scale=scale, metadata=METADATA))
    assert type(loaded) is SAVED_ARCHITECTURES[SAVED_AS[architecture]]
    x = inputs() * 4 / scale  # raw activations; the SAE was trained on scale * x (4 * randn)
    with torch.no_grad():
        latents = sae.encode(scale * x)
        assert latents.count_nonzero() > 0
        # A power-of-two scale folds exactly, so the saved SAE reproduces it bit for bit.
        assert torch.equal(loaded.encode(x), latents)
        assert torch.equal(loaded.decode(latents), sae.decode(latents) / scale)
        assert torch.equal(loaded(x), sae(scale * x) / scale)


@pytest.mark.parametrize("architecture", ARCHS)
def test_round_trip_with_any_scale(tmp_path: Path, architecture: str) -> None:
    sae, scale = trained_like(architecture), 0.37
    loaded = load_sae(save_sae(sae, tmp_path / "sae", input_scale=scale))
    x = inputs() * 4 / scale
    with torch.no_grad():
        assert torch.allclose(loaded(x), sae(scale * x) / scale, rtol=1e-5, atol=1e-5)


def test_batchtopk_loads_as_jumprelu_with_its_threshold(tmp_path: Path) -> None:
    sae = trained_like("batchtopk")
    assert isinstance(sae, BatchTopKSAE) and float(sae.threshold) > 0
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert isinstance(loaded, JumpReLUSAE)
    assert torch.allclose(loaded.threshold, sae.threshold.expand(D_SAE), rtol=1e-6, atol=0)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x) > 0, sae.pre_activations(x) > sae.threshold)


@pytest.mark.parametrize("architecture", ARCHS)
def test_cfg_json_has_the_saelens_keys(tmp_path: Path, architecture: str) -> None:
    sae = trained_like(architecture)
    directory = save_sae(sae, tmp_path / "sae", input_scale=2.0, metadata=METADATA)
    cfg = json.loads((directory / CFG_FILE).read_text())
    assert cfg["architecture"] == SAVED_AS[architecture]
    assert {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none"}.items() <= cfg.items()
    assert ("k" in cfg) == (architecture == "topk") and cfg.get("k", K) == K
    metadata = cfg["metadata"]
    assert METADATA.items() <= metadata.items()
    assert {"hook_head_index", "model_class_name", "model_from_pretrained_kwargs", "neuronpedia_id",
            "exclude_special_tokens", "sae_lens_training_version"} <= set(metadata)
    major = int(metadata["sae_lens_version"].split(".")[0])
    assert major >= 6  # else SAELens 6 re-reads the file as a flat pre-6 config
    assert cfg["saeworks"]["training_architecture"] == architecture and cfg["saeworks"]["input_scale"] == 2.0
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
        names = set(f.keys())
        assert all(f.get_tensor(name).dtype == torch.float32 for name in names)
    threshold = {"threshold"} if SAVED_AS[architecture] == "jumprelu" else set()
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec", *threshold}


def test_save_is_atomic_and_refuses_non_finite_weights(tmp_path: Path) -> None:
    sae = trained_like("topk")
    with torch.no_grad():
        sae.W_dec[3, 2] = float("nan")
    with pytest.raises(SAEFormatError, match="non-finite"):
        save_sae(sae, tmp_path / "sae")
    assert list(tmp_path.iterdir()) == []  # no directory, no scratch left behind


def test_save_replaces_an_existing_directory(tmp_path: Path) -> None:
    save_sae(trained_like("relu"), tmp_path / "sae")
    (tmp_path / "sae" / "stale.txt").write_text("old")
    loaded = load_sae(save_sae(trained_like("topk"), tmp_path / "sae"))
    assert isinstance(loaded, TopKSAE) and not (tmp_path / "sae" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_saved_sae_is_readable_by_others_under_umask_022(tmp_path: Path) -> None:
    """Written in scratch and renamed into place, a saved SAE still gets the modes of ordinary
    files and directories, not tempfile's owner-only ones."""
    with umask(0o022):
        directory = save_sae(trained_like("topk"), tmp_path / "sae")
    assert unshared_paths(directory) == []
    assert sorted(p.name for p in directory.iterdir()) == [CFG_FILE, WEIGHTS_FILE]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(SAEFormatError, match="no SAE directory"):
        load_sae(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SAEFormatError, match="no SAE directory"):
        load_sae(tmp_path / "file")
    directory = save_sae(trained_like("topk"), tmp_path / "sae")
    cfg = json.loads((directory / CFG_FILE).read_text())

    weights = (directory / WEIGHTS_FILE).read_bytes()
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(SAEFormatError, match=WEIGHTS_FILE):
        load_sae(directory)
    (directory / WEIGHTS_FILE).write_bytes(weights[:100])
    with pytest.raises(SAEFormatError, match="safetensors"):
        load_sae(directory)
    (directory / WEIGHTS_FILE).write_bytes(weights)

    (directory / CFG_FILE).write_text("{not json")
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        load_sae(directory)
    (directory / CFG_FILE).write_text("[1, 2]")
    with pytest.raises(SAEFormatError, match="not an object"):
        load_sae(directory)
    (directory / CFG_FILE).write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(UnknownArchitectureError, match="gated") as err:
        load_sae(directory)
    assert all(name in str(err.value) for name in [*SAVED_ARCHITECTURES, *ARCHITECTURES])
    (directory / CFG_FILE).write_text(json.dumps({key: v for key, v in cfg.items() if key != "k"}))
    with pytest.raises(SAEFormatError, match="lacks k"):
        load_sae(directory)
    (directory / CFG_FILE).write_text(json.dumps({**cfg, "d_sae": 32}))
    with pytest.raises(SAEFormatError, match=r"wrong tensor shapes: .*W_enc \(16, 64\) \(expected \(16, 32"):
        load_sae(directory)
    (directory / CFG_FILE).write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(SAEFormatError, match="lack threshold"):
        load_sae(directory)


def saelens_dir(directory: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir()
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "sae_weights.safetensors"))
    return directory


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
            "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}


def test_import_saelens_v6_jumprelu(tmp_path: Path) -> None:
    tensors = {**random_weights(), "threshold": torch.rand(D_SAE)}
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "gemma-2-2b", "hook_name": "blocks.12.hook_resid_post",
                        "sae_lens_version": "6.5.0"}}
    directory = saelens_dir(tmp_path / "sae", cfg, tensors)
    x = inputs()
    pre = x @ tensors["W_enc"] + tensors["b_enc"]  # apply_b_dec_to_input False: no centring
    expected = pre.relu() * (pre > tensors["threshold"])
    for sae in (import_saelens(directory), load_sae(directory)):
        assert isinstance(sae, JumpReLUSAE)
        with torch.no_grad():
            assert torch.allclose(sae.encode(x), expected, rtol=1e-6, atol=1e-6)
            decoded = expected @ tensors["W_dec"] + tensors["b_dec"]
            assert torch.allclose(sae(x), decoded, rtol=1e-5, atol=1e-5)


def test_import_saelens_pre_v6_layouts(tmp_path: Path) -> None:
    tensors = random_weights()
    flat = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "model_name": "gpt2", "hook_point": "blocks.0",
            "hook_point_layer": 0, "sae_lens_training_version": "3.1.0"}
    standard = import_saelens(saelens_dir(tmp_path / "standard", flat, tensors))  # no architecture key
    assert isinstance(standard, ReLUSAE)
    topk_cfg = {**flat, "architecture": "standard", "activation_fn_str": "topk",
                "activation_fn_kwargs": {"k": 5}}
    unit_scaling = {**tensors, "scaling_factor": torch.ones(D_SAE)}  # old files: all ones = unused
    topk = import_saelens(saelens_dir(tmp_path / "topk", topk_cfg, unit_scaling))
    assert isinstance(topk, TopKSAE) and topk.cfg.k == 5
    x = inputs()
    with torch.no_grad():
        assert torch.equal((topk.encode(x) != 0).sum(dim=1), torch.full((len(x),), 5))
        pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
        assert torch.allclose(standard.encode(x), pre.relu())
    normalised = {**flat, "normalize_activations": "expected_average_only_in"}
    scaled = saelens_dir(tmp_path / "scaled", normalised, tensors)
    with pytest.raises(SAEFormatError, match="normalize_activations"):
        import_saelens(scaled)
    tuned = saelens_dir(tmp_path / "tuned", flat, {**tensors, "scaling_factor": torch.full((D_SAE,), 2.0)})
    with pytest.raises(SAEFormatError, match="scaling_factor"):
        import_saelens(tuned)


def sparsify_dir(directory: Path, cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """A directory as sparsify's SparseCoder.save_to_disk writes it (cfg.json + sae.safetensors)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
               "encoder.bias": torch.randn(D_SAE, generator=g),
               "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    directory.mkdir(parents=True)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "sae.safetensors"))
    return tensors


SPARSIFY_CFG = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 0,
                "k": 6, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}


def test_import_sparsify_matches_its_forward(tmp_path: Path) -> None:
    tensors = sparsify_dir(tmp_path / "layers.3", SPARSIFY_CFG)  # d_sae = 4 * 16 = 64
    sae = import_sparsify(tmp_path / "layers.3")
    assert isinstance(sae, TopKSAE) and sae.d_sae == D_SAE and sae.cfg.k == 6
    x = inputs()
    # sparsify's SparseCoder.forward: encode = topk(relu(linear(x - b_dec)), k); decode = sum + b_dec
    pre = torch.nn.functional.linear(x - tensors["b_dec"], tensors["encoder.weight"], tensors["encoder.bias"])
    top_acts, top_indices = pre.relu().topk(6, sorted=False)
    sae_out = (top_acts[..., None] * tensors["W_dec"][top_indices]).sum(dim=1) + tensors["b_dec"]
    with torch.no_grad():
        latents = sae.encode(x)
        expected = torch.zeros(len(x), D_SAE).scatter_(1, top_indices, top_acts)
        assert torch.allclose(latents, expected, atol=1e-5)
        assert torch.allclose(sae(x), sae_out, rtol=1e-5, atol=1e-4)
    assert isinstance(import_sparsify(tmp_path / "layers.3"), TopKSAE)


def test_import_sparsify_errors(tmp_path: Path) -> None:
    sparsify_dir(tmp_path / "run" / "layers.0", {**SPARSIFY_CFG, "num_latents": D_SAE, "expansion_factor": 1})
    sparsify_dir(tmp_path / "run" / "layers.1", SPARSIFY_CFG)
    with pytest.raises(SAEFormatError, match=r"lacks cfg.json and sae.safetensors.*layers.0, layers.1"):
        import_sparsify(tmp_path / "run")
    assert import_sparsify(tmp_path / "run" / "layers.0").d_sae == D_SAE  # num_latents wins
    with pytest.raises(SAEFormatError, match="no sparsify SAE directory"):
        import_sparsify(tmp_path / "nowhere")
    (tmp_path / "run" / "layers.1" / "sae.safetensors").unlink()
    with pytest.raises(SAEFormatError, match=r"lacks sae\.safetensors"):
        import_sparsify(tmp_path / "run" / "layers.1")
    sparsify_dir(tmp_path / "groupmax", {**SPARSIFY_CFG, "activation": "groupmax", "skip_connection": True})
    with pytest.raises(SAEFormatError, match="activation='groupmax', skip_connection=True"):
        import_sparsify(tmp_path / "groupmax")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cfg.json").write_text(json.dumps(SPARSIFY_CFG))
    save_file({"encoder.weight": torch.zeros(D_SAE, D_IN)}, str(broken / "sae.safetensors"))
    with pytest.raises(SAEFormatError, match=r"lacks encoder\.bias, W_dec, b_dec"):
        import_sparsify(broken)
