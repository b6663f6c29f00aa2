"""Post-verify: after a failover's restore, re-read the target and compare it with the archive.

Every archived key the restore selected (after ``--subtree`` and ``--map``, translated to the
target's key space) must now be present in the target with its archived value, except the
conflicts the restore reported (existing keys that differ, which the safety rule leaves as
they are, listed by path). Anything else (a key missing, a value that differs and was not
reported as a conflict) fails the run: the restore claimed something the target does not
hold. A folder key folded onto a ZooKeeper node only needs the node to exist.

A key that holds its value is checked for the metadata a restore carries too, by the target's
session (``check_metadata``): a ZooKeeper node's ACL must be the one the restore gives it (the
archived ACL; the restorer-only placeholder where the source redacted it or the archive has
none), a Consul key's flags the archived flags, and an etcd key archived as leased
(``--include-leased``) must hold a lease (and any other must not). Each difference fails the
run too, counted by kind: a node left on the placeholder ACL is as broken for its clients as
a missing one.

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
from burrow.records import Record, display_key
from burrow.runlog import logger
from tasks import task

BATCH = 2000
LIST_LIMIT = 1000
#: Sessions reading the target at once.
WORKERS = 3


#: A key to check: its key in the target, its archived value, whether only its existence counts
#: (a folder key folded onto a ZooKeeper node), and its archived metadata.
Item = tuple[bytes, bytes, bool, dict[str, Any]]


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
    #: Keys holding their value whose metadata differs, by kind ("acl", "flags", "lease"); not in ``matching``.
    metadata_differing: dict[str, int] = field(default_factory=dict)
    metadata_paths: list[str] = field(default_factory=list)  # "path (kind)"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.differing or self.metadata_differing)

    def as_summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "postverify_checked": self.checked, "postverify_matching": self.matching,
            "postverify_conflicts": self.conflicts_confirmed, "postverify_missing": self.missing,
            "postverify_differing": self.differing,
        }
        for kind in METADATA_KINDS:
            out[f"postverify_{kind}_differing"] = self.metadata_differing.get(kind, 0)
        return out

    def problem(self) -> str:
        """What failed, in counts (the paths are in the run's artifact), or "" when nothing did."""
        parts = []
        if self.missing:
            parts.append(f"{self.missing} archived keys are missing")
        if self.differing:
            parts.append(f"{self.differing} differ without being reported conflicts")
        for kind in sorted(self.metadata_differing):
            parts.append(f"{self.metadata_differing[kind]} hold their value with {_KIND_TEXT.get(kind, kind)}")
        return ", ".join(parts)

    def _metadata(self, key: bytes, kind: str) -> None:
        self.metadata_differing[kind] = self.metadata_differing.get(kind, 0) + 1
        if len(self.metadata_paths) < LIST_LIMIT:
            self.metadata_paths.append(f"{display_key(key)} ({kind})")


#: The kinds of metadata a target's ``check_metadata`` reports (each is a summary count).
METADATA_KINDS = ("acl", "flags", "lease")
_KIND_TEXT = {
    "acl": "an ACL other than the archive's", "flags": "flags other than the archive's",
    "lease": "a lease where the archive has none, or none where it has one",
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

    def lookup(batch: list[Item]) -> tuple[list[bytes | None], list[str | None]]:
        """The batch's current values, and for the keys holding their archived value (not a
        folded folder key) what of their metadata differs, by kind, where the target can tell."""
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = target.connect()
            with lock:
                sessions.append(session)
        values = session.lookup([k for k, _, _, _ in batch])
        kinds: list[str | None] = [None] * len(batch)
        check = getattr(session, "check_metadata", None)
        if check is not None:
            same = [i for i, ((_, v, folded, _), cur) in enumerate(zip(batch, values, strict=True))
                    if cur is not None and not folded and cur == v]
            if same:
                found = check([Record(batch[i][0], batch[i][1], batch[i][3]) for i in same], source_service)
                for i, kind in zip(same, found, strict=True):
                    kinds[i] = kind
        return values, kinds

    def settle(batch: list[Item], answer: tuple[list[bytes | None], list[str | None]]) -> None:
        nonlocal unlisted
        values, kinds = answer
        for (key, value, exists_only, _), current, kind in zip(batch, values, kinds, strict=True):
            out.checked += 1
            if current is None:
                out.missing += 1
                if len(out.missing_paths) < LIST_LIMIT:
                    out.missing_paths.append(display_key(key))
            elif kind is not None:
                out._metadata(key, kind)
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
    pending: deque[tuple[list[Item], Future]] = deque()
    source_service = ""
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="burrow-postverify") as pool, \
                open(archive_path, "rb") as f:
            reader = ArchiveReader(f)
            source_service = reader.manifest["service"]
            dedupe = target.service == "zookeeper" and source_service != "zookeeper"
            batch: list[Item] = []

            def send() -> None:
                nonlocal batch
                pending.append((batch, pool.submit(lookup, batch)))
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
                    batch.append((key, rec.value, folded_folder(mapped, key), rec.meta))
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
    for kind, n in sorted(out.metadata_differing.items()):
        log.error("post-verify: %d keys in %s hold their value with %s (paths in the run's artifact)",
                  n, target.describe(), _KIND_TEXT.get(kind, kind))
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
