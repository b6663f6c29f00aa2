"""Validate: read a local archive end to end and check manifest, checksums and counts.

Nothing is written anywhere until this has passed. A failed check is permanent: never retried.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from burrow.archive import ArchiveReader, BodyDecryptor
from burrow.errors import ArchiveError
from burrow.runlog import logger
from tasks import task


def validate_archive(
    path: Path, decryptor: BodyDecryptor | None = None, label: str = "archive", allow_unencrypted: bool = False,
    expect_manifest_sha256: str | None = None, parse_records: bool = True,
) -> dict[str, Any]:
    """Return the manifest of a fully checked archive; raise ArchiveError otherwise.

    When ``decryptor`` holds keys (a non-empty keyring), an unencrypted archive is refused
    unless ``allow_unencrypted``: with keys configured, a plaintext archive in the store is
    what someone who can write to it could have planted (a downgrade).

    ``expect_manifest_sha256`` is the manifest checksum of the catalog row the archive was
    chosen by: an archive whose own manifest differs is not the one the choice was made on
    (a forged catalog index entry), and is refused.

    ``parse_records=False``: every byte is checked but the record lines are not parsed, for a
    caller whose next step parses each of them before anything is written (a restore's plan
    raises ArchiveError on a malformed one): one parse of the archive instead of two.
    """
    started = time.monotonic()
    with open(path, "rb") as f:
        reader = ArchiveReader(f, label=label)
        reader.check_downgrade(decryptor, allow_unencrypted=allow_unencrypted)
        n = reader.validate(decryptor, parse=parse_records)
        manifest = reader.manifest
    if expect_manifest_sha256 is not None and manifest.get("manifest_sha256") != expect_manifest_sha256:
        raise ArchiveError(
            f"{label} is not the archive its catalog entry describes (its manifest differs from the one it was "
            "chosen by: a damaged or forged catalog index)"
        )
    logger().info(
        "validate: %s ok: %d keys, content sha256 %s, checked in %.2fs",
        label, n, manifest["content_sha256"][:16], time.monotonic() - started,
    )
    return manifest


@task(name="validate")
def validate(
    path: str, decryptor: BodyDecryptor | None = None, label: str = "archive", allow_unencrypted: bool = False,
    expect_manifest_sha256: str | None = None, parse_records: bool = True,
) -> dict[str, Any]:
    """Prefect task wrapper of :func:`validate_archive`."""
    return validate_archive(Path(path), decryptor, label, allow_unencrypted, expect_manifest_sha256, parse_records)
