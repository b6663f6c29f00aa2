"""Compress: turn the spooled record stream into a finished archive file (zstd, and the
encryption stage when one is configured)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from burrow.archive import READ_CHUNK, ArchiveWriter, BodyEncryptor
from burrow.errors import ArchiveError
from burrow.runlog import logger
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
) -> Compressed:
    """Write the archive for ``extracted`` to ``out_path``."""
    log = logger()
    stats = extracted.stats
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        writer = ArchiveWriter(out, service=extracted.service, level=level, encryptor=encryptor)
        with open(extracted.spool, "rb") as spool:
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
        manifest = writer.finish(fields)
        out.flush()
        os.fsync(out.fileno())
    size = out_path.stat().st_size
    log.info(
        "compress: %d content bytes -> %d archive bytes (zstd level %d%s)",
        extracted.content_bytes, size, level, ", encrypted" if encryptor else "",
    )
    return Compressed(path=str(out_path), manifest=manifest, size=size)


@task(name="compress", cache_policy=NO_CACHE)
def compress(
    extracted: Extracted,
    out_path: str,
    source_name: str,
    level: int = 3,
    encryptor: BodyEncryptor | None = None,
    extra_manifest: dict[str, Any] | None = None,
) -> Compressed:
    """Prefect task wrapper of :func:`compress_spool`."""
    return compress_spool(
        extracted, Path(out_path), source_name=source_name, level=level, encryptor=encryptor,
        extra_manifest=extra_manifest,
    )
