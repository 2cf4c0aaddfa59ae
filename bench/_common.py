"""Shared helpers for the benchmarks in bench/ (not a benchmark itself).

* demo data and its conversion to nnU-Net v2 raw format;
* a lesionflow workspace in a temp folder and a stage runner (in process, or in a child process so that
  its process tree can be watched);
* :class:`TreeSampler`, which polls psutil over a process tree every 50 ms and keeps each process's peak RSS;
* locating the separate nnU-Net venv (``--nnunet-venv``) and the env vars nnU-Net needs.

The scripts run with the project venv (``.venv/bin/python bench/<name>.py``); nnU-Net runs from its own venv
through subprocesses, so nothing of it is imported here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from lesionflow.quiet_env import apply_quiet_env

REPO = Path(__file__).resolve().parent.parent
PROJECT_PYTHON = Path(sys.executable)
DEFAULT_NNUNET_VENV = Path("/tmp/bench-venv-nnunet")  # .gitignore ignores only `.venv/`, so not in the checkout
NNUNET_DATASET_ID = 501
NNUNET_DATASET_NAME = f"Dataset{NNUNET_DATASET_ID:03d}_LesionflowBench"

# Telemetry off, as the CLI does; nothing here needs the network.
apply_quiet_env()


# -- demo data -------------------------------------------------------------------------------------------


def build_demo(kind: str, cases: int, size: int, out: Path, seed: int = 0) -> dict[str, Any]:
    """Build the MSD demo dataset; return its dataset.json."""
    from lesionflow.demo import build_demo_dataset

    build_demo_dataset(kind, cases, out, seed, size=size)
    return json.loads((out / "dataset.json").read_text())


def to_nnunet_raw(msd: Path, raw_root: Path, *, splits: Sequence[str] = ("training",)) -> Path:
    """Copy the MSD demo into nnU-Net v2 raw layout (``DatasetXXX_Name``); returns the dataset folder.

    Only the given dataset.json lists go to imagesTr/labelsTr (nnU-Net preprocesses imagesTr only). The demo
    is single-channel 3D NIfTI, so files are copied byte for byte (``{case}_0000.nii.gz``, ``{case}.nii.gz``).
    """
    data = json.loads((msd / "dataset.json").read_text())
    if len(data["modality"]) != 1:
        raise ValueError("the benchmark converts single-channel datasets only")
    out = raw_root / NNUNET_DATASET_NAME
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    n = 0
    for split in splits:
        for entry in data[split]:
            case = Path(entry["image"]).name.removesuffix(".nii.gz")
            shutil.copyfile(msd / entry["image"], out / "imagesTr" / f"{case}_0000.nii.gz")
            shutil.copyfile(msd / entry["label"], out / "labelsTr" / f"{case}.nii.gz")
            n += 1
    labels = {name: int(value) for value, name in data["labels"].items()}
    doc = {
        "name": NNUNET_DATASET_NAME,
        "channel_names": {k: v for k, v in data["modality"].items()},
        "labels": labels,
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    (out / "dataset.json").write_text(json.dumps(doc, indent=2) + "\n")
    return out


def volume_shapes(folder: Path) -> list[tuple[int, ...]]:
    """Shapes of the images under ``folder/imagesTr`` (header only)."""
    import nibabel as nib

    return [tuple(nib.load(p).shape) for p in sorted((folder / "imagesTr").glob("*.nii.gz"))]


# -- lesionflow workspace and stages ---------------------------------------------------------------------


def make_workspace(root: Path) -> Path:
    """A fresh workspace at ``root`` with the project's params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "params.yaml", root / "params.yaml")
    return root


def run_stages(root: Path, names: Sequence[str], overrides: Sequence[str]) -> list[dict[str, Any]]:
    """Run stages in this process through ``run_cached``; per stage: name, seconds, cached, ok, summary."""
    from lesionflow.caching import run_cached
    from lesionflow.params import load_params
    from lesionflow.stages.registry import STAGES
    from lesionflow.workspace import Workspace

    ws = Workspace.at(root)
    params = load_params(ws.params_file, list(overrides))
    out = []
    for name in names:
        t0 = time.perf_counter()
        result = run_cached(name, ws, params, STAGES[name].run)
        seconds = time.perf_counter() - t0
        out.append(
            {"stage": name, "seconds": seconds, "cached": result.cached, "ok": result.ok, "summary": result.summary}
        )
        if not result.ok:
            raise RuntimeError(f"stage {name} failed: {result.summary} {[f.line() for f in result.findings]}")
    return out


