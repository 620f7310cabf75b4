"""Stores at fsspec URLs (`s3://bucket/path`, `gs://...`): what differs from a local directory.

Zarr opens such a URL through fsspec (s3fs for `s3://`), which takes its endpoint and credentials
the standard way (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` or
`AWS_PROFILE`, `AWS_DEFAULT_REGION`; fsspec's `FSSPEC_S3_*` settings). Three things differ:

- Failures to reach the store (no network, wrong endpoint, no credentials, access denied, no such
  bucket) arrive as botocore/aiohttp exceptions or as OSErrors whose errno describes a local disk;
  `access_problem` tells them apart from damage and says what to check, so that the store module
  can raise one `StoreError` line instead of a traceback or a misleading "permission denied;
  choose a directory".
- An object store has no OS locks: two writers of one remote store are not detected (README).
  `require_writable` stands in for the local check that the directory can be written, so that a
  harvest into a bucket it cannot write stops before the model loads.
- Existence of many shard objects is one listing of a prefix, not one request per object
  (`ActivationStore.missing_shard_files`), and such listings must never be answered from a cache:
  `STORAGE_OPTIONS` turns off fsspec's listings cache, which otherwise keeps a listing and
  answers later reads of objects that another process wrote since (the other ranks of a
  harvest) as missing, which Zarr reads as fill values.
"""

from __future__ import annotations

import os

from saeworks.sae.atomic import this_host
from saeworks.sae.distributed import all_gather_objects
from saeworks.sae.errors import SaeworksError
from saeworks.sae.oserrors import OutputPathError

STORAGE_OPTIONS = {"use_listings_cache": False}
"""fsspec options of every remote store this package opens (see the module docstring)."""
_REMOTE_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "urllib3", "requests",
                     "fsspec")


def is_remote(url: str) -> bool:
    """Whether `url` names a store behind fsspec (`s3://...`), not a local directory."""
    return "://" in url and not url.startswith("file://")


def access_problem(url: str, err: BaseException) -> str | None:
    """Why the remote store at `url` could not be reached, from `err` (or what it wraps or was
    raised while handling), as the end of a one-line message; None for a local store or an error
    that is not about reaching it (a chunk that does not decode is damage, not access)."""
    if not is_remote(url):
        return None
    seen: BaseException | None = err
    for _ in range(16):  # the chain of causes, bounded
        if seen is None:
            return None
        problem = _describe(seen)
        if problem is not None:
            return problem
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(err: BaseException) -> str | None:
    name, module = type(err).__name__, type(err).__module__
    message = " ".join(str(err).split())[:300] or name
    if "Credentials" in name:  # botocore's NoCredentialsError, PartialCredentialsError
        return (f"no credentials ({message}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE")
    if isinstance(err, PermissionError):
        return (f"access denied ({message}); check the credentials and the bucket's permissions")
    if isinstance(err, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
        return (f"cannot reach the storage endpoint ({name}: {message}); check the URL, "
                "AWS_ENDPOINT_URL and the network")
    if isinstance(err, FileNotFoundError) and "bucket" in message.lower():
        return f"{message}; create the bucket or fix the URL"
    if isinstance(err, OSError) or module.split(".")[0] in _REMOTE_LIBRARIES:
        return f"{name}: {message}"
    return None


def require_writable(url: str, setting: str, is_main: bool = True, collective: bool = False) -> None:
    """Prove that objects can be written under the remote `url` by writing and deleting a probe
    object inside it (`.saeworks-write-test-HOST-PID`), before any model loads; an OutputPathError
    naming the URL, `setting` and the reason (no such bucket, access denied, no credentials, no
    endpoint) otherwise. With `collective`, rank 0 probes for all ranks and every rank raises."""
    refusal = None
    if is_main:
        try:
            _probe(url, setting)
        except SaeworksError as err:
            refusal = str(err)
    shared = all_gather_objects(refusal)[0] if collective else refusal
    if shared is not None:
        raise OutputPathError(str(shared))


def _probe(url: str, setting: str) -> None:
    import fsspec  # type: ignore[import-untyped]

    try:
        fs, path = fsspec.core.url_to_fs(url, **STORAGE_OPTIONS)
        probe = f"{path.rstrip('/')}/.saeworks-write-test-{this_host()}-{os.getpid()}"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as err:
        reason = access_problem(url, err) or f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        raise OutputPathError(f"{setting}: cannot write to {url}: {reason}") from err
