"""A trained segmenter on disk: ``model.safetensors`` + ``config.json`` (+ ``metadata.json``), loaded without pickle.

``config.json`` = {"network": NetworkConfig fields, "label_values": [...], "label_names": {...},
"target_spacing": [x, y, z] mm, "normalization": plan's normalization, "plan_hash": str,
"modalities": [...]} -- everything inference needs to rebuild the network and read new data on the plan's
grid. Weights are safetensors: loading never runs code from the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lesionflow.errors import LesionflowError
from lesionflow.files import atomic_path, write_json
from lesionflow.seg.networks import NetworkConfig, build_network

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METADATA = "metadata.json"


class ModelFilesError(LesionflowError):
    """A model folder that is missing files or holds weights that do not load."""


@dataclass(frozen=True)
class SegmenterConfig:
    network: NetworkConfig
    label_values: tuple[int, ...]
    label_names: dict[str, str]
    target_spacing: tuple[float, float, float]
    normalization: dict[str, Any]
    plan_hash: str
    modalities: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "network": self.network.to_dict(),
            "label_values": list(self.label_values),
            "label_names": dict(self.label_names),
            "target_spacing": list(self.target_spacing),
            "normalization": self.normalization,
            "plan_hash": self.plan_hash,
            "modalities": list(self.modalities),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmenterConfig:
        ts = d["target_spacing"]
        return cls(
            network=NetworkConfig.from_dict(d["network"]),
            label_values=tuple(int(v) for v in d["label_values"]),
            label_names={str(k): str(v) for k, v in d.get("label_names", {}).items()},
            target_spacing=(float(ts[0]), float(ts[1]), float(ts[2])),
            normalization=dict(d["normalization"]),
            plan_hash=str(d["plan_hash"]),
            modalities=tuple(str(m) for m in d.get("modalities", ())),
        )


def state_dict_cpu(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the weights (unwraps DDP / torch.compile wrappers)."""
    module = getattr(network, "module", network)
    module = getattr(module, "_orig_mod", module)
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_segmenter(folder: Path, network: torch.nn.Module, config: SegmenterConfig, metadata: dict[str, Any]) -> None:
    """Write weights, config and metadata into ``folder`` (created); files are replaced atomically."""
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state_dict_cpu(network), str(tmp))
    for name, payload in ((CONFIG, config.to_dict()), (METADATA, metadata)):
        write_json(folder / name, payload)


def load_segmenter(folder: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, SegmenterConfig]:
    """Rebuild the network from ``config.json`` and load ``model.safetensors`` (eval mode, on ``device``)."""
    folder = Path(folder)
    missing = [n for n in (WEIGHTS, CONFIG) if not (folder / n).is_file()]
    if missing:
        raise ModelFilesError(f"model folder {folder} lacks {', '.join(missing)}; point to a folder written by train")
    try:
        config = SegmenterConfig.from_dict(json.loads((folder / CONFIG).read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise ModelFilesError(
            f"{folder / CONFIG} is not a lesionflow model config ({err}); retrain or re-download"
        ) from None
    network = build_network(config.network)
    try:
        weights = load_file(str(folder / WEIGHTS), device="cpu")
        network.load_state_dict(weights)
    except (SafetensorError, RuntimeError, OSError) as err:
        first = str(err).splitlines()[0][:160]
        raise ModelFilesError(
            f"{folder / WEIGHTS} does not load ({first}); the file is corrupted or from another network"
        ) from None
    return network.to(device).eval(), config
