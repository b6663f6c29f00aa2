"""Verify: re-read a stored archive from its store and check everything again."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blocks.store import ARCHIVE_SUFFIX, SIDECAR_SUFFIX, ArchiveStore
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


# ---------------------------------------------------------------------------- verification records

#: ``<archive>.verified-<level>.burrow-meta``: what the backup that wrote the archive verified
#: ("full" or "structure-only"), in the name, so one listing tells every archive's level. An
#: archive the backup could not verify (the store failed during the verify) is left in the
#: store without one, and list/status show it as unverified.
VERIFIED_INFIX = ".verified-"
VERIFICATION_LEVELS = ("full", "structure-only")


def verified_record_name(archive_name: str, level: str) -> str:
    if level not in VERIFICATION_LEVELS:
        raise ValueError(f"unknown verification level {level!r}")
    return f"{archive_name}{VERIFIED_INFIX}{level}{SIDECAR_SUFFIX}"


def record_verification(store: ArchiveStore, archive_name: str, level: str) -> str:
    """Write the create-only record of what the backup verified; returns its name. It is a
    convenience for ``list``/``status``, not a trust anchor: anyone who may write to the store
    could write one, so no decision (prune, failover, restore) reads it."""
    name = verified_record_name(archive_name, level)
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    store.put_sidecar(name, json.dumps({"level": level, "at": at}, sort_keys=True).encode())
    return name


@task(name="record-verification", retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=should_retry)
def record_verification_task(store: ArchiveStore, archive_name: str, level: str) -> str:
    """Prefect task wrapper of :func:`record_verification`."""
    return record_verification(store, archive_name, level)


def verification_levels(store: ArchiveStore) -> dict[str, str]:
    """``{archive name: "full" | "structure-only"}`` for every archive whose backup recorded a
    verification, from one listing of the store's sidecars (the level is in the record's name).
    An archive missing here was written before verification records existed, or was left
    unverified by its backup (``list``/``status`` tell the two apart by the archive's format)."""
    out: dict[str, str] = {}
    for name in store.list_sidecars():
        if not name.endswith(SIDECAR_SUFFIX) or VERIFIED_INFIX not in name:
            continue
        archive, _, level = name[: -len(SIDECAR_SUFFIX)].rpartition(VERIFIED_INFIX)
        if archive.endswith(ARCHIVE_SUFFIX) and level in VERIFICATION_LEVELS:
            if out.get(archive) != "full":  # both recorded (never by Burrow): the stronger one
                out[archive] = level
    return out


def verification_of(name: str, levels: dict[str, str]) -> str | None:
    """The level :func:`verification_levels` recorded for the archive ``name``, matched as
    binding matches names: ``name`` itself, or ``name`` ending with ``/<recorded name>`` (a store
    opened one directory above the one the backup wrote to)."""
    parts = name.split("/")
    for i in range(len(parts)):
        level = levels.get("/".join(parts[i:]))
        if level is not None:
            return level
    return None
