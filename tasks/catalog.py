"""Catalog: what is in a store, as archive listings with manifest summaries (the ``catalog``
task that prune and failover start with), and opening one archive for inspection.

A file in the store that does not open as a Burrow archive (half-written by another tool,
truncated, not an archive at all) never fails the catalog: its row carries ``error``, a
warning names it, and prune keeps it while failover passes it by. Only a transient store
failure (StoreUnavailable) fails the catalog, and the task retries that.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.local import LocalStore
from blocks.resolve import archive_from_ref
from blocks.store import ArchiveInfo, ArchiveStore
from burrow.archive import ArchiveReader
from burrow.crypto import ArchiveKeys, encryption_summary
from burrow.errors import ArchiveError, ArchiveNotFound, KeyMismatch, StoreError, should_retry, store_os_error
from burrow.runlog import logger

SUMMARY_FIELDS = ("service", "source", "keys", "raw_bytes", "created", "encrypted", "content_sha256")


@contextmanager
def open_archive(ref: str) -> Iterator[ArchiveReader]:
    """Open an archive for reading: in place when local, via a private download otherwise."""
    store, name = archive_from_ref(ref)
    with open_stored(store, name) as reader:
        yield reader


@contextmanager
def open_stored(store: ArchiveStore, name: str, size: int | None = None) -> Iterator[ArchiveReader]:
    """Open the archive ``name`` of ``store``: in place when the store is a local directory, by
    ranged reads where the store has them (S3: the archive is never downloaded whole), else
    through a private download. ``size`` saves a HEAD request when the listing gave it."""
    label = store.url(name)
    if isinstance(store, LocalStore):
        try:
            f = open(store.root / name, "rb")  # closed by the "with f" below, around the yield
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ArchiveNotFound(f"archive {label} not found") from None
        except OSError as exc:
            raise store_os_error(exc, f"cannot read archive {label}") from None
        with f:
            try:
                reader = ArchiveReader(f, label=label)
            except OSError as exc:
                raise store_os_error(exc, f"cannot read archive {label}") from None
            yield reader
        return
    open_ranged = getattr(store, "open_ranged", None)
    if open_ranged is not None:  # object storage: ranged reads of header, footer and manifest only
        with open_ranged(name, size) as f:
            yield ArchiveReader(f, label=label)
        return
    with tempfile.TemporaryDirectory(prefix="burrow-inspect-") as tmp:
        local = store.get(name, Path(tmp) / "archive.burrow")
        with open(local, "rb") as f:
            yield ArchiveReader(f, label=label)


def _summary_problem(manifest: dict[str, Any]) -> str | None:
    """Why the manifest's summary fields cannot be used to sort and select archives, if so."""
    source, created = manifest.get("source"), manifest.get("created")
    if not isinstance(source, str) or not source:
        return "its manifest names no source"
    if not isinstance(created, str):
        return "its manifest has no creation time"
    try:
        datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return "its manifest has an unreadable creation time"
    return None


def describe_archives(store: ArchiveStore, keys: ArchiveKeys | None = None) -> list[dict[str, Any]]:
    """Every complete archive in ``store`` with its manifest summary. A file that does not
    read as an archive gets an ``error`` (and a warning) instead of a summary."""
    log = logger()
    infos = store.list()
    # object stores answer one request at a time per connection: read several archives at once
    workers = 1 if isinstance(store, LocalStore) or len(infos) < 2 else 8
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="burrow-catalog") as pool:
        return list(pool.map(lambda info: _describe(store, info, log, keys), infos))


def _authenticate(reader: ArchiveReader, keys: ArchiveKeys) -> tuple[bool, str | None]:
    """Whether the manifest's claims (source, created, counts) can be trusted: its MAC checks
    under a configured key. An unencrypted archive's manifest cannot be authenticated."""
    if not reader.encrypted:
        return False, "unencrypted: its manifest cannot be authenticated (anyone who can write to the store could have made it)"
    try:
        reader.check_metadata(keys)
    except KeyMismatch:
        return False, "no configured key opens it"
    except ArchiveError as exc:
        return False, str(exc)
    return True, None


def _describe(store: ArchiveStore, info: ArchiveInfo, log: Any, keys: ArchiveKeys | None = None) -> dict[str, Any]:
    row: dict[str, Any] = info.to_dict()
    try:
        with open_stored(store, info.name, info.size) as reader:
            m = reader.manifest
            problem = _summary_problem(m)
            if problem is not None:
                raise ArchiveError(f"{info.url}: {problem}")
            row.update({k: m.get(k) for k in SUMMARY_FIELDS})
            if reader.encrypted:
                enc = encryption_summary(reader.header.get("encryption"))
                row.update(encryption_mode=enc.get("mode"), fingerprints=enc.get("fingerprints", []))
            if keys is not None and keys.keyring:
                row["authenticated"], why = _authenticate(reader, keys)
                if why:
                    row["unauthenticated_reason"] = why
    except (ArchiveError, StoreError) as exc:
        # Not an archive (or gone, or unreadable for good): reported, never fatal. A
        # transient StoreUnavailable is not caught: the catalog task retries it.
        row = {**info.to_dict(), "error": str(exc)}
        log.warning("catalog: skipping a file that is not a readable archive: %s", exc)
    return row


@task(name="catalog", retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=should_retry, cache_policy=NO_CACHE)
def catalog(store: ArchiveStore, keys: ArchiveKeys | None = None) -> list[dict[str, Any]]:
    """Prefect task wrapper of :func:`describe_archives`."""
    rows = describe_archives(store, keys)
    logger().info(
        "catalog: %d archives in %s (%d unreadable)", len(rows), store.describe(), sum(1 for r in rows if r.get("error"))
    )
    return rows


#: An archive dated later than now plus this is flagged: a clock error or a forgery.
FUTURE_SKEW = timedelta(minutes=5)


def created_at(row: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(row.get("created")).replace("Z", "+00:00"))
    except ValueError:
        return None


def distrust(row: dict[str, Any], *, keyed: bool, now: datetime | None = None) -> str | None:
    """Why a catalog row's claims (source, created) must not be acted on, or None: unreadable,
    dated in the future, or (when a read key is configured) not authenticated."""
    if row.get("error"):
        return "unreadable: " + str(row["error"])
    when = created_at(row)
    if when is None:
        return "no readable creation time"
    if when > (now or datetime.now(UTC)) + FUTURE_SKEW:
        return "dated in the future (a clock error or a forged manifest)"
    if keyed and row.get("authenticated") is not True:
        return "not authenticated: " + str(row.get("unauthenticated_reason") or "no configured key opens it")
    return None


def newest_first(rows: list[dict[str, Any]], source: str | None = None, *, keyed: bool) -> list[dict[str, Any]]:
    """The rows of ``source`` (all sources when None) whose claims may be acted on, newest first."""
    now = datetime.now(UTC)
    return by_creation([r for r in rows
                        if (source is None or r.get("source") == source) and distrust(r, keyed=keyed, now=now) is None])


def by_creation(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trusted rows (see :func:`distrust`), newest first."""
    return sorted(rows, key=lambda r: (created_at(r), r["name"]), reverse=True)
