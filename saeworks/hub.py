"""One way to load an SAE, wherever it lives: a local directory or a Hugging Face hub repository.

    load_sae("runs/demo/saes/topk-k32")                                  a directory of ours
    load_sae("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre")    a SAELens release
    load_sae("EleutherAI/sae-llama-3-8b-32x", "layers.23")               an EleutherAI sparsify repo
    load_sae("owner/name", revision="v1.0")                              an SAE at a repo's root

Resolution, in this order, so a name never means two things:
1. `path_or_repo` names an existing local path: that directory (joined with `sae_id` if given).
2. Otherwise a string shaped like a repo id (`owner/name`): the repo's `sae_id` folder (its root
   when `sae_id` is None), fetched with huggingface_hub.snapshot_download into the standard HF
   cache. Only that folder's files are fetched (allow_patterns), so one layer of a 32-layer
   release costs one layer. HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE work as they do for every
   huggingface_hub user: offline, a repo already in the cache loads and nothing else is tried.
3. Anything else is a user error.

A folder is read by the layout of its files, with the loaders of saeworks.sae (nothing is parsed
twice): cfg.json + sae_weights.safetensors is ours (cfg.json has a `saeworks` section,
sae.io.load_sae) or SAELens' of any version (sae.importers.import_saelens); cfg.json +
sae.safetensors is sparsify's (sae.importers.import_sparsify). `sae_directory` stops at the
resolved local directory (for code that reads the files itself); `load_sae_folder` loads one.
Every failure the user can fix is an SAELoadError: one line saying what was wrong and what to do.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import torch

from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.importers import SPARSIFY_WEIGHTS_FILE, import_saelens, import_sparsify
from saeworks.sae.io import CFG_FILE, WEIGHTS_FILE, SAEFormatError, read_cfg
from saeworks.sae.io import load_sae as load_sae_directory

if TYPE_CHECKING:
    from collections.abc import Callable

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
"""owner/name as the hub spells it (huggingface_hub validates the finer rules)."""
ROOT_FILES = [CFG_FILE, WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE]
"""What to fetch of an SAE at a repo's root: its files and none of the repo's other folders."""
LISTED_FOLDERS = 20
"""At most this many SAE folders are named in an error message."""


class SAELoadError(SAEFormatError):
    """An SAE that cannot be found where the user pointed: a bad path, repo, revision or sae_id."""


def load_sae(path_or_repo: str | Path, sae_id: str | None = None, *, revision: str | None = None,
             device: str | torch.device = "cpu", cache_dir: str | Path | None = None) -> SparseAutoencoder:
    """Load an SAE for inference on raw activations from a local directory or a hub repo.

    path_or_repo: an SAE directory (or a folder holding several, with `sae_id`), or a hub repo id.
    sae_id: the SAE's folder inside it, e.g. "blocks.8.hook_resid_pre" or "layers.23"; None when
        the SAE sits at the top.
    revision: a hub branch, tag or commit (default: the repo's main branch); hub repos only.
    cache_dir: the hub cache (default: huggingface_hub's, i.e. HF_HUB_CACHE or HF_HOME/hub).
    Raises SAELoadError (one line: what was wrong, what to do) when no SAE is found there, and
    SAEFormatError when the files found are not a loadable SAE.
    """
    directory = sae_directory(path_or_repo, sae_id, revision=revision, cache_dir=cache_dir)
    return load_sae_folder(directory, device)


def sae_directory(path_or_repo: str | Path, sae_id: str | None = None, *, revision: str | None = None,
                  cache_dir: str | Path | None = None) -> Path:
    """The local directory holding the SAE that `path_or_repo` and `sae_id` name (a hub repo's
    folder is fetched into the HF cache first); arguments and errors as load_sae."""
    sae_id = _clean_sae_id(sae_id)
    local = Path(path_or_repo).expanduser()
    if local.exists():
        if revision is not None:
            raise SAELoadError(f"revision={revision!r} applies to hub repos, but {str(path_or_repo)!r} "
                               "is a local path: drop revision, or check out that revision there")
        return _sae_folder(local, sae_id, f"{str(path_or_repo)!r}")
    if isinstance(path_or_repo, str) and REPO_ID.fullmatch(path_or_repo):
        snapshot = _snapshot(path_or_repo, sae_id, revision, cache_dir)
        return _sae_folder(snapshot, sae_id, f"the hub repo {path_or_repo!r}",
                           lambda: _remote_sae_folders(path_or_repo, revision))
    raise SAELoadError(f"{str(path_or_repo)!r} is neither an existing local path nor a Hugging Face repo "
                       "id (owner/name): pass an SAE directory or a repo id such as "
                       "'EleutherAI/sae-llama-3-8b-32x' with sae_id='layers.23'")


def load_sae_folder(directory: Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """The SAE of a directory, by its layout (see sae_layout) with the loader of saeworks.sae."""
    layout = sae_layout(directory)
    if layout == "sparsify":
        return import_sparsify(directory, device)
    if layout == "saelens":
        loader = load_sae_directory if "saeworks" in read_cfg(directory) else import_saelens
        return loader(directory, device)
    raise SAELoadError(f"{str(directory)!r} holds no SAE (no {CFG_FILE} with {WEIGHTS_FILE} or "
                       f"{SPARSIFY_WEIGHTS_FILE})")


def _clean_sae_id(sae_id: str | None) -> str | None:
    """`sae_id` without a trailing slash ('' is None: the top); one that could leave its repo or
    directory ('/x', '..') is an error."""
    if not sae_id:
        return None
    if sae_id.startswith("/") or ".." in PurePosixPath(sae_id).parts:
        raise SAELoadError(f"sae_id={sae_id!r} must be a folder inside the repo or directory, "
                           "such as 'layers.23' (no leading '/', no '..')")
    return sae_id.rstrip("/")


def sae_layout(directory: Path) -> str | None:
    """'saelens' (ours included), 'sparsify', or None when `directory` holds no SAE of either layout."""
    if not (directory / CFG_FILE).is_file():
        return None
    if (directory / WEIGHTS_FILE).is_file():
        return "saelens"
    return "sparsify" if (directory / SPARSIFY_WEIGHTS_FILE).is_file() else None


def sae_folders(root: Path) -> list[str]:
    """The folders under `root` (itself excluded) holding an SAE, as sae_ids ('a/b'), sorted."""
    found = {cfg.parent for cfg in root.rglob(CFG_FILE) if sae_layout(cfg.parent) is not None}
    names = [d.relative_to(root).as_posix() for d in found if d != root]
    return sorted(n for n in names if not any(part.startswith(".") for part in n.split("/")))


def _sae_folder(root: Path, sae_id: str | None, where: str,
                remote_folders: Callable[[], list[str]] | None = None) -> Path:
    """`root`/`sae_id` when it holds an SAE, else an SAELoadError naming the folders that hold one
    (under `root`, and by `remote_folders` when given)."""
    directory = root / sae_id if sae_id else root
    if directory.is_dir() and sae_layout(directory) is not None:
        return directory
    if root.is_file():
        raise SAELoadError(f"{where} is a file; pass the SAE's directory (cfg.json and its weights)")
    folders = sorted(set(sae_folders(root) + (remote_folders() if remote_folders else [])))
    what = f"has no SAE folder {sae_id!r}" if sae_id and not directory.is_dir() else (
        f"holds no SAE{f' in {sae_id!r}' if sae_id else ''} (no {CFG_FILE} with {WEIGHTS_FILE} "
        f"or {SPARSIFY_WEIGHTS_FILE})")
    raise SAELoadError(f"{where} {what}; {_folder_hint(folders)}")


def _folder_hint(folders: list[str]) -> str:
    if not folders:
        return "pass the directory that holds cfg.json and the weights, or the right sae_id"
    shown = ", ".join(folders[:LISTED_FOLDERS])
    more = f" and {len(folders) - LISTED_FOLDERS} more" if len(folders) > LISTED_FOLDERS else ""
    return f"pass sae_id= one of the folders that hold an SAE: {shown}{more}"


def _snapshot(repo_id: str, sae_id: str | None, revision: str | None, cache_dir: str | Path | None) -> Path:
    """The local snapshot folder of `repo_id` holding (at least) the SAE's files, fetched if needed."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=[f"{sae_id}/*"] if sae_id else ROOT_FILES))
    except LocalEntryNotFoundError as err:
        if constants.HF_HUB_OFFLINE:
            cache = cache_dir or constants.HF_HUB_CACHE
            raise SAELoadError(f"the hub repo {at} is not in the Hugging Face cache at {cache} and "
                               "HF_HUB_OFFLINE=1 forbids downloading it: set HF_HUB_OFFLINE=0 to fetch it, "
                               f"or pass a local SAE directory (there is no directory {repo_id!r})") from err
        raise SAELoadError(f"cannot reach the Hugging Face hub for {at} and it is not in the cache: "
                           "check the connection, or pass a local SAE directory") from err
    except GatedRepoError as err:
        raise SAELoadError(f"the hub repo {at} is gated: accept its terms on huggingface.co and log in "
                           "(`hf auth login` or HF_TOKEN)") from err
    except RepositoryNotFoundError as err:
        raise SAELoadError(f"no hub repo {repo_id!r} (nor a local directory of that name): check the "
                           "spelling; a private repo needs a login (`hf auth login` or HF_TOKEN)") from err
    except RevisionNotFoundError as err:
        raise SAELoadError(f"the hub repo {repo_id!r} has no revision {revision!r}: pass an existing "
                           "branch, tag or commit") from err
    except HFValidationError as err:
        raise SAELoadError(f"{repo_id!r} is not a valid hub repo id: {_first_line(err)}") from err
    except HfHubHTTPError as err:
        raise SAELoadError(f"the Hugging Face hub refused {at}: {_first_line(err)}") from err


def _remote_sae_folders(repo_id: str, revision: str | None) -> list[str]:
    """SAE folders of the repo by its file listing (one API call, online only); [] when unknown."""
    from huggingface_hub import constants, list_repo_files

    if constants.HF_HUB_OFFLINE:
        return []
    try:
        files = list_repo_files(repo_id, revision=revision)
    except Exception:  # only a hint for an error message: any failure just leaves it out
        return []
    names = {PurePosixPath(f).parent.as_posix() for f in files if PurePosixPath(f).name == CFG_FILE}
    return sorted(n for n in names if n != ".")


def _first_line(err: Any) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
