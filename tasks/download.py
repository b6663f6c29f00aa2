"""Download: fetch an archive from its store into private local staging."""

from __future__ import annotations

from pathlib import Path

from blocks.store import ArchiveStore
from burrow.errors import should_retry
from burrow.runlog import logger
from tasks import task


def download_archive(store: ArchiveStore, name: str, workdir: Path) -> Path:
    dest = workdir / "archive.burrow"
    dest.unlink(missing_ok=True)
    store.get(name, dest)
    logger().info("download: fetched %s (%d bytes)", store.url(name), dest.stat().st_size)
    return dest


@task(name="download", retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=should_retry)
def download(store: ArchiveStore, name: str, workdir: str) -> str:
    """Prefect task wrapper of :func:`download_archive`."""
    return str(download_archive(store, name, Path(workdir)))
