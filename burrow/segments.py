"""Change segments: the chain of changes a capture seals between full backups, and how a
restore turns a full archive plus the chain into the state at one point (docs/FORMAT.md,
"Change segments").

A segment is a Burrow archive like any other (same framing, zstd, STREAM encryption, a
manifest bound to its object name) whose manifest says ``kind: "changes"`` and links it:
``base`` names the full archive the chain started from, ``prev`` the segment before it (name
and manifest checksum), so a segment removed, reordered, replaced or moved in from another
chain breaks a link that the manifest MAC protects. Its records are changes, one per line, in
position order (etcd revision, Consul index, ZooKeeper zxid), each carrying in ``m``:

``op``   ``put``, ``del`` or ``gap``;
``pos``  the change's position;
``t``    when the capture saw it, microseconds since the epoch (UTC).

This module is the core of it: names, the record and manifest fields, reading a set of segment
manifests into chains with their restorable windows, choosing what a point needs, and
materializing the state at a point with the bounded external sort (burrow/extsort.py). It
talks to no store and no cluster: the tasks hand it manifests and record iterators.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from burrow.errors import ArchiveError, UsageError
from burrow.extsort import ExternalSorter
from burrow.naming import slug, stamp
from burrow.records import Record, decode_record, encode_record

KIND = "changes"
#: The folder, under a source's slug, that holds its segments: ``<slug>/changes/``.
CHANGES_DIR = "changes"
#: A segment is sealed when this much change has gathered, or every ``--seal-every``.
SEAL_BYTES = 8 * 1024 * 1024
PUT, DELETE, GAP = "put", "del", "gap"
#: Services whose full archive is one consistent state at a recorded position (etcd: its
#: revision, Consul: its index), from which any chain covering that position may continue.
_POSITION_FIELD = {"etcd": "revision", "consul": "consul_index"}


# ----------------------------------------------------------------------------- names


def segments_prefix(source_name: str) -> str:
    """The store prefix under which ``source_name``'s segments live."""
    s = slug(source_name)
    return f"{s}/{CHANGES_DIR}/"


def segment_name(source_name: str, first_position: int) -> str:
    """``<slug>/changes/<slug>-<UTC time>-<first position, 20 digits>-<random>.burrow``."""
    s = slug(source_name)
    return f"{s}/{CHANGES_DIR}/{s}-{stamp()}-{first_position:020d}-{secrets.token_hex(3)}.burrow"


def is_segment_name(name: str) -> bool:
    """Whether a store name is a segment's by its place (``.../changes/<file>``): such objects
    are never listed, chosen or pruned as full archives. A full archive moved there is simply
    not one any more (its manifest is bound to its own name anyway)."""
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2] == CHANGES_DIR


# ----------------------------------------------------------------------------- times


def now_us() -> int:
    """Microseconds since the epoch, UTC: a change record's ``t``."""
    return int(datetime.now(UTC).timestamp() * 1_000_000)


