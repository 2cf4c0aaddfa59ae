"""Content digests: bytes decide, and a remembered digest never outlives a change of the file."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lesionflow import hashing
from lesionflow.hashing import sha256_bytes, sha256_file


def _age(path: Path, seconds: float) -> None:
    old = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(old, old))


def test_a_fresh_file_is_read_again_after_a_same_size_rewrite(tmp_path: Path) -> None:
    f = tmp_path / "chunk"
    f.write_bytes(b"aaaa")
    assert sha256_file(f) == sha256_bytes(b"aaaa")
    f.write_bytes(b"bbbb")  # same size, within the same timestamp tick: must not be served from memory
    assert sha256_file(f) == sha256_bytes(b"bbbb")


def test_a_remembered_digest_is_dropped_when_the_file_changes_even_with_its_mtime_put_back(tmp_path: Path) -> None:
    f = tmp_path / "chunk"
    f.write_bytes(b"aaaa")
    _age(f, 10)
    stamp = f.stat().st_mtime_ns
    assert sha256_file(f) == sha256_bytes(b"aaaa")
    # ctime is only old when the clock has moved on; wait out the racy window once so the digest is remembered
    time.sleep(hashing._RACY_NS / 1e9 + 0.05)
    assert sha256_file(f) == sha256_bytes(b"aaaa")
    assert any(v == sha256_bytes(b"aaaa") for v in hashing._FILE_DIGESTS.values())
    with f.open("r+b") as fh:  # in-place edit, same size, then the mtime put back: ctime still moves
        fh.write(b"b")
    os.utime(f, ns=(stamp, stamp))
    assert sha256_file(f) == sha256_bytes(b"baaa")
