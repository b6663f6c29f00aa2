"""Extract: walk a live cluster and spool its records to a private local file, sealed under a
key that lives only in this process's memory (burrow/staging.py): no plaintext reaches the disk."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blocks.source import SourceBlock, WalkStats
from burrow import progress
from burrow.errors import should_retry
from burrow.perf import gc_paused
from burrow.records import encode_record
from burrow.runlog import logger
from burrow.staging import open_spool_writer, scratch_writes
from tasks import task


@dataclass
class Extracted:
    """What extract produced: a spool file of JSON-line records and what the walk saw."""

    spool: str
    service: str
    source_url: str
    root: str
    keys: int
    raw_bytes: int
    content_bytes: int
    content_sha256: str
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)


@gc_paused
def extract_records(source: SourceBlock, root: str, workdir: Path) -> Extracted:
    """Walk ``source`` below ``root`` and write every record to a sealed spool in ``workdir``
    (read it back with burrow.staging.open_spool_reader)."""
    log = logger()
    url = source.describe()
    log.info("extract: walking %s %s from %s", source.service, url, root)
    started = time.monotonic()
    spool = workdir / "records.sealed"
    stats = WalkStats()
    sha = hashlib.sha256()
    keys = raw = content = 0
    session = source.connect()
    try:
        with (
            scratch_writes("record spool", workdir),
            open_spool_writer(spool) as out,
            progress.stage(f"extract {url}") as advance,
        ):
            lines: list[bytes] = []  # written, hashed and counted 1000 lines at a time

            def flush() -> None:
                nonlocal content, keys
                chunk = b"".join(lines)
                out.write(chunk)
                sha.update(chunk)
                content += len(chunk)
                keys += len(lines)
                advance(len(lines))
                lines.clear()

            for record in session.walk(root.encode("utf-8"), stats):
                lines.append(encode_record(record))
                raw += len(record.key) + len(record.value)
                if len(lines) >= 1000:
                    flush()
            if lines:
                flush()
    finally:
        session.close()
    seconds = time.monotonic() - started
    log.info(
        "extract: %d keys, %d value+key bytes in %.2fs; skipped %d ephemeral/leased, %d excluded, %d vanished",
        keys, raw, seconds, stats.skipped_ephemeral, stats.skipped_excluded, stats.vanished,
    )
    for w in stats.warnings:
        log.warning("extract: %s", w)
    return Extracted(
        spool=str(spool), service=source.service, source_url=url, root=root, keys=keys,
        raw_bytes=raw, content_bytes=content, content_sha256=sha.hexdigest(), seconds=seconds,
        stats=asdict(stats),
    )


@task(name="extract", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def extract(source: SourceBlock, root: str, workdir: str) -> Extracted:
    """Prefect task wrapper of :func:`extract_records`."""
    return extract_records(source, root, Path(workdir))
