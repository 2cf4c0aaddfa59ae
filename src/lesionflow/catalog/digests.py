"""How the cache measures an artifact: one rule per ``Digest`` value, from bytes only (never paths or mtimes).

``digest(artifact, ws, params)`` returns a hex string, ``"absent"`` for an artifact that does not exist, or
None when the content cannot be known cheaply (an ``s3://`` source, remote registry state): a stage reading
such an artifact has no cache key and runs every time (its writes are idempotent).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lesionflow.catalog.artifacts import RAW_DATASET, RAW_MANIFEST, Artifact, Digest, accepted_beside
from lesionflow.hashing import combine_digests, sha256_bytes, sha256_file, sha256_json, sha256_tree
from lesionflow.params import Params
from lesionflow.workspace import Workspace

ABSENT = "absent"


def _bytes(path: Path) -> str:
    return sha256_file(path) if path.is_file() else ABSENT


def _tree(path: Path) -> str:
    return sha256_tree(path) if path.is_dir() else ABSENT


def raw_digest(ws: Workspace) -> str:
    """data/raw by its manifest and dataset.json (the manifest holds every stored file's sha256)."""
    parts = [(p.name, sha256_file(p)) for p in (RAW_MANIFEST.at(ws), RAW_DATASET.at(ws)) if p.exists()]
    return combine_digests(parts) if parts else sha256_bytes(b"")


def store_cases_digest(root: Path) -> str:
    """A Zarr store by its complete cases (cheap: no chunk is read; each case's bytes are in metadata.csv)."""
    from lesionflow.store.zarr_store import list_cases

    return sha256_json(list_cases(root)) if root.is_dir() else ABSENT


def source_digest(ws: Workspace, params: Params) -> str | None:
    """The ingest source's bytes (its folder, or the folder of a dataset.json); None for s3://."""
    from lesionflow.io.remote import is_remote

    if is_remote(params.ingest.source):
        return None
    source = ws.path(params.ingest.source)
    if not source.exists():
        return ABSENT
    return sha256_tree(source if source.is_dir() else source.parent)


def synthetic_selection_digest(ws: Workspace, params: Params) -> str:
    """The synthetic store training mixes in, with the gate's verdict beside it ("none" when training is real-only)."""
    from lesionflow.store.zarr_store import store_digest

    if not params.train.synthetic_store:
        return "none"
    root = ws.path(params.train.synthetic_store)
    accepted = accepted_beside(root)
    store = store_digest(root) if root.is_dir() else ABSENT
    return f"{store}:{_bytes(accepted)}"  # no verdict: train refuses the store (catalog.readers.synthetic_verdict)


def optional_file_digest(artifact: Artifact, ws: Workspace, params: Params) -> str:
    """A file located by a params key: "off" when the key is empty, else its bytes ("absent" when missing)."""
    key = artifact.param_key
    if key is None:
        raise ValueError(f"{artifact.name}: the optional-file rule needs a ${{key}} path, got {artifact.path}")
    section, _, rest = key.partition(".")
    value: Any = getattr(params, section)
    for part in rest.split("."):
        value = getattr(value, part)
    return _bytes(ws.path(str(value))) if str(value).strip() else "off"


def acceptance_model_identity(ws: Workspace, params: Params) -> str | None:
    """Identity of the synthetic gate's segmenter: ``off``, a folder's weights digest, the champion version.

    ``none`` when there is no champion yet; None when the registry does not answer (no cache key then).
    Raises SourceError for a folder setting that holds no model.
    """
    from lesionflow.errors import SourceError

    setting = params.quality.synthetic.acceptance_model.strip()
    if not setting:
        return "off"
    if setting != "champion":
        weights = ws.path(setting) / "model.safetensors"
        if not weights.is_file():
            raise SourceError(
                f"quality.synthetic.acceptance_model = {setting!r} is not a model folder (no model.safetensors); "
                "use champion, a folder such as models/segmenter, or an empty value"
            )
        return sha256_file(weights)
    from lesionflow.registry.publish import champion_info
    from lesionflow.registry.tracking import RegistryUnavailable, resolve_tracking_uri

    uri = resolve_tracking_uri(params.registry.tracking_uri, ws.root)
    try:
        champ = champion_info(uri, params.registry.model_name)
    except RegistryUnavailable:
        return None
    return "none" if champ is None else f"champion:v{champ.version}:{champ.run_id}"


_RULES: dict[Digest, Callable[[Artifact, Workspace, Params], str | None]] = {
    Digest.BYTES: lambda a, ws, p: _bytes(a.at(ws)),
    Digest.TREE: lambda a, ws, p: _tree(a.at(ws)),
    Digest.RAW: lambda a, ws, p: raw_digest(ws),
    Digest.STORE_CASES: lambda a, ws, p: store_cases_digest(a.at(ws)),
    Digest.SOURCE: lambda a, ws, p: source_digest(ws, p),
    Digest.SYNTHETIC_SELECTION: lambda a, ws, p: synthetic_selection_digest(ws, p),
    Digest.ACCEPTANCE_MODEL: lambda a, ws, p: acceptance_model_identity(ws, p),
    Digest.OPTIONAL_FILE: lambda a, ws, p: optional_file_digest(a, ws, p),
    # The registry is remote state: a stage that reads it is rechecked on every run (registration is idempotent).
    Digest.CHAMPION: lambda a, ws, p: None,
}


def digest(artifact: Artifact, ws: Workspace, params: Params) -> str | None:
    """The artifact's content digest by its rule; None when it cannot be known (no cache key)."""
    if artifact.digest is Digest.NONE:
        raise ValueError(f"{artifact.name} ({artifact.path}) is not part of any cache state (digest rule none)")
    return _RULES[artifact.digest](artifact, ws, params)
