"""Compose one synthetic case from a real one: choose lesion targets, generate them in ROIs, paste them back.

Pure computation (no file I/O): the synthesize stage reads the case and the generators and writes the result.
Three sample kinds, each a pure function of the arrays, the generators and the random generators it is given:

- ``relesion`` (LeFusion's P'): every usable real lesion of the case gets a new texture inside its own class
  masks (label unchanged);
- ``new`` (N'): spheres drawn from the training radii inside the organ, away from existing lesions; the mask is
  sampled by DiffMask (or is the sphere itself when no DiffMask was trained) with its voxel count matched to the
  training lesions' sizes (:func:`~lesionflow.synth.diffmask.generate_sized_mask`, sizes = ``layouts``' voxel
  counts, the gate's real side), its class layout borrowed from a real training lesion scaled to the sphere;
  then textured like a real lesion; label gains the lesion;
- ``remove``: one real lesion (dilated) refilled with healthy tissue by the unconditional DDPM; label cleared;
- ``paste`` (``synth.method: copy-paste``, the non-learned baseline; samples of kind ``new``): real training lesions
  copied voxel for voxel (image and label) to free spheres inside the organ, no generator involved.

Arrays are (c, x, y, z) images / (x, y, z) uint8 labels in the store's normalized units; ROIs are windows of the
volume ``[origin, origin + size)``. Only the voxels of a generation mask are written back into the volume, so
every voxel outside ``generated`` equals the source case bit for bit (the generators' final paste guarantees it
inside the ROI, the mask-only write outside it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from lesionflow.synth.histograms import HistogramBank
from lesionflow.synth.placement import Sphere, sample_spheres, sphere_mask
from lesionflow.synth.rois import Roi, crop, lesion_roi_problem, lesion_rois

Int3 = tuple[int, int, int]


@dataclass(frozen=True)
class Generators:
    """Everything sampling needs, loaded once per worker. ``texture`` is LeFusion or the DDPM (``method``)."""

    method: str
    texture: Any
    texture_settings: Any  # the method's params section: synth.lefusion or synth.ddpm
    class_values: tuple[int, ...]
    bank: HistogramBank | None
    histogram_mode: str
    explicit_histogram: tuple[float, ...]
    mask_model: Any | None
    mask_settings: Any | None
    radii: np.ndarray
    layouts: Sequence[Roi]  # real training lesion ROIs: class layouts for new lesions
    remover: Any | None = None
    remover_settings: Any | None = None


@dataclass(frozen=True)
class LesionRecord:
    """What was generated for one lesion (volume voxel coordinates), for the manifest and the gate."""

    origin: Int3
    classes: tuple[int, ...]
    voxels: int
    mask_source: str  # real | diffmask | sphere | removal | paste
    sphere: tuple[float, float, float, float] | None = None  # centre x, y, z, radius
    histogram: tuple[float, ...] = ()
    histogram_mode: str = ""
    cluster: int | None = None
    sphere_dice: float | None = None
    donor: str | None = None  # paste: "<case id>#<lesion index>" of the real training lesion that was copied


@dataclass
class ComposedSample:
    image: np.ndarray
    label: np.ndarray
    generated: np.ndarray  # uint8 (x, y, z): k + 1 where lesion k of ``lesions`` was generated, 0 elsewhere
    lesions: list[LesionRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _origin_for(centre: Sequence[float], size: Int3) -> Int3:
    o = np.rint(np.asarray(centre)).astype(int) - np.asarray(size) // 2
    return (int(o[0]), int(o[1]), int(o[2]))


def _paste(volume: np.ndarray, origin: Int3, roi_values: np.ndarray, mask: np.ndarray) -> None:
    """Write ``roi_values`` (..., *size) into ``volume`` (..., x, y, z) where ``mask`` (size) is set (in place)."""
    idx = np.argwhere(mask)
    pos = idx + np.asarray(origin)
    inside = np.all((pos >= 0) & (pos < np.asarray(volume.shape[-3:])), axis=1)
    idx, pos = idx[inside], pos[inside]
    volume[(..., *pos.T)] = roi_values[(..., *idx.T)]


def _marker(out: ComposedSample, roi_size: Int3) -> np.ndarray:
    """The ``generated`` value of the lesion about to be appended to ``out.lesions``: its index + 1."""
    k = len(out.lesions) + 1
    if k > 255:
        raise ValueError("more than 255 lesions in one synthetic sample: lower synth.lesions_per_sample")
    return np.full(roi_size, k, np.uint8)


def _histogram(gens: Generators, rng: np.random.Generator, present: np.ndarray) -> tuple[np.ndarray, str, int | None]:
    """A condition for the classes ``present`` (C bools) in the target; absent classes get the zero block."""
    assert gens.bank is not None
    if gens.histogram_mode == "explicit":
        draw = gens.bank.sample("explicit", rng, explicit=gens.explicit_histogram, present=present)
    else:
        draw = gens.bank.sample(gens.histogram_mode, rng, present=present)  # type: ignore[arg-type]
    return draw.histogram, draw.mode, draw.cluster


def _texture(
    gens: Generators,
    rois: list[np.ndarray],
    masks: list[np.ndarray],
    rng: np.random.Generator,
    torch_gen: torch.Generator,
) -> tuple[np.ndarray, list[tuple[np.ndarray, str, int | None]]]:
    """Generate texture in a batch of ROIs; ``masks`` are (C, *size) class masks. Returns (B, c, *size), conds."""
    if gens.method == "lefusion":
        from lesionflow.synth.lefusion import synthesize_batch

        conds = [_histogram(gens, rng, np.asarray(m.any(axis=(1, 2, 3)))) for m in masks]
        hist = np.stack([c[0] for c in conds]).astype(np.float32)
        out = synthesize_batch(
            gens.texture, gens.texture_settings, gens.class_values, np.stack(rois), np.stack(masks), hist, torch_gen
        )
        return out, conds
    from lesionflow.synth.inpaint import inpaint_batch

    unions = np.stack([m.any(axis=0) for m in masks])
    return inpaint_batch(gens.texture, gens.texture_settings, np.stack(rois), unions, torch_gen), [
        (np.zeros(0), "none", None) for _ in rois
    ]


def _sphere_tuple(sphere: Sphere, origin: Int3) -> tuple[float, float, float, float]:
    """(centre x, y, z, radius) of an ROI-coordinate sphere in volume coordinates."""
    c = [a + o for a, o in zip(sphere.centre, origin, strict=True)]
    return (c[0], c[1], c[2], sphere.radius)


def _class_masks(label_roi: np.ndarray, region: np.ndarray, class_values: Sequence[int]) -> np.ndarray:
    masks = np.stack([(label_roi == v) & region for v in class_values])
    if len(class_values) == 1:
        masks[0] = region  # one merged class: every lesion voxel belongs to it
    return masks


def _batched(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def relesion(
    image: np.ndarray,
    label: np.ndarray,
    organ: np.ndarray | None,
    gens: Generators,
    roi_size: Int3,
    *,
    min_voxels: int,
    batch: int,
    rng: np.random.Generator,
    torch_gen: torch.Generator,
) -> ComposedSample:
    """New texture for every real lesion that fits its ROI and does not touch the border."""
    out = ComposedSample(image.copy(), label.copy(), np.zeros(label.shape, np.uint8))
    usable = []
    for roi in lesion_rois(image, label, organ, roi_size, min_voxels=min_voxels):
        problem = lesion_roi_problem(roi, label.shape)  # the rule extract-rois trains with
        if problem is not None:
            out.notes.append(problem[1])
            continue
        usable.append(roi)
    for group in _batched(usable, batch):
        masks = [_class_masks(r.label, r.mask, gens.class_values) for r in group]
        generated, conds = _texture(gens, [r.image for r in group], masks, rng, torch_gen)
        for roi, gen_roi, m, (hist, mode, cluster) in zip(group, generated, masks, conds, strict=True):
            region = np.asarray(m.any(axis=0), dtype=bool)
            _paste(out.image, roi.origin, gen_roi, region)
            _paste(out.generated, roi.origin, _marker(out, roi_size), region)
            s = roi.sphere
            out.lesions.append(
                LesionRecord(
                    origin=roi.origin,
                    classes=roi.classes,
                    voxels=int(region.sum()),
                    mask_source="real",
                    sphere=None if s is None else _sphere_tuple(s, roi.origin),
                    histogram=tuple(float(v) for v in hist),
                    histogram_mode=mode,
                    cluster=cluster,
                )
            )
    return out


def borrowed_layout(mask: np.ndarray, sphere: Sphere, layout: Roi, class_values: Sequence[int]) -> np.ndarray:
    """(C, *size) class masks for a new lesion ``mask``: each voxel takes the class found at the corresponding
    position of the real lesion ``layout`` scaled onto ``sphere`` (nearest voxel); voxels mapping outside the
    real lesion take its most frequent class. One class: the mask itself."""
    if len(class_values) == 1:
        return mask[None].copy()
    assert layout.sphere is not None
    real = np.where(layout.mask, layout.label, 0)
    values, counts = np.unique(real[real > 0], return_counts=True)
    dominant = int(values[np.argmax(counts)]) if values.size else int(class_values[0])
    pts = np.argwhere(mask)
    scale = layout.sphere.radius / sphere.radius if sphere.radius > 0 else 1.0
    src = np.rint(np.asarray(layout.sphere.centre) + (pts - np.asarray(sphere.centre)) * scale).astype(int)
    ok = np.all((src >= 0) & (src < np.asarray(real.shape)), axis=1)
    classes = np.full(len(pts), dominant, np.uint8)
    found = np.zeros(len(pts), np.uint8)
    found[ok] = real[tuple(src[ok].T)]
    classes[found > 0] = found[found > 0]
    out = np.zeros((len(class_values), *mask.shape), bool)
    for c, v in enumerate(class_values):
        sel = pts[classes == v]
        out[(c, *sel.T)] = True
    return out


def new_lesions(
    image: np.ndarray,
    label: np.ndarray,
    organ: np.ndarray,
    gens: Generators,
    roi_size: Int3,
    *,
    count: int,
    batch: int,
    rng: np.random.Generator,
    torch_gen: torch.Generator,
) -> ComposedSample:
    """``count`` new lesions inside the organ, away from the case's lesions (DiffMask masks when trained)."""
    out = ComposedSample(image.copy(), label.copy(), np.zeros(label.shape, np.uint8))
    # Free organ: not within 2 voxels of a real lesion; radii that would not fit the ROI are left out.
    free = (organ > 0) & ~ndimage.binary_dilation(label > 0, iterations=2)
    radii = gens.radii[gens.radii < (min(roi_size) - 1) / 2]
    if radii.size == 0:
        out.notes.append(f"no training lesion radius fits synth.roi_size {list(roi_size)}")
        return out
    placement = sample_spheres(free, radii, count, rng, allow_overlap=False)
    out.notes += list(placement.notes)
    jobs: list[tuple[Sphere, Int3, np.ndarray, np.ndarray, float | None, str]] = []
    for sphere in placement.spheres:
        origin = _origin_for(sphere.centre, roi_size)
        local = Sphere(tuple(c - o for c, o in zip(sphere.centre, origin, strict=True)), sphere.radius)  # type: ignore[arg-type]
        organ_roi = crop((free).astype(np.uint8), origin, roi_size) > 0
        if gens.mask_model is not None:
            from lesionflow.synth.diffmask import SizeWindow, generate_sized_mask

            settings: Any = gens.mask_settings
            window = SizeWindow.from_sizes([r.voxels for r in gens.layouts], settings.size_quantiles)
            # one seed per lesion from the sample's stream: its size tries are (seed, k), reproducible in any worker
            sized = generate_sized_mask(
                gens.mask_model, settings, roi_size, local, organ_roi, window, int(rng.integers(2**62))
            )
            out.notes.append(sized.note)
            mask, dice, source = sized.sample.mask, sized.sample.sphere_dice, "diffmask"
        else:
            mask, dice, source = sphere_mask(roi_size, local.centre, local.radius) & organ_roi, 1.0, "sphere"
        if not mask.any():
            out.notes.append(f"empty mask for the sphere at {[round(c, 1) for c in sphere.centre]}; skipped")
            continue
        layout = gens.layouts[int(rng.integers(len(gens.layouts)))]
        jobs.append((sphere, origin, mask, borrowed_layout(mask, local, layout, gens.class_values), dice, source))
    for group in _batched(jobs, batch):
        rois = [crop(out.image, origin, roi_size) for _, origin, *_ in group]
        generated, conds = _texture(gens, rois, [j[3] for j in group], rng, torch_gen)
        for (sphere, origin, mask, masks, dice, source), gen_roi, (hist, mode, cluster) in zip(
            group, generated, conds, strict=True
        ):
            _paste(out.image, origin, gen_roi, mask)
            _paste(out.generated, origin, _marker(out, roi_size), mask)
            lab = np.zeros(roi_size, np.uint8)
            for c, v in enumerate(gens.class_values):
                lab[masks[c]] = v
            _paste(out.label, origin, lab, mask)
            out.lesions.append(
                LesionRecord(
                    origin=origin,
                    classes=tuple(int(v) for c, v in enumerate(gens.class_values) if masks[c].any()),
                    voxels=int(mask.sum()),
                    mask_source=source,
                    sphere=(*sphere.centre, sphere.radius),
                    histogram=tuple(float(v) for v in hist),
                    histogram_mode=mode,
                    cluster=cluster,
                    sphere_dice=dice,
                )
            )
    return out


