"""The one atomic write (lesionflow.files): a reader never sees half a file; failures leave no temp file."""

from __future__ import annotations

from pathlib import Path

import pytest

from lesionflow.files import atomic_path, json_text, write_bytes_atomic, write_json


def test_atomic_path_renames_on_success_and_cleans_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "model.safetensors"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent  # same folder: os.replace stays on one file system
        assert tmp.name.startswith(".")  # hidden: tree digests skip it
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_bytes() == b"new"

    def dying_writer() -> None:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        dying_writer()
    assert target.read_bytes() == b"new"  # old bytes kept
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.safetensors"]  # no temp left


def test_atomic_path_custom_temp_name(tmp_path: Path) -> None:
    target = tmp_path / "index.json"
    with atomic_path(target, tmp_name=".part-index") as tmp:
        assert tmp == tmp_path / ".part-index"
        tmp.write_text("x")
    assert target.read_text() == "x"


def test_write_helpers_bytes(tmp_path: Path) -> None:
    write_bytes_atomic(tmp_path / "a" / "b.bin", b"\x00\x01")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    payload = {"b": 1, "a": [1, 2]}
    assert write_json(tmp_path / "p.json", payload) is True
    assert (tmp_path / "p.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n' == json_text(payload)
    assert write_json(tmp_path / "p.json", payload) is False  # unchanged: not rewritten
