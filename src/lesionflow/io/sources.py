"""Find the cases of a source: an MSD or nnU-Net ``dataset.json``, a loose folder of volumes, DICOM series.

Discovery only lists files and checks that they are safe to read (inside the source root, no symlink
escaping it, one case id per case, every id valid by :mod:`lesionflow.case_id`, the rule the stores apply);
it reads no voxels. Problems with one case become a
:class:`CaseRejected` in ``Discovery.rejected`` and the rest goes on; problems with the dataset as a
whole (malformed dataset.json, nothing found) raise :class:`SourceError`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lesionflow.case_id import INVALID_CODE, case_id_problem, safe_case_id
from lesionflow.errors import CaseRejected, SourceError
from lesionflow.io.volumes import strip_volume_suffix, volume_suffix

_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "-seg", "-label", "_gt")
_LABEL_DIRS = {"labels", "labelstr", "labelsts", "segmentations", "masks", "seg"}


@dataclass(frozen=True)
class CaseSource:
    """Where one case's files are. ``images`` holds one path per channel (nnU-Net) or one 3D/4D file."""

    case_id: str
    split: str
    images: tuple[Path, ...] = ()
    label: Path | None = None
    organ: Path | None = None
    dicom_series: Any = None  # lesionflow.io.dicom.DicomSeries for DICOM cases
    relative: str = ""  # path relative to the source root (DICOM: empty, folder names may hold names)

    @property
    def files(self) -> tuple[Path, ...]:
        if self.dicom_series is not None:
            return tuple(self.dicom_series.files)
        return tuple(p for p in (*self.images, self.label, self.organ) if p is not None)


@dataclass(frozen=True)
class DatasetInfo:
    """Dataset-level facts a source declares."""

    name: str
    modalities: tuple[str, ...]  # per channel; ("unknown",) when undeclared
    labels: dict[int, str]  # value -> name; empty when undeclared
    organ_mask: str = ""
    layout: str = "folder"  # msd | nnunet | folder | dicom


@dataclass
class Discovery:
    info: DatasetInfo
    cases: list[CaseSource] = field(default_factory=list)
    rejected: list[CaseRejected] = field(default_factory=list)


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _escapes(written: str) -> bool:
    """True when a path as written in dataset.json leaves the dataset folder (``../``, absolute)."""
    normal = os.path.normpath(written)
    return os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep)


def _check_file(root: Path, path: Path, case_id: str, what: str) -> CaseRejected | None:
    """Reject paths that escape the source (``../``, absolute, symlinks outside) or do not exist."""
    if path.is_symlink() and not _inside(root, path):
        return CaseRejected(
            case_id,
            "symlink_outside_source",
            f"{what} {path.name} is a symlink pointing outside the source; copy the file into the source",
        )
    if not _inside(root, path):
        shown = os.path.relpath(path, root)  # where it points, relative to the dataset folder
        return CaseRejected(
            case_id,
            "path_escapes_source",
            f"{what} path {shown!r} escapes the source folder; keep every file under {root.name}/",
        )
    if not path.exists():
        return CaseRejected(case_id, "missing_file", f"{what} {path.name} does not exist; fix the path or add the file")
    if not path.is_file():
        return CaseRejected(case_id, "not_a_file", f"{what} {path.name} is not a regular file")
    return None


def discover(source: Path, *, modality: str = "auto", labels: dict[int, str] | None = None) -> Discovery:
    """List the cases of a local source (a folder, or a dataset.json file)."""
    if source.is_file() and source.name.endswith(".json"):
        return _from_dataset_json(source)
    if not source.exists():
        raise SourceError(
            f"source {source} does not exist; set ingest.source to a folder, dataset.json or s3:// prefix"
        )
    if not source.is_dir():
        raise SourceError(
            f"source {source} is neither a folder nor a dataset.json; point ingest.source at the dataset folder"
        )
    if (source / "dataset.json").is_file():
        return _from_dataset_json(source / "dataset.json")
    return _from_folder(source, modality=modality, labels=labels or {})


# -- dataset.json (MSD and nnU-Net v2) ------------------------------------------------------------------


def _load_dataset_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SourceError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}); fix the file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(f"{path} cannot be read ({type(err).__name__}); check the file") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} must hold a JSON object, found {type(data).__name__}; see the MSD/nnU-Net format")
    return data


