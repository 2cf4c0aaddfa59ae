"""What the synthesis stages share: where ROIs, generators and the synthetic store live, and the lesion classes.

Workspace layout (design.md): ``data/rois/rois.zarr`` (training ROIs), ``models/generators/<method>/``
(EMA weights + config.json + method extras), ``models/checkpoints/generators/<method>/<run key>/`` (resumable
training state), ``data/synthetic/store.zarr`` (full synthetic cases, same layout as data/processed),
``data/synthetic/manifest.json`` (one record per sample) and ``data/synthetic/accepted.json`` (what the
synthetic gate let through; the only samples the segmenter trains on).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lesionflow.errors import SourceError
from lesionflow.hashing import sha256_file
from lesionflow.params import Params
from lesionflow.workspace import Workspace

GENERATOR_FILES = ("model.safetensors", "config.json")


def rois_path(ws: Workspace) -> Path:
    return ws.root / "data" / "rois" / "rois.zarr"


def rois_table_path(ws: Workspace) -> Path:
    return ws.root / "data" / "rois" / "rois.csv"


def generators_dir(ws: Workspace) -> Path:
    return ws.root / "models" / "generators"


def generator_dir(ws: Workspace, method: str) -> Path:
    return generators_dir(ws) / method


def generator_checkpoints(ws: Workspace, method: str) -> Path:
    return ws.root / "models" / "checkpoints" / "generators" / method


def synthetic_dir(ws: Workspace) -> Path:
    return ws.root / "data" / "synthetic"


def synthetic_store(ws: Workspace) -> Path:
    return synthetic_dir(ws) / "store.zarr"


def manifest_path(ws: Workspace) -> Path:
    return synthetic_dir(ws) / "manifest.json"


def accepted_synthetic_path(store: Path) -> Path:
    """The gate's accepted-sample list of a synthetic store: ``accepted.json`` next to it."""
    return store.parent / "accepted.json"


def generator_digest(ws: Workspace, method: str) -> str:
    """sha256 of the generator's weights ("absent" when it has not been trained)."""
    weights = generator_dir(ws, method) / "model.safetensors"
    return sha256_file(weights) if weights.exists() else "absent"


def read_generator_extra(ws: Workspace, method: str) -> dict[str, Any]:
    """The ``extra`` block of a generator's config.json (method, preset fingerprint, bank, classes...)."""
    path = generator_dir(ws, method) / "config.json"
    if not path.exists():
        raise SourceError(
            f"no {method} generator in {path.parent}; run `lesionflow stage train-generator` "
            f"with '{method}' in synth.generators"
        )
    return dict(json.loads(path.read_text()).get("extra", {}))


def lesion_classes(label_values: tuple[int, ...], multi_class: bool) -> tuple[int, ...]:
    """The label values LeFusion gives a channel each (§2.7); one merged class (the first) when not multi-class."""
    values = tuple(v for v in label_values if v != 0)
    if not values:
        raise SourceError("the plan lists no lesion label value (only background); nothing to synthesize")
    return values if multi_class else values[:1]


def net_fingerprint(params: Params, method: str) -> dict[str, Any]:
    """What a trained generator must agree with to be used or resumed: method, ROI size and architecture."""
    net = getattr(params.synth, method)
    fingerprint: dict[str, Any] = {
        "method": method,
        "roi_size": list(params.synth.roi_size),
        "base_channels": net.base_channels,
        "channel_mults": list(net.channel_mults),
        "attention_levels": list(net.attention_levels),
        "timesteps": net.timesteps,
    }
    if method == "pie":  # the condition's meaning: a volume-quantile model cannot be driven by class ranks
        fingerprint["severity"] = params.synth.pie.severity
    return fingerprint


def check_generator(ws: Workspace, params: Params, method: str) -> dict[str, Any]:
    """The generator's extras after checking it was trained by ``method`` with today's preset; else a clear error."""
    extra = read_generator_extra(ws, method)
    want = net_fingerprint(params, method)
    have = extra.get("fingerprint", {})
    if have != want:
        diff = ", ".join(f"{k} {have.get(k)!r} (now {v!r})" for k, v in want.items() if have.get(k) != v)
        raise SourceError(
            f"the generator in models/generators/{method} was trained with {diff}; it cannot be used with the "
            f"current params: rerun `lesionflow stage train-generator` or restore the params it was trained with"
        )
    return extra
