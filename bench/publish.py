"""Benchmark: publishing a Zarr store to S3 (``publish_tree``) vs a plain recursive ``s3fs.put`` of the same folder.

A store of ``--cases`` synthetic cases (``--size``³ float32 image + uint8 label, the processed layout and chunking of
``lesionflow.store.zarr_store``) is written to a temp folder; a ``moto_server`` on 127.0.0.1 stands in for S3 (its
throughput is a single Python process's, not S3's: compare the ratios, not the MB/s). Timed, best of ``--repeats``:

1. the peer: ``s3fs.S3FileSystem.put(store, url, recursive=True)`` into an empty prefix;
2. ``publish_tree`` into an empty prefix (hashes every file, uploads in a safe order, writes the index);
3. ``publish_tree`` again with nothing changed (what every flow run after the first pays);
4. ``publish_tree`` after one case was rewritten (a new case in a nightly run).

    .venv/bin/python bench/publish.py --cases 8 --size 96
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import _common as c
import numpy as np

sys.path.insert(0, str(c.REPO))


def _best(fn: Callable[[int], object], repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    import boto3
    import s3fs

    from lesionflow.hashing import sha256_tree
    from lesionflow.io.publish import publish_tree
    from lesionflow.store.zarr_store import CaseArrays, write_case
    from tests.helpers.moto_server import start_moto_server, stop_process

    with c.workdir("bench-publish-", args.keep) as tmp:
        store = tmp / "store.zarr"
        rng = np.random.default_rng(0)
        shape = (args.size,) * 3

        def write(case: int, seed: int) -> None:
            image = rng.normal(size=(1, *shape)).astype(np.float32) + seed
            label = (rng.random(shape) > 0.97).astype(np.uint8)
            write_case(store, f"case_{case:03d}", CaseArrays(image, label), {"spacing": [1.0, 1.0, 1.0]},
                       chunk_shape=(64, 64, 64))  # fmt: skip

        for case in range(args.cases):
            write(case, 0)
        size_mb = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 1e6
        n_files = sum(1 for p in store.rglob("*") if p.is_file())

        proc, endpoint = start_moto_server(tmp / "moto.log")
        try:
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
            boto3.client("s3").create_bucket(Bucket="bench")
            fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)

            peer = _best(lambda i: fs.put(str(store), f"bench/peer{i}/store.zarr", recursive=True), args.repeats)
            first = _best(lambda i: publish_tree(store, f"s3://bench/ours{i}/store.zarr"), args.repeats)
            nothing = _best(lambda i: publish_tree(store, "s3://bench/ours0/store.zarr"), args.repeats)

            def one_changed(i: int) -> None:
                write(0, i + 1)
                result = publish_tree(store, "s3://bench/ours0/store.zarr")
                assert 0 < result.n_uploaded < result.n_files

            changed = _best(one_changed, args.repeats)
            assert publish_tree(store, "s3://bench/ours0/store.zarr").digest == sha256_tree(store)
        finally:
            stop_process(proc)

    print(f"store: {args.cases} cases of {args.size}^3, {n_files} files, {size_mb:.1f} MB; moto on 127.0.0.1")
    print(f"{'run':<44}{'seconds':>9}{'vs peer':>9}")
    for name, seconds in (
        ("peer: s3fs.put(recursive=True), empty prefix", peer),
        ("publish_tree, empty prefix", first),
        ("publish_tree, nothing changed", nothing),
        ("publish_tree, one case rewritten", changed),
    ):
        print(f"{name:<44}{seconds:>9.2f}{seconds / peer:>9.2f}")


if __name__ == "__main__":
    main()