def us_to_iso(us: int) -> str:
    """A record time as the manifest's ISO 8601 form (``...Z``, microseconds)."""
    return datetime.fromtimestamp(us / 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_to_us(text: Any) -> int:
    """The manifest form back to microseconds; ArchiveError when it is not one."""
    if not isinstance(text, str):
        raise ArchiveError("a segment's manifest carries no readable time")
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ArchiveError("a segment's manifest carries no readable time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1_000_000)


def parse_point(text: str) -> int:
    """``--at TIME`` (ISO 8601; without a zone it is UTC) as microseconds; UsageError else."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at takes an ISO 8601 time (2026-12-04T18:30:05Z) or 'latest', not {text[:40]!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1_000_000)


def show_time(us: int) -> str:
    """A time for a person: ISO 8601 UTC, to the millisecond."""
    return datetime.fromtimestamp(us / 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ----------------------------------------------------------------------------- records


def change_record(op: str, key: bytes, value: bytes, position: int, t_us: int,
                  meta: dict[str, Any] | None = None) -> Record:
    """One change as a segment holds it: the key, the value after a put (empty for a delete),
    and ``m`` with ``op``, ``pos``, ``t`` plus the metadata a backup would record."""
    m = dict(meta or {})
    m.update(op=op, pos=position, t=t_us)
    return Record(key, value if op == PUT else b"", m)


def gap_record(first_position: int, last_position: int, t_us: int, reason: str) -> Record:
    """A gap: the changes at positions ``first_position``..``last_position`` are lost."""
    return Record(b"", b"", {"op": GAP, "pos": first_position, "to": last_position, "t": t_us, "reason": reason})


def base_position(manifest: dict[str, Any]) -> int | None:
    """The position a full archive's state is exactly at (etcd revision, Consul index), or None
    when its service has none (a ZooKeeper walk is not one state)."""
    name = _POSITION_FIELD.get(str(manifest.get("service")))
    info = manifest.get("service_info")
    if name is None or not isinstance(info, dict) or not manifest.get("point_in_time"):
        return None
    value = info.get(name)
    return value if type(value) is int and value >= 0 else None


# ----------------------------------------------------------------------------- manifests


def _resync_part(m: dict[str, Any]) -> int:
    part = m.get("resync_part", 0)
    if type(part) is not int or part < 0:
        raise ValueError("bad resync part")
    return part


@dataclass(slots=True)
class Segment:
    """What one segment's (authenticated) manifest says about its place in a chain. A chain of
    a week holds tens of thousands: no per-instance ``__dict__``, and the names and hashes one
    segment shares with its neighbours (its predecessor's, the base's, the source) are interned,
    one string each however many segments name it."""

    name: str
    url: str
    sha: str
    source: str
    base_name: str
    base_sha: str
    base_position: int
    prev_name: str | None
    prev_sha: str | None
    first_position: int
    last_position: int
    first_time: int
    last_time: int
    gap: dict[str, Any] | None
    changes: int
    catching_up: bool
    resync: bool = False
    #: A resync is sealed in parts like any other changes (at SEAL_BYTES or ``--seal-every``):
    #: its part number (0: the part that starts it) and whether this part ends it. A segment
    #: written before resyncs were streamed is a whole resync: part 0, done.
    resync_part: int = 0
    resync_done: bool = True
    #: The lowest position of a change this segment holds at or below its predecessor's last
    #: position (a feed that reported progress ahead of queued changes: etcd 3.4.23,
    #: etcd-io/etcd#15220); None when it holds none. A point at or after it reads this segment too.
    late_from: int | None = None
    #: The service the segment's manifest names (``etcd``, ``zookeeper``, ``consul``): what its
    #: positions are (a revision, a zxid, a Consul index). None in a hand-built segment.
    service: str | None = None

    @classmethod
    def from_manifest(cls, name: str, url: str, m: dict[str, Any]) -> Segment:
        """Read the chain fields; ArchiveError naming the segment when one is missing or malformed."""
        try:
            if m.get("kind") != KIND:
                raise ValueError("not a change segment")
            base, prev = m["base"], m.get("prev")
            ints = [m["first_position"], m["last_position"], base["position"], m["keys"]]
            if not all(type(v) is int and v >= 0 for v in ints) or m["last_position"] < m["first_position"] - 1:
                raise ValueError("bad positions")
            if prev is not None and not (isinstance(prev.get("name"), str) and isinstance(prev.get("manifest_sha256"), str)):
                raise ValueError("bad prev")
            if not (isinstance(base.get("name"), str) and isinstance(base.get("manifest_sha256"), str)):
                raise ValueError("bad base")
            first_time, last_time = iso_to_us(m["first_time"]), iso_to_us(m["last_time"])
            if last_time < first_time:
                raise ValueError("bad times")
            late_from = m.get("late_from")
            if late_from is not None and not (type(late_from) is int and 0 <= late_from < m["first_position"]):
                raise ValueError("bad late_from")
            shared = sys.intern
            return cls(
                name=shared(name), url=url, sha=shared(str(m["manifest_sha256"])), source=shared(str(m["source"])),
                base_name=shared(base["name"]), base_sha=shared(base["manifest_sha256"]),
                base_position=base["position"],
                prev_name=shared(prev["name"]) if prev else None,
                prev_sha=shared(prev["manifest_sha256"]) if prev else None,
                first_position=m["first_position"], last_position=m["last_position"],
                first_time=first_time, last_time=last_time,
                gap=m.get("gap") if isinstance(m.get("gap"), dict) else None,
                changes=m["keys"], catching_up=bool(m.get("catching_up")), resync=bool(m.get("resync")),
                resync_part=_resync_part(m), resync_done=m.get("resync_done", True) is not False,
                late_from=late_from,
                service=shared(m["service"]) if isinstance(m.get("service"), str) else None,
            )
        except (KeyError, TypeError, AttributeError, ValueError, ArchiveError):
            raise ArchiveError(f"{url} is not a well-formed change segment (its manifest lacks or garbles the "
                               "chain fields)") from None


def segment_manifest_fields(
    *, base: dict[str, Any], prev: Segment | dict[str, Any] | None, first_position: int, last_position: int,
    first_time: int, last_time: int, counts: dict[str, int], catching_up: bool,
    gap: dict[str, Any] | None = None, resync: bool = False, resync_part: int = 0, resync_done: bool = True,
    late_from: int | None = None,
) -> dict[str, Any]:
    """The chain fields a capture writes into a segment's manifest (beside the archive fields).
    ``catching_up``: sealed before the capture had caught up with the service after it started
    (its changes are exact by position, but the times they were made are unknown). ``resync``:
    the segment holds (part ``resync_part`` of) a resync, the whole state listed afresh;
    ``resync_done``: this part ends it (only then is the state whole again). ``late_from``: the
    lowest position of a change it holds that an earlier segment's range already covered."""
    fields: dict[str, Any] = {
        "kind": KIND, "base": base, "first_position": first_position, "last_position": last_position,
        "first_time": us_to_iso(first_time), "last_time": us_to_iso(last_time), "changes": counts,
        "catching_up": catching_up, "point_in_time": False,
    }
    if isinstance(prev, Segment):
        fields["prev"] = {"name": prev.name, "manifest_sha256": prev.sha}
    elif prev is not None:
        fields["prev"] = prev
    if gap is not None:
        fields["gap"] = gap
    if resync:
        fields.update(resync=True, resync_part=resync_part, resync_done=resync_done)
    if late_from is not None:
        fields["late_from"] = late_from
    return fields


# ----------------------------------------------------------------------------- chains


@dataclass
class Chain:
    """Segments linked by ``prev`` from one that has none (the first after its base)."""

    segments: list[Segment] = field(default_factory=list)

    @property
    def first(self) -> Segment:
        return self.segments[0]

    @property
    def last(self) -> Segment:
        return self.segments[-1]

    @property
    def ended_by_gap(self) -> bool:
        return self.last.gap is not None

    def live(self) -> list[Segment]:
        """The segments that hold changes (a closing gap segment does not)."""
        return self.segments[:-1] if self.ended_by_gap else self.segments

    def consistent(self) -> list[bool]:
        """For each live segment, whether the state at its end is known whole. A resync (the
        whole state listed afresh) is sealed in parts; until its last part the state is half
        listed, so no point inside it is restorable. A resync that never finished (the capture
        was stopped or lost its connection mid-listing) leaves the state unknown until the next
        resync finishes."""
        out: list[bool] = []
        open_resync = False
        for s in self.live():
            if s.resync:
                open_resync = not s.resync_done
            out.append(not open_resync)
        return out

    def intervals(self) -> list[tuple[int, int]]:
        """The times (µs) this chain can restore to: from the first segment's first time to the
        last's last time, less the stretches a capture was down or catching up (a capture that
        starts or resumes seals ``catching_up`` segments, and its first segment after it caught
        up starts later than its predecessor ended: what changed meanwhile is known by position,
        not by time)."""
        out: list[tuple[int, int]] = []
        for s, whole in zip(self.live(), self.consistent(), strict=True):
            if s.catching_up or not whole:
                continue
            if out and s.first_time <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], s.last_time))
            else:
                out.append((s.first_time, s.last_time))
        return out


