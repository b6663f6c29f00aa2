"""Verify: re-read a stored archive from its store and check everything again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blocks.store import ArchiveStore
from burrow.archive import ArchiveReader, BodyDecryptor
from burrow.crypto import check_layout
from burrow.errors import should_retry
from burrow.runlog import logger
from tasks import task
from tasks.download import download_archive
from tasks.validate import validate_archive


def verify_stored(
    store: ArchiveStore, name: str, workdir: Path, decryptor: BodyDecryptor | None = None,
    allow_unencrypted: bool = False,
) -> dict[str, Any]:
    """Download ``name`` from ``store`` and validate it; return its manifest. With keys in
    ``decryptor``, an unencrypted archive is refused unless ``allow_unencrypted``."""
    sub = workdir / "verify"
    sub.mkdir(exist_ok=True)
    path = download_archive(store, name, sub)
    try:
        return validate_archive(path, decryptor, label=store.url(name), allow_unencrypted=allow_unencrypted)
    finally:
        path.unlink(missing_ok=True)


def verify_structure(path: Path, label: str = "archive") -> dict[str, Any]:
    """Keyless checks of a local archive: framing, header hash, body length and SHA-256, and
    (when encrypted) the chunk layout. Nothing is decrypted and the manifest is NOT
    authenticated: this is what a worker holding only recipients' public keys can check."""
    with open(path, "rb") as f:
        reader = ArchiveReader(f, label=label)
        reader.check_stored()
        chunks = None
        if reader.encrypted:
            chunks = check_layout(reader.header.get("encryption"), reader.body_length, label)
        manifest = reader.manifest
    logger().info(
        "verify: %s structure ok (%s); content not decrypted",
        label, f"{chunks} encrypted chunks" if chunks is not None else "not encrypted",
    )
    return manifest


def verify_stored_structure(store: ArchiveStore, name: str, workdir: Path) -> dict[str, Any]:
    """Download ``name`` and run :func:`verify_structure` on it."""
    sub = workdir / "verify"
    sub.mkdir(exist_ok=True)
    path = download_archive(store, name, sub)
    try:
        return verify_structure(path, label=store.url(name))
    finally:
        path.unlink(missing_ok=True)


@task(name="verify", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def verify(
    store: ArchiveStore, name: str, workdir: str, decryptor: BodyDecryptor | None = None,
    allow_unencrypted: bool = False,
) -> dict[str, Any]:
    """Prefect task wrapper of :func:`verify_stored`."""
    return verify_stored(store, name, Path(workdir), decryptor, allow_unencrypted)


@task(
    name="verify-structure", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry,
)
def verify_structure_task(store: ArchiveStore, name: str, workdir: str) -> dict[str, Any]:
    """Prefect task wrapper of :func:`verify_stored_structure`."""
    return verify_stored_structure(store, name, Path(workdir))
