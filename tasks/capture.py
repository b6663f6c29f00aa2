"""Capture: follow a source's changes after a full backup and seal them into change segments in
the same store (burrow/segments.py; docs/FORMAT.md, "Change segments").

A capture continues its source's chain where the last sealed segment ended (or starts one
right after the newest full archive), so a capture that was killed is resumed by the next one
from what was sealed: nothing unsealed is ever counted on. Changes gather in memory and are
sealed every ``seal_every`` seconds or ``SEAL_BYTES`` of changes, whichever comes first; an
idle source still gets a segment every ``IDLE_SEAL`` seconds, so its window keeps up with time.

A resync (Consul, ZooKeeper: the whole state listed afresh when a capture starts or reconnects)
arrives in pieces and is sealed like any other changes, in parts of at most ``SEAL_BYTES``, so
memory stays bounded however large the tree. Its parts are marked (``resync_part``,
``resync_done``) and all carry the resync's id: a restore reads them as one step, and no point
before the last part is restorable (burrow/segments.py ``Chain.consistent``).

Times: a change counts at the moment the capture saw it (milliseconds after it was made, as a
rule). Right after it starts, a capture catches up with what happened while none ran; the
segments it seals before it has caught up are marked ``catching_up``: their changes are exact
by position (an etcd revision), but when they were made is not known, so no time in that
stretch is restorable. A start position the service no longer holds is a gap: recorded as a
gap segment that closes the chain (the flow then takes a full backup and a new chain starts).

Hand-over: a run that has to wait for its source's capture lock (the run before it still
follows) opens its feed while it waits (``follow_ahead``) and keeps what arrives, with the
moment each batch arrived. Once it holds the lock it goes on from the chain's end: etcd's
changes that the run before it sealed meanwhile are dropped; a ZooKeeper or Consul resync and
the changes seen after it are kept, at positions past the chain's end. Either way it was caught
up before the run before it stopped, so the window runs on without a break.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocks.source import ChangeBatch, HistoryCompacted, SourceBlock
from blocks.store import ArchiveStore
from burrow import segments
from burrow.archive import ArchiveWriter
from burrow.crypto import ArchiveKeys, StreamEncryptor
from burrow.errors import ArchiveNotFound, SourceError, should_retry
from burrow.keys import WriteKeys
from burrow.records import Record
from burrow.runlog import logger
from burrow.segments import Segment
from burrow.staging import scratch_writes
from tasks import task
from tasks.catalog import index_new_archive
from tasks.chain import read_chains, trusted_fulls

#: Seconds between segments of an idle source (the window's end keeps up with time).
IDLE_SEAL = 60.0
#: At most one ``burrow.capture.sealed`` event a minute per source.
SEALED_EVENT_EVERY = 60.0
#: What a run waiting for its source's capture lock keeps of its feed (bytes of changes): beyond
#: it the oldest batches go, which the run holding the lock has sealed by then as a rule (and
#: when it has not, the waiting run follows afresh from the chain's end once it holds the lock).
AHEAD_BYTES = 64 * 1024 * 1024


class SealedEvents:
    """``burrow.capture.sealed``, at most one per ``every`` seconds *per source*: a capture of
    one source never silences another's (two captures may share a process: a worker, a test).
    Each event carries the counts sealed since the source's previous event, the run's totals,
    and the lag: how long the oldest change of the segment just sealed waited between being
    seen and being stored (the RPO the chain's end carries). ``clock`` and ``emit`` are
    injectable (a fake clock in the tests); the default emits a Prefect event."""

    def __init__(self, every: float = SEALED_EVENT_EVERY, clock: Any = time.monotonic, emit: Any = None) -> None:
        self.every, self.clock, self.emit = every, clock, emit or _emit_sealed
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._since: dict[str, dict[str, int]] = {}

    def sealed(self, source_name: str, seg: Segment, changes: int, lag_s: float, totals: dict[str, int]) -> bool:
        """Count one sealed segment of ``source_name``; emit when the source's minute is up.
        Returns whether an event went out. Never raises."""
        with self._lock:
            since = self._since.setdefault(source_name, {"segments": 0, "changes": 0})
            since["segments"] += 1
            since["changes"] += changes
            now = self.clock()
            last = self._last.get(source_name)
            if last is not None and now - last < self.every:
                return False
            self._last[source_name] = now
            self._since[source_name] = {"segments": 0, "changes": 0}
        payload = {"segments_since_last": since["segments"], "changes_since_last": since["changes"],
                   "segments": totals.get("segments", 0), "changes": totals.get("changes", 0),
                   "last_position": seg.last_position, "last_time": segments.us_to_iso(seg.last_time),
                   "lag_s": round(max(0.0, lag_s), 3), "catching_up": seg.catching_up}
        try:
            self.emit(source_name, payload)
        except Exception as exc:  # noqa: BLE001 - an event must never fail the capture
            logger().debug("could not emit burrow.capture.sealed: %s", type(exc).__name__)
            return False
        return True


def _emit_sealed(source_name: str, payload: dict[str, Any]) -> None:
    from prefect.events import emit_event

    emit_event(event="burrow.capture.sealed",
               resource={"prefect.resource.id": f"burrow.source.{source_name}", "prefect.resource.name": source_name},
               payload=payload)


#: The process's throttle of ``burrow.capture.sealed`` (keyed by source).
SEALED_EVENTS = SealedEvents()


@dataclass
class ChainHead:
    """Where a capture continues: the chain's base archive, its last sealed segment (None for
    a new chain) and the position everything up to which is sealed."""

    base: dict[str, Any]
    prev: Segment | None
    after: int
    last_time: int | None


def chain_head(store: ArchiveStore, source_name: str, keys: ArchiveKeys) -> ChainHead:
    """The end of the source's newest chain that a gap did not close, when it started after the
    newest trusted full archive; else a new chain right after that archive (etcd: from its
    revision; Consul, ZooKeeper: a resync starts every capture anyway)."""
    found = read_chains(store, source_name, keys)
    for url, why in found.bad:
        logger().warning("capture: passing by a segment that does not read: %s: %s", url, why)
    open_chains = [c for c in found.chains if not c.ended_by_gap]
    fulls = trusted_fulls(store, source_name, keys)
    # the newest with a position (etcd, Consul); a ZooKeeper walk has none: its chain starts with a
    # resync (the whole tree), and the archive only names the chain's start (position 0)
    newest_full = next((r for r in fulls if r.get("position") is not None), fulls[0] if fulls else None)
    if open_chains:
        chain = max(open_chains, key=lambda c: (c.last.last_time, c.last.name))
        ended = [c for c in found.chains if c.ended_by_gap and c.last.last_time > chain.last.last_time]
        # a newer full archive starts a new chain: each chain then spans one full archive to its
        # successor, which is what prune keeps (or lets go of) with that archive
        if not ended and (newest_full is None or chain.last.base_name == newest_full["name"]):
            last = chain.last
            base = {"name": last.base_name, "manifest_sha256": last.base_sha, "position": last.base_position}
            return ChainHead(base, last, last.last_position, last.last_time)
    if newest_full is None:
        raise ArchiveNotFound(f"no trusted full archive of {source_name!r} to start capturing after in "
                              f"{store.describe()}: run `burrow backup` first")
    position = int(newest_full.get("position") or 0)
    base = {"name": newest_full["name"], "manifest_sha256": newest_full["manifest_sha256"], "position": position}
    return ChainHead(base, None, position, None)


@dataclass
class _Pending:
    """Changes gathered for the next segment."""

    records: list[Record] = field(default_factory=list)
    bytes: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"put": 0, "del": 0})
    first_seen: int | None = None  # when its oldest change was seen (µs): the lag when it is sealed
    late_from: int | None = None  # its lowest change at a position a sealed segment covered


@dataclass
class _Resync:
    """A resync being gathered: its id (the time it started, µs, carried by every record of it),
    the part being gathered and, once its last piece arrived, when the state was whole."""

    id: int
    part: int = 0
    done_at: int | None = None


class Capture:
    """One capture run's state: the head it continues, the segment being gathered, the store."""

    def __init__(self, source: SourceBlock, store: ArchiveStore, source_name: str, write_keys: WriteKeys | None,
                 workdir: Path, head: ChainHead) -> None:
        self.source, self.store, self.source_name = source, store, source_name
        self.write_keys, self.workdir, self.head = write_keys, workdir, head
        self.pending = _Pending()
        self.covered = head.after  # everything up to here is gathered or sealed
        self.synced_at: int | None = None  # when the feed first said it had caught up
        self.last_t = head.last_time or 0  # times only grow along a chain (a host's clock may lag)
        #: When the feed was last heard from (a change or a progress report): the state is known
        #: up to then, not up to the moment a segment is sealed.
        self.heard_t = 0
        self.sealed = 0
        self.live_sealed = 0  # segments sealed by this run after it caught up
        self.changes = 0
        #: Changes delivered at a position a sealed segment already claimed (a feed that reported
        #: progress ahead of queued events: etcd 3.4.23, etcd-io/etcd#15220). Kept, in position order
        #: at materialize, but the earlier segment's range was wrong: never silent.
        self.late = 0
        self.resync: _Resync | None = None  # a resync being gathered, part by part
        #: The segment being stored, until the chain has moved on to it: an interrupt (Ctrl-C)
        #: can land inside the store's put after the object is already visible, and a capture
        #: that went on from the old head would store a second successor of it (a fork).
        self.inflight: _Inflight | None = None
        self.seal_bytes = segments.SEAL_BYTES
        self.events = SEALED_EVENTS

    # -- gathering ----------------------------------------------------------------------
    def take(self, batch: ChangeBatch, seen: int | None = None) -> None:
        """Gather ``batch``, which arrived at ``seen`` (µs; now when not given)."""
        self.settle()
        t = max(self.last_t, seen if seen is not None else segments.now_us())
        self.last_t = t
        self.heard_t = t
        if batch.resync:
            self._take_resync(batch, t)
            return
        if self.resync is not None:
            # changes while a resync is unfinished (a feed that gave up on it): the resync is
            # abandoned, its parts stay marked unfinished, and no point is restorable until the
            # next resync completes
            self.seal()
            self.resync = None
        if batch.changes and (late := [c[3] for c in batch.changes if c[3] <= self.head.after]):
            self.late += len(late)
            low = min(late)
            self.pending.late_from = low if self.pending.late_from is None else min(self.pending.late_from, low)
            logger().warning("capture: %d changes arrived at positions a sealed segment already covered (up to %d): "
                             "the feed reported progress ahead of them (etcd 3.4.23: etcd-io/etcd#15220; ZooKeeper: "
                             "notifications queued during a resync's walk); the next "
                             "segment records them as late from position %d, and a restore to a point at or after "
                             "it reads that segment too", len(late), self.head.after, low)
        self._gather(batch.changes, t, None)
        self.covered = max(self.covered, batch.position)
        if batch.progress and self.synced_at is None:
            self.synced_at = t
        if self.pending.bytes >= self.seal_bytes:
            self.seal()  # a batch is never split: the changes of one position stay in one segment

    def _gather(self, changes: list[tuple[str, bytes, bytes, int, dict[str, Any]]], t: int, rid: int | None) -> None:
        p = self.pending
        if changes and p.first_seen is None:
            p.first_seen = t
        for op, key, value, pos, meta in changes:
            if rid is not None:
                if p.bytes >= self.seal_bytes:
                    # bounded memory: a resync is sealed in parts (its keys all stand at one
                    # position, and no point inside it is restorable, so it may split anywhere)
                    self.seal()
                    p = self.pending
                    p.first_seen = t
                self.covered = max(self.covered, pos)
                meta = {**meta, "resync": rid}
            p.records.append(segments.change_record(op, key, value, pos, rid if rid is not None else t, meta))
            p.bytes += len(key) + len(value) + 64
            p.counts[op] = p.counts.get(op, 0) + 1

    def _take_resync(self, batch: ChangeBatch, t: int) -> None:
        """A piece of a resync: the whole state at the batch's position, listed afresh by a feed
        that cannot resume exactly. Its pieces gather and seal in parts like any other changes;
        the last piece seals at once (from then on the state is whole again)."""
        if self.resync is None or not batch.continued:
            # a new resync: what was gathered before it is superseded (the feed lost track, and
            # the time since is restorable only once the resync is whole), and the parts of a
            # resync still open (the feed restarted it) stay unfinished
            self.pending = _Pending()
            self.resync = _Resync(id=t)
        self._gather(batch.changes, t, self.resync.id)
        self.covered = max(self.covered, batch.position)
        if not batch.more:
            self.resync.done_at = t
            self.synced_at = t
            self.seal()

    def bridge(self, t: int) -> None:
        """A run that followed a resync feed ahead of the lock goes on from the chain's end: the
        state stands as the run before it last saw it (as between any two observations) until
        ``t``, its own first observation after that end, from which its resync and the changes it
        saw count. Seals that stretch as an empty segment, so the window runs on without a break."""
        self.synced_at = self.head.last_time
        self.heard_t = self.last_t = max(self.last_t, t)
        self.seal()

    # -- sealing ------------------------------------------------------------------------
    def due(self, idle_for_long: bool) -> bool:
        """Whether the next tick seals: changes gathered, the position moved on (changes
        elsewhere in the service), the capture just caught up, or an idle source's heartbeat."""
        caught_up = self.synced_at is not None and self.live_sealed == 0
        # an idle heartbeat only when the feed was heard from since the last segment: a feed gone
        # quiet (ZooKeeper reconnecting, Consul retrying) extends the window over nothing
        heard = self.heard_t > (self.head.last_time or 0)
        return bool(self.pending.records) or self.covered > self.head.after or caught_up or (idle_for_long and heard)

    def seal(self, *, gap: dict[str, Any] | None = None) -> Segment:
        """Write what was gathered as the chain's next segment (``gap``: a gap segment instead).
        While a resync is being gathered, the segment is its next part; the part that holds its
        last piece ends it."""
        self.settle()
        now = max(self.last_t, segments.now_us())
        prev = self.head.prev
        first_position = self.head.after + 1
        catching_up = self.synced_at is None
        rs = self.resync if gap is None else None
        resync = rs.done_at if rs is not None else None
        if gap is not None:
            records = [segments.gap_record(first_position, gap["to_position"], now, gap["reason"])]
            last_position = gap["to_position"]
            counts = {"gap": 1}
            first_time = prev.last_time if prev is not None else now
        else:
            records = self.pending.records
            last_position = self.covered
            counts = self.pending.counts
            if resync is not None:  # the resync's last part: the state is whole from then on
                first_time = max(resync, prev.last_time if prev is not None else 0)
            elif catching_up or rs is not None:  # (a resync's earlier part is restorable at no time)
                first_time = prev.last_time if prev is not None else now
            elif prev is not None and self.live_sealed:
                first_time = prev.last_time  # the run's segments follow each other without a break
            else:  # the run's first segment since it caught up: its times start then
                first_time = max(self.synced_at or now, prev.last_time if prev is not None else 0)
        # The state is known up to the last time the feed was heard from, not up to now: a feed
        # that went quiet because its connection was lost must not stretch the window over
        # changes it never saw (they come with the resync after the reconnection).
        last_time = now if gap is not None else max(first_time, min(now, self.heard_t or now))
        # the changes taken after this segment count from its end on, not from the moment it was
        # sealed: a run that took the lock after following ahead still takes batches that arrived
        # earlier, each at the moment it arrived
        self.last_t = max(self.last_t, last_time)
        name = segments.segment_name(self.source_name, first_position)
        fields = segments.segment_manifest_fields(
            base={k: v for k, v in self.head.base.items() if k in ("name", "manifest_sha256", "position")},
            prev=prev, first_position=first_position, last_position=last_position, first_time=first_time,
            last_time=last_time, counts=counts, catching_up=catching_up and gap is None, gap=gap, resync=rs is not None,
            resync_part=rs.part if rs is not None else 0, resync_done=resync is not None,
            late_from=self.pending.late_from if gap is None else None,
        )
        fields.update(service=self.source.service, source=self.source_name, source_url=self.source.describe(),
                      root="/", object_name=name)
        path = self.workdir / f"segment-{self.sealed:06d}.burrow"
        encryptor = StreamEncryptor(self.write_keys) if self.write_keys is not None else None
        with scratch_writes("change segment", self.workdir):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                writer = ArchiveWriter(out, service=self.source.service, encryptor=encryptor)
                for r in records:
                    writer.add(r)
                manifest = writer.finish(fields)
                # no fsync: the file is scratch, read once by the store's put, which makes its own
                # copy durable (a crash before the put loses only a segment no chain names yet);
                # the capture shares its host's disk with the source perhaps, whose log fsyncs
        seg = Segment.from_manifest(name, self.store.url(name), manifest)
        n = len(records) if gap is None else 0
        lag_s = (segments.now_us() - self.pending.first_seen) / 1e6 if self.pending.first_seen else 0.0
        live = not (seg.catching_up or gap is not None or (rs is not None and resync is None))
        self.inflight = _Inflight(seg, last_position, last_time, n, live, rs, resync is not None)
        try:
            info = self.store.put(name, path)
            self._moved_on(info, local=path)
        finally:
            path.unlink(missing_ok=True)
        what = "changes"
        if rs is not None:
            what = f"keys (part {rs.part + 1} of a resync: the whole state{', complete' if resync else ''})"
        logger().info("capture: sealed %s: %d %s, positions %d to %d%s", name, n, what, first_position,
                      last_position, " (catching up)" if seg.catching_up else "")
        if gap is None:
            self.events.sealed(self.source_name, seg, n, lag_s, {"segments": self.sealed, "changes": self.changes})
        return seg

    def settle(self) -> None:
        """Finish a put an interrupt cut short: when the segment it was storing is in the store,
        the chain moves on to it (its changes are sealed); when it is not, its changes are still
        pending and the next seal stores them. Either way the next segment follows the chain's
        real end, never the segment before it."""
        if self.inflight is None:
            return
        if self.head.prev is not None and self.head.prev.name == self.inflight.seg.name:
            self.inflight = None  # it moved on already (the interrupt came after)
            return
        try:
            info = self.store.head(self.inflight.seg.name)
        except ArchiveNotFound:
            self.inflight = None
            return
        logger().info("capture: %s was stored before the interruption; the chain continues from it",
                      self.inflight.seg.name)
        self._moved_on(info, local=None)

    def _moved_on(self, info: Any, local: Path | None) -> None:
        """The in-flight segment is stored: the chain moves on to it before anything else runs
        (its changes are no longer pending), then it goes into the source's chain index
        (tasks/catalog.py; from the local file when there is one), so readers of the chain need
        no request per segment."""
        f = self.inflight
        assert f is not None
        self.head = ChainHead(self.head.base, f.seg, f.last_position, f.last_time)
        self.inflight = None
        self.covered = max(self.covered, f.last_position)
        self.pending = _Pending()
        self.sealed += 1
        self.live_sealed += 1 if f.live else 0
        self.changes += f.changes
        if f.resync is not None:
            self.resync = None if f.resync_done else _Resync(id=f.resync.id, part=f.resync.part + 1)
        try:
            index_new_archive(self.store, f.seg.name, info, local=local)
        except KeyboardInterrupt:
            # a Ctrl-C inside the index write: the entry is written whole first (a second object
            # holding it is harmless, entries are merged by name), then the run stops
            index_new_archive(self.store, f.seg.name, info, local=local)
            raise


