"""LeFusion end to end on CPU (toy): train on lesion ROIs, then generate inside a mask with RePaint; one class and
two classes (§2.7: tiled image, per-block masked loss, concatenated histograms, merge rule)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lesionflow.diffusion.samplers import count_network_evaluations
from lesionflow.diffusion.trainer import eps_loss
from lesionflow.diffusion.unet import ConditionalUNet3D
from lesionflow.params_synth import LeFusionParams
from lesionflow.seeding import torch_generator
from lesionflow.synth.lefusion import (
    checked_classes,
    class_masks,
    classes_without_lesions,
    lesion_conditions,
    lesion_value_range,
    make_model,
    noise_schedule,
    rois_with_classes,
    sampling_settings,
    synthesize_batch,
    synthesize_in_roi,
    train_lefusion,
    training_batches,
)
from lesionflow.synth.placement import sphere_mask
from lesionflow.synth.rois import Roi, lesion_rois

SIZE = (16, 16, 16)


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 32³ z-scored-like image with two bright spheres (label 1) of different textures."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 0.3, (1, 32, 32, 32)).astype(np.float32)
    label = np.zeros((32, 32, 32), np.uint8)
    for centre, level in (((9, 10, 11), 1.5), ((22, 21, 20), 2.5)):
        ball = sphere_mask((32, 32, 32), centre, 3.5)
        label[ball] = 1
        image[0][ball] = level + rng.normal(0, 0.2, int(ball.sum()))
    return image, label


@pytest.fixture(scope="module")
def rois() -> list[Roi]:
    out = []
    for seed in range(3):
        image, label = _case(seed)
        out += lesion_rois(image, label, None, SIZE, case_id=f"c{seed}")
    return out


def test_conditions_and_batches_are_deterministic(rois: list[Roi]) -> None:
    conds = lesion_conditions(rois, LeFusionParams(), (1,))
    assert conds.shape == (6, 16)
    np.testing.assert_allclose(conds.sum(axis=1), 1.0)
    batches = training_batches(rois, conds, 4, seed=3)
    a, b = batches(7), batches(7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["image"].shape == (4, 1, *SIZE)
    assert a["mask"].shape == (4, 1, *SIZE)
    assert a["cond"].shape == (4, 16)
    assert not torch.equal(batches(8)["image"], a["image"])


def test_train_then_generate_keeps_the_background_exact(rois: list[Roi], tmp_path: Path) -> None:
    settings = LeFusionParams(
        timesteps=10, jump_length=2, jump_n_sample=2, bank_k=2,
        steps=6, batch_size=2, learning_rate=1e-3, ema_decay=0.5, checkpoint_every=3,
    )  # fmt: skip
    outcome, bank = train_lefusion(rois, settings, (1,), tmp_path / "ckpt", seed=0)
    assert outcome.steps_done == 6
    assert len(outcome.history) == 6
    assert bank.k == 2
    settings = sampling_settings(settings, bank.value_range)  # sample with the range recorded in the bank
    target = rois[0].image
    mask = sphere_mask(SIZE, (8, 8, 8), 3.0)
    hist = bank.sample("cluster", np.random.default_rng(0)).histogram
    calls = []
    model = outcome.ema
    original_forward = model.forward

    def counting_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original_forward(*args, **kwargs)

    model.forward = counting_forward  # type: ignore[method-assign]
    out = synthesize_in_roi(model, settings, (1,), target, mask, hist, torch_generator(0, "sample", 1))
    assert len(calls) == count_network_evaluations(10, 2, 2)
    assert out.shape == target.shape
    assert np.array_equal(out[0][~mask], target[0][~mask])  # bitwise, outside the lesion
    assert not np.array_equal(out[0][mask], target[0][mask])
    assert np.isfinite(out).all()
    again = synthesize_in_roi(model, settings, (1,), target, mask, hist, torch_generator(0, "sample", 1))
    assert np.array_equal(out, again)
    other = synthesize_in_roi(model, settings, (1,), target, mask, hist, torch_generator(0, "sample", 2))
    assert not np.array_equal(out, other)
    with pytest.raises(ValueError, match="empty"):
        synthesize_in_roi(model, settings, (1,), target, np.zeros(SIZE, bool), hist, torch_generator(0))


# --------------------------------------------------------------------------- multi-class (§2.7)

TWO = LeFusionParams(
    timesteps=6, jump_length=2, jump_n_sample=2, bank_k=2, value_range=(-3.0, 3.0),
    steps=3, batch_size=2, learning_rate=1e-3, ema_decay=0.5, checkpoint_every=3,
)  # fmt: skip
CLASSES = (3, 4)


def _two_class_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two lesions: one of class 3 with a class-4 core (EMIDEC-like MI + PMO), one of class 3 only."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 0.3, (1, 32, 32, 32)).astype(np.float32)
    label = np.zeros((32, 32, 32), np.uint8)
    for centre, core in (((9, 10, 11), True), ((22, 21, 20), False)):
        ball = sphere_mask((32, 32, 32), centre, 3.5)
        label[ball] = 3
        image[0][ball] = 1.0 + rng.normal(0, 0.1, int(ball.sum()))
        if core:
            inner = sphere_mask((32, 32, 32), centre, 1.8)
            label[inner] = 4
            image[0][inner] = -1.0 + rng.normal(0, 0.1, int(inner.sum()))
    return image, label


@pytest.fixture(scope="module")
def two_class_rois() -> list[Roi]:
    out: list[Roi] = []
    for seed in range(2):
        image, label = _two_class_case(seed)
        out += lesion_rois(image, label, None, SIZE, case_id=f"m{seed}")
    return out


@pytest.fixture(scope="module")
def two_class_model(two_class_rois: list[Roi], tmp_path_factory: pytest.TempPathFactory) -> ConditionalUNet3D:
    outcome, bank = train_lefusion(two_class_rois, TWO, CLASSES, tmp_path_factory.mktemp("ckpt2"), seed=0)
    assert bank.n_classes == 2
    assert outcome.steps_done == 3
    assert all(np.isfinite(outcome.history))
    model = outcome.ema
    assert isinstance(model, ConditionalUNet3D)
    assert (model.config.in_channels, model.config.out_channels, model.config.cond_dim) == (2, 2, 32)
    return model


def test_class_masks_and_absent_classes(two_class_rois: list[Roi]) -> None:
    label = np.zeros((4, 4, 4), np.uint8)
    label[0] = 3
    label[1] = 4
    label[2] = 7
    lesion = np.zeros((4, 4, 4), bool)
    lesion[:2, :2] = True  # rows 0 and 1 of the lesion only; label 7 is another lesion in the window
    masks = class_masks(label, lesion, (3, 4, 5))
    assert masks.shape == (3, 4, 4, 4)
    assert np.array_equal(masks[0], (label == 3) & lesion)
    assert np.array_equal(masks[1], (label == 4) & lesion)
    assert not masks[2].any()
    assert np.array_equal(class_masks(label, lesion, (1,))[0], lesion)  # binary model: the whole lesion
    with pytest.raises(ValueError, match="shape"):
        class_masks(label, lesion[0], (3, 4))
    assert classes_without_lesions(two_class_rois, (3, 4, 5)) == [5]
    cores = [r for r in two_class_rois if 4 in r.classes]
    assert classes_without_lesions([r for r in two_class_rois if r not in cores], (3, 4)) == [4]
    assert len(rois_with_classes(two_class_rois, (5, 6))) == 0


def test_two_class_conditions_and_batches(two_class_rois: list[Roi]) -> None:
    conds = lesion_conditions(two_class_rois, TWO, CLASSES)
    assert conds.shape == (4, 32)
    has_core = np.array([4 in r.classes for r in two_class_rois])
    np.testing.assert_allclose(conds[:, :16].sum(axis=1), 1.0)
    np.testing.assert_allclose(conds[:, 16:].sum(axis=1), has_core.astype(float))  # zeros block when absent
    # class 3 is bright (+1), class 4 dark (-1): the blocks peak in different bins
    bins = np.linspace(-3, 3, 17)
    centres = (bins[:-1] + bins[1:]) / 2
    assert (conds[:, :16] @ centres > 0.5).all()
    assert (conds[has_core, 16:] @ centres < -0.5).all()
    with pytest.raises(ValueError, match="no voxel of classes"):
        lesion_conditions(two_class_rois, TWO, (5, 6))
    with pytest.raises(ValueError, match=r"distinct label values in 1\.\.255"):
        checked_classes((3, 3))
    batches = training_batches(two_class_rois, conds, 3, seed=1, params=TWO, class_values=CLASSES)
    a = batches(2)
    assert all(torch.equal(a[k], batches(2)[k]) for k in a)
    assert a["image"].shape == (3, 2, *SIZE)
    assert a["mask"].shape == (3, 2, *SIZE)
    assert a["cond"].shape == (3, 32)
    assert torch.equal(a["image"][:, 0], a["image"][:, 1])  # the image tiled once per class
    assert not (a["mask"][:, 0] * a["mask"][:, 1]).any()  # class 3 and class 4 voxels are disjoint
    with pytest.raises(ValueError, match="conditions shape"):
        training_batches(two_class_rois, conds[:, :16], 3, seed=1, params=TWO, class_values=CLASSES)


def test_masked_loss_gradient_is_zero_on_each_blocks_background(two_class_rois: list[Roi]) -> None:
    conds = lesion_conditions(two_class_rois, TWO, CLASSES)
    batch = training_batches(two_class_rois, conds, 4, seed=2, params=TWO, class_values=CLASSES)(0)

    class Fixed(torch.nn.Module):
        """A 'network' whose prediction is a free tensor: its gradient is d loss / d prediction."""

        def __init__(self) -> None:
            super().__init__()
            self.pred = torch.nn.Parameter(torch.zeros(batch["image"].shape))

        def forward(self, x, t, cond=None, *, drop_cond=None):  # type: ignore[no-untyped-def]
            return self.pred

    for normalize in ("all", "mask"):
        fixed = Fixed()
        loss = eps_loss(
            fixed, batch, torch.Generator().manual_seed(0), schedule=noise_schedule(TWO), normalize=normalize
        )
        loss.backward()
        grad = fixed.pred.grad
        assert grad is not None
        for block in range(2):
            inside = batch["mask"][:, block] > 0
            assert inside.any()
            assert not grad[:, block][~inside].any()  # background of this block, incl. the other class's voxels
            assert (grad[:, block][inside] != 0).all()


def test_merge_rule_inside_and_outside_the_class_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a stand-in sampler that fills block k with the value 10 + k, the merge is visible in the output."""
    import lesionflow.synth.lefusion as lefusion

    def fake_repaint(eps_fn, known, mask, schedule, **kwargs):  # type: ignore[no-untyped-def]
        fill = torch.arange(known.shape[1], dtype=known.dtype)[None, :, None, None, None] + 10
        return torch.where(mask, fill.expand_as(known), known)

    monkeypatch.setattr(lefusion, "repaint_sample", fake_repaint)
    image = np.random.default_rng(0).normal(size=(1, *SIZE)).astype(np.float32)
    masks = np.zeros((2, *SIZE), bool)
    masks[0, 4:10, 4:10, 4:10] = True
    masks[1, 6:12, 6:12, 6:12] = True  # overlaps class 0: the later class wins
    model = make_model(1, TWO, CLASSES)
    hist = np.full(32, 1 / 16)
    out = synthesize_in_roi(model, TWO, CLASSES, image, masks, hist, torch.Generator().manual_seed(0))
    union = masks.any(axis=0)
    assert np.array_equal(out[0][~union], image[0][~union])
    assert (out[0][masks[1]] == 11).all()
    assert (out[0][masks[0] & ~masks[1]] == 10).all()