def build_chains(segments: Iterable[Segment]) -> tuple[list[Chain], list[str]]:
    """Link ``segments`` (every readable segment of one source) into chains; return them
    (oldest first) and the problems found: a segment whose predecessor is missing, two segments
    claiming one predecessor (a fork), or a broken position or time sequence. A restore refuses
    when a problem touches the chain it needs (:func:`choose`)."""
    by_name = {s.name: s for s in segments}
    problems: list[str] = []
    children: dict[str, list[Segment]] = {}
    starts: list[Segment] = []
    for s in by_name.values():
        if s.prev_name is None:
            starts.append(s)
        elif s.prev_name not in by_name:
            problems.append(f"{s.url} follows {s.prev_name}, which is missing from the store")
        elif by_name[s.prev_name].sha != s.prev_sha:
            problems.append(f"{s.url} follows a segment {s.prev_name} whose manifest is not the one it was "
                            "chained to (replaced)")
        else:
            children.setdefault(s.prev_name, []).append(s)
    chains: list[Chain] = []
    for start in starts:
        chain = Chain([start])
        if start.first_position != start.base_position + 1:
            problems.append(f"{start.url} does not start right after its base archive's position")
        while True:
            nxt = children.get(chain.last.name, [])
            if not nxt:
                break
            if len(nxt) > 1:
                problems.append(f"{len(nxt)} segments follow {chain.last.url} (a fork: two captures of one source "
                                "at once?)")
                break
            s, prev = nxt[0], chain.last
            if prev.gap is not None:
                problems.append(f"{s.url} follows a gap segment")
                break
            if (s.base_name, s.base_sha) != (prev.base_name, prev.base_sha) or s.first_position != prev.last_position + 1 \
                    or s.first_time < prev.last_time:
                problems.append(f"{s.url} does not continue {prev.url} (base, positions or times differ: moved in "
                                "from another chain?)")
                break
            if s.resync and s.resync_part > 0 and not (
                    prev.resync and not prev.resync_done and prev.resync_part == s.resync_part - 1):
                problems.append(f"{s.url} continues a resync that {prev.url} does not hold (parts missing or "
                                "reordered)")
                break
            chain.segments.append(s)
        chains.append(chain)
    chains.sort(key=lambda c: (c.first.first_time, c.first.name))
    return chains, problems


