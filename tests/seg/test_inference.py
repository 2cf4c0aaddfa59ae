"""Sliding-window inference on networks with known outputs, label mapping, and the way back to the raw grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lesionflow.preprocess.ops import preprocess_arrays
from lesionflow.seg.inference import predict_case, probabilities_to_labels, sliding_window_predict
from lesionflow.seg.networks import NetworkConfig, build_network

WEIGHTS = np.array([1.5, -1.0, 0.5], dtype=np.float32)
BIAS = np.array([0.0, 0.2, -0.1], dtype=np.float32)


def _pointwise() -> torch.nn.Module:
    """1x1x1 convolution, 1 -> 3 channels: logits = WEIGHTS * x + BIAS per voxel."""
    conv = torch.nn.Conv3d(1, 3, kernel_size=1)
    conv.weight = torch.nn.Parameter(torch.from_numpy(WEIGHTS).reshape(3, 1, 1, 1, 1))
    conv.bias = torch.nn.Parameter(torch.from_numpy(BIAS))
    return conv


def _expected(image: np.ndarray) -> np.ndarray:
    logits = WEIGHTS[:, None, None, None] * image[0][None].astype(np.float64) + BIAS[:, None, None, None]
    e = np.exp(logits - logits.max(axis=0))
    return e / e.sum(axis=0)


@pytest.mark.parametrize("shape", [(20, 17, 9), (5, 6, 3)])  # larger than the patch, and smaller on every axis
def test_sliding_window_probabilities_are_exact_for_a_pointwise_network(shape: tuple[int, int, int]) -> None:
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    net = _pointwise()
    probs = sliding_window_predict(net, image, (8, 8, 8), overlap=0.5, sw_batch_size=3)
    assert probs.shape == (3, *shape)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, _expected(image), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert net.training  # mode restored


def test_sliding_window_unet_is_deterministic_and_restores_eval_mode() -> None:
    torch.manual_seed(0)
    config = NetworkConfig("unet", 2, 3, (4, 8), 0, (16, 16, 16))
    net = build_network(config)
    net.eval()
    image = np.random.default_rng(1).normal(size=(2, 22, 18, 12)).astype(np.float32)
    a = sliding_window_predict(net, image, config.patch_size, overlap=0.25)
    b = sliding_window_predict(net, image, config.patch_size, overlap=0.25)
    assert a.shape == (3, 22, 18, 12)
    assert a.tobytes() == b.tobytes()
    assert np.all((a >= 0) & (a <= 1))
    assert not net.training
    # amp_dtype is ignored on the CPU: same result
    c = sliding_window_predict(net, image, config.patch_size, overlap=0.25, amp_dtype=torch.bfloat16)
    assert c.tobytes() == a.tobytes()


def test_sliding_window_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="channel-first"):
        sliding_window_predict(_pointwise(), np.zeros((4, 4, 4), dtype=np.float32), (8, 8, 8))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_predict(_pointwise(), np.zeros((1, 4, 4, 4), dtype=np.float32), (8, 8, 8), overlap=1.0)
    with pytest.raises(ValueError, match="patch_size"):
        sliding_window_predict(_pointwise(), np.zeros((1, 4, 4, 4), dtype=np.float32), (8, 0, 8))


def test_labels_from_probabilities_with_non_contiguous_values() -> None:
    probs = np.zeros((3, 2, 2, 1), dtype=np.float32)
    probs[0, 0, 0, 0] = 1.0  # channel 0 -> value 0
    probs[1, 0, 1, 0] = 1.0  # channel 1 -> value 2
    probs[2, 1, 0, 0] = 1.0  # channel 2 -> value 5
    probs[:, 1, 1, 0] = [0.2, 0.4, 0.4]  # tie between channels 1 and 2: the lower channel wins
    labels = probabilities_to_labels(probs, [0, 2, 5])
    assert labels.dtype == np.uint8
    assert labels[..., 0].tolist() == [[0, 2], [5, 2]]
    with pytest.raises(ValueError, match="n_classes = 2"):
        probabilities_to_labels(probs, [0, 2])
    with pytest.raises(ValueError, match="distinct"):
        probabilities_to_labels(probs, [0, 2, 2])


# --- raw-grid round trip ---------------------------------------------------------------------------------------

LABEL_VALUES = (0, 2, 5)
INTENSITY = {0: 10.0, 2: 25.0, 5: 40.0}  # inside the body; outside the body the image is 0 (cropped away)


def _lps(spacing: tuple[float, float, float]) -> np.ndarray:
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # i -> Left, j -> Posterior, k -> Superior
    affine[:3, 3] = (30.0, -12.5, 4.0)
    return affine


def _raw_case() -> tuple[np.ndarray, np.ndarray]:
    """Raw (i, j, k) image and label: a body box with two lesions, zero background around it."""
    shape = (26, 22, 14)
    label = np.zeros(shape, dtype=np.uint8)
    label[5:13, 4:12, 3:9] = 2
    label[14:21, 10:17, 6:11] = 5
    image = np.zeros(shape, dtype=np.float32)
    image[3:23, 2:19, 2:12] = INTENSITY[0]
    for value in (2, 5):
        image[label == value] = INTENSITY[value]
    return image, label


class Oracle(torch.nn.Module):
    """Per voxel, the class whose (normalized) intensity is nearest: logits = -(x - centre_k)^2."""

    def __init__(self, centres: list[float]) -> None:
        super().__init__()
        self.centres: torch.Tensor
        self.register_buffer("centres", torch.tensor(centres, dtype=torch.float32).reshape(1, -1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -10.0 * (x - self.centres) ** 2


def test_predict_case_inverts_exactly_to_the_raw_grid() -> None:
    spacing = (0.8, 1.2, 2.0)
    image, label = _raw_case()
    pre_img, pre_lab, record = preprocess_arrays(image, label, _lps(spacing), spacing, {"schemes": ["zscore"]})
    assert pre_lab is not None
    assert record.crop.shape != record.ras_shape  # something was cropped
    assert record.final_shape == record.cropped_shape  # spacing already at target: no resampling
    centres = [float(pre_img[0][pre_lab == v].mean()) for v in LABEL_VALUES]

    prediction = predict_case(Oracle(centres), pre_img, (8, 8, 8), LABEL_VALUES, record, overlap=0.5)
    assert np.array_equal(prediction.processed, pre_lab)
    assert prediction.raw is not None
    assert prediction.raw.shape == label.shape
    assert prediction.raw.dtype == np.uint8
    assert np.array_equal(prediction.raw, label)  # flips + crop undone voxel for voxel

    no_record = predict_case(Oracle(centres), pre_img, (8, 8, 8), LABEL_VALUES, None)
    assert no_record.raw is None
    assert np.array_equal(no_record.processed, pre_lab)


def test_predict_case_with_resampling_keeps_the_raw_shape() -> None:
    image, label = _raw_case()
    pre_img, pre_lab, record = preprocess_arrays(
        image, label, _lps((0.8, 1.2, 2.0)), (1.0, 1.0, 1.0), {"schemes": ["zscore"]}
    )
    assert pre_lab is not None
    assert record.final_shape != record.cropped_shape
    centres = [float(pre_img[0][pre_lab == v].mean()) for v in LABEL_VALUES]
    prediction = predict_case(Oracle(centres), pre_img, (16, 16, 16), LABEL_VALUES, record)
    assert prediction.raw is not None
    assert prediction.raw.shape == label.shape
    assert set(np.unique(prediction.raw)) <= set(LABEL_VALUES)
    for value in (2, 5):  # lossy both ways, but the lesions land where they were
        a, b = prediction.raw == value, label == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8
    with pytest.raises(ValueError, match="record"):
        predict_case(Oracle(centres), pre_img[:, 1:], (16, 16, 16), LABEL_VALUES, record)
