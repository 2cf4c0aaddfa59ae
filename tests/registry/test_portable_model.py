"""Issue 19 item 4: the registered pyfunc model loads in a clean environment holding only its logged requirements.

The environment is built without a network: a folder of links to the installed distributions that the model's
``requirements.txt`` names, plus everything they require (their metadata's ``Requires-Dist``, markers evaluated),
and nothing else -- lesionflow's editable install is not among them. A child interpreter started with ``-I -S``
(no site-packages, no user site, no PYTHONPATH) sees the standard library and that folder only.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lesionflow.registry.tracking import mlflow_session
from tests.registry.conftest import MODEL_NAME, Registered


def _closure(requirements: list[str]) -> dict[str, Distribution]:
    """Installed distributions named by ``requirements`` and, transitively, by their own requirements."""
    found: dict[str, Distribution] = {}
    todo = [(Requirement(r), frozenset({""})) for r in requirements]
    while todo:
        req, _ = todo.pop()
        key = canonicalize_name(req.name)
        if key in found:
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue  # an optional platform package (e.g. a GPU runtime) not installed here
        found[key] = dist
        extras = {""} | set(req.extras)
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append((sub, frozenset()))
    return found


def _clean_site(dists: dict[str, Distribution], site: Path) -> None:
    """Link each distribution's top-level files and folders (and its .dist-info) into ``site``."""
    site.mkdir()
    for dist in dists.values():
        base = Path(str(dist.locate_file("")))
        for file in dist.files or []:
            top = Path(file).parts[0]
            if top in ("..", "bin") or (site / top).exists():
                continue
            if (base / top).exists():
                (site / top).symlink_to(base / top)


_LOAD = """
import sys
import site
site.addsitedir(sys.argv[1])
import numpy as np
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[2])
labels = model.predict(np.zeros((1, 20, 24, 18), dtype=np.float32))
print("labels", labels.shape, labels.dtype)
"""


def test_the_registered_model_loads_with_only_its_logged_requirements(registered: Registered, tmp_path: Path) -> None:
    import mlflow.artifacts

    with mlflow_session(registered.tracking_uri):
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion", dst_path=str(tmp_path)))
    logged = [line.strip() for line in (local / "requirements.txt").read_text().splitlines() if line.strip()]
    assert not [r for r in logged if canonicalize_name(Requirement(r).name) == "lesionflow"]  # not on PyPI
    dists = _closure(logged)
    assert "mlflow" in dists
    assert "torch" in dists
    assert "lesionflow" not in dists
    _clean_site(dists, tmp_path / "site")
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _LOAD, str(tmp_path / "site"), str(local)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "labels (20, 24, 18) uint8" in proc.stdout
    # and the same interpreter without the model's own code cannot import lesionflow: the check is not vacuous
    bare = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import site, sys; site.addsitedir(sys.argv[1]); import lesionflow",
         str(tmp_path / "site")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert bare.returncode != 0
    assert "No module named 'lesionflow'" in bare.stderr
