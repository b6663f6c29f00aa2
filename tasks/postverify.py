"""Post-verify: after a failover's restore, re-read the target and compare it with the archive.

Every archived key the restore selected (after ``--subtree`` and ``--map``, translated to the
target's key space) must now be present in the target with its archived value, except the
conflicts the restore reported (existing keys that differ, which the safety rule leaves as
they are, listed by path). Anything else (a key missing, a value that differs and was not
reported as a conflict) fails the run: the restore claimed something the target does not
hold. A folder key folded onto a ZooKeeper node only needs the node to exist.

The archive is streamed (decrypting as it goes) and the target is read in batches: memory stays
bounded whatever the archive's size. Only counts and paths are reported, never values.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocks.source import SourceBlock
from burrow import progress
from burrow.archive import ArchiveReader, BodyDecryptor
from burrow.errors import PermanentError, should_retry
from burrow.paths import KeyMapper, folded_folder, translate
from burrow.records import display_key
from burrow.runlog import logger
from tasks import task

BATCH = 2000
LIST_LIMIT = 1000
#: Sessions reading the target at once.
WORKERS = 3


class PostVerifyFailed(PermanentError):
    """The target does not hold what the restore claims to have written."""


@dataclass
class Verified:
    """What post-verify found."""

    checked: int = 0
    matching: int = 0
    conflicts_confirmed: int = 0  # differ, and reported as conflicts by the restore
    missing: int = 0
    differing: int = 0  # differ, and not reported as conflicts
    missing_paths: list[str] = field(default_factory=list)
    differing_paths: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.differing)

    def as_summary(self) -> dict[str, object]:
        return {
            "postverify_checked": self.checked, "postverify_matching": self.matching,
            "postverify_conflicts": self.conflicts_confirmed, "postverify_missing": self.missing,
            "postverify_differing": self.differing,
        }


def verify_target(
    archive_path: Path,
    target: SourceBlock,
    *,
    subtree: str | None = None,
    maps: list[str] | None = None,
    decryptor: BodyDecryptor | None = None,
    conflict_paths: list[str] | None = None,
    conflicts: int = 0,
    workers: int = WORKERS,
) -> Verified:
    """Compare every selected archived key with the target, as described in the module doc.

    ``conflict_paths`` (the restore's list, display form) and ``conflicts`` (its count: the
    list stops at 1,000 paths) say which differences the restore already reported; beyond the
    listed paths, at most ``conflicts - len(conflict_paths)`` unlisted differences are
    accepted as those conflicts."""
    log = logger()
    started = time.monotonic()
    mapper = KeyMapper(subtree, maps)
    excused = set(conflict_paths or [])
    unlisted = max(0, conflicts - len(excused))
    out = Verified()
    # Into ZooKeeper from another service two archived keys may land on one node (etcd ``x`` and
    # ``/x``): the first decides, a later one was planned as identical or a conflict.
    seen: set[bytes] = set()
    sessions: list[Any] = []
    local = threading.local()
    lock = threading.Lock()

    def lookup(keys: list[bytes]) -> list[bytes | None]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = target.connect()
            with lock:
                sessions.append(session)
        return session.lookup(keys)

    def settle(batch: list[tuple[bytes, bytes, bool]], values: list[bytes | None]) -> None:
        nonlocal unlisted
        for (key, value, exists_only), current in zip(batch, values, strict=True):
            out.checked += 1
            if current is None:
                out.missing += 1
                if len(out.missing_paths) < LIST_LIMIT:
                    out.missing_paths.append(display_key(key))
            elif exists_only or current == value:
                out.matching += 1
            elif display_key(key) in excused:
                out.conflicts_confirmed += 1
            elif unlisted > 0:
                unlisted -= 1
                out.conflicts_confirmed += 1
            else:
                out.differing += 1
                if len(out.differing_paths) < LIST_LIMIT:
                    out.differing_paths.append(display_key(key))

    # Reads go out over up to ``workers`` sessions at once (a round trip per key is what costs);
    # at most two batches per session are in flight, so memory stays bounded.
    pending: deque[tuple[list[tuple[bytes, bytes, bool]], Future]] = deque()
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="burrow-postverify") as pool, \
                open(archive_path, "rb") as f:
            reader = ArchiveReader(f)
            source_service = reader.manifest["service"]
            dedupe = target.service == "zookeeper" and source_service != "zookeeper"
            batch: list[tuple[bytes, bytes, bool]] = []

            def send() -> None:
                nonlocal batch
                pending.append((batch, pool.submit(lookup, [k for k, _, _ in batch])))
                batch = []
                while len(pending) > 2 * max(1, workers):
                    done, future = pending.popleft()
                    settle(done, future.result())

            with progress.stage("post-verify", total=reader.manifest.get("keys")) as advance:
                for rec in reader.records(decryptor):
                    advance(1)
                    mapped = mapper(rec.key)
                    if mapped is None:
                        continue
                    key = translate(mapped, source_service, target.service)
                    if dedupe:
                        if key in seen:
                            continue
                        seen.add(key)
                    batch.append((key, rec.value, folded_folder(mapped, key)))
                    if len(batch) >= BATCH:
                        send()
                if batch:
                    send()
                while pending:
                    done, future = pending.popleft()
                    settle(done, future.result())
    finally:
        for future in (f for _, f in pending):
            future.cancel()
        for session in sessions:
            session.close()
    out.seconds = time.monotonic() - started
    log.info(
        "post-verify: %d keys checked in %s: %d match, %d reported conflicts, %d missing, %d differ; %.2fs",
        out.checked, target.describe(), out.matching, out.conflicts_confirmed, out.missing, out.differing, out.seconds,
    )
    return out


@task(name="postverify", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def postverify(
    archive_path: str,
    target: SourceBlock,
    subtree: str | None = None,
    maps: list[str] | None = None,
    decryptor: BodyDecryptor | None = None,
    conflict_paths: list[str] | None = None,
    conflicts: int = 0,
) -> Verified:
    """Prefect task wrapper of :func:`verify_target` (retried on transient errors: it only reads)."""
    return verify_target(
        Path(archive_path), target, subtree=subtree, maps=maps, decryptor=decryptor,
        conflict_paths=conflict_paths, conflicts=conflicts,
    )
