"""Remote (S3) dataset sources, mirrored into a local cache before any stage reads them.

Why a mirror, not streaming: QC, conversion and training read every volume several times and at random, and a
local copy keeps a run reproducible if the bucket changes later. An index of size + ETag per key makes a re-run
cost one listing. Rules kept throughout:

* Credentials come only from the environment (the standard AWS chain: ``AWS_ACCESS_KEY_ID`` / ``..._SECRET_...``,
  profiles, roles); user info in a URI is ignored. The endpoint is ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``),
  which botocore reads itself (checked with s3fs 2026.9.0 / aiobotocore 3.10.0), so nothing is passed explicitly.
* A URI goes through :func:`redact_uri` before it reaches a message, a log line, a manifest or a file; it is the
  one redaction rule (:func:`redact_text` and :func:`redact_tree` apply it to text and to params dumps).
* A key is written only if its relative path stays inside the mirror root; other keys are reported, not fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from lesionflow.errors import SourceError
from lesionflow.files import atomic_path

REMOTE_SCHEMES = frozenset({"s3", "s3a"})
INDEX_NAME = ".lesionflow-mirror.json"
_TMP_PREFIX = ".lesionflow-part-"  # partial downloads; anything with this prefix is pruned on the next run
# Query/fragment parameters that carry secrets: presigned URLs (X-Amz-*, AWSAccessKeyId, Signature), tokens, keys.
_SENSITIVE_PARAM = re.compile(r"^x-amz-|token|secret|passw|sig|credential|key|auth|session", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_WORKERS = 8  # concurrent downloads: S3 latency, not bandwidth, dominates for many small files
_CONNECT_TIMEOUT_S = 5
_READ_TIMEOUT_S = 60
_DEFAULT_MAX_ATTEMPTS = 3  # botocore's legacy default (5 + backoff) takes ~8 s to report a dead endpoint


@dataclass(frozen=True)
class MirrorResult:
    """Outcome of one mirror run. ``n_objects`` counts mirrored keys (downloaded + skipped), not rejected ones."""

    local_root: Path
    n_objects: int
    n_downloaded: int
    n_skipped_unchanged: int
    # (redacted key relative to the source prefix, reason): f"{redact_uri(uri)}/{key}" names the object.
    rejected_keys: tuple[tuple[str, str], ...]


def is_remote(uri: str) -> bool:
    """True for ``s3://`` and ``s3a://`` URIs; local paths (and ``file://``) are not remote."""
    scheme, sep, _ = str(uri).partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


