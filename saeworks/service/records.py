"""A dictionary's features as JSON records with Neuronpedia's field names.

One mapping, used by the HTTP API (`saeworks serve`) and the Neuronpedia export, so a script
written against one reads the other. Where Neuronpedia has the same quantity its name is used:

    feature record                          from the dictionary
    modelId                                 model_id(info): the model's hub name, lowercased
    layer                                   source_id(info): "<layer>-<res|att|mlp|...>-<sae name>"
    index                                   the feature id (a string in Neuronpedia's dump)
    hookName                                the hook (TransformerLens name)
    maxActApprox                            max_activation over the analysed tokens
    frac_nonzero                            density: fraction of analysed tokens where it is active
    pos_str / pos_values                    logit_positive: tokens its decoder direction promotes
    neg_str / neg_values                    logit_negative: tokens it suppresses
    freq_hist_data_bar_values / _heights    histogram: bin centres (activation) / counts
    topkCosSimIndices / topkCosSimValues    neighbours: decoder-cosine nearest features
    explanations[{description, ...}]        the label (auto or user)
    activations[...]                        the top and band contexts (activation_record)

    activation record                       from a context
    tokens, values                          the shown tokens and the feature's activation on each
    maxValue, maxValueTokenIndex, minValue  over `values`
    qualifyingTokenIndex                    the token the context was sampled for (its focus)
    binMin / binMax                         a band sample's activation band (absent for top ones)
    dataIndex                               the store row of the qualifying token

Fields Neuronpedia has and a dictionary does not are left out rather than filled with zeros:
logits_hist_data_bar_* (the histogram of logit effects over the vocabulary), decoder_weights_dist,
neuron_alignment_*, correlated_neurons_* / correlated_features_*, dfaValues, lossValues. The
decoder row (Neuronpedia's `vector`) is in the dictionary's sae/ directory; records leave it out.
Fields only saeworks has keep their own names (count, mean_activation, quantiles, top_tokens,
label_source, and kind/rank/band/row/window/position on activations).
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Any

from saeworks.eval.dictionary import Context, Feature, FeatureDictionary, FeatureSummary

HOOK_KINDS = (("resid", "res"), ("attn", "att"), ("mlp", "mlp"))
"""(substring of the hook name, Neuronpedia's short name for that kind of source)."""


def model_id(info: dict[str, Any]) -> str:
    """Neuronpedia-style model id: the last part of the hub name, lowercased
    (HuggingFaceTB/SmolLM2-135M-Instruct -> smollm2-135m-instruct; the embedded model likewise)."""
    return _model_id(str(info.get("model", {}).get("name") or "model"))


@functools.lru_cache(maxsize=256)
def _model_id(name: str) -> str:
    from saeworks.activations.model import EMBEDDED_ORIGIN

    if name == "embedded":
        name = EMBEDDED_ORIGIN
    return re.sub(r"[^a-z0-9.\-]+", "-", name.rstrip("/").split("/")[-1].lower()).strip("-") or "model"


def hook_layer(hook: str) -> int | None:
    """The block index of a TransformerLens hook name (blocks.15.hook_resid_post -> 15)."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", hook)
    return int(found.group(1)) if found else None


def source_id(info: dict[str, Any]) -> str:
    """Neuronpedia's source ("layer") id: `<layer>-<kind>-<sae name>`, e.g. 15-res-topk-k32-9216."""
    return _source_id(str(info.get("hook", "")), str(info.get("sae_name") or "sae"))


@functools.lru_cache(maxsize=256)
def _source_id(hook: str, sae_name: str) -> str:
    kind = next((short for part, short in HOOK_KINDS if part in hook), "hook")
    layer = hook_layer(hook)
    name = re.sub(r"[^A-Za-z0-9.\-]+", "-", sae_name).strip("-")
    return f"{layer if layer is not None else 0}-{kind}-{name}"


def histogram_bars(feature: Feature) -> tuple[list[float], list[int]]:
    """(bar values, bar heights): each histogram bin's centre activation and its count."""
    edges = feature.histogram_edges
    return [(a + b) / 2 for a, b in itertools.pairwise(edges)], list(feature.histogram)


def activation_record(info: dict[str, Any], feature: Feature, context: Context) -> dict[str, Any]:
    """One context as a Neuronpedia activation (plus saeworks' kind, rank, band, row, window,
    position)."""
    values = [float(v) for v in context.activations]
    peak = max(range(len(values)), key=values.__getitem__) if values else 0
    record: dict[str, Any] = {
        "id": f"{model_id(info)}@{source_id(info)}-{feature.id}-{context.kind}-{context.rank}",
        "modelId": model_id(info), "layer": source_id(info), "index": str(feature.id),
        "tokens": list(context.tokens), "values": values,
        "maxValue": values[peak] if values else 0.0, "maxValueTokenIndex": peak,
        "minValue": min(values) if values else 0.0,
        "qualifyingTokenIndex": context.focus, "dataIndex": str(context.row),
        "kind": context.kind, "rank": context.rank, "band": context.band, "activation": context.activation,
        "row": context.row, "window": context.window, "position": context.position,
    }
    edges = info.get("band_edges")
    if context.band is not None and edges and context.band + 1 < len(edges):
        record["binMax"] = float(edges[context.band]) * feature.max_activation
        record["binMin"] = float(edges[context.band + 1]) * feature.max_activation
    return record


def feature_record(dictionary: FeatureDictionary, feature: Feature) -> dict[str, Any]:
    """Everything the dictionary knows about `feature`, with Neuronpedia's field names."""
    info = dictionary.info
    bar_values, bar_heights = histogram_bars(feature)
    return {
        "modelId": model_id(info), "layer": source_id(info), "index": str(feature.id),
        "hookName": info.get("hook"),
        "maxActApprox": feature.max_activation, "frac_nonzero": feature.density,
        "pos_str": [t for t, _ in feature.logit_positive],
        "pos_values": [v for _, v in feature.logit_positive],
        "neg_str": [t for t, _ in feature.logit_negative],
        "neg_values": [v for _, v in feature.logit_negative],
        "freq_hist_data_bar_values": bar_values, "freq_hist_data_bar_heights": bar_heights,
        "topkCosSimIndices": [j for j, _ in feature.neighbours],
        "topkCosSimValues": [c for _, c in feature.neighbours],
        "explanations": [{"description": feature.label, "typeName": feature.label_source}],
        "activations": [activation_record(info, feature, c) for c in feature.contexts],
        # saeworks' own fields
        "id": feature.id, "label": feature.label, "label_source": feature.label_source,
        "density": feature.density, "count": feature.count, "dead": feature.dead,
        "mean_activation": feature.mean_activation, "max_activation": feature.max_activation,
        "quantiles": [[q, v] for q, v in feature.quantiles],
        "top_tokens": [[t, c] for t, c in feature.top_tokens],
        "neighbour_labels": dictionary.labels([j for j, _ in feature.neighbours]),
    }


def summary_record(summary: FeatureSummary) -> dict[str, Any]:
    """A feature in a list of results (search, token lookup)."""
    return {"index": summary.id, "label": summary.label, "label_source": summary.label_source,
            "frac_nonzero": summary.density, "maxActApprox": summary.max_activation,
            "top_tokens": [[t, c] for t, c in summary.top_tokens]}


def dictionary_record(name: str, dictionary: FeatureDictionary) -> dict[str, Any]:
    """What `GET /api/dictionaries` says about one served dictionary."""
    info = dictionary.info
    metrics = dictionary.metrics
    size = sum(p.stat().st_size for p in dictionary.path.rglob("*") if p.is_file())
    return {
        "name": name, "modelId": model_id(info), "layer": source_id(info), "hookName": info.get("hook"),
        "model": info.get("model"), "sae_name": info.get("sae_name"),
        "architecture": info.get("architecture"),
        "d_sae": len(dictionary), "d_in": info.get("d_in"), "n_tokens": info.get("n_tokens"),
        "counts": dictionary.counts(), "metrics": (metrics or {}).get("metrics"),
        "size_bytes": size, "created": info.get("created"),
    }
