"""MLflow "models from code" entry point for a lesionflow segmenter (no pickled Python objects).

``register_model`` logs this file as ``python_model=`` together with the three model files as pyfunc
artifacts (``weights`` = model.safetensors, ``config`` = config.json, ``metadata`` = metadata.json). MLflow runs
this file when the model is loaded; :func:`mlflow.models.set_model` at the bottom hands it the instance.

``predict`` takes one preprocessed image -- a float32 array (c, x, y, z) already on the plan's grid and
normalized -- and returns the label map (x, y, z) in the model's label values (uint8 when they fit), computed
with a Gaussian-weighted sliding window over the training patch size.

``model_config`` (given at logging time) and ``params`` (given at predict time, declared in the logged
signature) may set ``overlap``, ``sw_batch_size`` and ``device`` ("auto", "cpu", "cuda", ...).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

ARTIFACT_FILES = {"weights": "model.safetensors", "config": "config.json", "metadata": "metadata.json"}
DEFAULTS: dict[str, Any] = {"overlap": 0.5, "sw_batch_size": 2, "device": "auto"}


def _model_folder(artifacts: dict[str, str]) -> Path:
    """A folder holding the model files under their canonical names (the artifacts' own folder when it does)."""
    paths = {key: Path(artifacts[key]) for key in ARTIFACT_FILES if key in artifacts}
    parents = {p.parent for p in paths.values()}
    if len(parents) == 1 and all(p.name == ARTIFACT_FILES[k] for k, p in paths.items()):
        return parents.pop()
    folder = Path(tempfile.mkdtemp(prefix="lesionflow-model-"))
    for key, path in paths.items():
        shutil.copyfile(path, folder / ARTIFACT_FILES[key])
    return folder


class LesionflowSegmenter(PythonModel):
    """Sliding-window inference with a network rebuilt by :func:`lesionflow.seg.model_files.load_segmenter`."""

    def load_context(self, context: Any) -> None:
        import torch

        from lesionflow.seg.model_files import load_segmenter

        self._options = {**DEFAULTS, **(getattr(context, "model_config", None) or {})}
        device = str(self._options["device"])
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self._network, self._config = load_segmenter(_model_folder(dict(context.artifacts)), device=self._device)

    # MLflow turns a type hint on ``model_input`` into input validation and signature inference, which have no
    # form for an n-d array (a warning at logging and loading, hint or not): the hint is left out and the
    # validation skipped; the logged signature (a float32 tensor) documents and checks the input instead.
    _skip_type_hint_validation = True

    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> Any:
        import torch
        from monai.inferers import sliding_window_inference

        options = {**self._options, **(params or {})}
        image = np.asarray(model_input, dtype=np.float32)
        if image.ndim == 3:
            image = image[None]
        expected = self._config.network.in_channels
        if image.ndim != 4 or image.shape[0] != expected:
            raise ValueError(
                f"expected a preprocessed image of shape ({expected}, x, y, z), got {tuple(image.shape)}; "
                "run the image through lesionflow preprocessing first"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(image))[None].to(self._device)
        with torch.inference_mode():
            logits = sliding_window_inference(
                tensor,
                roi_size=self._config.network.patch_size,
                sw_batch_size=int(options["sw_batch_size"]),
                predictor=self._network,
                overlap=float(options["overlap"]),
                mode="gaussian",
            )
            assert isinstance(logits, torch.Tensor)
            index = logits.argmax(dim=1)[0].to("cpu").numpy()
        values = np.asarray(self._config.label_values)
        dtype = np.uint8 if values.min() >= 0 and values.max() <= np.iinfo(np.uint8).max else np.int32
        return values.astype(dtype)[index]


mlflow.models.set_model(LesionflowSegmenter())
