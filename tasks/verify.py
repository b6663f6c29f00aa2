"""Verify: re-read a stored archive from its store and check everything again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.store import ArchiveStore
from burrow.archive import BodyDecryptor
from burrow.errors import should_retry
from tasks.download import download_archive
from tasks.validate import validate_archive


def verify_stored(
    store: ArchiveStore, name: str, workdir: Path, decryptor: BodyDecryptor | None = None
) -> dict[str, Any]:
    """Download ``name`` from ``store`` and validate it; return its manifest."""
    sub = workdir / "verify"
    sub.mkdir(exist_ok=True)
    path = download_archive(store, name, sub)
    try:
        return validate_archive(path, decryptor, label=store.url(name))
    finally:
        path.unlink(missing_ok=True)


@task(name="verify", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry, cache_policy=NO_CACHE)
def verify(store: ArchiveStore, name: str, workdir: str, decryptor: BodyDecryptor | None = None) -> dict[str, Any]:
    """Prefect task wrapper of :func:`verify_stored`."""
    return verify_stored(store, name, Path(workdir), decryptor)
