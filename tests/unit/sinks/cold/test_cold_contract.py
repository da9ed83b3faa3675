"""One contract, two backends: a local directory and a real S3-compatible server (moto, 127.0.0.1)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from tests.conftest import MotoS3, refuse_writes

from betrace.config.sections import ColdStorageSettings
from betrace.sinks.cold import (
    ArrowColdStorage,
    ColdObjectMissingError,
    ColdStorage,
    ColdStorageError,
    FilesystemColdStorage,
    S3ColdStorage,
    open_cold_storage,
)


@pytest.fixture(params=["filesystem", "s3"])
def cold(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArrowColdStorage]:
    if request.param == "filesystem":
        yield FilesystemColdStorage(tmp_path / "cold")
        return
    moto: MotoS3 = request.getfixturevalue("moto_s3")
    bucket: str = request.getfixturevalue("s3_bucket")
    yield S3ColdStorage(
        bucket=bucket,
        endpoint=moto.endpoint,
        access_key=SecretStr("AKIDEXAMPLE"),
        secret_key=SecretStr("wJalrXUtnFEMI-not-a-real-secret"),
        prefix="archive",
    )


def test_put_get_stat_roundtrip(cold: ArrowColdStorage) -> None:
    assert isinstance(cold, ColdStorage)
    data = os.urandom(300_000)
    stat = cold.put("acme/2026/11/24/spans-0000.parquet", data)
    assert stat.size == len(data)
    assert stat.sha256 == hashlib.sha256(data).hexdigest()
    assert cold.get("acme/2026/11/24/spans-0000.parquet") == data
    again = cold.stat("acme/2026/11/24/spans-0000.parquet")
    assert (again.size, again.sha256) == (stat.size, stat.sha256)
    assert cold.exists("acme/2026/11/24/spans-0000.parquet")
    assert not cold.exists("acme/2026/11/24/spans-0001.parquet")


def test_put_replaces_and_files_stream(cold: ArrowColdStorage, tmp_path: Path) -> None:
    cold.put("t/a.bin", b"old")
    src = tmp_path / "src.bin"
    src.write_bytes(b"new" * 100_000)
    stat = cold.put_file("t/a.bin", src)
    assert cold.get("t/a.bin") == src.read_bytes()
    out = cold.get_file("t/a.bin", tmp_path / "down" / "a.bin")
    assert (tmp_path / "down" / "a.bin").read_bytes() == src.read_bytes()
    assert out.sha256 == stat.sha256
    assert [s.key for s in cold.list("t")] == ["t/a.bin"]  # no temporary leftovers


def test_list_by_prefix_is_sorted_and_scoped(cold: ArrowColdStorage) -> None:
    for key in ("acme/2026/11/02/m.json", "acme/2026/11/01/m.json", "other/2026/11/01/m.json"):
        cold.put(key, key.encode())
    assert [s.key for s in cold.list("acme")] == ["acme/2026/11/01/m.json", "acme/2026/11/02/m.json"]
    assert [s.size for s in cold.list("acme/2026/11/01")] == [len("acme/2026/11/01/m.json")]
    assert list(cold.list("nobody")) == []
    assert len(list(cold.list())) == 3


def test_delete_is_idempotent_and_missing_objects_are_clear(cold: ArrowColdStorage) -> None:
    cold.put("x/y.bin", b"1")
    assert cold.delete("x/y.bin") is True
    assert cold.delete("x/y.bin") is False
    with pytest.raises(ColdObjectMissingError, match="does not exist"):
        cold.get("x/y.bin")
    with pytest.raises(ColdObjectMissingError):
        cold.stat("x/y.bin")


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/./b", "a b", ""])
def test_keys_cannot_escape_the_root(cold: ArrowColdStorage, key: str) -> None:
    with pytest.raises(ValueError, match="invalid cold storage key"):
        cold.put(key, b"x")


def test_s3_credentials_never_appear_in_repr_or_logs(
    moto_s3: MotoS3, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "super-secret-value-123"
    cfg = ColdStorageSettings(
        backend="s3",
        endpoint=moto_s3.endpoint,
        bucket=s3_bucket,
        access_key=SecretStr("AKIDEXAMPLE"),
        secret_key=SecretStr(secret),
    )
    store = open_cold_storage(cfg, Path("/nonexistent"))
    store.put("k/v.bin", b"x")
    assert secret not in repr(store) and secret not in repr(cfg) and secret not in str(cfg.model_dump())
    assert secret not in caplog.text


def test_s3_outage_is_a_retriable_error(moto_s3: MotoS3, s3_bucket: str) -> None:
    store = S3ColdStorage(
        bucket=s3_bucket,
        endpoint=moto_s3.endpoint,
        timeout_s=2.0,
        access_key=SecretStr("a"),
        secret_key=SecretStr("b"),
    )
    store.put("k/v.bin", b"x")
    moto_s3.stop()
    try:
        with pytest.raises(ColdStorageError) as info:
            store.put("k/w.bin", b"y")
        assert info.value.retriable
    finally:
        moto_s3.start()


def test_filesystem_refusing_access_is_a_retriable_error(tmp_path: Path) -> None:
    store = FilesystemColdStorage(tmp_path / "cold")
    store.put("acme/a.bin", b"x")
    with refuse_writes(tmp_path / "cold" / "acme"):
        with pytest.raises(ColdStorageError) as info:
            store.put("acme/b.bin", b"y")
        assert info.value.retriable
        assert store.get("acme/a.bin") == b"x"  # reads still work
