"""Export a feature dictionary as a Neuronpedia dump: `saeworks export neuronpedia DICT OUT_DIR`.

OUT_DIR holds one Neuronpedia source in the layout its dumps and importer use (the importer reads
`<modelId>/<sourceId>/` under its dataset root, so copy OUT_DIR there under that name):

    release.jsonl, model.jsonl, sourceset.jsonl, source.jsonl   one record each, plain JSON lines
    features/batch-N.jsonl.gz       the features N*1024 .. N*1024+1023, one per line, by index
    activations/batch-N.jsonl.gz    the top and band contexts of the same features
    explanations/batch-N.jsonl.gz   their labels (skipped: the auto label of a dead feature)

Feature and activation records are `saeworks.service.records` (the HTTP API's records, the same
field names); a feature's activations go to activations/, not inside it. Neuronpedia's importer
keeps, from those three, the keys that are columns of its tables and ignores the others, so the
saeworks extras (density, count, quantiles, label, ...) travel along harmlessly. The four metadata
records are created field by field, so they hold exactly the fields of Neuronpedia's tables. A
batch with nothing to say (only dead features, no labels) has no activations/explanations file:
the importer cannot read an empty one.

The dump is built in a hidden scratch directory beside OUT_DIR and renamed into place when whole
(`saeworks.sae.atomic`), so a killed or failed export leaves no OUT_DIR that looks complete; it
streams feature by feature, so memory does not grow with the dictionary.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tqdm import tqdm

from saeworks.eval.labels import DEAD_LABEL
from saeworks.sae.atomic import atomic_directory
from saeworks.sae.errors import SaeworksError

if TYPE_CHECKING:  # the dictionary imports torch: not when the CLI only builds its parser
    from saeworks.eval.dictionary import Feature, FeatureDictionary

FEATURES_PER_BATCH = 1024
"""Features per batch file, as in Neuronpedia's own dumps."""
NEURONPEDIA_BOT_USER = "clkht01d40000jv08hvalcvly"
"""The user Neuronpedia's seeded database creates as the default creator of imported data: the
default creatorId/authorId, so a dump imports into a fresh Neuronpedia as it is."""
RELEASE_FILE, MODEL_FILE, SOURCE_SET_FILE, SOURCE_FILE = ("release.jsonl", "model.jsonl",
                                                         "sourceset.jsonl", "source.jsonl")
FEATURES_DIR, ACTIVATIONS_DIR, EXPLANATIONS_DIR = "features", "activations", "explanations"
LABEL_CHOICES = ("all", "user", "none")
VISIBILITIES = ("PUBLIC", "UNLISTED", "PRIVATE")
COMPRESS_LEVEL = 5


class ExportError(SaeworksError, ValueError):
    """An export that cannot be written as asked (output path, options)."""


@dataclass(frozen=True)
class NeuronpediaExport:
    """What an export wrote."""

    directory: Path
    model_id: str
    source_id: str
    source_set: str
    release: str
    features: int
    activations: int
    explanations: int
    batches: int

    def lines(self) -> list[str]:
        """What `saeworks export` prints."""
        return [f"wrote {self.features} features ({self.batches} batches), {self.activations} activations "
                f"and {self.explanations} explanations to {self.directory}",
                f"Neuronpedia model {self.model_id!r}, source {self.source_id!r} (set {self.source_set!r}), "
                f"release {self.release!r}; import it from <datasets>/{self.model_id}/{self.source_id}/"]


def batch_name(batch: int) -> str:
    """The file name of batch `batch` (batch-0.jsonl.gz holds features 0..1023)."""
    return f"batch-{batch}.jsonl.gz"


