"""Replay: create the planned keys in the target, each create atomic and create-if-absent.

A key that appeared since planning is never overwritten: it is compared and counted as
identical or as a conflict."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from blocks.source import SourceBlock
from burrow import progress
from burrow.perf import gc_paused
from burrow.records import Record, display_key, read_records
from burrow.runlog import logger
from burrow.staging import open_spool_reader
from tasks import task
from tasks.plan import LIST_LIMIT, Plan
from tasks.undo import CreatedLog, UndoSink, created_spool, seal_created

BATCH = 20_000  # records handed to the target at once (it pipelines them in transactions)
BATCH_BYTES = 32 * 1024 * 1024  # ... unless their values add up to this first


@dataclass
class Replayed:
    """What replay did."""

    created: int = 0
    intermediate_created: int = 0
    identical: int = 0
    conflicts: int = 0
    conflict_paths: list[str] = field(default_factory=list)
    target_report: dict[str, Any] = field(default_factory=dict)  # e.g. ZooKeeper's ACL counts and lists
    seconds: float = 0.0
    #: The spool of every key created, with its creation version (tasks/undo.py; the rehearsal cleanup reads it).
    created_path: str | None = None
    #: What the run summary says of the sealed undo list (``undo_run``, ...), or nothing.
    undo: dict[str, Any] = field(default_factory=dict)


@gc_paused
def replay_plan(plan: Plan, target: SourceBlock, undo: UndoSink | None = None) -> Replayed:
    """Execute the creates of ``plan`` against ``target``.

    Every key created is listed, with its creation version, in a spool beside the plan's
    (``Replayed.created_path``) as it goes. With ``undo``, that list is sealed into the run's
    store when the replay ends, however it ends (tasks/undo.py): on success ``Replayed.undo``
    says so; on an error or an interrupt after the first create, the exception carries it as
    ``undo_summary`` (the CLI prints its ``to undo:`` line either way)."""
    log = logger()
    started = time.monotonic()
    done = Replayed()
    created = CreatedLog(created_spool(plan.ops_path))
    done.created_path = str(created.path)
    session = target.connect()
    recorder = _Recorder(created)
    try:
        session.ensure_root()
        total = plan.to_create + plan.intermediate + plan.acl_pending
        with _Prefetch(plan.ops_path) as batches, progress.stage(f"restore into {plan.target}", total=total) as advance:
            for batch in batches:
                _apply(session, batch, done, created, recorder)
                advance(len(batch))
        recorder.close()
        finish = getattr(session, "finish", None)  # ZooKeeper: archived ACLs set once the children exist
        if finish is not None:
            done.target_report = finish()
    except BaseException as exc:
        try:
            recorder.close()  # what the batches before this one created is listed first
        except Exception as log_exc:  # noqa: BLE001 - the replay's own error is the one to report
            logger().warning("undo: the list of created keys could not be written (%s); an undo of this run "
                             "leaves the keys it misses", type(log_exc).__name__)
        _recover_inflight(session, created)
        created.close()
        if undo is not None and created.count:
            sealed = seal_created(undo, created, target)
            if sealed:
                exc.undo_summary = sealed  # type: ignore[attr-defined] - the CLI's "to undo:" line
        raise
    finally:
        created.close()
        session.close()
    if undo is not None:
        done.undo = seal_created(undo, created, target)
    done.seconds = time.monotonic() - started
    log.info(
        "replay: created %d (+%d intermediate); %d appeared meanwhile identical, %d conflicts; %.2fs",
        done.created, done.intermediate_created, done.identical, done.conflicts, done.seconds,
    )
    return done


class _Prefetch:
    """The plan's spool as batches of records, read and decoded by a thread of its own one
    batch ahead: while the target works on a batch's creates (the replay then waits on the
    network), the next batch is decoded, so the target does not wait for it in turn. At most
    one batch waits decoded beside the one being replayed and the one being read (memory
    stays bounded by BATCH_BYTES per batch). Errors reading the spool come out of the
    iteration; leaving the ``with`` stops the thread."""

    def __init__(self, ops_path: str) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._path = ops_path
        self._thread = threading.Thread(target=self._read, name="burrow-replay-read", daemon=True)

    def __enter__(self) -> Iterator[list[Record]]:
        self._thread.start()
        return self._batches()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():  # (it may be waiting to hand over a batch)
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()
            self._thread.join(0.05)

    def _put(self, item: Any) -> bool:  # noqa: ANN401 - a batch, an exception or None
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            with open_spool_reader(self._path) as f:
                batch: list[Record] = []
                size = 0
                for rec in read_records(f):
                    batch.append(rec)
                    size += len(rec.value)
                    if len(batch) >= BATCH or size >= BATCH_BYTES:
                        if not self._put(batch):
                            return
                        batch, size = [], 0
                if batch and not self._put(batch):
                    return
            self._put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the replaying thread, raised there
            self._put(exc)

    def _batches(self) -> Iterator[list[Record]]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class _Recorder:
    """Writes what each batch created into the created-keys list (tasks/undo.py) on a thread of
    its own, while the next batch is being created: the target does not wait for the list's
    encoding and sealing. One batch's entries at a time, in order; ``close`` waits for the
    last one and raises what writing it raised."""

    def __init__(self, created: CreatedLog) -> None:
        self.created = created
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def add(self, entries: list[tuple[bytes, int]]) -> None:
        self.wait()
        if not entries:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="burrow-replay-list")
        self._pending = self._pool.submit(self.created.add, entries)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                pool, self._pool = self._pool, None
                pool.shutdown(wait=True)


def _apply(session, batch: list[Record], done: Replayed, created: CreatedLog, recorder: _Recorder) -> None:  # noqa: ANN001
    created.inflight = batch
    outcome = session.create(batch)
    _record_created(session, batch, outcome, recorder)
    created.inflight = []
    # (a node an interrupted run left on its placeholder ACL, ``acl_pending``, was planned as identical)
    existed: list[Record] = []
    made = intermediate = 0
    for r, ok in zip(batch, outcome, strict=True):
        meta = r.meta
        if ok:
            if meta.get("intermediate"):
                intermediate += 1
            else:
                made += 1
        elif not meta.get("intermediate") and not meta.get("acl_pending"):
            existed.append(r)
    done.created += made
    done.intermediate_created += intermediate
    if existed:
        current = session.lookup([r.key for r in existed])
        for r, value in zip(existed, current, strict=True):
            if value == r.value:
                done.identical += 1
            else:
                done.conflicts += 1
                if len(done.conflict_paths) < LIST_LIMIT:
                    done.conflict_paths.append(display_key(r.key))


def _record_created(session, batch: list[Record], outcome: list[bool], created: CreatedLog | _Recorder) -> None:  # noqa: ANN001
    """List the keys of ``batch`` this create made, each with the version it was created at,
    read back in one batch (``created_versions``); a key gone meanwhile has nothing to undo."""
    made = [r.key for r, ok in zip(batch, outcome, strict=True) if ok]
    if not made:
        return
    versions = session.created_versions(made)
    created.add([(k, v) for k, v in zip(made, versions, strict=True) if v is not None])


def _recover_inflight(session, created: CreatedLog) -> None:  # noqa: ANN001 - a SourceSession
    """The replay stopped (an error, an interrupt) inside a batch's create: list the keys of that
    batch that exist now. Each was planned because it was absent (under the target's lock, which
    keeps other Burrow runs out), so this run created it; a key someone else made in that very
    window would be listed too, and undo would delete it only while unchanged since."""
    batch = [r.key for r in created.inflight if not r.meta.get("acl_pending")]
    created.inflight = []
    if not batch:
        return
    try:
        versions = session.created_versions(batch)
    except Exception as exc:  # noqa: BLE001 - the replay's own error is the one to report
        logger().warning("undo: the keys of the batch being created when the replay stopped could not be listed "
                         "(%s); an undo of this run leaves them", type(exc).__name__)
        return
    created.add([(k, v) for k, v in zip(batch, versions, strict=True) if v is not None])


@task(name="replay")
def replay(plan: Plan, target: SourceBlock, undo: UndoSink | None = None) -> Replayed:
    """Prefect task wrapper of :func:`replay_plan`. Not retried: a half-done replay is safe to
    run again by hand (it only creates what is missing), but not blindly."""
    return replay_plan(plan, target, undo)