@dataclass
class _Inflight:
    """A segment being stored, and what the chain's head becomes once it is."""

    seg: Segment
    last_position: int
    last_time: int
    changes: int
    live: bool  # sealed by this run after it caught up (not a gap, not an unfinished resync's part)
    resync: _Resync | None
    resync_done: bool


class _Batches:
    """The feed's batches, in order, each with the moment it arrived (µs), then the feed's end:
    None, or the error it raised. While ``bounded`` (a run that waits for the capture lock), it
    keeps at most AHEAD_BYTES of changes: the oldest batches go first, and ``dropped_to`` is the
    position up to which something went."""

    def __init__(self, bounded: bool = False) -> None:
        self._items: collections.deque[tuple[int, Any, int]] = collections.deque()
        self._cond = threading.Condition()
        self.bounded = bounded
        self.bytes = 0
        self.dropped_to = 0
        self.ended = False
        self.synced = False  # a progress report, or a resync's last piece, has arrived

    def put(self, item: Any) -> None:
        size = sum(len(c[1]) + len(c[2]) + 64 for c in item.changes) if isinstance(item, ChangeBatch) else 0
        with self._cond:
            self._items.append((segments.now_us(), item, size))
            self.bytes += size
            self.ended = self.ended or not isinstance(item, ChangeBatch)
            self.synced = self.synced or (isinstance(item, ChangeBatch) and (item.progress or (item.resync and not item.more)))
            while (self.bounded and self.bytes > AHEAD_BYTES and len(self._items) > 1
                   and isinstance(self._items[0][1], ChangeBatch)):
                _, old, n = self._items.popleft()
                self.bytes -= n
                self.dropped_to = max(self.dropped_to, old.position)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> tuple[int, Any]:
        """The next item and when it arrived; queue.Empty when none came within ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                raise queue.Empty
            t, item, n = self._items.popleft()
            self.bytes -= n
            return t, item


def _pump(feed: Any, out: _Batches) -> None:
    """The feed's batches onto ``out`` (in order), then its end: None, or the error it raised."""
    try:
        for batch in feed:
            out.put(batch)
        out.put(None)
    except BaseException as exc:  # noqa: BLE001 - handed to the capture loop, which raises it
        out.put(exc)


