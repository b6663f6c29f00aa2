"""The catalog index on object storage: a listing reads one index instead of one ranged GET per
archive, and the index is only ever a cache. Archives a backup publishes index themselves; an
entry that no longer matches its object (replaced), or whose bytes were tampered with, is never
believed over the archive itself; many small index objects are merged into one."""

from __future__ import annotations

import base64
import io

import pytest
import zstandard
from test_stores import minio_store, new_bucket, raw_client

from blocks.s3 import S3Store
from burrow.archive import ArchiveWriter, canonical_json
from burrow.crypto import ArchiveKeys, StreamEncryptor
from burrow.keys import Keyring, SymmetricKey, WriteKeys
from burrow.records import Record, encode_record
from tasks import catalog as cat

KEY = SymmetricKey.generate()


def archive_bytes(source: str, created: str, keys: int = 3) -> bytes:
    out = io.BytesIO()
    w = ArchiveWriter(out, service="zookeeper", encryptor=StreamEncryptor(WriteKeys("symmetric", [KEY], "t")))
    for i in range(keys):
        w.write_content(encode_record(Record(key=f"/k{i}".encode(), value=b"v" * 50)))
    w.finish({"service": "zookeeper", "source": source, "source_url": "zk://x", "root": "/",
              "keys": keys, "raw_bytes": 50 * keys, "created": created})
    return out.getvalue()


class Counting:
    """Counts the ranged archive reads a store makes (what the index exists to avoid)."""

    def __init__(self, monkeypatch) -> None:
        self.n = 0
        real = S3Store.read_range

        def counted(store: S3Store, name: str, start: int, length: int) -> bytes:
            self.n += 1
            return real(store, name, start, length)

        monkeypatch.setattr(S3Store, "read_range", counted)


@pytest.fixture
def s3(moto):
    bucket = new_bucket(moto)
    return minio_store(moto, bucket, prefix="idx"), raw_client(moto), bucket


def put_raw(s3, name: str, data: bytes) -> None:
    _, client, bucket = s3
    client.put_object(Bucket=bucket, Key=f"idx/{name}", Body=data)


def keyring() -> ArchiveKeys:
    ring = Keyring()
    ring.add([KEY])
    return ArchiveKeys(ring)


def test_second_listing_reads_no_archive_and_gives_the_same_rows(s3, monkeypatch):
    store = s3[0]
    for i in range(5):
        put_raw(s3, f"src/src-{i}.burrow", archive_bytes("src", f"2026-01-0{i + 1}T00:00:00Z"))
    reads = Counting(monkeypatch)
    first = cat.describe_archives(store)
    assert reads.n >= 5 and len(store.list_sidecars(cat.INDEX_PREFIX)) == 1
    reads.n = 0
    second = cat.describe_archives(store)
    assert reads.n == 0, "the second listing read archives although the index holds them all"
    assert second == first
    assert [r["created"] for r in second] == [f"2026-01-0{i + 1}T00:00:00Z" for i in range(5)]


def test_a_replaced_object_is_read_again_not_taken_from_the_index(s3, monkeypatch):
    store = s3[0]
    put_raw(s3, "src/a.burrow", archive_bytes("src", "2026-01-01T00:00:00Z"))
    cat.describe_archives(store)
    put_raw(s3, "src/a.burrow", archive_bytes("other", "2026-02-01T00:00:00Z", keys=7))  # new ETag and size
    reads = Counting(monkeypatch)
    (row,) = cat.describe_archives(store)
    assert reads.n >= 1 and row["source"] == "other" and row["keys"] == 7