def test_two_class_generation_keeps_the_background_exact(
    two_class_rois: list[Roi],
    two_class_model: ConditionalUNet3D,
) -> None:
    roi = next(r for r in two_class_rois if 4 in r.classes)
    masks = class_masks(roi.label, roi.mask, CLASSES)
    union = masks.any(axis=0)
    hist = lesion_conditions([roi], TWO, CLASSES)[0]
    out = synthesize_in_roi(two_class_model, TWO, CLASSES, roi.image, masks, hist, torch_generator(0, "mc", 1))
    assert out.shape == roi.image.shape
    assert out.dtype == np.float32
    assert np.array_equal(out[:, ~union], roi.image[:, ~union])
    assert not np.array_equal(out[:, union], roi.image[:, union])
    assert np.isfinite(out).all()
    again = synthesize_in_roi(two_class_model, TWO, CLASSES, roi.image, masks, hist, torch_generator(0, "mc", 1))
    assert np.array_equal(out, again)
    with pytest.raises(ValueError, match="expected 32"):
        synthesize_in_roi(two_class_model, TWO, CLASSES, roi.image, masks, hist[:16], torch_generator(0))
    with pytest.raises(ValueError, match="mask shape"):
        synthesize_in_roi(two_class_model, TWO, CLASSES, roi.image, masks[:1], hist, torch_generator(0))
    with pytest.raises(ValueError, match="class masks"):
        synthesize_in_roi(two_class_model, TWO, CLASSES, roi.image, union, hist, torch_generator(0))
    with pytest.raises(ValueError, match="empty"):
        synthesize_in_roi(two_class_model, TWO, CLASSES, roi.image, np.zeros_like(masks), hist, torch_generator(0))


