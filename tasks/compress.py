"""Compress: turn the spooled record stream into a finished archive file (zstd, and the
encryption stage when one is configured)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from blocks.store import ArchiveInfo, ArchiveStore
from burrow.archive import READ_CHUNK, ArchiveWriter, BodyEncryptor
from burrow.errors import ArchiveError, should_retry
from burrow.runlog import logger
from burrow.staging import open_spool_reader, scratch_writes
from tasks import task
from tasks.extract import Extracted


@dataclass
class Compressed:
    """A finished archive in the staging directory and its manifest."""

    path: str
    manifest: dict[str, Any]
    size: int


def compress_spool(
    extracted: Extracted,
    out_path: Path,
    *,
    source_name: str,
    level: int = 3,
    encryptor: BodyEncryptor | None = None,
    extra_manifest: dict[str, Any] | None = None,
    object_name: str | None = None,
) -> Compressed:
    """Write the archive for ``extracted`` to ``out_path``; a full disk is a ScratchFull error.
    ``object_name``: the name the archive will have in its store (bound into its manifest)."""
    with scratch_writes("archive", out_path.parent):
        return _compress(extracted, out_path, source_name, level, encryptor, extra_manifest, object_name)


def _compress(
    extracted: Extracted,
    out_path: Path,
    source_name: str,
    level: int,
    encryptor: BodyEncryptor | None,
    extra_manifest: dict[str, Any] | None,
    object_name: str | None = None,
) -> Compressed:
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        manifest = compress_into(extracted, out, source_name=source_name, level=level, encryptor=encryptor,
                                 extra_manifest=extra_manifest, object_name=object_name)
        out.flush()
        os.fsync(out.fileno())
    size = out_path.stat().st_size
    _log_done(extracted, size, level, encryptor)
    return Compressed(path=str(out_path), manifest=manifest, size=size)


def _log_done(extracted: Extracted, size: int, level: int, encryptor: BodyEncryptor | None, where: str = "") -> None:
    logger().info(
        "compress: %d content bytes -> %d archive bytes (zstd level %d%s)%s",
        extracted.content_bytes, size, level, ", encrypted" if encryptor else "", where,
    )


def compress_into(
    extracted: Extracted,
    out: BinaryIO,
    *,
    source_name: str,
    level: int = 3,
    encryptor: BodyEncryptor | None = None,
    extra_manifest: dict[str, Any] | None = None,
    object_name: str | None = None,
) -> dict[str, Any]:
    """Write the archive for ``extracted`` to the binary stream ``out`` (written front to back,
    never sought); return its manifest.

    ``object_name`` (the archive's name in its store) goes into the authenticated manifest: a
    copy of the archive under another name is then told apart from it (docs/FORMAT.md,
    "Binding"), so no one who can only write to the store can pass an old archive off as new."""
    stats = extracted.stats
    writer = ArchiveWriter(out, service=extracted.service, level=level, encryptor=encryptor)
    with open_spool_reader(extracted.spool) as spool:
        while chunk := spool.read(READ_CHUNK):
            writer.write_content(chunk)
    if writer._content_sha.hexdigest() != extracted.content_sha256:
        raise ArchiveError("the spooled records changed on disk before compression (staging corrupt)")
    fields: dict[str, Any] = {
        "service": extracted.service,
        "source": source_name,
        "source_url": extracted.source_url,
        "root": extracted.root,
        "keys": extracted.keys,
        "raw_bytes": extracted.raw_bytes,
        "skipped_ephemeral": stats.get("skipped_ephemeral", 0),
        "skipped_excluded": stats.get("skipped_excluded", 0),
        "vanished_during_backup": stats.get("vanished", 0),
        "redacted_acls": stats.get("redacted_acls", 0),
        "warnings": stats.get("warnings", []),
        "service_info": {k: v for k, v in stats.get("info", {}).items() if k != "point_in_time"},
        # True when the walk read one consistent state (an etcd revision, a Consul index);
        # a ZooKeeper walk is not a snapshot.
        "point_in_time": bool(stats.get("info", {}).get("point_in_time", False)),
    }
    fields.update(extra_manifest or {})
    if object_name is not None:
        fields["object_name"] = object_name
    return writer.finish(fields)


def compress_to_store(
    extracted: Extracted,
    store: ArchiveStore,
    name: str,
    *,
    source_name: str,
    level: int = 3,
    encryptor: BodyEncryptor | None = None,
    extra_manifest: dict[str, Any] | None = None,
) -> tuple[Compressed, ArchiveInfo]:
    """Stream the archive straight into a store that takes streamed writes (S3): parts leave
    as zstd produces them, no archive file is made on the scratch disk, and the archive is
    published (atomically, never replacing one) only when it is complete."""
    with store.writer(name) as out:  # type: ignore[attr-defined]
        manifest = compress_into(extracted, out, source_name=source_name, level=level, encryptor=encryptor,
                                 extra_manifest=extra_manifest, object_name=name)
    info = store.head(name)
    _log_done(extracted, info.size, level, encryptor, f", streamed to {info.url}")
    from tasks.catalog import index_new_archive

    index_new_archive(store, name, info)
    return Compressed(path="", manifest=manifest, size=info.size), info


@task(name="compress")
def compress(
    extracted: Extracted,
    out_path: str,
    source_name: str,
    level: int = 3,
    encryptor: BodyEncryptor | None = None,
    extra_manifest: dict[str, Any] | None = None,
    object_name: str | None = None,
) -> Compressed:
    """Prefect task wrapper of :func:`compress_spool` (``object_name``: the archive's name in
    the store it is uploaded to, bound into its manifest)."""
    return compress_spool(
        extracted, Path(out_path), source_name=source_name, level=level, encryptor=encryptor,
        extra_manifest=extra_manifest, object_name=object_name,
    )


@task(name="compress-upload", retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=should_retry)
def compress_upload(
    extracted: Extracted,
    store: ArchiveStore,
    name: str,
    source_name: str,
    level: int = 3,
    encryptor: BodyEncryptor | None = None,
    extra_manifest: dict[str, Any] | None = None,
) -> tuple[Compressed, ArchiveInfo]:
    """Prefect task wrapper of :func:`compress_to_store` (a transient store error re-runs it
    from the sealed spool)."""
    return compress_to_store(extracted, store, name, source_name=source_name, level=level, encryptor=encryptor,
                             extra_manifest=extra_manifest)
