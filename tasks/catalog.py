"""Catalog: what is in a store, as archive listings with manifest summaries (the ``catalog``
task that prune and failover start with), and opening one archive for inspection."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.local import LocalStore
from blocks.resolve import archive_from_ref
from blocks.store import ArchiveStore
from burrow.archive import ArchiveReader
from burrow.crypto import encryption_summary
from burrow.errors import ArchiveError, ArchiveNotFound, should_retry
from burrow.runlog import logger

SUMMARY_FIELDS = ("service", "source", "keys", "raw_bytes", "created", "encrypted", "content_sha256")


@contextmanager
def open_archive(ref: str) -> Iterator[ArchiveReader]:
    """Open an archive for reading: in place when local, via a private download otherwise."""
    store, name = archive_from_ref(ref)
    label = store.url(name)
    if isinstance(store, LocalStore):
        path = store.root / name
        if not path.is_file():
            raise ArchiveNotFound(f"archive {label} not found")
        with open(path, "rb") as f:
            yield ArchiveReader(f, label=label)
        return
    with tempfile.TemporaryDirectory(prefix="burrow-inspect-") as tmp:
        local = store.get(name, Path(tmp) / "archive.burrow")
        with open(local, "rb") as f:
            yield ArchiveReader(f, label=label)


def describe_archives(store: ArchiveStore) -> list[dict[str, Any]]:
    """Every complete archive in ``store`` with its manifest summary."""
    rows = []
    for info in store.list():
        row: dict[str, Any] = info.to_dict()
        try:
            with open_archive(info.url) as reader:
                m = reader.manifest
                row.update({k: m.get(k) for k in SUMMARY_FIELDS})
                if reader.encrypted:
                    enc = encryption_summary(reader.header.get("encryption"))
                    row.update(encryption_mode=enc.get("mode"), fingerprints=enc.get("fingerprints", []))
        except ArchiveError as exc:
            row["error"] = str(exc)
        rows.append(row)
    return rows


@task(name="catalog", retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=should_retry, cache_policy=NO_CACHE)
def catalog(store: ArchiveStore) -> list[dict[str, Any]]:
    """Prefect task wrapper of :func:`describe_archives`."""
    rows = describe_archives(store)
    logger().info(
        "catalog: %d archives in %s (%d unreadable)", len(rows), store.describe(), sum(1 for r in rows if r.get("error"))
    )
    return rows