def _int_labels(raw: Any, path: Path, inverted: bool) -> dict[int, str]:
    if not isinstance(raw, dict):
        raise SourceError(f"{path}: 'labels' must be an object, found {type(raw).__name__}")
    out: dict[int, str] = {}
    for key, value in raw.items():
        number, name = (value, key) if inverted else (key, value)
        values = number if isinstance(number, list) else [number]  # nnU-Net regions list several values
        for v in values:
            try:
                out[int(v)] = str(name)
            except (TypeError, ValueError):
                raise SourceError(f"{path}: label {key!r} has value {v!r}; label values must be integers") from None
    return out


def _from_dataset_json(path: Path) -> Discovery:
    data = _load_dataset_json(path)
    root = path.parent
    if "training" in data or "modality" in data:
        return _msd(data, path, root)
    if "channel_names" in data:
        return _nnunet(data, path, root)
    raise SourceError(
        f"{path} is neither MSD (needs 'training' and 'modality') nor nnU-Net v2 (needs 'channel_names', 'labels', "
        "'file_ending'); fix dataset.json"
    )


def _msd(data: dict[str, Any], path: Path, root: Path) -> Discovery:
    modality = data.get("modality", {"0": "unknown"})
    if not isinstance(modality, dict) or not modality:
        raise SourceError(f'{path}: \'modality\' must be an object like {{"0": "CT"}}, found {modality!r}')
    try:
        channels = tuple(str(modality[k]) for k in sorted(modality, key=int))
    except ValueError:
        raise SourceError(f"{path}: 'modality' keys must be channel numbers, found {list(modality)}") from None
    labels = _int_labels(data.get("labels", {}), path, inverted=False)
    info = DatasetInfo(str(data.get("name", root.name)), channels, labels, str(data.get("organ_mask", "")), "msd")
    found = Discovery(info)
    for split, key in (("train", "training"), ("test", "test")):
        entries = data.get(key, [])
        if not isinstance(entries, list):
            raise SourceError(f"{path}: '{key}' must be a list, found {type(entries).__name__}")
        for index, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise SourceError(f"{path}: {key}[{index}] must be an object with an 'image' path, found {entry!r}")
            image = root / entry["image"]
            # An entry whose image path leaves the dataset is named by its own place in dataset.json
            # ("training[3]"), never by the file it points to (that name may be another case's, or /etc/passwd).
            # The brackets make it an invalid case id, so its quarantine folder cannot collide with a case's.
            escapes = _escapes(entry["image"])
            case_id = f"{key}[{index}]" if escapes else safe_case_id(strip_volume_suffix(Path(entry["image"]).name))
            files = {"image": image}
            for role in ("label", "organ"):
                if isinstance(entry.get(role), str):
                    files[role] = root / entry[role]
            problems = [p for role, f in files.items() if (p := _check_file(root, f, case_id, role)) is not None]
            if problems:
                found.rejected.append(problems[0])
                continue
            found.cases.append(
                CaseSource(
                    case_id,
                    split,
                    (image,),
                    files.get("label"),
                    files.get("organ"),
                    relative=entry["image"].removeprefix("./"),
                )
            )
    return _finish(found)


def _nnunet(data: dict[str, Any], path: Path, root: Path) -> Discovery:
    names = data["channel_names"]
    ending = data.get("file_ending")
    if not isinstance(names, dict) or not isinstance(ending, str) or volume_suffix("x" + ending) is None:
        raise SourceError(
            f"{path}: nnU-Net needs 'channel_names' (object) and 'file_ending' (.nii.gz, .nrrd, .mha), found {ending!r}"
        )
    channels = tuple(str(names[k]) for k in sorted(names, key=int))
    labels = _int_labels(data.get("labels", {}), path, inverted=True)
    found = Discovery(DatasetInfo(str(data.get("name", root.name)), channels, labels, "", "nnunet"))
    for split, images_dir, labels_dir in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        by_case: dict[str, dict[int, Path]] = {}
        for f in sorted((root / images_dir).glob(f"*{ending}")) if (root / images_dir).is_dir() else []:
            match = _NNUNET_CHANNEL.match(f.name[: -len(ending)])
            if match:
                by_case.setdefault(match["case"], {})[int(match["channel"])] = f
        for case, chans in sorted(by_case.items()):
            case_id = safe_case_id(case)
            missing = [c for c in range(len(channels)) if c not in chans]
            if missing:
                found.rejected.append(
                    CaseRejected(
                        case_id,
                        "missing_channel",
                        f"channel(s) {missing} missing; expected {case}_0000..{len(channels) - 1:04d}{ending}",
                    )
                )
                continue
            label = root / labels_dir / f"{case}{ending}"
            images = tuple(chans[c] for c in range(len(channels)))
            problem = next((p for f in images if (p := _check_file(root, f, case_id, "image")) is not None), None)
            if problem is None and label.exists():
                problem = _check_file(root, label, case_id, "label")
            if problem:
                found.rejected.append(problem)
                continue
            found.cases.append(
                CaseSource(case_id, split, images, label if label.exists() else None, relative=f"{images_dir}/{case}")
            )
    return _finish(found)