def export_neuronpedia(dictionary_dir: str | Path, out_dir: str | Path, *, creator: str = "saeworks",
                       creator_id: str = NEURONPEDIA_BOT_USER, release_id: str | None = None,
                       release_title: str | None = None, url: str | None = None,
                       hf_repo_id: str | None = None, features_per_batch: int = FEATURES_PER_BATCH,
                       labels: str = "all", visibility: str = "PUBLIC", force: bool = False,
                       progress: bool = True) -> NeuronpediaExport:
    """Write the dictionary at `dictionary_dir` as a Neuronpedia dump in `out_dir` (module docstring).

    `creator`: the creator's name shown on the release; `creator_id`: the Neuronpedia user id that
    owns every record (default: the seeded bot user). `release_id`/`release_title`/`url`: the
    release (default: `<model>-<source set>` and a title naming the SAE). `labels`: which labels
    become explanations (all, user, none). An existing non-empty `out_dir` is replaced only with
    `force`."""
    from saeworks.eval.dictionary import FeatureDictionary

    out = Path(out_dir)
    _check_options(features_per_batch, labels, visibility, release_id)
    with FeatureDictionary.open(dictionary_dir, readonly=True) as dictionary:
        n = len(dictionary)
        _check_out_dir(out, dictionary.path, force)
        meta = _Metadata(dictionary.info, creator, creator_id, release_id, release_title, url, hf_repo_id,
                         visibility)
        with atomic_directory(out) as scratch:
            for name, record in meta.records().items():
                (scratch / name).write_text(_dumps(record, name) + "\n")
            counts = _write_batches(dictionary, scratch, meta, features_per_batch, labels, progress)
    return NeuronpediaExport(out, meta.model, meta.source, meta.source_set, meta.release, n,
                             counts["activations"], counts["explanations"], math.ceil(n / features_per_batch))


def _check_options(features_per_batch: int, labels: str, visibility: str, release_id: str | None) -> None:
    if features_per_batch < 1:
        raise ExportError(f"features per batch must be at least 1, got {features_per_batch}")
    if labels not in LABEL_CHOICES:
        raise ExportError(f"labels must be one of {', '.join(LABEL_CHOICES)}, got {labels!r}")
    if visibility not in VISIBILITIES:
        raise ExportError(f"visibility must be one of {', '.join(VISIBILITIES)}, got {visibility!r}")
    if release_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9\-]*", release_id):
        raise ExportError(f"release id {release_id!r} must be letters, digits and dashes (it is part of a "
                          "Neuronpedia URL)")