def remove_lesion(
    image: np.ndarray,
    label: np.ndarray,
    organ: np.ndarray | None,
    gens: Generators,
    roi_size: Int3,
    *,
    which: int,
    min_voxels: int,
    torch_gen: torch.Generator,
) -> ComposedSample:
    """Lesion ``which`` (modulo the usable ones) refilled with healthy tissue; its label voxels set to 0."""
    from lesionflow.synth.inpaint import remove_lesion as refill

    out = ComposedSample(image.copy(), label.copy(), np.zeros(label.shape, np.uint8))
    rois = [
        r for r in lesion_rois(image, label, organ, roi_size, min_voxels=min_voxels) if int(r.mask.sum()) == r.voxels
    ]
    if not rois or gens.remover is None:
        out.notes.append("no lesion fits the ROI" if gens.remover is not None else "no ddpm generator for removal")
        return out
    roi = rois[which % len(rois)]
    filled, region = refill(gens.remover, gens.remover_settings, roi.image, roi.mask, torch_gen)  # type: ignore[arg-type]
    _paste(out.image, roi.origin, filled, region)
    _paste(out.generated, roi.origin, _marker(out, roi_size), region)
    _paste(out.label, roi.origin, np.zeros(roi_size, np.uint8), roi.mask)
    out.lesions.append(
        LesionRecord(origin=roi.origin, classes=roi.classes, voxels=int(region.sum()), mask_source="removal")
    )
    return out