class Following:
    """A source's feed being followed from a chain head: its session, the feed and what it has
    delivered (``_Batches``, filled by a thread)."""

    def __init__(self, source: SourceBlock, head: ChainHead, *, ahead: bool = False) -> None:
        self.head = head
        self._log = logger()  # (the run's, taken on the run's thread: the progress thread logs too)
        self.session = source.connect()
        watch = getattr(self.session, "watch", None)
        if watch is None:
            self.session.close()
            raise SourceError(f"capture does not support {source.service} sources yet")
        try:
            self.feed = watch(head.after)
        except BaseException:
            self.session.close()
            raise
        #: Whether the feed resumes exactly (etcd) or begins with a resync (ZooKeeper, Consul)
        self.exact = bool(getattr(self.feed, "RESUMES_EXACTLY", False))
        self.batches = _Batches(bounded=ahead)
        self._stop = threading.Event()
        self._closed = False
        threading.Thread(target=_pump, args=(self.feed, self.batches), name="burrow-capture-feed",
                         daemon=True).start()
        self.feed.request_progress()
        if ahead:  # (the capture loop asks once it holds the lock: until then, this thread)
            threading.Thread(target=self._ask_progress, name="burrow-capture-ahead", daemon=True).start()

    def _ask_progress(self) -> None:
        """Ask the feed how far it has delivered every second while the run waits for the lock,
        so that what it kept says when it had caught up (its first progress report after that),
        and say once when it has."""
        told = False
        while not self._stop.wait(1.0):
            self.feed.request_progress()
            if self.batches.synced and not told and not self._stop.is_set():
                told = True
                self._log.info("capture: caught up with the source while waiting for the lock: this run goes on "
                               "where the one holding it stops, without a gap")

    def continues(self, head: ChainHead) -> str | None:
        """Why this feed, opened ahead of the lock, cannot go on from ``head`` (the chain's end now
        that the run holds the lock), or None when it can: the same chain, grown or not, and
        nothing dropped that the chain does not hold (for a feed that begins with a resync,
        nothing dropped at all: the resync is the whole state), and no end of the feed."""
        if head.base.get("name") != self.head.base.get("name") or head.after < self.head.after:
            return "the chain it followed was ended (a gap, or a new full archive)"
        if self.batches.dropped_to > (head.after if self.exact else 0):
            return f"it keeps at most {AHEAD_BYTES >> 20} MiB while waiting for the lock"
        if self.batches.ended and (head.after > self.head.after or not self.exact):
            return "its feed ended while waiting for the lock"
        return None

    def hold(self) -> None:
        """The run holds the lock: keep everything from now on, and stop asking for progress
        (the capture loop does)."""
        self._stop.set()
        self.batches.bounded = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with contextlib.suppress(Exception):
            self.feed.close()
        self.session.close()


