"""Publication of workspace folders (the Zarr stores) to the team's S3 storage, so readers elsewhere open them.

The workspace stays on local disk: DVC versions it there and the stages write it with atomic renames, which S3
does not have. After a stage has written a store, :func:`publish_tree` makes ``<storage.remote>/<relative
path>`` an exact copy of it:

* Only changed files travel. An index object beside the copy (``<url>.publish.json``) lists every file's
  sha256 and size as last uploaded; a file whose local digest and remote size still match is skipped, so a
  rerun after a new case uploads that case only.
* Readers never see half a case. Chunk and shard files go first, then the ``zarr.json`` documents from the
  deepest up (a case group's metadata appears after its arrays, the root's last), then stale objects are
  deleted (their ``zarr.json`` first), then the index is written. An interrupted publication leaves at worst
  extra objects that the next one removes.
* The copy's digest is the same :func:`lesionflow.hashing.sha256_tree` digest as the local folder (hidden
  entries, e.g. a killed writer's ``.tmp-`` folders, are skipped by both), so lineage and tests can compare.

Credentials and the endpoint come from the environment only (see :mod:`lesionflow.io.remote`). A failure is one
:class:`StorageError` line naming the URL and the fix; :class:`StorageUnavailable` marks the transient ones (the
endpoint did not answer, a 5xx) that an adapter may retry with backoff.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionflow.errors import LesionflowError
from lesionflow.hashing import combine_digests, sha256_file, tree_files
from lesionflow.io.remote import connect_s3, is_remote, redact_uri, s3_problem

INDEX_SUFFIX = ".publish.json"
_METADATA = "zarr.json"


class StorageError(LesionflowError):
    """The team storage refused or failed a publication (one line: URL, problem, fix)."""


class StorageUnavailable(StorageError):
    """The storage endpoint did not answer (or answered 5xx): retrying later may succeed."""


@dataclass(frozen=True)
class PublishResult:
    """What one publication did. ``digest`` is the sha256_tree digest of the folder (and so of its copy)."""

    url: str  # redacted
    n_files: int
    n_uploaded: int
    n_deleted: int
    digest: str


def remote_url(remote: str, relative: str) -> str:
    """``<remote>/<relative>`` with one slash between them (``remote`` is ``s3://bucket[/prefix]``)."""
    return f"{remote.rstrip('/')}/{relative.strip('/')}"


def upload_order(rels: list[str]) -> list[str]:
    """Data files first, then ``zarr.json`` documents deepest first: a group is announced after its content."""
    data = sorted(r for r in rels if Path(r).name != _METADATA)
    metadata = sorted((r for r in rels if Path(r).name == _METADATA), key=lambda r: (-r.count("/"), r))
    return data + metadata


def publish_tree(local: Path, url: str) -> PublishResult:
    """Make the S3 prefix ``url`` an exact copy of the local folder ``local`` (see the module docstring).

    Raises:
        StorageError: one line naming the redacted URL and the fix; :class:`StorageUnavailable` when retrying
            may help.
    """
    shown = redact_uri(url)
    if not is_remote(url):
        raise StorageError(f"{shown!r} is not an S3 location; set storage.remote to s3://bucket/prefix")
    if not local.is_dir():
        raise StorageError(f"nothing to publish to {shown}: {local} is not a folder; run the stage that writes it")
    files = tree_files(local)  # the files sha256_tree digests, so the copy's digest is the folder's
    # rel -> [sha256, size], the index entry of each file
    entries = {rel: [sha256_file(path), path.stat().st_size] for rel, path in files.items()}
    try:
        return _publish(files, entries, url.rstrip("/"), shown)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - every S3 failure becomes one clean line without secrets
        what, transient = s3_problem(exc)
        kind = StorageUnavailable if transient else StorageError
        raise kind(f"cannot publish {local.name} to {shown}: {what}") from None


def _publish(files: dict[str, Path], entries: dict[str, list[Any]], url: str, shown: str) -> PublishResult:
    fs = connect_s3()
    base = url.partition("://")[2]
    index_key = base + INDEX_SUFFIX
    old = _read_index(fs, index_key)
    present = _remote_sizes(fs, base)
    todo = [
        rel for rel in upload_order(list(files)) if old.get(rel) != entries[rel] or present.get(rel) != entries[rel][1]
    ]
    for rel in todo:
        fs.put_file(str(files[rel]), f"{base}/{rel}")
    stale = sorted(set(present) - set(files))
    # A removed case disappears metadata first, so no reader finds a group whose arrays are already gone.
    for batch in ([r for r in stale if Path(r).name == _METADATA], [r for r in stale if Path(r).name != _METADATA]):
        if batch:
            fs.rm([f"{base}/{rel}" for rel in batch])
    digest = combine_digests((rel, sha256) for rel, (sha256, _) in entries.items())
    fs.pipe_file(index_key, json.dumps({"format": 1, "digest": digest, "files": entries}, sort_keys=True).encode())
    return PublishResult(shown, len(files), len(todo), len(stale), digest)


def _read_index(fs: Any, key: str) -> dict[str, list[Any]]:
    """The last publication's rel -> [sha256, size]; a missing or unreadable index only costs a full upload."""
    try:
        data = json.loads(fs.cat_file(key))
        return {str(k): list(v) for k, v in data["files"].items()}
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _remote_sizes(fs: Any, base: str) -> dict[str, int]:
    """Relative key -> size of every object under ``base/`` (none when the prefix does not exist yet)."""
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    prefix = base + "/"
    return {key[len(prefix) :]: int(info["size"]) for key, info in found.items() if key.startswith(prefix)}
