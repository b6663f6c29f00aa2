"""Drift: diff an archive against a live cluster by path, never by value.

Both sides are streams of ``(key, SHA-256 of the value)``: the archive's records (keys
translated into the live cluster's key space) and the cluster's own walk. Each stream goes
through the bounded external sort of the restore planner (tasks/plan.py: runs of at most
``RUN_BYTES`` sorted in memory, spilled to sealed spools, merged), then one merge-join walks
both in step. Memory stays bounded whatever the size of the tree, values never reach the
disk (only their digests do, in sealed spools), and the result lists keys by path only.

* ``added``: in the cluster, not in the archive;
* ``removed``: in the archive, not in the cluster;
* ``changed``: in both, with different values.

The rehearsal (tasks/rehearse.py) uses the same diff to compare a scratch restore with its
archive.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kazoo.exceptions import KazooException

from blocks.source import SourceBlock, WalkStats
from blocks.zookeeper import ZooKeeperSession
from burrow.archive import ArchiveReader, BodyDecryptor
from burrow.errors import should_retry
from burrow.extsort import ExternalSorter
from burrow.paths import translate
from burrow.records import Record, display_key
from burrow.runlog import logger
from tasks import task
from tasks.plan import RUN_BYTES

#: Paths listed per kind of difference (the counts are always complete).
LIST_LIMIT = 1000
_EMPTY = hashlib.sha256(b"").hexdigest().encode()


@dataclass
class Drift:
    """The differences between an archive and a cluster, by path."""

    archive_keys: int = 0
    live_keys: int = 0
    same: int = 0
    added: int = 0
    removed: int = 0
    changed: int = 0
    added_empty: int = 0  # added keys with an empty value (a restore's intermediate parents)
    added_paths: list[str] = field(default_factory=list)
    removed_paths: list[str] = field(default_factory=list)
    changed_paths: list[str] = field(default_factory=list)
    walk_info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        """Keys that differ in any way."""
        return self.added + self.removed + self.changed

    def counts(self) -> dict[str, int]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed}

    def _note(self, kind: str, key_hex: bytes) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        paths: list[str] = getattr(self, f"{kind}_paths")
        if len(paths) < LIST_LIMIT:
            paths.append(display_key(bytes.fromhex(key_hex.decode("ascii"))))


def _line(key: bytes, value: bytes) -> bytes:
    # hex keeps byte order (and a shorter key sorts before its extensions: " " < any hex digit)
    return key.hex().encode("ascii") + b" " + hashlib.sha256(value).hexdigest().encode("ascii") + b"\n"


def _pairs(lines: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Sorted lines as ``(key hex, value digest)``; a key seen twice counts once (the first)."""
    last = None
    for line in lines:
        k, _, d = line.rstrip(b"\n").partition(b" ")
        if k == last:
            continue
        last = k
        yield k, d


def merge_diff(archive: Iterable[bytes], live: Iterable[bytes], result: Drift) -> Drift:
    """Merge-join two sorted line streams (see :func:`_line`) into ``result``."""
    a_it, b_it = _pairs(archive), _pairs(live)
    a, b = next(a_it, None), next(b_it, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            result._note("removed", a[0])  # type: ignore[index]
            a = next(a_it, None)
        elif a is None or b[0] < a[0]:
            result._note("added", b[0])
            if b[1] == _EMPTY:
                result.added_empty += 1
            b = next(b_it, None)
        else:
            if a[1] == b[1]:
                result.same += 1
            else:
                result._note("changed", a[0])
            a, b = next(a_it, None), next(b_it, None)
    return result


def archive_lines(
    reader: ArchiveReader, decryptor: BodyDecryptor | None, target_service: str, result: Drift
) -> Iterator[bytes]:
    """The archive's records as sort lines, keys in ``target_service``'s key space. Reading
    to the end checks every checksum (ArchiveReader.records raises on any mismatch)."""
    source_service = reader.manifest["service"]
    for rec in reader.records(decryptor):
        result.archive_keys += 1
        yield _line(translate(rec.key, source_service, target_service), rec.value)


def live_lines(records: Iterable[Record], result: Drift) -> Iterator[bytes]:
    """A cluster walk as sort lines."""
    for rec in records:
        result.live_keys += 1
        yield _line(rec.key, rec.value)


def _sorted(lines: Iterable[bytes], workdir: Path) -> ExternalSorter:
    workdir.mkdir(parents=True, exist_ok=True)
    sorter = ExternalSorter(workdir, RUN_BYTES, "comparison")
    for line in lines:
        sorter.add(line)
    return sorter


def _missing_root(session: Any, root: str) -> bool:
    """True when ``root`` is a ZooKeeper node that no longer exists (the whole subtree was
    removed: every archived key counts as removed, where the walk would refuse the root)."""
    if not isinstance(session, ZooKeeperSession) or root in ("", "/"):
        return False
    try:
        return session.client.exists("/" + root.strip("/")) is None
    except KazooException as exc:
        raise session._wrap(exc, root, "reading") from None


def diff_archive(
    archive_path: Path,
    target: SourceBlock,
    workdir: Path,
    *,
    decryptor: BodyDecryptor | None = None,
    root: str | None = None,
    label: str = "archive",
) -> Drift:
    """Diff the local (downloaded) archive ``archive_path`` against the cluster ``target``,
    walked below ``root`` (default: the archive's own root when the services match, else
    the whole tree). Nothing is written to the cluster."""
    log = logger()
    started = time.monotonic()
    result = Drift()
    base = Path(tempfile.mkdtemp(prefix="drift-", dir=workdir))
    with open(archive_path, "rb") as f:
        reader = ArchiveReader(f, label=label)
        source_service = reader.manifest["service"]
        if root is None:
            root = str(reader.manifest.get("root") or "/") if source_service == target.service else "/"
        ours = _sorted(archive_lines(reader, decryptor, target.service, result), base / "archive")
    try:
        session = target.connect()
        try:
            stats = WalkStats()
            records = iter(()) if _missing_root(session, root) else session.walk(root.encode("utf-8"), stats)
            theirs = _sorted(live_lines(records, result), base / "live")
            result.walk_info = {"skipped_ephemeral": stats.skipped_ephemeral,
                                "skipped_excluded": stats.skipped_excluded, "vanished": stats.vanished}
        finally:
            session.close()
        try:
            merge_diff(ours, theirs, result)
        finally:
            theirs.close()
    finally:
        ours.close()
    result.seconds = time.monotonic() - started
    log.info(
        "drift: %s against %s below %s: %d added, %d removed, %d changed, %d the same (%d archived, %d live) in %.2fs",
        label, target.describe(), root, result.added, result.removed, result.changed, result.same,
        result.archive_keys, result.live_keys, result.seconds,
    )
    return result


@task(name="drift", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def drift(
    archive_path: str,
    target: SourceBlock,
    workdir: str,
    decryptor: BodyDecryptor | None = None,
    root: str | None = None,
    label: str = "archive",
) -> Drift:
    """Prefect task wrapper of :func:`diff_archive` (retried when the cluster is unreachable)."""
    return diff_archive(Path(archive_path), target, Path(workdir), decryptor=decryptor, root=root, label=label)