def follow_ahead(source: SourceBlock, store: ArchiveStore, source_name: str,
                 write_keys: WriteKeys | None) -> Following | None:
    """Open ``source``'s feed from its chain's end before the run holds the capture lock; None
    when the chain cannot be read yet or the source does not answer (the run then follows from
    the chain's end once it holds the lock, and reports what is wrong). A run whose lock is free
    at once loses nothing by it; one that waits is caught up when it gets the lock (etcd: every
    change since; ZooKeeper, Consul: its resync done, and every change seen since), so the
    window does not break where one run hands over to the next."""
    keys = ArchiveKeys(write_keys.keyring() if write_keys is not None else None)
    try:
        return Following(source, chain_head(store, source_name, keys), ahead=True)
    except Exception as exc:  # noqa: BLE001 - the run does it again, and reports it, once it holds the lock
        logger().debug("capture: not following ahead of the lock (%s)", type(exc).__name__)
        return None


def capture_changes(
    source: SourceBlock, store: ArchiveStore, source_name: str, write_keys: WriteKeys | None, workdir: Path, *,
    seal_every: float = 10.0, seal_bytes: int = segments.SEAL_BYTES, duration: float | None = None,
    stop: threading.Event | None = None, ahead: Following | None = None,
) -> dict[str, Any]:
    """Follow ``source`` for ``duration`` seconds (None: until ``stop`` is set or the process is
    interrupted), sealing segments as it goes. Returns the run's counts; ``gap`` holds the gap
    when the chain's next position was compacted away (the gap segment is sealed then).
    ``ahead``: the feed ``follow_ahead`` opened before the run held the capture lock (this call
    owns it from now on): what it kept past the chain's end is taken first, at the moments it
    arrived."""
    log = logger()
    keys = ArchiveKeys(write_keys.keyring() if write_keys is not None else None)
    try:
        head = chain_head(store, source_name, keys)
        if ahead is not None and (why := ahead.continues(head)) is not None:
            log.info("capture: following afresh from the chain's end: the feed opened while waiting for the lock "
                     "cannot go on (%s)", why)
            ahead.close()
            ahead = None
        following = ahead if ahead is not None else Following(source, head)
    except BaseException:
        if ahead is not None:
            ahead.close()
        raise
    following.hold()
    cap = Capture(source, store, source_name, write_keys, workdir, head)
    cap.seal_bytes = seal_bytes
    feed, batches = following.feed, following.batches
    adjust = _adjust(head.after if ahead is not None else None, following.exact)
    #: A feed that began with a resync (ZooKeeper, Consul), opened ahead of the lock on a chain
    #: that goes on: what it saw before the chain's end (the run before this one sealed its own
    #: view up to then) counts from its first batch seen after it (``Capture.bridge``).
    early: list[tuple[int, ChangeBatch]] | None = (
        [] if ahead is not None and not following.exact and head.last_time is not None else None)
    log.info("capture: following %s %s from position %d (%s%s)", source.service, source.describe(), head.after + 1,
             "continuing the chain" if head.prev is not None else f"a new chain after {head.base['name']}",
             f"; caught up ahead of the lock from position {following.head.after + 1}" if ahead is not None else "")
    started = time.monotonic()
    end = started + duration if duration is not None else None
    next_seal = started + seal_every
    last_seal = started
    summary: dict[str, Any] = {"gap": None}  # (Following asked the feed for progress when it opened it)
    try:
        while True:
            now = time.monotonic()
            if (end is not None and now >= end) or (stop is not None and stop.is_set()):
                break
            try:
                seen, item = batches.get(timeout=max(0.0, min(1.0, next_seal - now)))
            except queue.Empty:
                seen, item = 0, False
            if early is not None and item is not False:
                if isinstance(item, ChangeBatch) and seen < (head.last_time or 0):
                    early.append((seen, item))  # seen before the chain's end: held until a batch seen after it
                    continue
                if isinstance(item, ChangeBatch):
                    # both runs followed across the chain's end only when this one's resync was
                    # done by then; else (the run before was killed, say) the time from the
                    # chain's end to this resync is not known, a gap, as for any capture's start
                    across = any(b.resync and not b.more for _, b in early)
                    if across:
                        cap.bridge(seen)
                    for t, b in early:
                        cap.take(adjust(b), seen if across else t)
                early = None
            if isinstance(item, ChangeBatch):
                item = adjust(item)
            if item is None:
                raise SourceError(f"the change feed of {source.describe()} ended unexpectedly")
            if isinstance(item, HistoryCompacted):
                # the gap's first and last positions and times: from the chain's end (its last
                # sealed change) to now, when the capture found the history gone
                end = cap.head
                from_time = end.last_time if end.last_time is not None else segments.now_us()
                summary["gap"] = gap = {
                    "from_position": end.after + 1, "to_position": max(end.after, item.available - 1),
                    "from_time": segments.us_to_iso(from_time), "to_time": segments.us_to_iso(segments.now_us()),
                    "reason": f"{source.service} no longer holds the history from position {end.after + 1} "
                              f"(compacted up to {item.available})",
                }
                cap.seal(gap=gap)
                log.warning("capture: gap: %s", gap["reason"])
                break
            if isinstance(item, BaseException):
                with contextlib.suppress(Exception):
                    cap.seal()  # what the feed delivered before it failed is exact: keep it
                raise item
            if item is not False:
                cap.take(item, seen)  # seals by itself at seal_bytes
                continue
            feed.request_progress()  # (etcd: a progress report within the second; the others report unasked)
            now = time.monotonic()
            if now < next_seal:
                continue
            if cap.due(now - last_seal >= IDLE_SEAL):
                cap.seal()
                last_seal = now
            next_seal = now + seal_every
            feed.request_progress()
        if summary["gap"] is None:
            _drain(batches, cap, adjust)
            cap.seal()  # the window reaches the end of the run
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            _drain(batches, cap, adjust)
            cap.seal()  # what was seen is kept; the next capture continues from it
        raise
    finally:
        following.close()
    summary.update(segments=cap.sealed, changes=cap.changes, last_position=cap.head.after, late_changes=cap.late,
                   seconds=round(time.monotonic() - started, 3))
    log.info("capture: %d segments sealed, %d changes, up to position %d", cap.sealed, cap.changes, cap.head.after)
    return summary