def redact_uri(uri: str) -> str:
    """Return ``uri`` without credentials: user info (``key:secret@``) and secret-looking query parameters.

    Bucket, host, path and harmless parameters are kept byte for byte, so a URI without secrets comes back
    unchanged. Strings without ``://`` (local paths) are returned as they are.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    # "host:port" and "[ipv6]" are fine; any other ':' in the authority is the start of "key:secret@".
    key_colon = ":" in authority and not authority.startswith("[") and not authority.rsplit(":", 1)[1].isdigit()
    if "@" in authority:
        rest = rest[authority.rindex("@") + 1 :]
    elif key_colon and "@" in rest:
        # An unescaped AWS secret may contain '/', which ends the authority early: s3://AKIA:ab/cd@bucket/p.
        rest = rest[rest.index("@") + 1 :]
    rest, _, fragment = rest.partition("#")
    hier, _, query = rest.partition("?")
    out = scheme + "://" + hier
    if query := _drop_sensitive(query):
        out += "?" + query
    if fragment := _drop_sensitive(fragment):
        out += "#" + fragment
    return out


def redact_text(text: str) -> str:
    """``text`` with :func:`redact_uri` applied to every URL in it (an override line, a message, a YAML list)."""
    return _URL_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def redact_tree(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings...) with every string passed through
    :func:`redact_text`; everything else is returned as it is. The one way params reach a sink (MLflow, a table).
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(item) for item in value)
    return value


def _drop_sensitive(params: str) -> str:
    """Drop ``name=value`` pairs whose name looks like a credential; keep the others exactly as written."""
    kept = [p for p in params.split("&") if p and not _SENSITIVE_PARAM.search(unquote(p.split("=", 1)[0]))]
    return "&".join(kept)


def mirror_remote_source(
    uri: str, cache_dir: Path, *, progress: Callable[[int, int], None] | None = None
) -> MirrorResult:
    """Mirror every object under the S3 prefix ``uri`` into ``cache_dir/<16 hex>/``, keeping the key layout.

    The folder name is the sha256 of the redacted URI, so the same source always lands in the same place and
    secrets never reach the file system. Unchanged objects (same size and ETag as recorded in the index, and a
    local file of that size) are skipped; changed ones are re-downloaded atomically; local files whose key is
    gone are deleted. ``progress(done, total)`` is called once per object on the caller's thread.
    Not safe for two concurrent runs on the same source and cache dir.

    Raises:
        SourceError: one line naming the redacted URI, the problem and what to check (missing bucket, denied
            access, unreachable endpoint, empty prefix, local write failure).
    """
    shown = redact_uri(str(uri))
    if not is_remote(shown):
        raise SourceError(f"{shown!r} is not a remote source; expected s3://bucket/prefix")
    bucket, _, prefix = re.split(r"[?#]", shown.partition("://")[2], maxsplit=1)[0].partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise SourceError(f"{shown} names no bucket; expected s3://bucket/prefix")
    root = Path(cache_dir) / hashlib.sha256(shown.rstrip("/").encode()).hexdigest()[:16]
    try:
        return _mirror(bucket, prefix, shown, root, progress)
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clean line; `from None` drops secrets
        raise _as_source_error(exc, shown, root) from None


def _mirror(
    bucket: str, prefix: str, shown: str, root: Path, progress: Callable[[int, int], None] | None
) -> MirrorResult:
    fs = connect_s3()
    listing = _list_objects(fs, bucket, prefix)
    if not listing:
        raise SourceError(
            f"{shown} holds no objects; check the bucket and prefix (it must name a folder, not a single object)"
        )
    wanted, rejected = _plan(listing, prefix, root)
    root.mkdir(parents=True, exist_ok=True)
    old = _load_index(root)
    todo = [rel for rel, (_, size, etag) in wanted.items() if not _unchanged(root / rel, old.get(rel), size, etag)]
    _prune(root, set(wanted))  # before downloading: a deleted file "a" may now be a folder "a/"
    index = {rel: list(old[rel]) for rel in wanted if rel not in todo}
    total, done = len(wanted), 0
    for done in range(1, len(index) + 1):  # skipped objects count as done, so the bar reaches total
        if progress:
            progress(done, total)
    pool = ThreadPoolExecutor(max_workers=max(1, min(_WORKERS, len(todo))))
    try:
        jobs = {pool.submit(_download, fs, bucket, wanted[rel], root / rel): rel for rel in todo}
        for job in as_completed(jobs):
            job.result()
            rel = jobs[job]
            index[rel] = [wanted[rel][1], wanted[rel][2]]
            done += 1
            if progress:
                progress(done, total)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _save_index(root, index, shown)  # even on failure: finished downloads are not repeated next run
    return MirrorResult(root, total, len(todo), total - len(todo), tuple(rejected))


def connect_s3() -> Any:
    """An S3FileSystem configured only from the environment, failing fast on a dead endpoint."""
    import s3fs  # lazy: importing lesionflow for local data should not pay for aiobotocore

    # Our fail-fast defaults apply only where the user has not set AWS_MAX_ATTEMPTS / AWS_RETRY_MODE themselves.
    defaults = {"max_attempts": ("AWS_MAX_ATTEMPTS", _DEFAULT_MAX_ATTEMPTS), "mode": ("AWS_RETRY_MODE", "standard")}
    retries = {name: value for name, (var, value) in defaults.items() if var not in os.environ}
    config = {"connect_timeout": _CONNECT_TIMEOUT_S, "read_timeout": _READ_TIMEOUT_S, "retries": retries}
    # skip_instance_cache: s3fs caches instances by argument, not by environment, so a cached one would keep an
    # old endpoint or old credentials after the environment changed.
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, config_kwargs=config)


def _list_objects(fs: Any, bucket: str, prefix: str) -> dict[str, tuple[int, str]]:
    """Raw key -> (size, ETag) for every object under ``prefix/``, using the API directly so keys stay verbatim."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
    out: dict[str, tuple[int, str]] = {}
    while True:
        page = fs.call_s3("list_objects_v2", **kwargs)
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (int(obj["Size"]), str(obj.get("ETag") or obj.get("LastModified")))
        if not page.get("IsTruncated"):
            return out
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _plan(
    listing: dict[str, tuple[int, str]], prefix: str, root: Path
) -> tuple[dict[str, tuple[str, int, str]], list[tuple[str, str]]]:
    """Split the listing into safe relative paths (rel -> (key, size, etag)) and rejected (redacted rel, reason)."""
    base = f"{prefix}/" if prefix else ""
    real_root = os.path.realpath(root)
    wanted: dict[str, tuple[str, int, str]] = {}
    rejected: list[tuple[str, str]] = []
    for key, (size, etag) in sorted(listing.items()):
        rel = key[len(base) :]
        if rel.endswith("/") and size == 0:
            continue  # a "folder" placeholder made by consoles, not data
        reason = _unsafe_reason(rel)
        if reason is None and not os.path.realpath(root / rel).startswith(real_root + os.sep):
            reason = "path escapes the mirror root"  # e.g. through a symlink someone left in the cache
        if reason is None and any(str(parent) in wanted for parent in Path(rel).parents):
            reason = "another object has the name of one of its folders"
        if reason is None:
            wanted[rel] = (key, size, etag)
        else:
            rejected.append((redact_uri(rel), reason))
    return wanted, rejected


