"""The streaming feature analysis against direct dense computations on a small real store."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from saeworks.activations.rows import RowSelection, iter_kept_rows
from saeworks.activations.store import ActivationStore
from saeworks.eval import analysis as analysis_module
from saeworks.eval import logit_effects, native_analysis
from saeworks.eval.analysis import (
    SUB_BINS,
    DistributionPass,
    EncodedBatch,
    Replay,
    SlotTable,
    TopPass,
    WindowBatch,
    analyze_features,
    encode_batch,
    encoded_on_device,
    encoded_reading_ahead,
    fine_bin,
    logit_effects_for,
    read_rows_together,
    sample_keys,
    window_batches,
)
from saeworks.eval.config import AnalyzeConfig
from saeworks.eval.features import FeatureAnalysis
from saeworks.eval.logit_effects import decoder_neighbours, final_norm_of, norm_gain
from saeworks.sae import native
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.config import SAEConfig
from saeworks.sae.io import load_sae
from saeworks.sae.registry import create_sae
from tests.conftest import torch_threads
from tests.eval_helpers import TINY_HOOK
from tests.test_hooks import CASES
from tests.train_helpers import HOOK, make_store


class Dense(NamedTuple):
    """Every row of a store encoded at once, and which rows the analysis reads."""

    acts: torch.Tensor
    """[n_tokens, d_sae]."""
    keep: torch.Tensor
    """[n_tokens] bool."""
    tokens: torch.Tensor
    """[n_tokens] int64."""


def kept_mask(store: ActivationStore, hook: str, max_rows: int | None = None) -> torch.Tensor:
    """[n_tokens] bool: the rows `iter_kept_rows` reads."""
    keep = torch.zeros(store.n_tokens, dtype=torch.bool)
    for batch in iter_kept_rows(store, hook, RowSelection.of_store(store, max_rows), 1024):
        keep[batch.rows] = True
    return keep


def dense_of(sae: SparseAutoencoder, store: ActivationStore, hook: str) -> Dense:
    with torch.no_grad():
        acts = sae.encode(store.read_rows(hook, 0, store.n_tokens).float())
    return Dense(acts, kept_mask(store, hook), torch.from_numpy(store.array("token_ids")[:]).long())


class Tiny(NamedTuple):
    store: ActivationStore
    sae: SparseAutoencoder
    cfg: AnalyzeConfig
    analysis: FeatureAnalysis
    dense: Dense


@pytest.fixture(scope="module", autouse=True)
def one_thread_here() -> Iterator[None]:
    """Small batches run fastest, and steadiest on a busy machine, with one torch thread."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny(tiny_run: Any, embedded_model: Any) -> Tiny:
    store = ActivationStore.open(tiny_run.store_url)
    sae = load_sae(tiny_run.sae_dir)
    cfg = tiny_run.cfg.analyze
    analysis = analyze_features(sae, store, TINY_HOOK, cfg, embedded_model, progress=False)
    return Tiny(store, sae, cfg, analysis, dense_of(sae, store, TINY_HOOK))


def window_acts(sae: SparseAutoencoder, store: ActivationStore, hook: str, row: int) -> torch.Tensor:
    """[context, d_sae]: the row's window encoded by itself."""
    start = row // store.context_size * store.context_size
    with torch.no_grad():
        return sae.encode(store.read_rows(hook, start, start + store.context_size).float())


def check_contexts(contexts: Any, features: list[int], sae: SparseAutoencoder, store: ActivationStore,
                   hook: str, before: int, after: int) -> int:
    """Re-encode each sample's window: value, tokens and per-token activations match. Returns samples."""
    tokens, context, checked = torch.from_numpy(store.array("token_ids")[:]).long(), store.context_size, 0
    for f in features:
        for slot in range(contexts.rows.shape[1]):
            row = int(contexts.rows[f, slot])
            if row < 0:
                assert contexts.values[f, slot] == 0 and not contexts.activations[f, slot].any()
                assert not contexts.token_ids[f, slot].any()  # a missing sample: all-zero context
                continue
            acts = window_acts(sae, store, hook, row)[:, f]  # [context]
            position = row % context
            expected_acts = torch.zeros(before + 1 + after)
            expected_tokens = torch.full((before + 1 + after,), -1, dtype=torch.int32)
            for slot_c, offset in enumerate(range(-before, after + 1)):
                if 0 <= position + offset < context:
                    expected_acts[slot_c] = acts[position + offset]
                    expected_tokens[slot_c] = int(tokens[row + offset])
            torch.testing.assert_close(contexts.values[f, slot], acts[position])
            torch.testing.assert_close(contexts.activations[f, slot], expected_acts)
            assert torch.equal(contexts.token_ids[f, slot], expected_tokens)
            assert contexts.activations[f, slot, before] == contexts.values[f, slot]
            checked += 1
    return checked


