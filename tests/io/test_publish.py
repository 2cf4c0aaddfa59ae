"""Publishing Zarr stores to S3 on a real moto server: exact copy, incremental, metadata last, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from lesionflow.hashing import sha256_tree
from lesionflow.io.layout import on_disk
from lesionflow.io.publish import (
    INDEX_SUFFIX,
    StorageError,
    StorageUnavailable,
    publish_tree,
    remote_url,
    upload_order,
)
from lesionflow.store.zarr_store import CaseArrays, write_case
from tests.helpers.moto_server import MotoS3, _free_port

BUCKET = "team"
# a fresh s3fs per open: fsspec would otherwise hand back a cached instance with an old listing
FRESH = {"skip_instance_cache": True, "use_listings_cache": False}


def _case(root: Path, case_id: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, 12, 10, 8)).astype(np.float32)
    label = (rng.random((12, 10, 8)) > 0.8).astype(np.uint8)
    affine = [[0.0, -1.5, 0.0, 10.0], [1.2, 0.0, 0.0, -4.0], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]]
    write_case(root, case_id, CaseArrays(image, label), {"spacing": [1.2, 1.5, 2.5], "affine": affine},
               chunk_shape=(8, 8, 8))  # fmt: skip
    return image


def _download(url: str, dest: Path) -> Path:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.get(url.removeprefix("s3://") + "/", str(dest), recursive=True)
    return dest


def test_publish_makes_an_exact_readable_copy_and_sends_only_changes(moto_s3: MotoS3, tmp_path: Path) -> None:
    moto_s3.client().create_bucket(Bucket=BUCKET)
    store = tmp_path / "store.zarr"
    image_a = _case(store, "a", 0)
    _case(store, "b", 1)
    url = remote_url(f"s3://{BUCKET}/ws", "data/processed/store.zarr")
    assert url == f"s3://{BUCKET}/ws/data/processed/store.zarr"

    first = publish_tree(store, url)
    assert first.n_uploaded == first.n_files > 0
    assert first.digest == sha256_tree(store)
    # zarr reads the copy straight from S3 (s3fs, endpoint from AWS_ENDPOINT_URL), geometry included
    group = zarr.open_group(url, mode="r", storage_options=FRESH)
    assert sorted(group.group_keys()) == ["a", "b"]
    np.testing.assert_array_equal(group["a"]["0"][:], on_disk(image_a))  # level 0, stored (c, z, y, x)
    assert group["a"].attrs["affine"][0][1] == -1.5
    # the bytes are those of the local folder
    assert sha256_tree(_download(url, tmp_path / "copy")) == sha256_tree(store)

    again = publish_tree(store, url)
    assert again.n_uploaded == 0
    assert again.n_deleted == 0

    _case(store, "c", 2)
    import shutil

    shutil.rmtree(store / "b")
    third = publish_tree(store, url)
    assert 0 < third.n_uploaded < third.n_files  # only case c (and the root listing) travelled
    assert third.n_deleted > 0  # case b's objects are gone from the copy
    assert sorted(zarr.open_group(url, mode="r", storage_options=FRESH).group_keys()) == ["a", "c"]
    assert sha256_tree(_download(url, tmp_path / "copy2")) == sha256_tree(store)
    index = json.loads(moto_s3.client().get_object(Bucket=BUCKET, Key=f"ws/data/processed/store.zarr{INDEX_SUFFIX}")
                       ["Body"].read())  # fmt: skip
    assert index["digest"] == third.digest


def test_an_object_deleted_behind_the_index_is_sent_again(moto_s3: MotoS3, tmp_path: Path) -> None:
    moto_s3.client().create_bucket(Bucket=BUCKET)
    store = tmp_path / "store.zarr"
    _case(store, "a", 0)
    url = f"s3://{BUCKET}/p/store.zarr"
    publish_tree(store, url)
    moto_s3.client().delete_object(Bucket=BUCKET, Key="p/store.zarr/a/zarr.json")
    assert publish_tree(store, url).n_uploaded == 1
    assert "a" in zarr.open_group(url, mode="r", storage_options=FRESH).group_keys()


def test_metadata_documents_go_last_deepest_first() -> None:
    rels = ["zarr.json", "a/zarr.json", "a/image/c/0/0/0/0", "a/image/zarr.json", "b/zarr.json", "b/image/c/0"]
    assert upload_order(rels) == [
        "a/image/c/0/0/0/0",
        "b/image/c/0",
        "a/image/zarr.json",
        "a/zarr.json",
        "b/zarr.json",
        "zarr.json",
    ]


def test_missing_bucket_is_one_line_and_not_retried(moto_s3: MotoS3, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    _case(store, "a", 0)
    with pytest.raises(StorageError) as err:
        publish_tree(store, "s3://no-such-bucket/x/store.zarr")
    assert not isinstance(err.value, StorageUnavailable)
    message = str(err.value)
    assert "\n" not in message
    assert "s3://no-such-bucket/x/store.zarr" in message
    assert "create the bucket" in message


def test_unreachable_endpoint_names_the_address(
    moto_s3: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = tmp_path / "store.zarr"
    _case(store, "a", 0)
    with pytest.raises(StorageUnavailable) as err:
        publish_tree(store, f"s3://{BUCKET}/x/store.zarr")
    assert dead in str(err.value)
    assert "\n" not in str(err.value)


def test_not_a_folder_and_not_s3(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="run the stage that writes it"):
        publish_tree(tmp_path / "absent.zarr", "s3://b/p/absent.zarr")
    (tmp_path / "x").mkdir()
    with pytest.raises(StorageError, match="not an S3 location"):
        publish_tree(tmp_path / "x", "/local/path")