def _drain(batches: _Batches, cap: Capture, adjust: Any) -> None:
    """Take the batches already delivered (the run is ending: seal everything it saw), through
    ``adjust`` (``_adjust``)."""
    while True:
        try:
            seen, item = batches.get(timeout=0)
        except queue.Empty:
            return
        if isinstance(item, ChangeBatch):
            cap.take(adjust(item), seen)


def _past(batch: ChangeBatch, held: int) -> ChangeBatch:
    """``batch`` less its changes at or before ``held``, the chain's end when the run took the
    lock: an exact feed (etcd) opened ahead of the lock delivered what the run before this one
    sealed meanwhile, and the chain holds it."""
    if not batch.changes or batch.changes[0][3] > held:
        return batch
    return ChangeBatch([c for c in batch.changes if c[3] > held], batch.position, progress=batch.progress)


class _Lift:
    """The positions of a feed opened ahead of the lock that began with a resync (ZooKeeper,
    Consul), moved past the chain's end ``held`` when the run took the lock, as such a feed keeps
    its own past the chain's end it started from: the resync's to ``held + 1``, and each batch
    after it above the batch before (so a position a sealed segment covered holds every change
    seen by then: a change seen later never shares it), until the feed's own positions are past
    them; from then on, as they come. The resync is the whole state and the changes seen after
    it bring it up to date, so none is dropped. These positions are observed order, not a point
    a restore can name (``--at-revision`` is etcd's); the times stay as seen."""

    def __init__(self, held: int) -> None:
        self.floor = held
        self.active = True

    def __call__(self, batch: ChangeBatch) -> ChangeBatch:
        if not self.active or (batch.progress and not batch.changes):
            return batch
        to = self.floor + 1
        if batch.changes and batch.changes[0][3] >= to:
            self.active = batch.more  # (a resync's pieces all stand at one position)
            return batch
        if batch.changes:
            changes = [(op, k, v, max(pos, to), meta) for op, k, v, pos, meta in batch.changes]
            batch = dataclasses.replace(batch, changes=changes, position=max(batch.position, changes[-1][3]))
        elif batch.resync:
            batch = dataclasses.replace(batch, position=max(batch.position, to))  # an empty tree's
        else:
            return batch
        if not batch.more:
            self.floor = batch.position
        return batch


def _adjust(held: int | None, exact: bool) -> Any:
    """What a batch goes through before the capture takes it: nothing for a feed opened at the
    chain's end (``held`` None); ``_past`` or ``_Lift`` for one opened ahead of the lock."""
    if held is None:
        return lambda batch: batch
    return (lambda batch: _past(batch, held)) if exact else _Lift(held)


@task(name="capture", retries=0, retry_condition_fn=should_retry)
def capture(
    source: SourceBlock, store: ArchiveStore, source_name: str, write_keys: WriteKeys | None, workdir: str,
    seal_every: float = 10.0, duration: float | None = None, ahead: Following | None = None,
) -> dict[str, Any]:
    """Prefect task wrapper of :func:`capture_changes`."""
    return capture_changes(source, store, source_name, write_keys, Path(workdir), seal_every=seal_every,
                           duration=duration, ahead=ahead)