def test_a_tampered_index_entry_is_never_believed(s3, monkeypatch):
    store = s3[0]
    put_raw(s3, "src/a.burrow", archive_bytes("src", "2026-01-01T00:00:00Z"))
    put_raw(s3, "src/b.burrow", archive_bytes("src", "2026-01-02T00:00:00Z"))
    cat.describe_archives(store)
    # Swap b's cached bytes for a's: a forged index claiming b is the older archive.
    (name,) = store.list_sidecars(cat.INDEX_PREFIX)
    doc = __import__("orjson").loads(zstandard.ZstdDecompressor().decompress(store.get_sidecar(name)))
    entries = {e["name"]: e for e in doc["entries"]}
    forged = dict(entries["src/a.burrow"], name="src/b.burrow", size=entries["src/b.burrow"]["size"],
                  etag=entries["src/b.burrow"]["etag"])
    tail = bytearray(base64.b64decode(forged["tail"]))
    tail[len(tail) // 2] ^= 0x01  # and one flipped bit in the manifest
    forged["tail"] = base64.b64encode(bytes(tail)).decode()
    doc["entries"] = [entries["src/a.burrow"], forged]
    store.delete_sidecar(name)
    store.put_sidecar(name, zstandard.ZstdCompressor().compress(canonical_json(doc)))
    rows = {r["name"]: r for r in cat.describe_archives(store, keyring())}
    assert rows["src/b.burrow"]["created"] == "2026-01-02T00:00:00Z"
    assert rows["src/b.burrow"]["authenticated"] is True and not rows["src/b.burrow"].get("error")
    assert rows["src/a.burrow"]["authenticated"] is True


def test_backups_index_themselves_and_many_index_objects_are_merged(s3, monkeypatch):
    store = s3[0]
    n = cat.INDEX_MAX_OBJECTS + 3
    for i in range(n):
        put_raw(s3, f"src/s-{i:02d}.burrow", archive_bytes("src", f"2026-03-01T00:00:{i:02d}Z"))
        cat.index_new_archive(store, f"src/s-{i:02d}.burrow")  # what a backup does after publishing
    assert 1 <= len(store.list_sidecars(cat.INDEX_PREFIX)) <= cat.INDEX_MAX_OBJECTS + 1
    reads = Counting(monkeypatch)
    rows = cat.describe_archives(store)
    assert reads.n == 0 and len(rows) == n and not any(r.get("error") for r in rows)


def test_a_store_without_write_access_still_lists(s3, monkeypatch):
    store = s3[0]
    put_raw(s3, "src/a.burrow", archive_bytes("src", "2026-01-01T00:00:00Z"))

    def denied(self, name, data):  # a read-only credential: PutObject is refused
        from burrow.errors import StoreError

        raise StoreError("access denied (AccessDenied)")

    monkeypatch.setattr(S3Store, "put_sidecar", denied)
    (row,) = cat.describe_archives(store)
    assert row["source"] == "src" and store.list_sidecars(cat.INDEX_PREFIX) == []


def test_a_swapped_entry_is_caught_when_the_archive_is_downloaded(s3, tmp_path):
    """An index entry holding another authentic archive's bytes (same key, same size) passes the
    catalog's checks: the choice made on it is then refused by the download's manifest check."""
    from burrow.errors import ArchiveError
    from tasks.validate import validate_archive

    store = s3[0]
    put_raw(s3, "src/a.burrow", archive_bytes("src", "2026-01-01T00:00:00Z"))
    put_raw(s3, "src/b.burrow", archive_bytes("src", "2026-01-02T00:00:00Z"))
    cat.describe_archives(store)
    (name,) = store.list_sidecars(cat.INDEX_PREFIX)
    doc = __import__("orjson").loads(zstandard.ZstdDecompressor().decompress(store.get_sidecar(name)))
    entries = {e["name"]: e for e in doc["entries"]}
    assert entries["src/a.burrow"]["size"] == entries["src/b.burrow"]["size"]
    forged = dict(entries["src/b.burrow"], name="src/a.burrow", etag=entries["src/a.burrow"]["etag"])
    doc["entries"] = [forged, entries["src/b.burrow"]]
    store.delete_sidecar(name)
    store.put_sidecar(name, zstandard.ZstdCompressor().compress(canonical_json(doc)))
    rows = {r["name"]: r for r in cat.describe_archives(store, keyring())}
    claimed = rows["src/a.burrow"]
    assert claimed["created"] == "2026-01-02T00:00:00Z"  # the lie the index tells
    local = store.get("src/a.burrow", tmp_path / "a.burrow")
    with pytest.raises(ArchiveError, match="not the archive its catalog entry describes"):
        validate_archive(local, keyring(), label=claimed["url"], expect_manifest_sha256=claimed["manifest_sha256"])
    honest = rows["src/b.burrow"]
    local = store.get("src/b.burrow", tmp_path / "b.burrow")
    assert validate_archive(local, keyring(), label=honest["url"],
                            expect_manifest_sha256=honest["manifest_sha256"])["created"] == "2026-01-02T00:00:00Z"


def test_an_index_object_that_is_not_an_index_is_ignored(s3):
    """Valid zstd and JSON, but not an index (a list, a foreign document): the listing reads the
    archives instead of failing."""
    store = s3[0]
    put_raw(s3, "src/a.burrow", archive_bytes("src", "2026-01-01T00:00:00Z"))
    for i, doc in enumerate((b"[1, 2, 3]", b'{"format": "something else", "entries": []}', b"not zstd")):
        data = doc if i == 2 else zstandard.ZstdCompressor().compress(doc)
        store.put_sidecar(f"{cat.INDEX_PREFIX}0000000{i}-junk{cat.INDEX_SUFFIX}", data)
    (row,) = cat.describe_archives(store)
    assert row["source"] == "src" and not row.get("error")