def test_batch_matches_single_item_semantics(
    two_class_rois: list[Roi],
    two_class_model: ConditionalUNet3D,
) -> None:
    images = np.stack([r.image for r in two_class_rois[:3]])
    masks = np.stack([class_masks(r.label, r.mask, CLASSES) for r in two_class_rois[:3]])
    hists = lesion_conditions(two_class_rois[:3], TWO, CLASSES)
    out = synthesize_batch(two_class_model, TWO, CLASSES, images, masks, hists, torch_generator(0, "batch"))
    single = synthesize_in_roi(two_class_model, TWO, CLASSES, images[0], masks[0], hists[0], torch_generator(0, "one"))
    assert out.shape == images.shape
    assert out[0].shape == single.shape
    for i in range(3):
        union = masks[i].any(axis=0)
        assert np.array_equal(out[i][:, ~union], images[i][:, ~union])
        assert not np.array_equal(out[i][:, union], images[i][:, union])
    assert np.array_equal(
        out, synthesize_batch(two_class_model, TWO, CLASSES, images, masks, hists, torch_generator(0, "batch"))
    )
    bad = masks.copy()
    bad[1] = False
    with pytest.raises(ValueError, match=r"empty for item\(s\) \[1\]"):
        synthesize_batch(two_class_model, TWO, CLASSES, images, bad, hists, torch_generator(0))
    with pytest.raises(ValueError, match="histograms"):
        synthesize_batch(two_class_model, TWO, CLASSES, images, masks, hists[:2], torch_generator(0))
    with pytest.raises(ValueError, match="masks shape"):
        synthesize_batch(two_class_model, TWO, CLASSES, images, masks[:, :1], hists, torch_generator(0))