def check_against_dense(analysis: FeatureAnalysis, dense: Dense, cfg: AnalyzeConfig) -> None:
    """Moments, exhaustive top-N, histogram, quantiles and bands, for every feature."""
    kept = dense.acts[dense.keep]  # [kept rows, d_sae]
    kept_rows = torch.nonzero(dense.keep).squeeze(1)
    assert analysis.n_tokens == kept.shape[0]
    assert torch.equal(analysis.count, (kept > 0).sum(0))
    torch.testing.assert_close(analysis.sum, kept.double().sum(0), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(analysis.max, kept.max(0).values)

    n = cfg.top_n
    top = analysis.top
    for f in range(analysis.d_sae):
        active = kept[:, f] > 0
        values, order = kept[active, f].sort(descending=True, stable=True)  # ties: earlier row first
        rows = kept_rows[active][order]
        filled = min(n, values.shape[0])
        torch.testing.assert_close(top.values[f, :filled], values[:filled])
        assert torch.equal(top.rows[f, :filled], rows[:filled])
        assert (top.rows[f, filled:] == -1).all() and (top.values[f, filled:] == 0).all()
        # exhaustively: no kept row outside the top-N activates more than its last entry
        outside = torch.ones(kept.shape[0], dtype=torch.bool)
        outside[torch.searchsorted(kept_rows, top.rows[f, :filled])] = False
        if filled == n:
            assert kept[outside, f].max() <= top.values[f, -1]

        # histogram and quantiles
        maximum = analysis.max[f]
        assert analysis.histogram[f].sum() == analysis.count[f]
        if values.shape[0]:
            fine = fine_bin(values, maximum.expand_as(values), SUB_BINS * cfg.histogram_bins)
            expected = torch.bincount(fine // SUB_BINS, minlength=cfg.histogram_bins)
            assert torch.equal(analysis.histogram[f], expected)
            levels = torch.tensor(analysis.quantile_levels, dtype=torch.float64)
            exact = torch.quantile(values.double(), levels)
            resolution = float(maximum) / (SUB_BINS * cfg.histogram_bins)
            assert (analysis.quantiles[f].double() - exact).abs().max() <= resolution * (1 + 1e-5) + 1e-6
        else:
            assert not analysis.quantiles[f].any()

        # bands: in their band, not top-N, distinct, and as many as the band holds (up to the slots)
        edges, spb = analysis.band_edges, cfg.samples_per_band
        for band in range(cfg.bands):
            slots = slice(band * spb, (band + 1) * spb)
            band_rows, band_values = analysis.bands.rows[f, slots], analysis.bands.values[f, slots]
            filled_rows = band_rows[band_rows >= 0]
            assert (band_rows[len(filled_rows):] == -1).all()
            in_band = (kept[:, f] > edges[band + 1] * maximum) & (kept[:, f] <= edges[band] * maximum)
            candidates = active & in_band & outside
            assert len(filled_rows) == min(spb, int(candidates.sum()))
            assert len(set(filled_rows.tolist())) == len(filled_rows)
            at = torch.searchsorted(kept_rows, filled_rows)
            assert torch.equal(kept_rows[at], filled_rows) and candidates[at].all()
            torch.testing.assert_close(band_values[: len(filled_rows)], kept[at, f])


def test_kept_rows_are_those_iter_kept_rows_reads(tiny: Tiny) -> None:
    for max_rows in (None, 1000):
        selection = RowSelection.of_store(tiny.store, max_rows)
        ours = torch.cat([torch.nonzero(b.keep).squeeze(1) + b.start
                          for b in window_batches(tiny.store, TINY_HOOK, selection, 3)])
        theirs = torch.cat([b.rows for b in iter_kept_rows(tiny.store, TINY_HOOK, selection, 256)])
        assert torch.equal(ours, theirs)


def test_batches_hold_the_store_rows_across_shards(tiny: Tiny) -> None:
    """Token ids are read a shard at a time: every batch still holds its own rows' ids and
    activations, for batches that straddle shard boundaries and when resuming mid-shard."""
    store, context = tiny.store, tiny.store.context_size
    assert store.geometry.n_windows > store.geometry.windows_per_shard  # more than one shard
    token_ids = torch.from_numpy(store.array("token_ids")[:]).long()
    windows = store.geometry.windows_per_shard // 2 + 1  # not a divisor of the shard
    selection = RowSelection.of_store(store)
    for first_window in (0, windows + 1):
        row = first_window * context
        for batch in window_batches(store, TINY_HOOK, selection, windows, first_window=first_window):
            assert batch.start == row
            rows = batch.tokens.shape[0]
            assert torch.equal(batch.tokens, token_ids[row: row + rows])
            assert torch.equal(batch.x, store.read_rows(TINY_HOOK, row, row + rows))
            row += rows
        assert row == store.n_tokens


def test_batches_end_with_the_window_of_the_last_kept_row(tiny: Tiny) -> None:
    """The last batch is cut after the window holding the last kept row wanted; encoded while the
    next one is read in a thread, each batch gives the entries it gives alone, and stopping early
    is fine."""
    context = tiny.store.context_size
    for max_rows in (1000, 3 * context):
        selection = RowSelection.of_store(tiny.store, max_rows)
        last_kept = int(torch.nonzero(kept_mask(tiny.store, TINY_HOOK, max_rows))[-1])
        inline = list(window_batches(tiny.store, TINY_HOOK, selection, 3))
        assert inline[-1].start + inline[-1].x.shape[0] == (last_kept // context + 1) * context
        assert all(b.x.shape[0] == b.tokens.shape[0] == b.keep.shape[0] for b in inline)
        assert sum(int(b.keep.sum()) for b in inline) == max_rows
        ahead = list(encoded_reading_ahead(tiny.sae, window_batches(tiny.store, TINY_HOOK, selection, 3),
                                           torch.device("cpu"), context))
        assert len(ahead) == len(inline)
        for batch, theirs in zip(inline, ahead, strict=True):
            mine = encode_batch(tiny.sae, batch, context)
            assert mine.batch.start == theirs.batch.start and torch.equal(mine.batch.keep, theirs.batch.keep)
            assert torch.equal(mine.local, theirs.local) and torch.equal(mine.values, theirs.values)
    selection = RowSelection.of_store(tiny.store)
    first = next(encoded_reading_ahead(tiny.sae, window_batches(tiny.store, TINY_HOOK, selection, 2),
                                       torch.device("cpu"), context))
    assert first.batch.start == 0 and first.batch.x.shape[0] == 2 * context


@pytest.mark.parametrize("together", [1, 2, 3])
def test_batches_read_together_hold_their_own_rows(tiny: Tiny, together: int) -> None:
    """Rows read several batches a call (the last group shorter): each batch holds exactly the
    rows read for it alone, and no batch is lost or repeated."""
    selection = RowSelection.of_store(tiny.store, 1000)
    alone = list(window_batches(tiny.store, TINY_HOOK, selection, 2))
    plans = window_batches(tiny.store, TINY_HOOK, selection, 2, rows=False)
    grouped = list(read_rows_together(tiny.store, TINY_HOOK, plans, together))
    assert len(grouped) == len(alone) and len(alone) % 2 and len(alone) % 3  # a shorter last group
    for mine, theirs in zip(alone, grouped, strict=True):
        assert mine.start == theirs.start and mine.kept_rows == theirs.kept_rows
        assert torch.equal(mine.x, theirs.x) and torch.equal(mine.keep, theirs.keep)


def test_sparse_encoding_equals_dense_encode(tiny: Tiny) -> None:
    selection = RowSelection.of_store(tiny.store)
    batch = next(window_batches(tiny.store, TINY_HOOK, selection, 4))
    relu = create_sae(SAEConfig(architecture="relu", d_sae=64).resolved(tiny.sae.d_in))
    sparse_top_k = copy.deepcopy(tiny.sae)  # some of the k selected are not positive: inactive
    with torch.no_grad():
        sparse_top_k.b_enc -= sparse_top_k.pre_activations(batch.x).topk(2, dim=1).values[:, 1].median()
    rows, k = batch.x.shape[0], sparse_top_k.cfg.k
    for sae in (tiny.sae, sparse_top_k, relu):  # TopK's own path (all active or not), the generic one
        encoded = encode_batch(sae, batch, tiny.store.context_size)
        dense = torch.zeros(batch.x.shape[0], sae.d_sae)
        dense[encoded.local, encoded.features] = encoded.values
        torch.testing.assert_close(dense, sae.encode(batch.x).detach())
        assert (encoded.values > 0).all()
        assert (encoded.local.diff() >= 0).all() and encoded.row_start[-1] == encoded.values.shape[0]
        assert ((encoded.local.diff() > 0) | (encoded.features.diff() > 0)).all()  # by (row, latent)
    assert encode_batch(tiny.sae, batch, tiny.store.context_size).values.shape[0] == rows * k
    assert 0 < encode_batch(sparse_top_k, batch, tiny.store.context_size).values.shape[0] < rows * k


def test_replay_gives_back_the_entries_held(tiny: Tiny) -> None:
    """A TopK batch with every entry active is held without its rows (8 bytes an entry), others
    with them (12); either way the replay hands back the same entries, batch by batch."""
    selection = RowSelection.of_store(tiny.store)
    context = tiny.store.context_size
    sparse_top_k = copy.deepcopy(tiny.sae)  # some of the k selected are not positive: inactive
    batches = list(window_batches(tiny.store, TINY_HOOK, selection, 4))[:3]
    with torch.no_grad():
        sparse_top_k.b_enc -= sparse_top_k.pre_activations(batches[0].x).topk(2, dim=1).values[:, 1].median()
    for sae, entry_bytes in ((tiny.sae, 8), (sparse_top_k, 12)):
        replay = Replay(1 << 30, sae.d_sae, context)
        encoded = [encode_batch(sae, batch, context) for batch in batches]
        for batch in encoded:
            replay.hold(batch)
        sizes = [e.values.numel() * entry_bytes + e.batch.tokens.numel() * 9 for e in encoded]
        assert replay.bytes == sum(sizes)
        replayed = list(replay.replay())
        assert len(replayed) == len(encoded) and not replay.held
        for mine, theirs in zip(encoded, replayed, strict=True):
            assert theirs.batch.start == mine.batch.start and theirs.per_row == mine.per_row
            assert torch.equal(theirs.local, mine.local) and torch.equal(theirs.features, mine.features)
            assert torch.equal(theirs.values, mine.values) and torch.equal(theirs.row_start, mine.row_start)


def test_analysis_equals_dense_computation(tiny: Tiny) -> None:
    check_against_dense(tiny.analysis, tiny.dense, tiny.cfg)


def test_top_and_band_contexts_reproduce_on_reencoding(tiny: Tiny) -> None:
    """The acceptance check: re-encoding the stored contexts gives the stored activations."""
    features = torch.randperm(tiny.sae.d_sae, generator=torch.Generator().manual_seed(0))[:24].tolist()
    args = (tiny.sae, tiny.store, TINY_HOOK, tiny.cfg.context_before, tiny.cfg.context_after)
    assert check_contexts(tiny.analysis.top, features, *args) > 50
    assert check_contexts(tiny.analysis.bands, features, *args) > 50


def test_result_does_not_depend_on_batch_size(tiny: Tiny) -> None:
    """... and on whether pass 2 replays pass 1's activations (here: not at all) or encodes again."""
    other = analyze_features(tiny.sae, tiny.store, TINY_HOOK, replace(tiny.cfg, batch_size=64),
                             progress=False, replay_bytes=0)
    a = tiny.analysis
    assert other.info["rows_per_pass"] == a.info["rows_per_pass"]
    assert a.info["encode_passes"] == 1 and other.info["encode_passes"] == 2
    assert torch.equal(other.count, a.count) and torch.equal(other.histogram, a.histogram)
    for mine, theirs in ((a.top, other.top), (a.bands, other.bands)):
        assert torch.equal(mine.rows, theirs.rows) and torch.equal(mine.token_ids, theirs.token_ids)
        torch.testing.assert_close(mine.values, theirs.values)
        torch.testing.assert_close(mine.activations, theirs.activations)
    torch.testing.assert_close(other.quantiles, a.quantiles)


def test_partial_replay_gives_the_same_result(tiny: Tiny) -> None:
    """A replay budget of about two batches: pass 2 replays those and encodes the rest again."""
    partial = analyze_features(tiny.sae, tiny.store, TINY_HOOK, tiny.cfg, progress=False,
                               replay_bytes=150_000)
    assert 1 < partial.info["encode_passes"] < 2
    a = tiny.analysis
    assert torch.equal(partial.histogram, a.histogram) and torch.equal(partial.quantiles, a.quantiles)
    for mine, theirs in ((a.top, partial.top), (a.bands, partial.bands)):
        assert torch.equal(mine.rows, theirs.rows) and torch.equal(mine.activations, theirs.activations)


def test_max_tokens_limits_the_rows(tiny: Tiny) -> None:
    cfg = replace(tiny.cfg, max_tokens=700)
    analysis = analyze_features(tiny.sae, tiny.store, TINY_HOOK, cfg, progress=False)
    check_against_dense(analysis, tiny.dense._replace(keep=kept_mask(tiny.store, TINY_HOOK, 700)), cfg)
    assert analysis.n_tokens == 700 and analysis.info["rows_per_pass"] < tiny.store.n_tokens


def test_after_batch_is_called_after_each_batch_of_both_passes(tiny: Tiny) -> None:
    """The benchmark's hook: once per batch of each pass (both passes go through the same batches,
    replayed or encoded again), and the analysis is unchanged."""
    windows = max(1, tiny.cfg.batch_size // tiny.store.context_size)
    selection = RowSelection.of_store(tiny.store, tiny.cfg.max_tokens)
    n_batches = sum(1 for _ in window_batches(tiny.store, TINY_HOOK, selection, windows))
    calls: list[int] = []
    for replay_bytes in (1 << 30, 0):
        calls.clear()
        analysis = analyze_features(tiny.sae, tiny.store, TINY_HOOK, tiny.cfg, progress=False,
                                    replay_bytes=replay_bytes, after_batch=lambda: calls.append(1))
        assert len(calls) == 2 * n_batches > 2
        assert torch.equal(analysis.count, tiny.analysis.count)
        assert torch.equal(analysis.top.rows, tiny.analysis.top.rows)


def test_state_is_bounded_by_features_times_slots(tiny: Tiny) -> None:
    """No tensor of n_tokens x d_sae: batches are whole windows, every state tensor is per feature."""
    cfg, context, d_sae = tiny.cfg, tiny.store.context_size, tiny.sae.d_sae
    selection = RowSelection.of_store(tiny.store)
    first = TopPass(d_sae, cfg, torch.device("cpu"))
    for batch in window_batches(tiny.store, TINY_HOOK, selection, 2):
        assert batch.x.shape[0] <= 2 * context
        first.add(encode_batch(tiny.sae, batch, context))
    second = DistributionPass(first, cfg, torch.device("cpu"))
    for batch in window_batches(tiny.store, TINY_HOOK, selection, 2):
        second.add(encode_batch(tiny.sae, batch, context))
    width = cfg.context_before + 1 + cfg.context_after
    slots = max(cfg.top_n * width, cfg.bands * cfg.samples_per_band * width, SUB_BINS * cfg.histogram_bins)
    for name, tensor in {**first.state(), **second.state()}.items():
        assert tensor.numel() <= d_sae * slots, name
        assert tensor.shape[0] in (d_sae, d_sae * cfg.bands), name
    assert torch.equal(first.top.contexts().rows, tiny.analysis.top.rows)


def test_generic_encode_path_on_a_synthetic_store(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", n_windows=48)
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture="relu", d_sae=48).resolved(store.d(HOOK)))
    with torch.no_grad():  # each latent active on ~10% of rows
        sae.b_enc.copy_(-sae.pre_activations(store.read_rows(HOOK, 0, 512)).quantile(0.9, dim=0))
    cfg = AnalyzeConfig(batch_size=100, top_n=4, bands=3, samples_per_band=3, context_before=3,
                        context_after=2, histogram_bins=8, neighbours=5)
    analysis = analyze_features(sae, store, HOOK, cfg, progress=False)
    dense = dense_of(sae, store, HOOK)
    assert 0 < (dense.acts > 0).float().mean() < 0.5
    check_against_dense(analysis, dense, cfg)
    assert check_contexts(analysis.top, list(range(0, 48, 5)), sae, store, HOOK, 3, 2) > 20
    assert analysis.logit_positive_ids.shape == (48, 0) and analysis.logit_negative_values.shape == (48, 0)


def test_logit_effects_equal_a_dense_computation(tiny: Tiny, embedded_model: Any) -> None:
    W_dec = tiny.sae.W_dec.detach()
    features = [0, 17, 101, 255]
    gain = embedded_model.get_submodule("model.norm").weight.detach()
    effects = (W_dec[features] * gain) @ embedded_model.get_output_embeddings().weight.detach().T
    k = tiny.cfg.logit_tokens
    a = tiny.analysis
    top, bottom = effects.topk(k, dim=1), effects.topk(k, dim=1, largest=False)
    torch.testing.assert_close(a.logit_positive_values[features], top.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.logit_negative_values[features], bottom.values, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.logit_positive_ids[features], top.indices)
    assert torch.equal(a.logit_negative_ids[features], bottom.indices)
    assert a.info["logit_effects"].startswith("computed")
    empty, why = logit_effects_for(W_dec, "blocks.3.mlp.hook_post", embedded_model, k)
    assert empty.positive_ids.shape == (W_dec.shape[0], 0) and "residual stream" in why


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_norm_gain_of_every_family(case: Any) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(case.make_config(), dtype=torch.float32)
    norm = model.get_submodule(case.final_norm)
    assert final_norm_of(model) is norm
    with torch.no_grad():
        for param in norm.parameters():
            param.add_(0.3 * torch.randn_like(param))  # a bias must cancel, a scale must show
    weight = norm.get_parameter("weight").detach()
    expected = 1 + weight if case.family.startswith("gemma") else weight
    torch.testing.assert_close(norm_gain(norm, weight.shape[0]), expected, rtol=1e-4, atol=1e-5)


def test_neighbours_equal_a_dense_computation(tiny: Tiny) -> None:
    unit = torch.nn.functional.normalize(tiny.sae.W_dec.detach(), dim=1)
    cosines = unit @ unit.T
    cosines.fill_diagonal_(-2)
    best = cosines.topk(tiny.cfg.neighbours, dim=1)
    torch.testing.assert_close(tiny.analysis.neighbour_cosines, best.values)
    assert torch.equal(tiny.analysis.neighbour_ids, best.indices)
    padded = decoder_neighbours(tiny.sae.W_dec.detach()[:4], 5)  # only 3 others
    assert (padded.ids[:, 3:] == -1).all() and (padded.ids[:, :3] >= 0).all()


@pytest.mark.parametrize(("block", "d_sae"), [(64, 200), (512, 1100)])  # torch's top-k; the native one
def test_blocked_neighbours_equal_a_dense_computation(monkeypatch: pytest.MonkeyPatch, block: int,
                                                      d_sae: int) -> None:
    """Above one block the similarities come in blocks on and above the diagonal, each serving the
    rows of both its features (a last, partial block too): the same neighbours as the full matrix."""
    monkeypatch.setattr(logit_effects, "NEIGHBOUR_BLOCK", block)
    W_dec = torch.randn(d_sae, 16, generator=torch.Generator().manual_seed(0))
    unit = torch.nn.functional.normalize(W_dec, dim=1)
    cosines = unit @ unit.T
    cosines.fill_diagonal_(-2)
    best = cosines.topk(7, dim=1)
    neighbours = decoder_neighbours(W_dec, 7)
    assert torch.equal(neighbours.ids, best.indices)
    torch.testing.assert_close(neighbours.cosines, best.values)


def test_sample_keys_are_deterministic_and_spread() -> None:
    rows = torch.arange(100_000, dtype=torch.int64)
    keys = sample_keys(rows, torch.full_like(rows, 7))
    assert torch.equal(keys, sample_keys(rows, torch.full_like(rows, 7)))
    assert keys.min() >= 0 and keys.max() < 2**32 and keys.unique().numel() == rows.numel()
    assert abs(keys.double().mean() / 2**32 - 0.5) < 0.01
    assert not torch.equal(keys, sample_keys(rows, torch.full_like(rows, 8)))


def test_info_names_where_it_came_from(tiny: Tiny) -> None:
    info = tiny.analysis.info
    assert info["store"] == tiny.store.url and info["hook"] == TINY_HOOK
    assert info["n_tokens"] == tiny.analysis.n_tokens and info["tokens_per_s"] > 0
    assert info["pass1_seconds"] > 0 and info["pass2_seconds"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_gives_the_cpu_result(tiny: Tiny) -> None:
    on_gpu = analyze_features(copy.deepcopy(tiny.sae), tiny.store, TINY_HOOK, tiny.cfg, device="cuda",
                              progress=False)
    a = tiny.analysis
    assert torch.equal(on_gpu.count, a.count)
    for mine, theirs in ((a.top, on_gpu.top), (a.bands, on_gpu.bands)):
        assert (mine.rows == theirs.rows).float().mean() > 0.99  # float differences may swap near-ties
        torch.testing.assert_close(mine.values.sort(1).values, theirs.values.sort(1).values,
                                   rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(on_gpu.neighbour_cosines, a.neighbour_cosines, rtol=1e-4, atol=1e-5)


def test_slot_table_ties_go_to_the_earlier_row() -> None:
    """Equal keys keep the earlier row whatever slot each entry sits in; only entering entries
    ask for their context; the output is sorted by key."""
    table = SlotTable(groups=1, slots=2, width=1, device=torch.device("cpu"))
    asked: list[list[int]] = []

    def offer(rows: list[int], keys: list[int]) -> None:
        row_t = torch.tensor(rows)

        def context_of(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            asked.append(row_t[i].tolist())
            return row_t[i, None].int(), row_t[i, None].float()

        table.offer(torch.zeros(len(rows), dtype=torch.int64), torch.tensor(keys),
                    torch.tensor(keys).float(), row_t, context_of)

    offer([10], [5])
    offer([11], [9])
    offer([20], [5])  # row 11 leaves; row 20 may sit in a slot before row 10's
    assert table.worst(torch.tensor([0])).tolist() == [5]
    offer([30], [3])  # one of the two key-5 entries leaves: row 20, the later one
    assert asked == [[10], [11], [20], [30]]
    out = table.contexts()
    assert out.rows.tolist() == [[30, 10]] and out.token_ids.tolist() == [[[30], [10]]]


def test_lookup_native_and_torch_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """EncodedBatch.lookup: the native per-row search and the torch search over all entries give
    every activation, zeros where a row does not hold the latent, for every row and latent asked."""
    torch.manual_seed(0)
    rows, d_sae, k = 64, 300, 6
    latents = torch.stack([torch.randperm(d_sae)[:k].sort().values for _ in range(rows)])  # [rows, k]
    values = torch.rand(rows, k) + 0.1
    values[5] = 0  # a row with no active latent
    active = values > 0
    local = torch.arange(rows)[:, None].expand_as(latents)[active]
    batch = WindowBatch(0, torch.zeros(rows, 4), torch.arange(rows), torch.ones(rows, dtype=torch.bool), rows)
    encoded = EncodedBatch(batch, local, latents[active], values[active], d_sae, context_size=16)
    query_rows = torch.arange(rows)[:, None].expand(rows, d_sae)
    query_latents = torch.arange(d_sae).expand(rows, d_sae)
    dense = torch.zeros(rows, d_sae).scatter_(1, latents, values)
    assert torch.equal(encoded.lookup(query_rows, query_latents), dense)
    monkeypatch.setenv("SAEWORKS_NATIVE", "0")
    assert torch.equal(EncodedBatch(batch, local, latents[active], values[active], d_sae, 16)
                       .lookup(query_rows, query_latents), dense)


CONTEXT_FIELDS = ("values", "rows", "token_ids", "activations")


def test_native_bookkeeping_gives_the_torch_result(tiny: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval/kernels/analysis_tables.c (pass 1's counters, pass 2's histogram and band candidates,
    the slot-table merges) against the torch ops: the whole analysis is equal, bit for bit."""
    kernels = native_analysis.KERNELS_DIR
    assert native.library("analysis_tables", kernels, native_analysis.SIGNATURES) is not None
    monkeypatch.setenv("SAEWORKS_NATIVE", "0")
    torch_only = analyze_features(tiny.sae, tiny.store, TINY_HOOK, tiny.cfg, progress=False)
    for name in ("count", "sum", "max", "quantiles", "histogram"):
        assert torch.equal(getattr(torch_only, name), getattr(tiny.analysis, name)), name
    for mine, theirs in ((tiny.analysis.top, torch_only.top), (tiny.analysis.bands, torch_only.bands)):
        for field in CONTEXT_FIELDS:
            assert torch.equal(getattr(mine, field), getattr(theirs, field)), field


def test_native_slot_merge_keeps_what_the_torch_merge_keeps() -> None:
    """Random offers with many equal keys and rows in any order (each row offered once, as the
    analysis does): after every offer the native merge and the torch merge hold the same entries
    with the same contexts and the same worst keys, and on a CPU both ask only for the contexts of
    the candidates that got in."""
    generator = torch.Generator().manual_seed(0)
    unused_rows = torch.randperm(40 * 30, generator=generator)
    tables = {name: SlotTable(groups=7, slots=3, width=2, device=torch.device("cpu"))
              for name in ("c", "torch")}
    tables["torch"]._native = False
    for _ in range(40):
        n = int(torch.randint(0, 30, (), generator=generator))
        groups = torch.randint(0, 7, (n,), generator=generator)
        keys = torch.randint(0, 6, (n,), generator=generator)
        rows, unused_rows = unused_rows[:n], unused_rows[n:]
        values = torch.rand(n, generator=generator)
        asked: dict[str, list[int]] = {}
        for name, table in tables.items():
            table.offer(groups, keys, values, rows, recording_contexts(asked, name, rows, keys, values))
        held = set(tables["c"].rows.flatten().tolist())
        for name in tables:
            assert asked.get(name, []) == [i for i, row in enumerate(rows.tolist()) if row in held], name
        mine, theirs = tables["c"].contexts(), tables["torch"].contexts()
        for field in CONTEXT_FIELDS:
            assert torch.equal(getattr(mine, field), getattr(theirs, field)), field
        assert torch.equal(tables["c"].worst_keys, tables["torch"].worst_keys)
    assert tables["c"]._owner is not None and (tables["c"]._owner == -1).all()


def recording_contexts(asked: dict[str, list[int]], name: str, rows: torch.Tensor, keys: torch.Tensor,
                       values: torch.Tensor) -> Any:
    """A context function that records which candidates it was asked for under `name`."""
    def context_of(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        asked[name] = sorted(i.tolist())
        return torch.stack([rows[i], keys[i]], 1).int(), values[i, None].expand(-1, 2)
    return context_of


def test_native_bookkeeping_refuses_an_index_out_of_range() -> None:
    """A latent or row outside the tables is an IndexError, and nothing was counted."""
    count, sum_, max_ = torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.float64), torch.zeros(4)
    worst = torch.full((4,), 1 << 32)
    entries = native_analysis.Entries(torch.tensor([0, 1]), torch.tensor([2, 4]), torch.tensor([1.0, 2.0]),
                                      torch.ones(2, dtype=torch.bool))
    with pytest.raises(IndexError, match="out of range"):
        native_analysis.top_stats(entries, count, sum_, max_, worst)
    assert not count.any() and not sum_.any() and not max_.any()
    table_keys, table_rows = torch.full((2, 2), 1 << 32), torch.full((2, 2), -1)
    with pytest.raises(IndexError, match="out of range"):
        native_analysis.slot_offer(torch.tensor([0, 2]), torch.tensor([1, 1]), torch.tensor([0, 1]),
                                   table_keys, table_rows, torch.full((2,), 1 << 32), torch.full((2, 2), -1))
    assert (table_rows == -1).all()


def inactive_top_k(tiny: Tiny) -> SparseAutoencoder:
    """The tiny TopK SAE with b_enc lowered so that some of each row's k selected are not positive."""
    sae = copy.deepcopy(tiny.sae)
    x = tiny.store.read_rows(TINY_HOOK, 0, 256).float()
    with torch.no_grad():
        sae.b_enc -= sae.pre_activations(x).topk(2, dim=1).values[:, 1].median()
    return sae


def assert_same_analysis(mine: FeatureAnalysis, theirs: FeatureAnalysis) -> None:
    for name in ("count", "sum", "max", "quantiles", "histogram"):
        assert torch.equal(getattr(mine, name), getattr(theirs, name)), name
    for ours, other in ((mine.top, theirs.top), (mine.bands, theirs.bands)):
        for field in CONTEXT_FIELDS:
            assert torch.equal(getattr(ours, field), getattr(other, field)), field


def test_fixed_shape_bookkeeping_gives_the_native_result(tiny: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """The formulation a GPU runs (`waits_for_nothing`: every entry masked instead of compacted, a
    TopK row's inactive entries kept as zeros, the slot merges and context fills in fixed shapes),
    run on the CPU: the whole analysis equals the native one bit for bit, for a TopK SAE with every
    entry active, one with inactive entries and a ReLU SAE, replayed or encoded twice."""
    torch.manual_seed(0)
    saes = {"all active": tiny.sae, "inactive": inactive_top_k(tiny),
            "relu": create_sae(SAEConfig(architecture="relu", d_sae=64).resolved(tiny.sae.d_in))}
    expected = {name: analyze_features(sae, tiny.store, TINY_HOOK, tiny.cfg, progress=False)
                for name, sae in saes.items()}
    assert (expected["inactive"].count < expected["all active"].count).any()
    monkeypatch.setenv("SAEWORKS_NATIVE", "0")
    monkeypatch.setattr(analysis_module, "waits_for_nothing", lambda device: True)
    for sae_name, sae in saes.items():
        for replay_bytes in (1 << 30, 0):
            fixed = analyze_features(sae, tiny.store, TINY_HOOK, tiny.cfg, progress=False,
                                     replay_bytes=replay_bytes)
            assert_same_analysis(fixed, expected[sae_name])


SYNCHRONISING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                     "unique_consecutive", "unique_dim", "bincount", "repeat_interleave", "equal",
                     "is_nonzero", "item"}
"""aten ops whose result size or value the host must read from the device (on a GPU, each waits)."""


class SynchronisationCounter(TorchDispatchMode):
    """Records every aten op that would make the host wait for a device: those above, and
    indexing or assigning with a boolean mask (a hidden nonzero)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        indexing = (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_)
        masks = func.overloadpacket in indexing and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if name in SYNCHRONISING_OPS or masks:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_fixed_shape_bookkeeping_never_waits_for_the_device(tiny: Tiny, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """What runs per batch on a GPU (the encode, both passes' bookkeeping, the replay) holds no op
    that reads a size or a value back to the host, after pass 2's first batch (which indexes the
    final top-N rows once); the same passes on the CPU's native path do (so the counter sees them)."""
    context, cfg, selection = tiny.store.context_size, tiny.cfg, RowSelection.of_store(tiny.store)
    sae = inactive_top_k(tiny)
    batches = list(window_batches(tiny.store, TINY_HOOK, selection, 3))

    def run_passes() -> SynchronisationCounter:
        counter = SynchronisationCounter()
        first, replay = TopPass(sae.d_sae, cfg, torch.device("cpu")), Replay(1 << 30, sae.d_sae, context)
        for batch in batches:
            with counter:
                encoded = encode_batch(sae, batch, context)
                first.add(encoded)
            replay.hold(encoded)
        second = DistributionPass(first, cfg, torch.device("cpu"))
        replayed = replay.replay()
        encoded = next(replayed)
        first.add_contexts(encoded)  # indexes the top-N rows: reads back once
        second.add(encoded)
        with counter:
            for encoded in replayed:
                first.add_contexts(encoded)
                second.add(encoded)
        return counter

    with monkeypatch.context() as patched:
        patched.setenv("SAEWORKS_NATIVE", "0")
        patched.setattr(analysis_module, "waits_for_nothing", lambda device: True)
        assert run_passes().found == []
    assert "nonzero" in run_passes().found  # the CPU path compacts its entries


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_a_gpu_batch_never_synchronises(tiny: Tiny) -> None:
    """On a GPU itself, with CUDA's synchronisation check set to raise: a batch's encode and both
    passes' bookkeeping, replayed, never wait for the device (after pass 2's first batch, which
    indexes the final top-N rows once)."""
    context, cfg, selection = tiny.store.context_size, tiny.cfg, RowSelection.of_store(tiny.store)
    device = torch.device("cuda")
    sae = copy.deepcopy(inactive_top_k(tiny)).to(device)
    batches = [batch.pinned().to(device, non_blocking=True)
               for batch in window_batches(tiny.store, TINY_HOOK, selection, 3)]
    first, replay = TopPass(sae.d_sae, cfg, device), Replay(1 << 30, sae.d_sae, context)
    torch.cuda.synchronize()
    with raising_on_synchronisation():
        for batch in batches:
            encoded = encode_batch(sae, batch, context)
            first.add(encoded)
            replay.hold(encoded)
    second = DistributionPass(first, cfg, device)  # once, between the passes: it may copy
    replayed = replay.replay()
    encoded = next(replayed)
    first.add_contexts(encoded)  # indexes the top-N rows: reads back once
    second.add(encoded)
    with raising_on_synchronisation():
        for encoded in replayed:
            first.add_contexts(encoded)
            second.add(encoded)
    assert int(first.count.sum()) > 0 and int(second.fine.sum()) == int(first.count.sum())


@contextmanager
def raising_on_synchronisation() -> Iterator[None]:
    """CUDA's check that raises where the host would wait for the device."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_device_reading_gives_the_batches_read_in_line(tiny: Tiny) -> None:
    """`encoded_on_device` (several threads reading ahead, as on a GPU), run on the CPU: the same
    batches in the same order as `encoded_reading_ahead`, and stopping early is fine."""
    context, selection = tiny.store.context_size, RowSelection.of_store(tiny.store, 1000)
    inline = list(encoded_reading_ahead(tiny.sae, window_batches(tiny.store, TINY_HOOK, selection, 3),
                                        torch.device("cpu"), context))
    plans = window_batches(tiny.store, TINY_HOOK, selection, 3, rows=False)
    ahead = list(encoded_on_device(tiny.sae, tiny.store, TINY_HOOK, plans, torch.device("cpu"), context, 3))
    assert len(ahead) == len(inline) > 3
    for mine, theirs in zip(inline, ahead, strict=True):
        assert mine.batch.start == theirs.batch.start and mine.batch.kept_rows == theirs.batch.kept_rows
        assert torch.equal(mine.batch.x, theirs.batch.x) and torch.equal(mine.features, theirs.features)
        assert torch.equal(mine.values, theirs.values)
    plans = window_batches(tiny.store, TINY_HOOK, selection, 3, rows=False)
    first = next(encoded_on_device(tiny.sae, tiny.store, TINY_HOOK, plans, torch.device("cpu"), context, 2))
    assert first.batch.start == 0 and first.batch.x.shape[0] == 3 * context