@dataclass
class Window:
    """A source's restorable window: its times (µs) and the gaps between them."""

    intervals: list[tuple[int, int]] = field(default_factory=list)

    @property
    def start(self) -> int | None:
        return self.intervals[0][0] if self.intervals else None

    @property
    def end(self) -> int | None:
        return self.intervals[-1][1] if self.intervals else None

    def gaps(self) -> list[tuple[int, int]]:
        return [(a[1], b[0]) for a, b in zip(self.intervals, self.intervals[1:], strict=False)]

    def describe(self) -> str:
        """One line: ``from A to B`` (``, gaps: C to D, ...``)."""
        if not self.intervals:
            return "no restorable window (no change segments)"
        text = f"the restorable window is {show_time(self.intervals[0][0])} to {show_time(self.intervals[-1][1])}"
        gaps = self.gaps()
        if gaps:
            shown = ", ".join(f"{show_time(a)} to {show_time(b)}" for a, b in gaps[:5])
            text += f", with gaps {shown}" + (f" and {len(gaps) - 5} more" if len(gaps) > 5 else "")
        return text

    def to_json(self) -> dict[str, Any]:
        """``{"from": T, "to": T, "gaps": [[T, T], ...]}`` (ISO 8601 UTC), as ``--json`` shows it."""
        if not self.intervals:
            return {"from": None, "to": None, "gaps": []}
        return {"from": us_to_iso(self.intervals[0][0]), "to": us_to_iso(self.intervals[-1][1]),
                "gaps": [[us_to_iso(a), us_to_iso(b)] for a, b in self.gaps()]}


