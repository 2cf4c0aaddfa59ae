"""Checkpoints: exact round trip through safetensors, corruption detected and skipped, nothing unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from lesionflow.seg.checkpoint import latest_valid, load_checkpoint, save_checkpoint
from lesionflow.seg.model_files import ModelFilesError, SegmenterConfig, load_segmenter, save_segmenter
from lesionflow.seg.networks import NetworkConfig, build_network

CONFIG = NetworkConfig("unet", 1, 3, (8, 16), 1, (16, 16, 16))


def _trained_pair(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = build_network(CONFIG)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(2):
        loss = net(torch.randn(1, 1, 16, 16, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, opt


def test_round_trip_restores_weights_and_optimizer_exactly(tmp_path: Path) -> None:
    net, opt = _trained_pair(0)
    save_checkpoint(tmp_path, 7, net, opt, {"history": [{"step": 7.0}]}, keep=2)
    fresh, fresh_opt = _trained_pair(1)
    ckpt = latest_valid(tmp_path, warn=lambda line: None)
    assert ckpt is not None
    assert ckpt.step == 7
    assert ckpt.loop_state == {"history": [{"step": 7.0}]}
    load_checkpoint(ckpt, fresh, fresh_opt)
    for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    s_old, s_new = opt.state_dict(), fresh_opt.state_dict()
    assert s_old["param_groups"] == s_new["param_groups"]
    for index, slots in s_old["state"].items():
        for key, value in slots.items():
            assert torch.equal(value, s_new["state"][index][key])


def test_keeps_only_the_newest_checkpoints(tmp_path: Path) -> None:
    net, opt = _trained_pair(0)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, net, opt, {}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000004", "step-0000006"]


def test_truncated_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path: Path) -> None:
    net, opt = _trained_pair(0)
    save_checkpoint(tmp_path, 2, net, opt, {"at": 2}, keep=3)
    save_checkpoint(tmp_path, 4, net, opt, {"at": 4}, keep=3)
    weights = tmp_path / "step-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a crash mid-copy, a full disk...
    warnings: list[str] = []
    ckpt = latest_valid(tmp_path, warn=warnings.append)
    assert ckpt is not None
    assert ckpt.step == 2
    assert ckpt.loop_state == {"at": 2}
    assert len(warnings) == 1
    assert "step-0000004 is corrupted" in warnings[0]
    assert "\n" not in warnings[0]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("corrupt-step-0000004")]  # kept, not deleted


def test_missing_trainer_json_counts_as_corrupt(tmp_path: Path) -> None:
    net, opt = _trained_pair(0)
    save_checkpoint(tmp_path, 3, net, opt, {}, keep=2)
    (tmp_path / "step-0000003" / "trainer.json").unlink()
    assert latest_valid(tmp_path, warn=lambda line: None) is None


class _Exploit:
    """Unpickling this would create a file: proof that a loader executed code from the weights."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "pwned"))  # type: ignore[return-value]


def test_model_weights_never_unpickle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_network(CONFIG)
    config = SegmenterConfig(CONFIG, (0, 1, 2), {"0": "bg", "1": "a", "2": "b"}, (1.0, 1.0, 1.0), {}, "h", ("MR",))
    folder = tmp_path / "model"
    save_segmenter(folder, net, config, {"x": 1})
    loaded, loaded_config = load_segmenter(folder)
    assert loaded_config == config
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(net.eval()(x), loaded(x))
    marker = tmp_path / "marker.txt"
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(ModelFilesError, match="does not load"):
        load_segmenter(folder)
    assert not marker.exists()
