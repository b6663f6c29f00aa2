"""One test suite for every archive store, the way restic tests every backend: the local
directory store and the S3 store (against moto's real HTTP server) pass the same contract.

put, get, list, head, delete; no replacing an existing archive; partials never listed; unsafe
names refused; stray objects skipped. Then what only S3 has: end-to-end CRC32 (moto never
validates checksums, so the object itself is corrupted), Object Lock, stray multipart uploads
and failed uploads aborted, and credentials from prefect-aws blocks."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from pydantic import SecretStr

from blocks.local import LocalStore
from blocks.resolve import archive_from_ref, store_from_ref
from blocks.s3 import S3Store
from blocks.store import ArchiveStore
from burrow.errors import ArchiveError, ArchiveNotFound, StoreError, UsageError

KEY, SECRET = "burrow-test-key", "burrow-test-secret"


def raw_client(moto):
    return boto3.client(
        "s3", endpoint_url=moto.url, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1",
        config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                      s3={"addressing_style": "path"}),
    )


def new_bucket(moto, *, lock: bool = False) -> str:
    name = f"burrow-{uuid.uuid4().hex[:12]}"
    kw = {"ObjectLockEnabledForBucket": True} if lock else {}
    raw_client(moto).create_bucket(Bucket=name, **kw)
    return name


def minio_store(moto, bucket: str, **kw) -> S3Store:
    from prefect_aws import MinIOCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    creds = MinIOCredentials(minio_root_user=KEY, minio_root_password=SecretStr(SECRET),
                             aws_client_parameters=AwsClientParameters(endpoint_url=moto.url))
    creds.save(f"moto-{uuid.uuid4().hex[:8]}")  # saved, so archive URLs can name it
    return S3Store(bucket=bucket, credentials=creds, addressing_style="path", part_size_mib=5, **kw)


class LocalRaw:
    """Backdoor access to a local store, for what a store user cannot do through the protocol."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, name: str, data: bytes) -> None:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def partial(self, name: str) -> None:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.parent / f".{p.name}.0123abcd.partial").write_bytes(b"half an archive")

    def corrupt(self, name: str) -> None:
        p = self.root / name
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))