# -- loose folders and DICOM -----------------------------------------------------------------------------


def _is_label_file(root: Path, path: Path) -> bool:
    stem = strip_volume_suffix(path.name).lower()
    parents = {p.lower() for p in path.relative_to(root).parts[:-1]}
    return stem.endswith(_LABEL_SUFFIXES) or bool(parents & _LABEL_DIRS)


def _label_key(path: Path) -> str:
    stem = strip_volume_suffix(path.name)
    for suffix in _LABEL_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """Files under root (symlinked folders are not followed) and symlinks found on the way."""
    files: list[Path] = []
    links: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            p = Path(dirpath) / name
            (links if p.is_symlink() else files).append(p)
    return files, links


def _from_folder(root: Path, *, modality: str, labels: dict[int, str]) -> Discovery:
    from lesionflow.io import dicom

    files, links = _walk(root)
    found = Discovery(
        DatasetInfo(root.name, (modality if modality != "auto" else "unknown",), dict(labels), "", "folder")
    )
    for link in links:
        case_id = safe_case_id(strip_volume_suffix(link.name))
        if not _inside(root, link):
            found.rejected.append(
                _check_file(root, link, case_id, "file") or CaseRejected(case_id, "symlink", "symlink")
            )
        elif link.is_file():
            files.append(link)
    volumes = sorted(p for p in files if volume_suffix(p) is not None and not p.name.startswith("."))
    images = [p for p in volumes if not _is_label_file(root, p)]
    label_by_key = {_label_key(p): p for p in volumes if _is_label_file(root, p)}
    for image in images:
        stem = strip_volume_suffix(image.name)
        case_id = safe_case_id(stem)
        found.cases.append(
            CaseSource(case_id, "train", (image,), label_by_key.get(stem), relative=image.relative_to(root).as_posix())
        )
    if any(dicom.is_dicom_file(p) for p in files if volume_suffix(p) is None):
        found.info = DatasetInfo(
            found.info.name, found.info.modalities, found.info.labels, "", "dicom" if not images else "folder"
        )
        for series in dicom.find_series(root):
            # Case id and source path are set by ingest from a pseudonym: folder names may hold patient names.
            found.cases.append(CaseSource("", "train", dicom_series=series))
    return _finish(found)


def _finish(found: Discovery) -> Discovery:
    """Every discovery ends here: invalid case ids, then duplicate ones, become rejections."""
    return _dedupe(_reject_invalid_ids(found))


def _reject_invalid_ids(found: Discovery) -> Discovery:
    """A case whose id the stores would refuse is rejected now (quarantined by ingest), not in a worker later.

    DICOM series have no id yet (ingest gives them a pseudonym, valid by construction)."""
    kept = []
    for case in found.cases:
        problem = case_id_problem(case.case_id) if case.case_id or case.dicom_series is None else None
        if problem is None:
            kept.append(case)
        else:
            where = f" (source: {case.relative})" if case.relative else ""
            found.rejected.append(CaseRejected(case.case_id, INVALID_CODE, problem + where))
    found.cases = kept
    return found


def _dedupe(found: Discovery) -> Discovery:
    """Several sources claiming one case id: all of them are rejected (which one is right is not ours to guess)."""
    counts: dict[str, list[CaseSource]] = {}
    for case in found.cases:
        counts.setdefault(case.case_id, []).append(case)
    kept = []
    for case_id, group in counts.items():
        if case_id and len(group) > 1:
            where = ", ".join(c.relative for c in group)
            found.rejected.append(
                CaseRejected(
                    case_id,
                    "duplicate_case_id",
                    f"{len(group)} sources share this case id ({where}); rename all but one",
                )
            )
        else:
            kept.extend(group)
    found.cases = kept
    return found
