"""The public Python API, used as a notebook or a script would: no YAML file, one namespace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import saeworks
from saeworks.eval.evaluate import EvaluationError, text_windows
from saeworks.sae.configio import ConfigError
from saeworks.sae.io import load_sae
from tests.dictionary_helpers import build
from tests.eval_helpers import TINY_CONTEXT

FIRST_KEPT = 2  # the tiny run's seqpos_slice start
TEXTS = [
    "The sqlite3 module provides a SQL interface compliant with the DB-API 2.0 specification.",
    "import os\nprint(os.getcwd())\n",
    "Paris is the capital of France, and Berlin is the capital of Germany. " * 3,
    "A short one.",
]


def test_every_public_name_resolves() -> None:
    assert saeworks.__version__
    for name in saeworks.__all__:
        assert getattr(saeworks, name) is not None, name
    assert "load_sae" in dir(saeworks)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = saeworks.nope  # type: ignore[attr-defined]


def test_load_config_takes_a_path_an_object_and_overrides(tmp_path: Path) -> None:
    cfg = saeworks.load_config("configs/demo.yaml", "harvest.max_tokens=2048", run_dir=str(tmp_path),
                               **{"train.total_tokens": 10_000, "harvest.hooks": ["blocks.1.hook_mlp_out"]})
    assert cfg.harvest.max_tokens == 2048 and cfg.train.total_tokens == 10_000
    assert cfg.run_dir == str(tmp_path) and cfg.harvest.hooks == ["blocks.1.hook_mlp_out"]
    again = saeworks.load_config(cfg, "data.context_size=64")
    assert again.data.context_size == 64 and again.harvest.max_tokens == 2048
    assert cfg.data.context_size != 64 or again is not cfg  # the object given is not changed
    with pytest.raises(ConfigError, match=r"harvest\.max_tokenz"):
        saeworks.load_config(None, "harvest.max_tokenz=5")
    with pytest.raises(ConfigError, match="expected an integer"):
        saeworks.load_config(None, **{"train.total_tokens": "many"})


def test_text_windows_pack_like_the_harvester_and_keep_the_tail() -> None:
    class Tokens:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
            return {"input_ids": [int(word) for word in text.split()]}

    windows = text_windows(Tokens(), ["10 11 12", "13 14"], 4, prepend_bos=True)
    assert [w.tolist() for w in windows] == [[1, 10, 11, 12], [1, 2, 13, 14]]  # nothing left over
    windows = text_windows(Tokens(), ["10 11 12 13 14"], 4, prepend_bos=True)
    assert [w.tolist() for w in windows] == [[1, 10, 11, 12], [1, 13, 14, 2]]
    windows = text_windows(Tokens(), ["10 11 12 13"], 4, prepend_bos=True)
    assert [w.tolist() for w in windows] == [[1, 10, 11, 12], [1, 13]]  # the tail: its own window
    windows = text_windows(Tokens(), ["10 11", "12"], 8, prepend_bos=False)
    assert [w.tolist() for w in windows] == [[10, 11, 2, 12]]


@torch.no_grad()
def test_evaluate_on_texts_matches_a_hand_computation(tiny_run: Any, embedded_model: Any,
                                                      embedded_tokenizer: Any) -> None:
    """saeworks.evaluate(sae, model=..., text=[...]) with no config: the reconstruction figures
    equal the SAE applied by hand to a plain forward's hidden states of the same windows."""
    report = saeworks.evaluate(tiny_run.sae_dir, model="embedded", text=TEXTS, downstream=False,
                               device="cpu", batch_size=2)
    windows = text_windows(embedded_tokenizer, TEXTS, TINY_CONTEXT, prepend_bos=True)
    assert len(windows[-1]) < TINY_CONTEXT < len(windows[0]) + 1  # a short tail window is scored
    special = set(embedded_tokenizer.all_special_ids)
    rows = []
    for window in windows:
        hidden = embedded_model(torch.from_numpy(window).long()[None], output_hidden_states=True,
                                use_cache=False).hidden_states[4][0]  # blocks.3 output
        keep = [p for p in range(FIRST_KEPT, len(window)) if int(window[p]) not in special]
        rows.append(hidden[keep])
    x = torch.cat(rows).float()
    sae = load_sae(tiny_run.sae_dir)
    x_hat = sae.decode(sae.encode(x))
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
    assert report.info["n_tokens"] == x.shape[0]
    assert report.info["target"] == {"kind": "texts", "n_texts": len(TEXTS), "n_windows": len(windows),
                                     "context_size": TINY_CONTEXT, "model_dtype": "float32"}
    assert report.metrics["fvu"] == pytest.approx(float(fvu), rel=1e-4)
    shown = f"EvalReport('{tiny_run.sae_dir.name}' on texts, {x.shape[0]} tokens: FVU "
    assert repr(report).startswith(shown)


def test_evaluate_with_downstream_and_on_a_store(tiny_run: Any) -> None:
    texts = saeworks.evaluate(tiny_run.sae_dir, model="embedded", text=TEXTS, device="cpu")
    assert texts.info["n_predictions"] > 0
    assert texts.metrics["ce_clean"] < texts.metrics["ce_zero"]
    stored = saeworks.evaluate(tiny_run.sae_dir, store=tiny_run.store_url, downstream=False)
    assert stored.info["target"]["kind"] == "store" and stored.info["n_tokens"] > 0


def test_evaluate_says_what_is_missing(tiny_run: Any) -> None:
    with pytest.raises(ConfigError, match="model="):
        saeworks.evaluate(tiny_run.sae_dir, text=TEXTS)
    with pytest.raises(ConfigError, match="one target"):
        saeworks.evaluate(tiny_run.sae_dir, model="embedded")
    with pytest.raises(EvaluationError, match="exactly one target"):
        saeworks.evaluate(tiny_run.sae_dir, model="embedded", text=TEXTS, store=tiny_run.store_url)
    with pytest.raises(EvaluationError, match="no window longer"):
        saeworks.evaluate(tiny_run.sae_dir, model="embedded", text=["Hi"], device="cpu")
    with pytest.raises(ConfigError, match=r"evaluate\.batch_sise"):
        saeworks.evaluate(tiny_run.sae_dir, model="embedded", text=TEXTS, batch_sise=3)


def test_open_dictionary_and_load_sae_from_a_directory(tmp_path: Path, tiny_run: Any) -> None:
    directory, _ = build(tmp_path)
    with saeworks.open_dictionary(directory) as features:
        assert isinstance(features, saeworks.FeatureDictionary)
        assert features.feature(0).id == 0
    sae = saeworks.load_sae(tiny_run.sae_dir)
    assert isinstance(sae, saeworks.SparseAutoencoder) and sae.d_sae == 256


def test_only_the_saeworks_namespace_is_installed(tmp_path: Path) -> None:
    """Outside the checkout, the stage folders are reachable only as saeworks.*; importing
    saeworks loads no model code and switches no matplotlib backend."""
    script = ("import importlib.util, sys\n"
              "import saeworks\n"
              "stages = ('sae', 'activations', 'train', 'eval')\n"
              "assert all(importlib.util.find_spec(n) is None for n in stages)\n"
              "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules\n"
              "import saeworks.train.run, saeworks.eval.dictionary\n"
              "print(saeworks.__version__, saeworks.train.run.__name__)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [saeworks.__version__, "saeworks.train.run"]
