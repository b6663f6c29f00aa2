"""Rehearse: the stages of a restore rehearsal around the restore itself (flows/rehearse.py).

* :func:`check_scratch`: the scratch target (a ZooKeeper chroot, an etcd or Consul prefix,
  or a whole scratch cluster) must be empty, so that everything found there afterwards is
  what the rehearsal restored; which levels of a ZooKeeper chroot are missing is noted, so
  cleanup removes exactly the ones the restore created.
* :func:`compare_scratch`: re-read the scratch target with the service's own walk and diff
  it, key by key, with the archive's records (tasks/drift.py: streaming, bounded memory,
  by path and value digest, never printing a value). The only keys allowed in the target
  that the archive lacks are the empty intermediate parents the restore created.
* :func:`clean_scratch`: delete exactly what the restore created (the list its replay kept,
  intermediate parents included, tasks/undo.py), children first, each key only if unchanged
  since it was created (``delete_if_version`` of the source sessions, as ``burrow undo`` does:
  a guarded, atomic delete), then the chroot levels it created. Anything else (a key someone
  changed or added meanwhile) is left alone and counted.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocks.source import SourceBlock, WalkStats
from burrow.archive import BodyDecryptor
from burrow.errors import (
    ArchiveError,
    ArchiveNotFound,
    AuthError,
    BurrowError,
    SourceError,
    SourceUnavailable,
    StoreError,
    StoreUnavailable,
    UsageError,
    should_retry,
)
from burrow.extsort import ExternalSorter
from burrow.records import Record, decode_record, display_key, encode_record, read_records
from burrow.runlog import logger
from burrow.staging import open_spool_reader
from tasks import task
from tasks.drift import Drift, diff_archive
from tasks.plan import RUN_BYTES
from tasks.undo import created_spool

DELETE_BATCH = 1000
LIST_LIMIT = 1000


# ---------------------------------------------------------------------------- public error text
#
# A rehearsal's error goes into its marker (beside the archive, readable by anyone who can read
# the store), its artifact and its ``burrow.rehearsal.failed`` event. The messages of the restore
# and the comparison name key paths (``/customer-acme/db-password cannot be restored ...``), and
# a key path can be a secret in itself. So what leaves the run's logs names a class and a count,
# never the message; the full message stays in the run's logs.

#: The class a failure of the restore, comparison or cleanup is reported as, most specific first.
_CLASSES: list[tuple[type[BaseException], str]] = [
    (AuthError, "permission denied"),
    (SourceUnavailable, "the scratch target became unavailable"),
    (StoreUnavailable, "the store became unavailable"),
    (ArchiveNotFound, "the archive is missing (pruned meanwhile?)"),
    (StoreError, "the store refused it"),
    (ArchiveError, "the archive's records are malformed"),
    (SourceError, "the scratch target refused it"),
]

#: A key path in a message: a ``/`` that starts a word (not one inside a URL or a file path's
#: middle), up to the next blank or quote.
_PATH = re.compile(r"""(?<![\w:/.@%-])/[^\s'"]*""")


def error_class(exc: BaseException) -> str:
    """What kind of failure ``exc`` is, in words that name no key, value or path."""
    return next((what for cls, what in _CLASSES if isinstance(exc, cls)), type(exc).__name__)


def without_paths(text: str) -> str:
    """``text`` with every word that starts like a key path replaced by ``<key>``."""
    return _PATH.sub("<key>", text)


def public_error(exc: BaseException, stage: str) -> str:
    """The one-line error of a failed rehearsal for its marker, artifact and event: a class and
    a count, never a key path. ``stage``: ``download`` or ``validate`` (archive-level messages,
    kept with any key-like word masked), ``restore``, ``compare`` or ``cleanup`` (the message is
    replaced: those name keys), ``own`` (a message the flow built from counts)."""
    if stage in ("download", "validate", "own") or not isinstance(exc, BurrowError):
        return without_paths(str(exc))[:500]
    what = error_class(exc)
    if stage == "restore":
        return f"the restore into the scratch target failed: 1 key could not be restored ({what}); it is named in the run's logs"
    if stage == "compare":
        return f"the comparison with the scratch target failed ({what}); the key is named in the run's logs"
    return f"the {stage} of the scratch target failed ({what}); details in the run's logs"


@dataclass
class Scratch:
    """A scratch target checked empty: its description and the chroot levels it lacks."""

    target: str
    missing_levels: list[str] = field(default_factory=list)  # ZooKeeper chroot levels, top first


def _chroot_levels(target: SourceBlock) -> list[str]:
    """The levels of a ZooKeeper target's chroot, top first (a target with a session above its
    chroot, ``unrooted()``); none for any other target."""
    chroot = getattr(target, "chroot", None) if hasattr(target, "unrooted") else None
    if not chroot or chroot == "/":
        return []
    levels, path = [], ""
    for part in chroot.strip("/").split("/"):
        path += "/" + part
        levels.append(path)
    return levels


def check_scratch_target(target: SourceBlock) -> Scratch:
    """Refuse a scratch target that holds any key (nothing is written); note which levels of a
    ZooKeeper chroot do not exist yet (the restore creates them, cleanup removes them)."""
    session = target.connect()
    try:
        walker = session.walk(b"/", WalkStats())
        try:
            first = next(walker, None)
        finally:
            walker.close()
    finally:
        session.close()
    if first is not None:
        raise UsageError(
            f"the scratch target {target.describe()} already holds keys: a rehearsal restores only into an empty "
            "chroot, prefix or cluster (so that it can compare and clean up exactly what it restored); give an "
            "empty one, such as a new chroot or prefix. Nothing was written"
        )
    missing: list[str] = []
    levels = _chroot_levels(target)
    if levels:
        root = target.unrooted()  # type: ignore[attr-defined]
        try:
            found = root.created_versions([p.encode("utf-8") for p in levels])
        finally:
            root.close()
        missing = [p for p, version in zip(levels, found, strict=True) if version is None]
    logger().info(
        "rehearse: scratch target %s is empty%s", target.describe(),
        f" ({len(missing)} chroot level(s) to create)" if missing else "",
    )
    return Scratch(target=target.describe(), missing_levels=missing)


@task(name="check-scratch", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def check_scratch(target: SourceBlock) -> Scratch:
    """Prefect task wrapper of :func:`check_scratch_target`."""
    return check_scratch_target(target)


@dataclass
class Comparison:
    """The outcome of comparing a scratch restore with its archive."""

    ok: bool
    drift: Drift
    problem: str | None = None


def _as_restored(target: SourceBlock) -> SourceBlock:
    """``target`` walking every key a restore may have written: leased etcd keys included."""
    if getattr(target, "include_leased", True) is False:
        return target.model_copy(update={"include_leased": True})
    return target


def compare_scratch_target(
    archive_path: Path, target: SourceBlock, workdir: Path, decryptor: BodyDecryptor | None,
    intermediate_created: int, label: str = "archive",
) -> Comparison:
    """Diff the scratch target against the archive: every archived key must be there with
    its value; the only extra keys allowed are the empty parents the restore created.

    The scratch target is walked as it was restored, leased keys included: an archive taken
    with ``--include-leased`` was restored with a fresh lease on each of its leased keys, and an
    etcd walk of a block without ``include_leased`` would skip them all (every one would count
    as missing)."""
    d = diff_archive(archive_path, _as_restored(target), workdir, decryptor=decryptor, root="/", label=label)
    problems = []
    if d.removed:
        problems.append(f"{d.removed} archived keys missing")
    if d.changed:
        problems.append(f"{d.changed} keys with a value other than the archive's")
    unexpected = d.added - min(d.added_empty, max(0, intermediate_created))
    if unexpected:
        problems.append(f"{unexpected} keys the archive does not hold")
    problem = ", ".join(problems) or None
    log = logger()
    if problem:
        log.error("rehearse: the scratch restore differs from %s: %s", label, problem)
    else:
        log.info("rehearse: every one of the %d archived keys is in the scratch target with its value", d.archive_keys)
    return Comparison(ok=problem is None, drift=d, problem=problem)


@task(name="compare-scratch", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def compare_scratch(
    archive_path: str, target: SourceBlock, workdir: str, decryptor: BodyDecryptor | None,
    intermediate_created: int, label: str = "archive",
) -> Comparison:
    """Prefect task wrapper of :func:`compare_scratch_target`."""
    return compare_scratch_target(Path(archive_path), target, Path(workdir), decryptor, intermediate_created, label)


def _deepest_first(records: Iterator[Record], workdir: Path) -> Iterator[Record]:
    """``records`` children before parents (by depth, deepest first), through the bounded sort."""
    sorter = ExternalSorter(workdir, RUN_BYTES, "comparison")
    try:
        for r in records:
            depth = r.key.count(b"/")
            sorter.add(b"%06d" % (999_999 - min(depth, 999_999)) + encode_record(Record(r.key, r.value)))
        for line in sorter:
            yield decode_record(line[6:])
    finally:
        sorter.close()


def _created_records(created: Path) -> Iterator[Record]:
    """The keys the restore created (its replay's sealed list, tasks/undo.py), each with the
    version it was created at as its value."""
    if not created.exists():
        return  # the replay created nothing
    with open_spool_reader(created) as f:
        for r in read_records(f):
            yield Record(r.key, r.value)


def clean_scratch_target(
    target: SourceBlock, scratch: Scratch, workdir: Path, restored: Path | None = None
) -> dict[str, Any]:
    """Delete what the rehearsal restored into ``target``, then the chroot levels it created.

    ``restored`` is the restore's plan spool (tasks/plan.py); beside it, its replay listed every
    key it created with the version it was created at, intermediate parents included
    (tasks/undo.py ``CREATED_SPOOL``): exactly those keys are deleted, children first, each only
    if unchanged since (``delete_if_version``). Without a plan (planning failed before it wrote
    one) nothing is deleted, and one log line says so: the restore wrote nothing
    without a plan, and whatever the scratch target holds then is not the rehearsal's to delete
    (walking it and deleting what it read once could remove keys someone else wrote there).
    Returns ``{"deleted", "left", "left_paths"}`` (and ``"no_plan": True`` when there was none);
    a key left alone is counted, never an error."""
    log = logger()
    if restored is None or not restored.exists():
        log.warning("rehearse: no restore plan was made, so the rehearsal wrote nothing to %s; cleanup deletes "
                    "nothing there", target.describe())
        return {"deleted": 0, "left": 0, "left_paths": [], "no_plan": True}
    started = time.monotonic()
    deleted = revoked = 0
    left_paths: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="cleanup-", dir=workdir))
    session = target.connect()
    delete = getattr(session, "delete_if_version", None)
    if delete is None:
        session.close()
        raise SourceError(f"{target.service} targets cannot be cleaned up by this Burrow (no delete support)")
    try:
        tree = session.parent_key(b"/a/b") is not None
        records: Iterator[Record] = _created_records(created_spool(restored))
        if tree:
            records = _deepest_first(records, base)  # (reads them all before the first delete)
        batch: list[Record] = []
        # etcd: the leases the restore granted the keys it created, read before they are deleted
        held = getattr(session, "leases_held", None)
        leases: set[int] = set()

        def flush() -> None:
            nonlocal deleted
            if held is not None and batch:
                leases.update(held(batch))
            deleted += sum(delete([(r.key, int(r.value)) for r in batch]))
            batch.clear()

        for r in records:
            batch.append(r)
            if len(batch) >= DELETE_BATCH:
                flush()
        flush()
        if leases:
            # A granted lease outlives its keys until its TTL runs out: revoke each that holds no
            # key any more (one that still holds a key someone attached to it is left to expire).
            revoked = session.revoke_unused(leases)  # type: ignore[attr-defined]
    finally:
        session.close()
    left = 0
    session = _as_restored(target).connect()  # (a leased key left behind is counted too)
    try:
        for r in session.walk(b"/", WalkStats()):
            left += 1
            if len(left_paths) < LIST_LIMIT:
                left_paths.append(display_key(r.key))
    finally:
        session.close()
    if not left and scratch.missing_levels:
        root = target.unrooted()  # type: ignore[attr-defined]
        try:
            levels = [Record(p.encode("utf-8"), b"") for p in reversed(scratch.missing_levels)]
            for r, ok in zip(levels, root.delete_if_unchanged(levels), strict=True):
                if not ok:
                    left_paths.append(f"{display_key(r.key)} (chroot level)")
        finally:
            root.close()
    if left:
        log.warning(
            "rehearse: cleanup of %s left %d keys the rehearsal did not restore, or that changed since "
            "(left alone)", target.describe(), left,
        )
    log.info("rehearse: cleaned up %s: %d keys deleted, %d left%s, in %.2fs", target.describe(), deleted, left,
             f", {revoked} leases revoked" if revoked else "", time.monotonic() - started)
    return {"deleted": deleted, "left": left, "left_paths": left_paths, "leases_revoked": revoked}


@task(name="clean-scratch", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def clean_scratch(target: SourceBlock, scratch: Scratch, workdir: str, restored: str | None = None) -> dict[str, Any]:
    """Prefect task wrapper of :func:`clean_scratch_target` (retrying it is safe: a key already
    deleted is simply not found again)."""
    return clean_scratch_target(target, scratch, Path(workdir), Path(restored) if restored else None)
