"""The embedded default corpus: the Python 3.11 documentation, as written by its authors.

Why this text: it is real human-written English prose (tutorials, how-tos, reference pages with
examples), ~10 MB or ~2.6 M SmolLM2 tokens in 497 documents, under the PSF licence, and it
installs offline from Debian's package registry (`python3.11-doc`), which these machines reach.
It is prepared on first use into one jsonl file in the saeworks cache and never committed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from saeworks.sae.errors import SaeworksError
from saeworks.sae.paths import cache_root

DEBIAN_PACKAGE = "python3.11-doc"
SOURCES_DIR = "usr/share/doc/python3.11/html/_sources"
CORPUS_FILE = "python-3.11-docs.jsonl"

log = logging.getLogger(__name__)


class CorpusError(SaeworksError, RuntimeError):
    """The embedded corpus cannot be prepared on this machine."""


def embedded_corpus() -> Path:
    """Path of the prepared jsonl corpus (one `{"text", "source"}` object per document)."""
    target = cache_root() / "corpus" / CORPUS_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".preparing-") as scratch:
        installed = Path("/") / SOURCES_DIR
        sources = installed if installed.is_dir() else _unpack_package(Path(scratch))
        partial = Path(scratch) / CORPUS_FILE
        count = _write_jsonl(sources, partial)
        os.replace(partial, target)  # atomic: a reader never sees half a corpus
    log.warning("prepared the embedded corpus: %d documents in %s", count, target)
    return target


def _unpack_package(scratch: Path) -> Path:
    """`apt-get download` the Debian package and unpack it (no system install, no root needed)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise CorpusError(
            "data.path=embedded needs Debian's apt-get and dpkg to fetch python3.11-doc; on this "
            "system set data.path to a local text/jsonl/parquet file instead"
        )
    log.warning("downloading Debian package %s for the embedded corpus", DEBIAN_PACKAGE)
    download = ["apt-get", "download", DEBIAN_PACKAGE]
    result = subprocess.run(download, cwd=scratch, capture_output=True, text=True)
    if result.returncode != 0 and os.geteuid() == 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)  # empty package lists
        result = subprocess.run(download, cwd=scratch, capture_output=True, text=True)
    debs = list(scratch.glob("*.deb"))
    if result.returncode != 0 or not debs:
        raise CorpusError(
            f"could not download {DEBIAN_PACKAGE} ({result.stderr.strip()[-300:]}); run "
            f"`apt-get update` or set data.path to a local text/jsonl/parquet file"
        )
    subprocess.run(["dpkg", "-x", str(debs[0]), str(scratch / "root")], check=True)
    return scratch / "root" / SOURCES_DIR


def _write_jsonl(sources: Path, out: Path) -> int:
    count = 0
    with out.open("w", encoding="utf-8") as handle:
        for path in sorted(sources.rglob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                record = {"text": text, "source": str(path.relative_to(sources))}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    if count == 0:
        raise CorpusError(f"no documents found under {sources}")
    return count