def _unsafe_reason(rel: str) -> str | None:
    """Why a relative key cannot be a local path, or None if it can."""
    parts = rel.split("/")
    if rel.startswith("/"):
        return "absolute path"
    if ".." in parts:
        return "path escapes the source prefix"
    if "" in parts or "." in parts or "\x00" in rel:
        return "empty, '.' or NUL path component"
    if any(len(p.encode()) > 255 for p in parts):
        return "path component longer than 255 bytes"
    if parts[-1] == INDEX_NAME or any(p.startswith(_TMP_PREFIX) for p in parts):
        return "name reserved by the mirror"
    if "?versionId=" in rel:
        return "contains '?versionId=', which s3fs reads as a version"
    return None


def _unchanged(local: Path, recorded: list[Any] | None, size: int, etag: str) -> bool:
    """Same size and ETag as last time, and the local copy is a regular file of that size (lstat: no symlinks)."""
    try:
        st = os.lstat(local)
    except OSError:
        return False
    return recorded == [size, etag] and stat.S_ISREG(st.st_mode) and st.st_size == size


def _download(fs: Any, bucket: str, obj: tuple[str, int, str], dest: Path) -> None:
    """Fetch one object into a temp file next to ``dest``, then rename it: a crash never leaves half a file.

    The index records the ETag seen in the listing, so an object rewritten while we download it does not
    match the listing on the next run and is fetched again.
    """
    key, size, _ = obj
    with atomic_path(dest, tmp_name=f"{_TMP_PREFIX}{uuid.uuid4().hex}") as tmp:
        fs.get_file(f"{bucket}/{key}", str(tmp))  # ranged, concurrent parts for big volumes
        if tmp.stat().st_size != size:
            raise SourceError(f"object {redact_uri(key)!r} changed while being mirrored; run again")


def _prune(root: Path, keep: set[str]) -> None:
    """Delete files (and symlinks) not in ``keep`` and then empty folders, so the mirror equals the prefix."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames + links:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if rel not in keep and rel != INDEX_NAME:
                os.unlink(path)
        if dirpath != str(root) and not os.listdir(dirpath):
            os.rmdir(dirpath)


def _load_index(root: Path) -> dict[str, list[Any]]:
    """The previous run's rel -> [size, etag]; a bad index only costs a full re-download, so it is not an error."""
    try:
        data = json.loads((root / INDEX_NAME).read_text())
        return {str(k): list(v) for k, v in data["objects"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # missing or unreadable


def _save_index(root: Path, objects: dict[str, list[Any]], shown: str) -> None:
    text = json.dumps({"format": 1, "source": shown, "objects": objects}, indent=1, sort_keys=True)
    with atomic_path(root / INDEX_NAME, tmp_name=f"{_TMP_PREFIX}index") as tmp:
        tmp.write_text(text)


def _as_source_error(exc: Exception, shown: str, root: Path) -> SourceError:
    """Map any failure to one actionable line without secrets (the original exception is dropped on purpose)."""
    if isinstance(exc, OSError) and exc.filename is not None:  # only local file operations set filename
        what = f"cannot write the local mirror under {root} ({exc.strerror}); check free space and permissions"
    else:
        what, _ = s3_problem(exc)
    return SourceError(f"cannot mirror {shown}: {what}")


def s3_endpoint() -> str:
    """The S3 endpoint boto3 talks to, as a user would name it (redacted): ``AWS_ENDPOINT_URL[_S3]`` or AWS S3."""
    return redact_uri(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3")


def s3_problem(exc: BaseException) -> tuple[str, bool]:
    """(what went wrong, with the fix; whether retrying may help) for a failed S3 call, without secrets.

    Transient means the endpoint did not answer, timed out or answered 5xx/throttling; a missing bucket, denied
    access or absent credentials are not transient: retrying them only delays the message.
    """
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    endpoint = s3_endpoint()
    name = type(exc).__name__.lower()
    text = str(exc)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "no usable AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile/role)", False
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        return f"the bucket or an object does not exist at {endpoint}; create the bucket or fix the URI", False
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return "access denied; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy", False
    if "connect" in name or "timeout" in name or "endpoint" in name:
        return f"cannot reach the endpoint {endpoint}; check AWS_ENDPOINT_URL and the network", True
    transient = any(word in text for word in ("SlowDown", "InternalError", "ServiceUnavailable", "503", "500"))
    return f"{type(exc).__name__}: {_scrub(text)}; check AWS_ENDPOINT_URL and credentials", transient


def _scrub(text: str) -> str:
    """One short line with credential values and URL secrets removed, for errors we have no wording for."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        if value := os.environ.get(var):
            text = text.replace(value, "***")
    return " ".join(redact_text(text).split())[:200]