def test_histogram_of_an_absent_class_must_be_the_zero_block() -> None:
    """The network saw the zero block for a class the lesion lacks: a draw for it elsewhere is refused."""
    image = np.zeros((1, *SIZE), np.float32)
    masks = np.zeros((2, *SIZE), bool)
    masks[0, 4:10, 4:10, 4:10] = True  # class 3 only
    model = make_model(1, TWO, CLASSES)
    with pytest.raises(ValueError, match="histogram block of class 4 is non-zero but its class mask is empty"):
        synthesize_in_roi(model, TWO, CLASSES, image, masks, np.full(32, 1 / 16), torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- value range from the data


def _bright_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lesions at +4.5 z (up to ~+5): brighter than the former fixed range (-3, 3)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 0.3, (1, 32, 32, 32)).astype(np.float32)
    label = np.zeros((32, 32, 32), np.uint8)
    for centre in ((9, 10, 11), (22, 21, 20)):
        ball = sphere_mask((32, 32, 32), centre, 3.5)
        label[ball] = 1
        image[0][ball] = 4.5 + rng.uniform(-0.5, 0.5, int(ball.sum()))
    return image, label


def test_value_range_is_derived_from_the_training_lesions(tmp_path: Path) -> None:
    rois = [r for seed in range(2) for r in lesion_rois(*_bright_case(seed), None, SIZE, case_id=f"b{seed}")]
    settings = LeFusionParams(
        timesteps=6, jump_length=2, jump_n_sample=2, bank_k=2,
        steps=4, batch_size=2, learning_rate=1e-3, ema_decay=0.5, checkpoint_every=4,
    )  # fmt: skip
    assert settings.value_range is None  # the default: derive
    lo, hi = lesion_value_range(rois, (1,))
    voxels = np.concatenate([r.image[0][r.mask] for r in rois])
    assert lo < np.percentile(voxels, 0.5)
    assert hi > np.percentile(voxels, 99.5) > 4.9
    outcome, bank = train_lefusion(rois, settings, (1,), tmp_path / "ckpt", seed=0)
    model = outcome.ema
    assert isinstance(model, ConditionalUNet3D)
    assert bank.value_range == (lo, hi)  # recorded with the generator (its bank goes into config.json)
    # the bright lesions fill the upper bins of the derived support instead of piling into the last bin
    assert lesion_conditions(rois, settings, (1,))[:, -1].max() < 0.5
    with pytest.raises(ValueError, match="value_range is None at sampling"):
        synthesize_in_roi(model, settings, (1,), rois[0].image, rois[0].mask, bank.histograms[0], torch_generator(0))
    sampling = sampling_settings(settings, bank.value_range)
    outs = [
        synthesize_in_roi(model, sampling, (1,), r.image, r.mask, bank.histograms[0], torch_generator(0, "v", i))
        for i, r in enumerate(rois[:2])
    ]
    lesion_values = np.concatenate([o[0][r.mask] for o, r in zip(outs, rois, strict=False)])
    assert lesion_values.max() > 3.0  # the former fixed clamp (-3, 3) made this impossible
    assert lesion_values.max() <= hi + 1e-5  # the recorded clamp holds
    assert lesion_values.min() >= lo - 1e-5
    explicit = LeFusionParams(**{**settings.model_dump(), "value_range": (-3.0, 3.0), "steps": 1})
    assert train_lefusion(rois, explicit, (1,), tmp_path / "ckpt2", seed=0)[1].value_range == (-3.0, 3.0)
