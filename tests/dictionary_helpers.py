"""A synthetic feature dictionary: hand-made, consistent analysis data written with the real
write_dictionary, in well under a second (no model, no store). Shared by the dictionary, report
and notebook tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saeworks.activations.config import ModelConfig
from saeworks.eval.dictionary_build import write_dictionary
from saeworks.eval.features import Contexts, FeatureAnalysis
from saeworks.sae.config import SAEConfig
from saeworks.sae.io import save_sae
from saeworks.sae.registry import create_sae

VOCAB = [" def", " class", "\n", "__init__", " the", "(", " x", "<bos>", " = ", "'s", " Paris", ".",
         "\t", " return", "ing", " π"]
METRICS = {"metrics": {"fvu": 0.21, "l0": 8.0, "ce_recovered": 0.97, "dead_fraction": 0.0625},
           "info": {"tokens": 256}}


class FakeTokenizer:
    """Decodes ids to VOCAB entries (ids past it to ' w<id>'), as write_dictionary asks a tokenizer to."""

    def text(self, i: int) -> str:
        return VOCAB[i] if i < len(VOCAB) else f" w{i}"

    def batch_decode(self, sequences: list[list[int]], **kwargs: Any) -> list[str]:
        return ["".join(self.text(i) for i in seq) for seq in sequences]


def _contexts(g: torch.Generator, store: torch.Tensor, d_sae: int, n: int, before: int, after: int,
              context_size: int, descending: bool) -> Contexts:
    """Contexts of `n` random rows per feature, cut from `store` within each row's window."""
    n_tokens = store.numel()
    rows = torch.randint(0, n_tokens, (d_sae, n), generator=g)
    values = torch.rand(d_sae, n, generator=g) * 10 + 0.5
    if descending:
        values = values.sort(dim=1, descending=True).values
    slot_rows = rows[..., None] - before + torch.arange(before + 1 + after)
    inside = (slot_rows >= 0) & (slot_rows // context_size == (rows // context_size)[..., None])
    token_ids = torch.where(inside, store[slot_rows.clamp(0, n_tokens - 1)], -1).int()
    sparse = torch.rand(slot_rows.shape, generator=g) * (torch.rand(slot_rows.shape, generator=g) < 0.3)
    activations = torch.where(inside, sparse * 5, 0.0)
    activations[..., before] = values
    return Contexts(values, rows, token_ids, activations.float())


def synthetic_analysis(d_sae: int = 12, *, top_n: int = 4, bands: int = 2, per_band: int = 2,
                       before: int = 3, after: int = 2, context_size: int = 8, n_windows: int = 16,
                       vocab: int = len(VOCAB), logit_tokens: int = 3, neighbours: int = 2,
                       dead: tuple[int, ...] = (1,), seed: int = 0) -> FeatureAnalysis:
    """A FeatureAnalysis of consistent hand-made data: contexts cut from a random token store,
    `dead` features never active, and feature 2's last top slot and first band slot empty."""
    g = torch.Generator().manual_seed(seed)
    store = torch.randint(0, vocab, (n_windows * context_size,), generator=g)
    top = _contexts(g, store, d_sae, top_n, before, after, context_size, descending=True)
    band = _contexts(g, store, d_sae, bands * per_band, before, after, context_size, descending=False)
    count = torch.randint(1, 100, (d_sae,), generator=g)
    for ctx, slot in ((top, top_n - 1), (band, 0)):
        for feature, n in [(f, slice(None)) for f in dead] + [(2, slice(slot, slot + 1))]:
            ctx.rows[feature, n], ctx.values[feature, n] = -1, 0
            ctx.token_ids[feature, n], ctx.activations[feature, n] = -1, 0
    count[list(dead)] = 0
    peak = top.values[:, 0].clone()
    quantiles = (torch.rand(d_sae, 3, generator=g).sort(dim=1).values * peak[:, None]).float()
    logit_values = torch.randn(d_sae, 2 * logit_tokens, generator=g).sort(dim=1, descending=True).values
    return FeatureAnalysis(
        n_tokens=store.numel(), count=count, sum=count.double() * 1.5, max=peak,
        quantile_levels=[0.25, 0.5, 0.9], quantiles=quantiles * (count[:, None] > 0),
        histogram=torch.randint(0, 50, (d_sae, 5), generator=g) * (count[:, None] > 0),
        top=top, band_edges=torch.linspace(1, 0, bands + 1), bands=band,
        logit_positive_ids=torch.randint(0, vocab, (d_sae, logit_tokens), generator=g),
        logit_positive_values=logit_values[:, :logit_tokens].contiguous(),
        logit_negative_ids=torch.randint(0, vocab, (d_sae, logit_tokens), generator=g),
        logit_negative_values=logit_values[:, logit_tokens:].flip(1).contiguous(),
        neighbour_ids=torch.randint(0, d_sae, (d_sae, neighbours), generator=g),
        neighbour_cosines=torch.rand(d_sae, neighbours, generator=g).sort(dim=1, descending=True).values,
        info={"store": "memory://synthetic", "context_size": context_size,
              "analyze": {"context_before": before, "context_after": after}},
    )


def tiny_sae_dir(path: Path, d_sae: int = 12, d_in: int = 8) -> Path:
    """A saved random TopK SAE (k=2) of the synthetic analysis' shape, seeded."""
    torch.manual_seed(0)
    return save_sae(create_sae(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=2)), path)


def build(tmp_path: Path, analysis: FeatureAnalysis | None = None, name: str = "dict",
          metrics: dict[str, Any] | None = METRICS) -> tuple[Path, FeatureAnalysis]:
    """The dictionary of `analysis` (default: synthetic_analysis()) at tmp_path/name, with one tiny SAE
    under tmp_path/saes/tiny shared by every dictionary built there."""
    analysis = analysis or synthetic_analysis()
    sae_dir = tmp_path / "saes" / "tiny"
    if not sae_dir.exists():
        tiny_sae_dir(sae_dir, analysis.d_sae)
    directory = write_dictionary(tmp_path / name, analysis, sae_dir, FakeTokenizer(),
                                 ModelConfig(device="cpu"), "blocks.0.hook_resid_post", metrics)
    return directory, analysis
