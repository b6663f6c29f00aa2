"""Upload: put a finished archive into a store, atomically."""

from __future__ import annotations

from pathlib import Path

from blocks.store import ArchiveInfo, ArchiveStore
from burrow.errors import should_retry
from burrow.runlog import logger
from tasks import task


def upload_archive(store: ArchiveStore, path: Path, name: str) -> ArchiveInfo:
    info = store.put(name, path)
    logger().info("upload: stored %s (%d bytes)", info.url, info.size)
    from tasks.catalog import index_new_archive

    index_new_archive(store, name, info)
    return info


@task(name="upload", retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=should_retry)
def upload(store: ArchiveStore, path: str, name: str) -> ArchiveInfo:
    """Prefect task wrapper of :func:`upload_archive`."""
    return upload_archive(store, Path(path), name)


@task(name="check-store", retries=2, retry_delay_seconds=[1, 4], retry_condition_fn=should_retry)
def check_store(store: ArchiveStore) -> None:
    """Check the store is there and writable before a backup touches the cluster. A store that
    is down (StoreUnavailable) is retried like the upload would be; a missing or read-only one
    (a permanent StoreError) fails at once."""
    store.check(writable=True)