def _check_out_dir(out: Path, dictionary: Path, force: bool) -> None:
    """Refuse an output path that is a file, that holds the dictionary, or that is a non-empty
    directory (unless `force`): each in one line, before anything is written."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{str(out)!r} is a file; give a directory path for the export")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ExportError(f"{str(out)!r} cannot be made: {str(blocking)!r} is a file, not a directory")
    resolved, source = out.resolve(), dictionary.resolve()
    if resolved == source or resolved in source.parents:
        raise ExportError(f"{str(out)!r} holds the dictionary being exported; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{str(out)!r} exists and is not empty; choose a new directory or pass --force "
                          "to replace it")


class _Metadata:
    """The release, model, source set and source records, and the ids every record shares."""

    def __init__(self, info: dict[str, Any], creator: str, creator_id: str, release_id: str | None,
                 release_title: str | None, url: str | None, hf_repo_id: str | None,
                 visibility: str) -> None:
        from saeworks.service.records import model_id, source_id

        self.info, self.creator, self.creator_id, self.visibility = info, creator, creator_id, visibility
        self.model, self.source = model_id(info), source_id(info)
        self.source_set = self.source.split("-", 1)[1]  # Neuronpedia's source id: <layer>-<source set>
        self.release = release_id or re.sub(r"[^A-Za-z0-9\-]+", "-", f"{self.model}-{self.source_set}")
        self.title = release_title or (f"saeworks {info.get('sae_name')} on {_hub_name(info)} "
                                       f"({info.get('hook')})")
        self.urls = [url] if url else []
        self.hf_repo_id = hf_repo_id
        self.created = str(info.get("created") or "")
        """Every record's createdAt: the dictionary's build time, so an export is repeatable."""

    def records(self) -> dict[str, dict[str, Any]]:
        """File name -> record, in the order the importer creates them."""
        return {RELEASE_FILE: self._release(), MODEL_FILE: self._model(), SOURCE_SET_FILE: self._source_set(),
                SOURCE_FILE: self._source()}

    def _release(self) -> dict[str, Any]:
        return {"name": self.release, "description": self.title, "descriptionShort": self.title,
                "creatorName": self.creator, "creatorNameShort": self.creator, "creatorEmail": None,
                "creatorId": self.creator_id, "visibility": self.visibility, "isNewUi": False,
                "featured": False, "urls": self.urls, "defaultSourceSetName": self.source_set,
                "defaultSourceId": self.source, "defaultUmapSourceIds": [], "createdAt": self.created}

    def _model(self) -> dict[str, Any]:
        """The model; its default source (set) stays unset: they are created after it, and the
        importer would refuse the reference."""
        hub = _hub_name(self.info)
        shape = _model_shape(self.info)
        return {"id": self.model, "displayName": hub, "displayNameShort": self.model,
                "creatorId": self.creator_id, "tlensId": None, "dimension": shape.get("hidden_size"),
                "visibility": self.visibility, "defaultSourceSetName": None, "defaultSourceId": None,
                "inferenceEnabled": False, "instruct": bool(re.search(r"instruct|-it$|chat", self.model)),
                "layers": int(shape.get("num_hidden_layers") or 0),
                "neuronsPerLayer": int(shape.get("intermediate_size") or 0),
                "owner": hub.split("/")[0] if "/" in hub else self.creator,
                "website": f"https://huggingface.co/{hub}" if "/" in hub else None,
                "createdAt": self.created, "updatedAt": self.created}

    def _source_set(self) -> dict[str, Any]:
        return {"modelId": self.model, "name": self.source_set, "creatorId": self.creator_id,
                "creatorName": self.creator, "creatorEmail": None, "hasDashboards": True,
                "visibility": self.visibility,
                "description": f"{self.info.get('sae_name')} at {self.info.get('hook')} "
                               f"({int(self.info.get('d_sae', 0)):,} features)",
                "type": "", "urls": self.urls, "releaseName": self.release, "defaultOfModelId": None,
                "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
                "showHeadAttribution": False, "showUmap": False, "createdAt": self.created}

    def _source(self) -> dict[str, Any]:
        context = self.info.get("context_size")
        rows = (self.info.get("info") or {}).get("rows_per_pass")
        return {"id": self.source, "modelId": self.model, "setName": self.source_set,
                "creatorId": self.creator_id, "hasDashboards": True, "inferenceEnabled": False,
                "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None, "saelensSaeId": None,
                "hfRepoId": self.hf_repo_id, "hfFolderId": None, "visibility": self.visibility,
                "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
                "hasUmapClusters": False,
                "num_prompts": int(rows) // int(context) if rows and context else None,
                "num_tokens_in_prompt": int(context) if context else None,
                "dataset": self.info.get("dataset"),
                "notes": f"saeworks feature dictionary over {int(self.info.get('n_tokens', 0)):,} tokens",
                "createdAt": self.created}


def _hub_name(info: dict[str, Any]) -> str:
    """The model's hub name (the embedded model's origin for `embedded`)."""
    from saeworks.activations.model import EMBEDDED, EMBEDDED_ORIGIN

    name = str((info.get("model") or {}).get("name") or "model")
    return EMBEDDED_ORIGIN if name == EMBEDDED else name


def _model_shape(info: dict[str, Any]) -> dict[str, Any]:
    """The model's config.json (layers, widths) where this machine has it: the converted copy the
    analysis loaded, or a local model directory; {} otherwise (Neuronpedia then shows 0 layers)."""
    candidates = [(info.get("info") or {}).get("model"), (info.get("model") or {}).get("name")]
    for candidate in candidates:
        path = Path(str(candidate)) / "config.json" if candidate else None
        if path is not None and path.is_file():
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(config, dict):
                return config
    return {}


def _write_batches(dictionary: FeatureDictionary, out: Path, meta: _Metadata, per_batch: int, labels: str,
                   progress: bool) -> dict[str, int]:
    """Every feature, its activations and its label into the batch files; returns the counts."""
    from saeworks.service.records import feature_record

    for name in (FEATURES_DIR, ACTIVATIONS_DIR) + ((EXPLANATIONS_DIR,) if labels != "none" else ()):
        (out / name).mkdir()
    counts = {"activations": 0, "explanations": 0}
    bar = tqdm(total=len(dictionary), desc="export neuronpedia", unit="feature", file=sys.stderr,
               disable=not progress)
    with bar:
        for batch, ids in enumerate(_batches(len(dictionary), per_batch)):
            with _BatchFiles(out, batch) as files:
                for i in ids:
                    feature = dictionary.feature(i)
                    record = feature_record(dictionary, feature)
                    activations = record.pop("activations")
                    record.update(sourceSetName=meta.source_set, creatorId=meta.creator_id)
                    files.write(FEATURES_DIR, _dumps(record, f"feature {i}"))
                    for activation in activations:
                        activation["creatorId"] = meta.creator_id
                        files.write(ACTIVATIONS_DIR, _dumps(activation, f"feature {i}'s activations"))
                        counts["activations"] += 1
                    explanation = _explanation(meta, feature, labels)
                    if explanation is not None:
                        files.write(EXPLANATIONS_DIR, _dumps(explanation, f"feature {i}'s label"))
                        counts["explanations"] += 1
                    bar.update(1)
    return counts


def _batches(n: int, per_batch: int) -> Iterator[range]:
    for start in range(0, n, per_batch):
        yield range(start, min(start + per_batch, n))


def _explanation(meta: _Metadata, feature: Feature, labels: str) -> dict[str, Any] | None:
    """The feature's label as a Neuronpedia explanation, or None when `labels` leaves it out (and
    for the auto label of a dead feature, which only says it is dead). Its type is left unset:
    Neuronpedia's explanation types name explainer methods, and 'auto'/'user' is not one."""
    if labels == "none" or (labels == "user" and feature.label_source != "user"):
        return None
    if feature.label_source == "auto" and (feature.dead or feature.label == DEAD_LABEL):
        return None
    how = "written by a user" if feature.label_source == "user" else \
        "automatic (its top activating tokens, then the tokens it promotes)"
    return {"id": f"{meta.model}-{meta.source}-{feature.id}-saeworks-label", "modelId": meta.model,
            "layer": meta.source, "index": str(feature.id), "description": feature.label,
            "authorId": meta.creator_id, "typeName": None, "explanationModelName": None,
            "notes": f"saeworks label, {how}", "label_source": feature.label_source,
            "createdAt": meta.created}


class _BatchFiles:
    """The gzip files of one batch, each opened on its first line (so no empty file is written)."""

    def __init__(self, out: Path, batch: int) -> None:
        self.out, self.batch = out, batch
        self.stack = ExitStack()
        self.files: dict[str, IO[str]] = {}

    def __enter__(self) -> _BatchFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def write(self, kind: str, line: str) -> None:
        if kind not in self.files:
            path = self.out / kind / batch_name(self.batch)
            opened = gzip.open(path, "wt", encoding="utf-8", compresslevel=COMPRESS_LEVEL)  # noqa: SIM115
            self.files[kind] = self.stack.enter_context(opened)
        self.files[kind].write(line + "\n")


def _dumps(record: dict[str, Any], what: str) -> str:
    """One JSON line; a NaN or infinity (which Neuronpedia's database cannot take) is an error."""
    try:
        return json.dumps(record, allow_nan=False, separators=(",", ":"))
    except ValueError as err:
        raise ExportError(f"{what} holds a value JSON cannot carry ({err}); the dictionary may be "
                          "damaged: rebuild it with `saeworks analyze`") from err