def window(chains: list[Chain]) -> Window:
    """The union of every chain's intervals, in time order."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted(i for c in chains for i in c.intervals()):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return Window(merged)


@dataclass
class Point:
    """What restoring one point takes: the chain, its segments to read (in order), the full
    archive to start from (name, and its position), and the cut: changes after the start
    archive's position up to ``at_position``, or seen up to ``at_time`` or at a position a
    segment ended by then had covered (``known_position``: a change delivered after a progress
    report that covered it was made before that report)."""

    chain: Chain
    segments: list[Segment]
    start_name: str | None  # None: the first segment is a resync, the whole state at its position
    start_sha: str | None
    start_position: int
    at_time: int | None
    at_position: int | None
    known_position: int = -1

    def includes(self, record: Record) -> bool:
        """Whether a change record belongs to the state at this point."""
        m = record.meta
        pos = m.get("pos")
        if type(pos) is not int or pos <= self.start_position:
            return False
        if self.at_position is not None:
            return pos <= self.at_position
        return int(m.get("t", 0)) <= (self.at_time or 0) or pos <= self.known_position


def _damage(problems: list[str]) -> str:
    """What a refusal adds when the store holds a broken chain: a missing, replaced or foreign
    segment cuts the chain there, so the window shows a gap that is damage, not a stopped capture."""
    return f"; the change chain is broken: {problems[0]}" if problems else ""


def choose(
    chains: list[Chain], problems: list[str], fulls: list[dict[str, Any]], *, source: str,
    at_time: int | None = None, at_position: int | None = None, latest: bool = False,
) -> Point:
    """The chain, segments and full archive that restore ``source`` to a point: a time
    (``at_time``, µs), a position (``at_position``: an etcd revision) or the chain's end
    (``latest``). ``fulls``: the trusted full archives of the source, as catalog rows with
    their manifest's ``position`` (None where the service has none).

    Refuses, in one line naming the restorable window, a point outside it or inside a gap,
    and refuses a point whose chain has a problem (a missing, replaced, forked or foreign
    segment). A position is refused, as a usage error, for a source whose chains or full archives
    are of another service than etcd (a zxid or a Consul index is no point a revision names)."""
    if at_position is not None:
        chains = _revision_chains(chains, fulls, source)
    win = window(chains)
    if not chains:
        raise ArchiveError(f"no change segments of source {source!r}: there is no restorable window (run "
                           "`burrow capture` after a full backup)")
    chain: Chain | None = None
    upto: Segment | None = None
    if latest:
        chain = max(chains, key=lambda c: (c.live()[-1].last_time if c.live() else 0))
        whole = [s for s, ok in zip(chain.live(), chain.consistent(), strict=True) if ok]
        if not whole:
            raise ArchiveError(f"source {source!r} has no change segment to restore to; {win.describe()}")
        upto = whole[-1]  # not into a resync the chain's end holds only part of
        at_position = upto.last_position
    elif at_position is not None:
        for c in chains:
            for s, ok in zip(c.live(), c.consistent(), strict=True):
                if ok and s.first_position - 1 <= at_position <= s.last_position and (
                        upto is None or s.first_position > upto.first_position):
                    chain, upto = c, s
        if chain is None:
            lo = min((c.first.first_position - 1 for c in chains), default=0)
            hi = max((c.live()[-1].last_position for c in chains if c.live()), default=0)
            raise ArchiveError(f"revision {at_position} of {source!r} is outside the captured revisions "
                               f"{lo} to {hi} (or inside a gap); {win.describe()}{_damage(problems)}")
    else:
        assert at_time is not None
        for c in chains:
            if any(a <= at_time <= b for a, b in c.intervals()):
                for s, ok in zip(c.live(), c.consistent(), strict=True):
                    if ok and s.first_time <= at_time:
                        chain, upto = c, s
                break
        if chain is None:
            raise ArchiveError(f"{show_time(at_time)} is outside the restorable window of {source!r} or inside a "
                               f"gap; {win.describe()}{_damage(problems)}")
    assert chain is not None and upto is not None
    relevant = [p for p in problems if any(s.url in p or s.name in p for s in chain.segments)]
    dangling = [p for p in problems if "missing from the store" in p or "fork" in p]
    if relevant or (dangling and upto is chain.live()[-1]):
        raise ArchiveError(f"the change chain of {source!r} is broken, nothing was written: {(relevant or dangling)[0]}")
    needed = chain.segments[: chain.segments.index(upto) + 1]
    known = at_position if at_position is not None else max(
        (s.last_position for s in needed if s.last_time <= (at_time or 0)), default=-1)
    late = _late_segments(chain, upto, known)
    # a resync is the whole state at its position: start from the first part of the last one
    # before the point (upto is consistent, so that resync is finished by upto)
    resyncs = [i for i, s in enumerate(needed) if s.resync and s.resync_part == 0]
    if resyncs:
        needed = needed[resyncs[-1]:]
        return Point(chain=chain, segments=needed + late, start_name=None, start_sha=None,
                     start_position=needed[0].first_position - 1,
                     at_time=None if at_position is not None else at_time, at_position=at_position,
                     known_position=known)
    # The full archive to start from: the newest trusted one whose state is a position the chain
    # covers before the point (any, for a service with positions; else only the chain's own base).
    first = chain.first
    best: tuple[int, str, str] | None = None
    limit = upto.first_position - 1 if at_position is None else min(at_position, upto.last_position)
    for row in fulls:
        pos = row.get("position")
        name = str(row.get("name"))
        if name == first.base_name:
            if row.get("manifest_sha256") != first.base_sha:
                raise ArchiveError(f"the base archive {row.get('url')} is not the one the change chain of "
                                   f"{source!r} was started from (its manifest differs): refusing the chain")
            pos = first.base_position
        if type(pos) is int and first.base_position <= pos <= limit and (best is None or pos > best[0]):
            best = (pos, name, str(row.get("manifest_sha256")))
    if best is None:
        raise ArchiveError(f"no trusted full archive of {source!r} to start the change chain from (its base "
                           f"{first.base_name} is gone or not trusted); {win.describe()}")
    needed = [s for s in needed if s.last_position > best[0]]
    return Point(chain=chain, segments=needed + late, start_name=best[1], start_sha=best[2], start_position=best[0],
                 at_time=None if at_position is not None else at_time, at_position=at_position,
                 known_position=known)


def _revision_chains(chains: list[Chain], fulls: list[dict[str, Any]], source: str) -> list[Chain]:
    """The chains a revision (``--at-revision``) may be looked up in: etcd's. UsageError when the
    source has none and its chains, or (without any) its full archives, name another service:
    decided from the manifests already read, before any segment or archive is downloaded."""
    kept = [c for c in chains if c.first.service in (None, "etcd")]
    if kept:
        return kept
    others = {c.first.service for c in chains} or {str(r["service"]) for r in fulls if r.get("service")}
    others.discard("etcd")
    if others:
        raise UsageError(f"--at-revision applies to etcd only: source {source!r} is {' and '.join(sorted(map(str, others)))}"
                         " (its changes are not at etcd revisions); give --at TIME or --at latest")
    return kept


def _late_segments(chain: Chain, upto: Segment, known: int) -> list[Segment]:
    """The segments after ``upto`` that hold changes at or below ``known`` (delivered after a
    progress report had covered them: etcd-io/etcd#15220). Their other changes are cut by the
    point's position; a resync (the whole state afresh) is never read in part, so the search
    stops at one, and at a segment whose state is not whole."""
    out: list[Segment] = []
    live = chain.live()
    for s, whole in list(zip(live, chain.consistent(), strict=True))[live.index(upto) + 1:]:
        if s.resync or not whole:
            break
        if s.late_from is not None and s.late_from <= known:
            out.append(s)
    return out


# ----------------------------------------------------------------------------- materialize


def _sort_line(key: bytes, generation: int, position: int, ordinal: int, record_line: bytes) -> bytes:
    # hex keeps byte order and holds no separator; the space sorts below every hex digit, so a
    # key comes before the keys it prefixes, and a key's lines come by generation (resyncs seen
    # before it), position, then arrival.
    return key.hex().encode() + b" %06d %020d %012d " % (generation, position, ordinal) + record_line


def materialize(
    base: Iterator[Record], changes: Iterator[Record], point: Point, workdir: Path,
) -> Iterator[Record]:
    """The state at ``point``: every record of the start archive ``base``, overlaid by each
    change of ``changes`` (in chain order) that the point includes; a delete removes a key. In
    bounded memory: every line goes through the external sort, keyed by (key, generation, position,
    arrival), and the last line of each key decides.

    A resync (Consul, ZooKeeper: a capture that (re)started lists the whole tree) is the whole
    state at its position: its records are ``put`` lines with ``m.resync`` set (to the resync's
    id, its start time, which every part of it carries; ``true`` in segments written before
    resyncs were streamed), and a key that is not in the last resync and was not changed after
    it is gone. ``changes`` starts a new generation at each resync's first record (a record of
    another resync id, or the first resync record after changes). Yields the records of the
    state, by key."""
    sorter = ExternalSorter(workdir, what="point-in-time sort run")
    try:
        for r in base:
            sorter.add(_sort_line(r.key, 0, 0, 0, encode_record(r)))
        n = 0
        last_pos = -1
        generation = 0
        current: Any = None  # the resync id of the previous record (None: not a resync record)
        for r in changes:
            rid = r.meta.pop("resync", None) or None
            if rid is not None and (current is None or rid != current):
                generation += 1
            current = rid
            op = r.meta.get("op")
            pos = r.meta.get("pos")
            if op == GAP:
                continue  # a gap closes its chain: choose() never lets a point reach past one
            if op not in (PUT, DELETE) or type(pos) is not int:
                raise ArchiveError("a change segment holds a record that is not a change (corrupt)")
            if pos < last_pos:
                raise ArchiveError("a change segment holds changes out of position order (corrupt or reordered)")
            last_pos = pos
            if not point.includes(r):
                continue
            n += 1
            sorter.add(_sort_line(r.key, generation, pos, n, encode_record(r)))
        yield from _last_per_key(sorter, b"%06d" % generation)
    finally:
        sorter.close()


def _last_per_key(lines: Iterable[bytes], generation: bytes) -> Iterator[Record]:
    """The state record of each key's last line, when that line is of the last generation (a
    key the last resync did not list, and no change touched since, is gone)."""
    current: bytes | None = None
    held: bytes | None = None
    for line in lines:
        key_hex, _, rest = line.partition(b" ")
        if key_hex != current:
            if held is not None and (r := _state_record(held, generation)) is not None:
                yield r
            current = key_hex
        held = rest
    if held is not None and (r := _state_record(held, generation)) is not None:
        yield r


def _state_record(rest: bytes, generation: bytes) -> Record | None:
    """A key's last line as a state record (None: deleted, or not of the last generation): a
    change loses its ``op``, ``pos`` and ``t`` and keeps the metadata a backup records (etcd:
    ``mod_revision``)."""
    if rest[:6] != generation:
        return None
    r = decode_record(rest[41:])  # generation (6), position (20) and arrival (12), each and a space
    op = r.meta.pop("op", None)
    if op == DELETE:
        return None
    if op == PUT:
        r.meta.pop("pos", None)
        r.meta.pop("t", None)
    return r