class S3Raw:
    def __init__(self, moto, bucket: str, prefix: str) -> None:
        self.c, self.bucket, self.prefix = raw_client(moto), bucket, prefix

    def write(self, name: str, data: bytes) -> None:
        self.c.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}", Body=data)

    def partial(self, name: str) -> None:
        up = self.c.create_multipart_upload(Bucket=self.bucket, Key=f"{self.prefix}/{name}")
        self.c.upload_part(Bucket=self.bucket, Key=f"{self.prefix}/{name}", UploadId=up["UploadId"],
                           PartNumber=1, Body=b"half an archive")

    def corrupt(self, name: str) -> None:
        """Rewrite the object with one byte flipped, keeping its metadata (and so its stored CRC32)."""
        key = f"{self.prefix}/{name}"
        head = self.c.head_object(Bucket=self.bucket, Key=key)
        data = bytearray(self.c.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        self.c.put_object(Bucket=self.bucket, Key=key, Body=bytes(data), Metadata=head["Metadata"])


@pytest.fixture(params=["local", "s3"])
def store_under_test(request, tmp_path) -> tuple[ArchiveStore, object]:
    if request.param == "local":
        root = tmp_path / "store"
        root.mkdir()
        return LocalStore(path=str(root)), LocalRaw(root)
    moto = request.getfixturevalue("moto")
    bucket = new_bucket(moto)
    return minio_store(moto, bucket, prefix="backups/dc"), S3Raw(moto, bucket, "backups/dc")


def payload(tmp_path: Path, size: int = 13, name: str = "a.burrow") -> Path:
    p = tmp_path / name
    p.write_bytes((b"archive bytes" * (size // 13 + 1))[:size])
    return p


# ------------------------------------------------------------------------ the shared contract


def test_put_get_list_head_delete(store_under_test, tmp_path):
    store, _ = store_under_test
    src = payload(tmp_path)
    info = store.put("src/src-1.burrow", src)
    assert info.name == "src/src-1.burrow" and info.size == 13 and info.url == store.url("src/src-1.burrow")
    assert store.head("src/src-1.burrow").size == 13
    assert [a.name for a in store.list()] == ["src/src-1.burrow"]
    assert [a.name for a in store.list("src/")] == ["src/src-1.burrow"]
    assert [a.name for a in store.list("other/")] == []
    out = store.get("src/src-1.burrow", tmp_path / "copy")
    assert out.read_bytes() == src.read_bytes()
    # the URL it reports leads back to the same archive
    again, name = archive_from_ref(info.url)
    assert name == "src-1.burrow" and again.get(name, tmp_path / "copy2").read_bytes() == src.read_bytes()
    store.delete("src/src-1.burrow")
    assert store.list() == []
    with pytest.raises(ArchiveNotFound):
        store.head("src/src-1.burrow")
    with pytest.raises(ArchiveNotFound):
        store.delete("src/src-1.burrow")
    with pytest.raises(ArchiveNotFound):
        store.get("src/src-1.burrow", tmp_path / "x")


def test_open_stored_reads_the_manifest_and_names_a_missing_archive(store_under_test, tmp_path):
    """Every store opens an archive for its header, footer and manifest (in place, by ranges or
    by a private download): the catalog, inspect and the rehearsal markers read through it."""
    import io

    from blocks.store import open_stored
    from burrow.archive import ArchiveWriter
    from burrow.records import Record

    store, _ = store_under_test
    buf = io.BytesIO()
    w = ArchiveWriter(buf, service="zookeeper")
    w.add(Record(key=b"/a", value=b"1"))
    w.finish({"service": "zookeeper", "source": "dc", "source_url": "zk://h:1", "root": "/", "keys": 1,
              "raw_bytes": 3, "created": "2026-11-25T00:00:00Z"})
    (tmp_path / "m.burrow").write_bytes(buf.getvalue())
    info = store.put("dc/m.burrow", tmp_path / "m.burrow")
    for size in (None, info.size):
        with open_stored(store, "dc/m.burrow", size) as reader:
            assert reader.manifest["source"] == "dc" and reader.manifest["keys"] == 1
    with pytest.raises(ArchiveNotFound), open_stored(store, "dc/none.burrow"):
        pass


def test_multipart_sized_archives_round_trip(store_under_test, tmp_path):
    store, _ = store_under_test
    src = tmp_path / "big.burrow"
    src.write_bytes(bytes(range(256)) * (12 * 1024 * 1024 // 256 + 7))  # 3 parts of 5 MiB on S3
    store.put("big/big-1.burrow", src)
    assert store.get("big/big-1.burrow", tmp_path / "back").read_bytes() == src.read_bytes()


def test_an_existing_archive_is_never_replaced(store_under_test, tmp_path):
    store, _ = store_under_test
    store.put("src/x.burrow", payload(tmp_path, 13))
    with pytest.raises(StoreError, match="already exists"):
        store.put("src/x.burrow", payload(tmp_path, 40, "other.burrow"))
    assert store.get("src/x.burrow", tmp_path / "back").read_bytes() == payload(tmp_path, 13).read_bytes()


def test_partials_are_never_listed(store_under_test, tmp_path):
    store, raw = store_under_test
    raw.partial("src/src-2.burrow")
    store.put("src/src-1.burrow", payload(tmp_path))
    assert [a.name for a in store.list()] == ["src/src-1.burrow"]
    with pytest.raises(ArchiveNotFound):
        store.head("src/src-2.burrow")


@pytest.mark.parametrize("name", ["../escape.burrow", "/abs.burrow", "a/../b.burrow", ".hidden.burrow", "x.txt",
                                  "a//b.burrow", "copy of x.burrow"])
def test_unsafe_names_are_refused(store_under_test, tmp_path, name):
    store, _ = store_under_test
    with pytest.raises(UsageError):
        store.url(name)
    with pytest.raises(UsageError):
        store.put(name, payload(tmp_path))


def test_stray_objects_are_skipped(store_under_test, tmp_path):
    store, raw = store_under_test
    store.put("src/src-1.burrow", payload(tmp_path))
    raw.write("src/notes.txt", b"notes")
    raw.write("src/copy of src-1.burrow", b"a copy someone made")
    raw.write("src/half-written by rsync.burrow~", b"half")
    assert [a.name for a in store.list()] == ["src/src-1.burrow"]


def test_a_corrupted_object_is_caught_before_the_archive_checks(store_under_test, tmp_path):
    store, raw = store_under_test
    store.put("src/c.burrow", payload(tmp_path, 4096))
    raw.corrupt("src/c.burrow")
    if isinstance(store, LocalStore):
        return  # a local file carries no checksum of its own: the archive's SHA-256 checks catch it
    with pytest.raises(ArchiveError, match="end-to-end checksum"):
        store.get("src/c.burrow", tmp_path / "back")


def test_sidecars_put_get_list_delete_and_never_replace(store_under_test, tmp_path):
    store, raw = store_under_test
    store.put("src/src-1.burrow", payload(tmp_path))
    store.put_sidecar("src/src-1.burrow.rehearsal-1.burrow-meta", b"marker one")
    store.put_sidecar("_catalog/0001-ab.index.burrow-meta", b"\x00index\xff")
    raw.write("src/stray.burrow-meta~", b"not a sidecar name")
    assert [a.name for a in store.list()] == ["src/src-1.burrow"]  # sidecars are never archives
    assert store.list_sidecars() == ["_catalog/0001-ab.index.burrow-meta", "src/src-1.burrow.rehearsal-1.burrow-meta"]
    assert store.list_sidecars("_catalog/") == ["_catalog/0001-ab.index.burrow-meta"]
    assert store.get_sidecar("_catalog/0001-ab.index.burrow-meta") == b"\x00index\xff"
    with pytest.raises(StoreError, match="already exists"):
        store.put_sidecar("src/src-1.burrow.rehearsal-1.burrow-meta", b"marker two")
    assert store.get_sidecar("src/src-1.burrow.rehearsal-1.burrow-meta") == b"marker one"
    store.delete_sidecar("_catalog/0001-ab.index.burrow-meta")
    assert store.list_sidecars("_catalog/") == []
    with pytest.raises(ArchiveNotFound):
        store.get_sidecar("_catalog/0001-ab.index.burrow-meta")
    with pytest.raises(ArchiveNotFound):
        store.delete_sidecar("_catalog/0001-ab.index.burrow-meta")
    assert [a.name for a in store.list()] == ["src/src-1.burrow"]


@pytest.mark.parametrize("name", ["../escape.burrow-meta", "/abs.burrow-meta", ".hidden.burrow-meta",
                                  "x.burrow", "a//b.burrow-meta", "copy of x.burrow-meta"])
def test_unsafe_sidecar_names_are_refused(store_under_test, name):
    store, _ = store_under_test
    with pytest.raises(UsageError):
        store.put_sidecar(name, b"x")
    with pytest.raises(UsageError):
        store.get_sidecar(name)


# ------------------------------------------------------------------------ S3 only


def test_the_stored_crc32_is_the_full_object_checksum(moto, tmp_path):
    import base64
    import zlib

    bucket = new_bucket(moto)
    store = minio_store(moto, bucket, checksum="when_supported")
    src = tmp_path / "x.burrow"
    src.write_bytes(b"\x01\x02" * (6 * 1024 * 1024))
    store.put("s/x.burrow", src)
    head = raw_client(moto).head_object(Bucket=bucket, Key="s/x.burrow", ChecksumMode="ENABLED")
    crc = zlib.crc32(src.read_bytes())
    assert head["Metadata"]["burrow-crc32"] == f"{crc:08x}"
    assert head["ChecksumCRC32"] == base64.b64encode(crc.to_bytes(4, "big")).decode()
    assert head["ChecksumType"] == "FULL_OBJECT"


def test_a_failed_upload_is_aborted_and_nothing_is_visible(moto, tmp_path, monkeypatch):
    bucket = new_bucket(moto)
    store = minio_store(moto, bucket)
    src = tmp_path / "x.burrow"
    src.write_bytes(b"z" * (11 * 1024 * 1024))
    client = store.client()
    real = client.upload_part
    calls = []

    def flaky(**kw):
        calls.append(kw["PartNumber"])
        if kw["PartNumber"] == 2:
            raise OSError("simulated connection reset")
        return real(**kw)

    monkeypatch.setattr(client, "upload_part", flaky)
    with pytest.raises(Exception):  # noqa: B017 - the store's classified error
        store.put("s/x.burrow", src)
    assert store.list() == []
    assert raw_client(moto).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_stray_multipart_uploads_are_aborted_only_when_burrow_started_them(moto, tmp_path):
    from blocks.s3 import _MultipartWriter

    bucket = new_bucket(moto)
    store = minio_store(moto, bucket, prefix="p")
    S3Raw(moto, bucket, "p").partial("s/theirs.burrow")  # no Burrow record: another writer's, never touched
    raw_client(moto).create_multipart_upload(Bucket=bucket, Key="elsewhere/x.burrow")  # not below our prefix
    w = _MultipartWriter(store, "s/killed.burrow", {})  # a backup killed mid-upload
    w.pool.shutdown()
    assert store.abort_stray_uploads() == []  # a week must pass (moto dates every Initiated in 2010)
    assert store.abort_stray_uploads(now=datetime.now(UTC) + timedelta(days=8)) == ["p/s/killed.burrow"]
    left = raw_client(moto).list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert sorted(u["Key"] for u in left) == ["elsewhere/x.burrow", "p/s/theirs.burrow"]


def test_object_lock_keeps_an_archive_until_its_date(moto, tmp_path):
    bucket = new_bucket(moto, lock=True)
    store = minio_store(moto, bucket, object_lock_mode="GOVERNANCE", retain_days=2)
    store.put("s/locked.burrow", payload(tmp_path))
    until = store.locked_until("s/locked.burrow")
    assert until is not None and until > datetime.now(UTC) + timedelta(days=1)
    with pytest.raises(StoreError, match="Object Lock"):
        store.delete("s/locked.burrow")
    # not even through the raw API, version by version
    c = raw_client(moto)
    version = c.head_object(Bucket=bucket, Key="s/locked.burrow")["VersionId"]
    with pytest.raises(Exception, match="AccessDenied"):
        c.delete_object(Bucket=bucket, Key="s/locked.burrow", VersionId=version)
    assert [a.name for a in store.list()] == ["s/locked.burrow"]


def test_url_options_and_credentials(moto, tmp_path, monkeypatch):
    from prefect_aws import MinIOCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    bucket = new_bucket(moto)
    name = f"minio-{uuid.uuid4().hex[:6]}"
    MinIOCredentials(minio_root_user=KEY, minio_root_password=SecretStr(SECRET),
                     aws_client_parameters=AwsClientParameters(endpoint_url=moto.url)).save(name)
    store = store_from_ref(f"s3://{bucket}/pre?credentials={name}&addressing=path&checksum=when_required")
    assert isinstance(store, S3Store) and store.checksum_mode == "when_required"
    info = store.put("s/x.burrow", payload(tmp_path))
    assert SECRET not in info.url and KEY not in info.url and f"credentials={name}" in info.url
    # the environment works too, and a non-AWS endpoint defaults to when_required checksums
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    env_store = store_from_ref(f"s3://{bucket}/pre?endpoint={moto.url}&addressing=path")
    assert env_store.checksum_mode == "when_required"
    assert [a.name for a in env_store.list()] == ["s/x.burrow"]
    for bad in (f"s3://{KEY}:{SECRET}@{bucket}/x", f"s3://{bucket}?endpoint=http://{KEY}:{SECRET}@h:1",
                f"s3://{bucket}?nope=1", f"s3://{bucket}?verify=maybe"):
        with pytest.raises(UsageError) as exc:
            store_from_ref(bad)
        assert SECRET not in str(exc.value)


def test_an_s3_store_saved_as_a_block_loads_by_name_with_its_credentials_block(moto, tmp_path):
    """S3Store is a plain pydantic model; saving goes through its Prefect twin, which keeps the
    credentials as a reference to the saved MinIOCredentials block. Loaded by name (bare, or
    slug/name) it is an S3Store again, and its credentials reach the bucket."""
    from prefect.blocks.core import Block
    from prefect.client.orchestration import get_client
    from prefect_aws import AwsCredentials, MinIOCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    bucket = new_bucket(moto)
    saved = minio_store(moto, bucket, prefix="named")
    saved.put("s/x.burrow", payload(tmp_path))
    name = f"objects-{uuid.uuid4().hex[:6]}"
    saved.save(name)
    with get_client(sync_client=True) as client:
        doc = client.read_block_document_by_name(name, block_type_slug="burrow-s3-store", include_secrets=False)
    assert set(doc.block_document_references) == {"credentials"}  # a reference, not a copy of the secret
    for ref in (name, f"burrow-s3-store/{name}"):
        store = store_from_ref(ref)
        assert isinstance(store, S3Store) and isinstance(store.credentials, MinIOCredentials)
        assert [a.name for a in store.list()] == ["s/x.burrow"]
    assert isinstance(Block.load(f"burrow-s3-store/{name}"), S3Store)
    # an AwsCredentials block comes back as one too, keys included
    aws = AwsCredentials(aws_access_key_id=KEY, aws_secret_access_key=SecretStr(SECRET),
                         aws_client_parameters=AwsClientParameters(endpoint_url=moto.url))
    S3Store(bucket=bucket, prefix="named", credentials=aws, addressing_style="path").save(name + "-aws")
    store = store_from_ref(name + "-aws")
    assert type(store.credentials) is AwsCredentials and store.credentials.aws_access_key_id == KEY
    assert [a.name for a in store.list()] == ["s/x.burrow"]
    with pytest.raises(ValueError):
        S3Store(bucket=bucket, credentials="not a credentials block")
    with pytest.raises(ValueError):
        S3Store(bucket=bucket, buckett="typo")  # a misspelt field is an error, not silently kept


def test_a_missing_bucket_is_a_permanent_error(moto):
    store = minio_store(moto, "no-such-bucket-" + uuid.uuid4().hex[:6])
    with pytest.raises(StoreError, match="does not exist|not found"):
        store.check(writable=True)


def test_streamed_writes_publish_whole_or_nothing(moto, tmp_path):
    import base64
    import zlib

    bucket = new_bucket(moto)
    store = minio_store(moto, bucket)
    data = bytes(range(256)) * (12 * 1024 * 1024 // 256 + 3)
    with store.writer("s/streamed.burrow") as out:
        for i in range(0, len(data), 1 << 20):  # written as produced, a MiB at a time
            out.write(data[i : i + (1 << 20)])
        assert store.list() == []  # nothing visible before the write completes
    assert store.get("s/streamed.burrow", tmp_path / "back").read_bytes() == data
    head = raw_client(moto).head_object(Bucket=bucket, Key="s/streamed.burrow", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    with pytest.raises(StoreError, match="already exists"), store.writer("s/streamed.burrow") as out:
        out.write(b"another writer")
    with pytest.raises(RuntimeError), store.writer("s/broken.burrow") as out:
        out.write(data[: 6 * 1024 * 1024])
        raise RuntimeError("the producer failed")
    assert [a.name for a in store.list()] == ["s/streamed.burrow"]
    assert raw_client(moto).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # bytes corrupted on the way back (moto recomputes checksums, so corrupt in transit): caught
    from burrow.testing.faultproxy import FaultProxy

    with FaultProxy(moto.url, rate=1.0, seed=1, faults=("flip",)) as proxy:
        via = minio_store(moto, bucket, endpoint_url=proxy.url)
        with pytest.raises(ArchiveError, match="end-to-end checksum"):
            via.get("s/streamed.burrow", tmp_path / "back2")