def stage_command(root: Path, names: Sequence[str], overrides: Sequence[str], report: Path) -> list[str]:
    """Command line that runs :func:`run_stages` in a child process (project venv) and writes JSON to ``report``."""
    args = [str(PROJECT_PYTHON), str(Path(__file__).resolve()), "stages", str(root), str(report), ",".join(names)]
    return [*args, *overrides]


# -- process-tree memory sampling -------------------------------------------------------------------------


@dataclass
class ProcInfo:
    pid: int
    ppid: int
    depth: int  # 0 = the root process
    name: str
    cmdline: str
    peak_rss: int = 0
    first_rss: int = 0


@dataclass
class TreeSampler:
    """Poll the RSS of ``root_pid`` and all its descendants every ``interval`` s (a background thread)."""

    root_pid: int
    interval: float = 0.05
    procs: dict[int, ProcInfo] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for proc in tree:
                try:
                    rss = proc.memory_info().rss
                    info = self.procs.get(proc.pid)
                    if info is None:
                        depth, parent = 0, proc
                        while parent.pid != self.root_pid and depth < 16:
                            parent = parent.parent() or root
                            depth += 1
                        info = ProcInfo(proc.pid, proc.ppid(), depth, proc.name(), " ".join(proc.cmdline())[:300])
                        info.first_rss = rss
                        self.procs[proc.pid] = info
                    info.peak_rss = max(info.peak_rss, rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.samples += 1
            self._stop.wait(self.interval)

    def root_peak(self) -> int:
        info = self.procs.get(self.root_pid)
        return info.peak_rss if info else 0

    def children(self) -> list[ProcInfo]:
        return [p for p in self.procs.values() if p.pid != self.root_pid]


def run_watched(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, log: Path | None = None
) -> tuple[float, int, TreeSampler, list[tuple[float, str]]]:
    """Run ``cmd``, sampling its process tree.

    Returns (wall seconds, return code, sampler, output lines with the second each was seen); the output
    (stdout and stderr together) is also written to ``log``.
    """
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    with TreeSampler(proc.pid) as sampler:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if log is not None:
        log.write_text("".join(f"[{t:8.2f}] {text}\n" for t, text in lines))
    return wall, rc, sampler, lines


def baseline_rss(python: Path, imports: str, env: dict[str, str] | None = None) -> int:
    """RSS of a fresh ``python`` process after ``imports`` (what an idle worker costs before any data)."""
    code = f"{imports}\nimport psutil, os\nprint(psutil.Process(os.getpid()).memory_info().rss)"
    if "psutil" not in imports:
        # the nnU-Net venv may lack psutil: read /proc instead
        code = (
            f"{imports}\nimport os\nprint(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))"
        )
    out = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


# -- nnU-Net ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NnUNet:
    venv: Path
    version: str

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def find_nnunet(venv: Path) -> tuple[NnUNet | None, str]:
    """(nnU-Net handle, "") when ``venv`` has a working nnunetv2, else (None, why not)."""
    python = venv / "bin" / "python"
    if not python.exists():
        return None, f"no Python at {python}: create the venv (see the docstring of bench/preprocess_vs_nnunet.py)"
    probe = "import importlib.metadata as m, nnunetv2, blosc2, torch; print(m.version('nnunetv2'))"
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"nnunetv2 does not import in {venv}: {tail}"
    return NnUNet(venv, out.stdout.strip()), ""


def nnunet_env(base: Path) -> dict[str, str]:
    """Environment with nnUNet_raw / nnUNet_preprocessed / nnUNet_results under ``base`` (created)."""
    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (base / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(base / sub)
    env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"  # line timestamps of its log mark its phases
    return env


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _stages_main(argv: list[str]) -> None:
    root, report, names, *overrides = argv
    results = run_stages(Path(root), names.split(","), overrides)
    Path(report).write_text(json.dumps(results))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "stages":
        _stages_main(sys.argv[2:])
    else:
        sys.exit("usage: _common.py stages <workspace> <report.json> <stage,stage,...> [key=value ...]")


# -- scaffolding shared by the scripts ---------------------------------------------------------------------


@contextmanager
def workdir(prefix: str, keep: bool) -> Iterator[Path]:
    """A temporary folder for one benchmark run, removed afterwards unless ``keep``."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def timed_reads(read: Callable[[str, list[float]], int], plan: Sequence[Any], warm: Sequence[Any]) -> tuple[float, int]:
    """Warm up with ``warm``, then time ``read(case, rel)`` over ``plan``; returns (seconds, voxels read)."""
    for case, rel in warm:
        read(case, rel)
    voxels, t0 = 0, time.perf_counter()
    for case, rel in plan:
        voxels += read(case, rel)
    return time.perf_counter() - t0, voxels