def _donor_geometry(roi: Roi) -> tuple[np.ndarray, float]:
    """(anchor, radius) of a donor lesion in its ROI: the voxel nearest its centroid, and the largest distance
    (voxels) from that voxel to one of the lesion's voxels, so a sphere of that radius about the anchor holds it all."""
    pts = np.argwhere(roi.mask)
    anchor = np.rint(pts.mean(axis=0)).astype(int)
    return anchor, float(np.sqrt(((pts - anchor) ** 2).sum(axis=1).max()))


def paste_lesions(
    image: np.ndarray,
    label: np.ndarray,
    organ: np.ndarray | None,
    layouts: Sequence[Roi],
    roi_size: Int3,
    *,
    count: int,
    rng: np.random.Generator,
) -> ComposedSample:
    """``count`` real training lesions copied to new positions inside the organ: the copy-paste baseline.

    Contract. ``image`` is (c, x, y, z) in the store's normalized units, ``label`` / ``organ`` (x, y, z) uint8;
    ``layouts`` are the real training lesion ROIs of data/rois (each ``roi_size``, image (c, *roi_size) float32,
    ``mask`` the lesion, ``label`` its class values). A donor is used only when its whole lesion lies in its ROI
    (``mask.sum() == voxels``). Its bounding radius about the voxel nearest its centroid (the anchor) is its
    sphere radius, so :func:`~lesionflow.synth.placement.sample_spheres` draws a donor with its radius (uniform
    over the donors) and a centre in the free organ (organ voxels more than 2 voxels from any lesion of the case;
    spheres do not intersect); the sphere check covers every voxel within the radius, so the moved lesion lies
    entirely inside the free organ and the volume, never clipped. Donors too large for the organ are drawn again
    (up to the sampler's tries; a shortfall is noted, not raised).

    Exactness. The donor's lesion voxels (``mask``) are written with the anchor on the sphere centre, by integer
    translation only (no resampling, no blending): image values of every channel and label values exactly as in
    the donor (float32 in the ROI store, so a float16 or float32 case gets the source case's stored value back);
    every voxel outside the pasted masks equals the source bit for bit. ``generated`` is k + 1 on lesion k.
    The records have ``mask_source`` "paste", no histogram condition (``histogram_mode`` "none"), the donor's
    classes and voxel count, the placed sphere and ``donor`` "<case id>#<lesion index>"; ``origin`` is the donor
    ROI's window in this volume. A donor may come from the same case; the case's own lesions stay where they are.
    The result depends only on the arrays, the donors and ``rng``.
    """
    out = ComposedSample(image.copy(), label.copy(), np.zeros(label.shape, np.uint8))
    if organ is None or not np.any(organ):
        out.notes.append("no organ mask: nowhere to paste a lesion")
        return out
    donors: list[Roi] = []
    geometry: list[tuple[np.ndarray, float]] = []
    for roi in layouts:
        if roi.mask.shape != tuple(roi_size) or roi.image.shape[0] != image.shape[0]:
            raise ValueError(
                f"donor {roi.case_id}#{roi.index} has ROI {list(roi.mask.shape)} with {roi.image.shape[0]} channel(s); "
                f"expected {list(roi_size)} with {image.shape[0]}: rerun extract-rois with this synth.roi_size"
            )
        if roi.mask.any() and int(roi.mask.sum()) == roi.voxels:
            donors.append(roi)
            geometry.append(_donor_geometry(roi))
    if len(donors) < len(layouts):
        out.notes.append(f"{len(layouts) - len(donors)} of {len(layouts)} real lesions are not whole in their ROI")
    if not donors:
        out.notes.append("no real training lesion to paste")
        return out
    radii = np.asarray([r for _, r in geometry], dtype=np.float64)
    free = (organ > 0) & ~ndimage.binary_dilation(label > 0, iterations=2)
    placement = sample_spheres(free, radii, count, rng, allow_overlap=False)
    out.notes += list(placement.notes)
    for sphere in placement.spheres:
        same = np.flatnonzero(radii == sphere.radius)  # the sampler drew a radius: the donor is one of these
        d = int(same[int(rng.integers(len(same)))]) if len(same) > 1 else int(same[0])
        roi, (anchor, radius) = donors[d], geometry[d]
        o = np.asarray(sphere.centre).astype(int) - anchor  # sphere centres are voxel indices
        origin = (int(o[0]), int(o[1]), int(o[2]))
        pos = np.argwhere(roi.mask) + o
        if not (np.all((pos >= 0) & (pos < np.asarray(label.shape))) and free[tuple(pos.T)].all()):
            # unreachable with the sampler's exact sphere check; kept so nothing is ever pasted outside
            out.notes.append(f"donor {roi.case_id}#{roi.index} would leave the free organ at {list(origin)}; skipped")
            continue
        _paste(out.image, origin, roi.image, roi.mask)
        _paste(out.label, origin, roi.label, roi.mask)
        _paste(out.generated, origin, _marker(out, roi_size), roi.mask)
        out.lesions.append(
            LesionRecord(
                origin=origin,
                classes=roi.classes,
                voxels=int(roi.mask.sum()),
                mask_source="paste",
                sphere=(*sphere.centre, radius),
                histogram_mode="none",
                donor=f"{roi.case_id}#{roi.index}",
            )
        )
    return out
