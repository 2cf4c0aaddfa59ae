"""S3 sources against a real moto server and real s3fs (no mocks): layout, incremental re-runs, path safety,
redaction and error messages."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from lesionflow.errors import SourceError
from lesionflow.io.remote import INDEX_NAME, MirrorResult, is_remote, mirror_remote_source, redact_uri
from tests.helpers.moto_server import MotoS3

pytest_plugins = ["tests.helpers.moto_server"]  # moto_s3, moto_s3_server

SECRET = "s3cr3t-XYZ"
KEY_ID = "AKIAFAKEKEYID42"
BUCKET = "lesion-data"

LAYOUT = {
    "dataset.json": b'{"name": "tiny", "numTraining": 2}',
    "imagesTr/a.nii.gz": os.urandom(300),
    "imagesTr/b.nii.gz": os.urandom(257),
    "labelsTr/a.nii.gz": os.urandom(64),
    "labelsTr/b.nii.gz": os.urandom(65),
    "extra/deep/nested/notes.txt": b"nested\n",
}


@pytest.fixture
def moto_s3_credentials() -> tuple[str, str]:
    """A distinctive secret, so 'the secret never appears anywhere' is a meaningful check."""
    return (KEY_ID, SECRET)


def _upload(s3: MotoS3, prefix: str = "tiny", layout: dict[str, bytes] = LAYOUT) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    for rel, data in layout.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=data)


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket is closed


def test_is_remote() -> None:
    assert is_remote("s3://bucket/prefix")
    assert is_remote("S3A://bucket")
    assert not is_remote("/data/tiny")
    assert not is_remote("data/s3://x")
    assert not is_remote("file:///data/tiny")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://AKIA:SECRET@bucket/p", "s3://bucket/p"),
        ("s3://AKIA@bucket/p", "s3://bucket/p"),
        ("s3://AKIA:ab/cd+SECRET@bucket/p", "s3://bucket/p"),  # unescaped '/' in the secret
        ("https://u:SECRET@minio.local:9000/bucket/p", "https://minio.local:9000/bucket/p"),
        (
            "https://bucket.s3.amazonaws.com/p/a.nii.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101"
            "&X-Amz-Signature=SECRET&X-Amz-Security-Token=SECRET&partNumber=1",
            "https://bucket.s3.amazonaws.com/p/a.nii.gz?partNumber=1",
        ),
        ("https://h/p?AWSAccessKeyId=AKIA&Signature=SECRET&Expires=1", "https://h/p?Expires=1"),
        ("https://h/p?token=SECRET&password=SECRET&sig=SECRET#access_token=SECRET", "https://h/p"),
        ("s3://bucket/prefix/with@sign/file", "s3://bucket/prefix/with@sign/file"),
        ("http://[::1]:9000/bucket/a@b", "http://[::1]:9000/bucket/a@b"),
        ("s3://bucket/tiny", "s3://bucket/tiny"),
        ("s3://bucket/tiny/?versionId=3", "s3://bucket/tiny/?versionId=3"),
        ("/data/tiny", "/data/tiny"),
    ],
)
def test_redact_uri(uri: str, expected: str) -> None:
    redacted = redact_uri(uri)
    assert redacted == expected
    assert "SECRET" not in redacted
    assert "AKIA" not in redacted


def test_mirror_copies_layout_and_bytes(moto_s3: MotoS3, tmp_path: Path) -> None:
    _upload(moto_s3)
    calls: list[tuple[int, int]] = []
    result = mirror_remote_source(f"s3://{BUCKET}/tiny", tmp_path / "cache", progress=lambda d, t: calls.append((d, t)))

    assert result.local_root.parent == tmp_path / "cache"
    assert len(result.local_root.name) == 16
    assert (result.n_objects, result.n_downloaded, result.n_skipped_unchanged) == (len(LAYOUT), len(LAYOUT), 0)
    assert result.rejected_keys == ()
    files = _local_files(result.local_root)
    assert files.pop(INDEX_NAME)  # the index is the only extra file, and it is hidden
    assert files == LAYOUT
    assert calls == [(i, len(LAYOUT)) for i in range(1, len(LAYOUT) + 1)]
    # A trailing slash does not change which folder a source maps to.
    again = mirror_remote_source(f"s3://{BUCKET}/tiny/", tmp_path / "cache")
    assert again.local_root == result.local_root


def test_rerun_skips_unchanged_and_follows_changes(moto_s3: MotoS3, tmp_path: Path) -> None:
    _upload(moto_s3)
    uri, cache = f"s3://{BUCKET}/tiny", tmp_path / "cache"
    first = mirror_remote_source(uri, cache)

    second = mirror_remote_source(uri, cache)
    assert (second.n_downloaded, second.n_skipped_unchanged) == (0, len(LAYOUT))

    # Same size, different bytes: only the ETag can tell, so this proves the ETag is compared.
    client = moto_s3.client()
    new_bytes = os.urandom(len(LAYOUT["imagesTr/a.nii.gz"]))
    client.put_object(Bucket=BUCKET, Key="tiny/imagesTr/a.nii.gz", Body=new_bytes)
    third = mirror_remote_source(uri, cache)
    assert (third.n_downloaded, third.n_skipped_unchanged) == (1, len(LAYOUT) - 1)
    assert (first.local_root / "imagesTr/a.nii.gz").read_bytes() == new_bytes

    # A local file that went missing (or was truncated) is fetched again even though the index lists it.
    (first.local_root / "labelsTr/b.nii.gz").write_bytes(b"")
    assert mirror_remote_source(uri, cache).n_downloaded == 1

    client.delete_object(Bucket=BUCKET, Key="tiny/extra/deep/nested/notes.txt")
    fourth = mirror_remote_source(uri, cache)
    assert fourth.n_objects == len(LAYOUT) - 1
    assert not (first.local_root / "extra").exists()  # the file and its now-empty folders are gone
    expected = {k: v for k, v in LAYOUT.items() if not k.startswith("extra/")}
    expected["imagesTr/a.nii.gz"] = new_bytes
    files = _local_files(first.local_root)
    files.pop(INDEX_NAME)
    assert files == expected


def test_unsafe_keys_are_rejected_and_never_written(moto_s3: MotoS3, tmp_path: Path) -> None:
    bad = {
        "../evil.txt": "path escapes the source prefix",
        "imagesTr/../../escape.txt": "path escapes the source prefix",
        "/abs.txt": "absolute path",
        "a/./b.txt": "empty, '.' or NUL path component",
        INDEX_NAME: "name reserved by the mirror",
    }
    _upload(moto_s3, layout={"good.nii.gz": b"ok", **dict.fromkeys(bad, b"pwned")})
    workdir = tmp_path / "work"
    result = mirror_remote_source(f"s3://{BUCKET}/tiny", workdir / "cache")

    assert dict(result.rejected_keys) == bad  # keys relative to the prefix, as for local paths
    assert (result.n_objects, result.n_downloaded) == (1, 1)
    files = _local_files(result.local_root)
    assert files.pop(INDEX_NAME) != b"pwned"
    assert files == {"good.nii.gz": b"ok"}
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"pwned"]
    assert written == []


def test_object_shadowing_a_folder_is_rejected(moto_s3: MotoS3, tmp_path: Path) -> None:
    _upload(moto_s3, layout={"a": b"file", "a/b.txt": b"nested"})
    result = mirror_remote_source(f"s3://{BUCKET}/tiny", tmp_path / "cache")
    assert dict(result.rejected_keys) == {"a/b.txt": "another object has the name of one of its folders"}
    assert (result.local_root / "a").read_bytes() == b"file"


def _assert_clean_message(err: SourceError) -> str:
    message = str(err)
    assert "\n" not in message
    assert "Traceback" not in message
    assert SECRET not in message
    assert KEY_ID not in message
    assert err.__cause__ is None  # the boto exception (and anything in it) is not chained
    return message


def test_missing_bucket(moto_s3: MotoS3, tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        mirror_remote_source(f"s3://{KEY_ID}:{SECRET}@no-such-bucket/tiny", tmp_path / "cache")
    message = _assert_clean_message(info.value)
    assert "s3://no-such-bucket/tiny" in message
    assert "does not exist" in message


def test_access_denied(moto_s3: MotoS3, tmp_path: Path) -> None:
    _upload(moto_s3)
    moto_s3.require_auth()  # our fake key id is not an IAM user, so moto now answers 403
    with pytest.raises(SourceError) as info:
        mirror_remote_source(f"s3://{BUCKET}/tiny", tmp_path / "cache")
    message = _assert_clean_message(info.value)
    assert "access denied" in message
    assert "AWS_ACCESS_KEY_ID" in message


def test_empty_prefix(moto_s3: MotoS3, tmp_path: Path) -> None:
    _upload(moto_s3)
    with pytest.raises(SourceError, match="holds no objects") as info:
        mirror_remote_source(f"s3://{BUCKET}/nothing-here", tmp_path / "cache")
    _assert_clean_message(info.value)


def test_unreachable_endpoint_fails_fast(moto_s3: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    start = time.monotonic()
    with pytest.raises(SourceError) as info:
        mirror_remote_source(f"s3://{BUCKET}/tiny", tmp_path / "cache")
    assert time.monotonic() - start < 15
    message = _assert_clean_message(info.value)
    assert endpoint in message
    assert "AWS_ENDPOINT_URL" in message


def test_credentials_never_leak(moto_s3: MotoS3, tmp_path: Path) -> None:
    _upload(moto_s3)
    cache = tmp_path / "cache"
    uri = f"s3://{KEY_ID}:{SECRET}@{BUCKET}/tiny?X-Amz-Security-Token={SECRET}"
    result = mirror_remote_source(uri, cache)
    assert isinstance(result, MirrorResult)
    assert result.n_objects == len(LAYOUT)
    assert result.local_root == mirror_remote_source(f"s3://{BUCKET}/tiny", cache).local_root
    for text in (repr(result), str(result.local_root)):
        assert SECRET not in text
        assert KEY_ID not in text
    for path in cache.rglob("*"):
        assert SECRET not in path.name
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data
            assert KEY_ID.encode() not in data
