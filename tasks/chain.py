"""Chain: read a source's change segments (authenticated, bound to their names), link them into
chains, choose what a point in time needs, and materialize the state at that point as a
private archive that the restore's plan reads like any other (burrow/segments.py holds the
rules; docs/FORMAT.md, "Change segments").

Nothing here writes to a cluster. Every segment a point needs is read whole, every check of an
archive plus the chain's links passing, before the state archive is finished: a tampered,
reordered, missing or foreign segment stops the restore before its plan starts.

At scale (a segment every 10 s is 60,000 in a week) a chain is read as the catalog reads
archives: one LIST of the source's segments and its index (``_catalog/<slug>/changes/``, which
the capture writes as it seals: tasks/catalog.py ``read_indexed``), no read per segment. And
the MAC is checked where a decision rests, not on every segment: each link names the whole
previous manifest's checksum, so an authenticated segment vouches for the chain before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from blocks.store import ArchiveInfo, ArchiveStore, open_stored
from burrow import segments
from burrow.archive import ArchiveReader, ArchiveWriter, manifest_digest
from burrow.crypto import ArchiveKeys, StreamEncryptor
from burrow.errors import ArchiveError, ArchiveNotFound, KeyMismatch, StoreError, should_retry
from burrow.keys import SymmetricKey, WriteKeys
from burrow.naming import age_text
from burrow.records import Record
from burrow.runlog import logger
from burrow.segments import Chain, Point, Segment
from burrow.staging import scratch_writes
from tasks import task
from tasks.catalog import (
    INDEX_PREFIX,
    IndexedRead,
    describe_archives,
    entry_reader,
    index_prefix,
    read_indexed,
    select_archives,
)
from tasks.retention import lock_reason


@dataclass
class Chains:
    """A source's segments as chains, the problems found linking them, and the segments that
    could not be read or authenticated (``bad``: url and why). ``entries``: the bytes each
    segment was read from (its index entry, or the object's own header and manifest), so that
    authenticating one later costs no request."""

    chains: list[Chain]
    problems: list[str]
    bad: list[tuple[str, str]]
    entries: dict[str, tuple[ArchiveInfo, dict[str, Any]]] = field(default_factory=dict)
    from_index: set[str] = field(default_factory=set)  # the segments read from their index entries
    #: The chains prune cut at their start (``--keep-changes-within``): their first segment's
    #: name -> the full archive a restore starts from there (None: the segment starts a resync).
    trimmed: dict[str, str | None] = field(default_factory=dict)

    def window(self) -> segments.Window:
        return segments.window(self.chains)


def _segment_of(name: str, url: str, reader: ArchiveReader) -> Segment:
    """A segment's chain fields, from a reader whose framing and manifest checksum passed,
    bound to ``name``. The manifest's checksum is required (a link is a manifest's checksum,
    so it must be the checksum of the manifest read: a header may not switch the check off)."""
    if reader.manifest.get("manifest_sha256") != manifest_digest(reader.manifest):
        raise ArchiveError(f"{url} has a manifest whose checksum does not match it")
    if reader.check_binding(name) is not True:
        raise ArchiveError(f"{url} is not bound to its name")
    return Segment.from_manifest(name, url, reader.manifest)


def _authenticate(reader: ArchiveReader, keys: ArchiveKeys, allow_unencrypted: bool) -> None:
    """The segment's manifest MAC under ``keys`` (an unencrypted segment is refused, unless
    ``allow_unencrypted``): ArchiveError or KeyMismatch when it does not hold."""
    reader.check_downgrade(keys, allow_unencrypted=allow_unencrypted)
    reader.check_metadata(keys)


def read_segment(store: ArchiveStore, name: str, keys: ArchiveKeys | None, *, authenticate: bool,
                 allow_unencrypted: bool = False) -> Segment:
    """One segment's chain fields from its manifest (a ranged read): the archive's framing and
    manifest checksum, its binding to ``name`` and, when ``authenticate``, its manifest MAC
    under ``keys`` (an unencrypted segment is refused then, unless ``allow_unencrypted``)."""
    with open_stored(store, name) as reader:
        if authenticate and keys is not None:
            _authenticate(reader, keys, allow_unencrypted)
        return _segment_of(name, store.url(name), reader)


def trim_anchor(seg: Segment, fulls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trusted full archive (a row of :func:`trusted_fulls`) a chain may start from at
    ``seg`` once prune has deleted the segments before it: an etcd archive of the source (its
    state is one revision, exactly) whose revision ``seg`` covers or starts right after, not
    before the chain's base. The one right before ``seg`` first (every instant of ``seg`` stays
    restorable), else the earliest inside it. None when there is none."""
    if seg.service not in (None, "etcd"):
        return None
    best: tuple[tuple[bool, int], dict[str, Any]] | None = None
    for row in fulls:
        pos = row.get("position")
        if row.get("service") != "etcd" or type(pos) is not int or pos < seg.base_position:
            continue
        if seg.first_position - 1 <= pos <= seg.last_position:
            rank = (pos == seg.first_position - 1, -pos)
            if best is None or rank > best[0]:
                best = (rank, row)
    return best[1] if best is not None else None


def starts_resync(seg: Segment) -> bool:
    """Whether ``seg`` starts a resync (its first part): the whole state afresh, which a chain may
    start from once prune has deleted the segments before it."""
    return seg.resync and seg.resync_part == 0


def _trimmed_view(good: list[Segment], fulls: Callable[[], list[dict[str, Any]]],
                  present: Collection[str] = ()) -> tuple[list[Segment], dict[str, str | None]]:
    """The segments as the chain rules read them once prune has cut chains at their start.

    Prune deletes a chain's old segments from its start, and only up to a segment a restore can
    start from without them (``prune_chains``): one that starts a resync (the whole state), or
    one that covers, or starts right after, the revision of a trusted etcd full archive. Such a
    segment, whose predecessor is gone, is read as the first of its chain: after that archive
    (the chain's base from there on, for it and the segments after it, which name the old base)
    at its revision, its times from its own end (or its start, when the archive is right before
    it: no instant in it is then before the archive's revision), or from the resync. Any other
    segment whose predecessor is missing stays what it is: a break, which a restore refuses.
    The archive's state is exact at its revision, so nothing before it is needed and nothing
    after it is lost: a segment removed by anyone else at such a place costs the window its
    past, never a wrong state. A predecessor that is ``present`` but did not read is damage,
    not a cut: its successor stays a break."""
    names = {s.name for s in good} | set(present)
    dangling = [s for s in good if s.prev_name is not None and s.prev_name not in names]
    if not dangling:
        return good, {}
    rows = fulls()
    known = {(str(r.get("name")), str(r.get("manifest_sha256"))) for r in rows}
    children: dict[str, list[Segment]] = {}
    for s in good:
        if s.prev_name is not None:
            children.setdefault(s.prev_name, []).append(s)
    view = {s.name: s for s in good}
    trimmed: dict[str, str | None] = {}
    for s in dangling:
        if starts_resync(s):
            view[s.name] = dataclasses.replace(s, prev_name=None, prev_sha=None, base_position=s.first_position - 1)
            trimmed[s.name] = None
            continue
        row = trim_anchor(s, rows)
        if row is None:
            continue
        name, sha, pos = str(row["name"]), str(row["manifest_sha256"]), int(row["position"])
        exact = pos == s.first_position - 1
        view[s.name] = dataclasses.replace(
            s, prev_name=None, prev_sha=None, base_name=name, base_sha=sha, base_position=pos, first_position=pos + 1,
            first_time=s.first_time if exact else s.last_time)
        trimmed[s.name] = name
        # the segments after it name the chain's old base (or, written by a capture that continued
        # this view, a trusted full archive): from here on the chain starts from this archive
        allowed = {(s.base_name, s.base_sha)} | known
        todo = list(children.get(s.name, []))
        while todo:
            d = todo.pop()
            if (d.base_name, d.base_sha) not in allowed:
                continue  # (moved in from another chain: the chain rules refuse it)
            view[d.name] = dataclasses.replace(d, base_name=name, base_sha=sha, base_position=pos)
            todo.extend(children.get(d.name, []))
    return list(view.values()), trimmed


#: ``read_chains``' ``authenticate``: every segment's MAC; the MAC of each chain's last segment,
#: whose links (each a manifest's checksum) vouch for every segment before it; or none (the
#: caller authenticates what it relies on: :func:`resolve_point`).
AUTH_ALL, AUTH_ENDS, AUTH_NONE = "all", "ends", "none"


def read_chains(store: ArchiveStore, source_name: str, keys: ArchiveKeys | None, *,
                allow_unencrypted: bool = False, authenticate: str = AUTH_ENDS, distrust: Collection[str] = (),
                fulls: list[dict[str, Any]] | None = None) -> Chains:
    """Every segment of ``source_name`` in ``store``, linked, read as the catalog reads archives
    (tasks/catalog.py ``read_indexed``): one LIST of the segments, the source's index objects,
    and a ranged read only for a segment the index does not hold. Without a key nothing is
    authenticated (a capture writing to public keys only: it only continues the chain, and
    every restore authenticates what it uses).

    With ``AUTH_ENDS`` (the default) each chain's last segment is authenticated: its manifest
    names its predecessor's manifest checksum, which names the one before, so the MAC of the
    end vouches for the whole chain, and reading a week of segments costs a few MAC checks, not
    one per segment. A chain whose end does not authenticate is cut back to its last segment
    that does; what was cut is ``bad``. A link that does not hold, where an index entry was
    involved, is read again from the objects themselves: a forged or stale entry costs speed,
    never a decision. ``distrust``: segments whose index entries are not used at all.

    A chain that prune cut at its start begins at a segment whose predecessor is gone; it is
    read from the full archive or resync it starts after (:func:`_trimmed_view`; ``fulls``: the
    source's :func:`trusted_fulls`, read only when a segment's predecessor is missing, unless
    given)."""
    keyed = bool(keys is not None and keys.keyring)
    held: list[list[dict[str, Any]]] = [fulls] if fulls is not None else []

    def trusted() -> list[dict[str, Any]]:
        if not held:
            held.append(trusted_fulls(store, source_name, keys if keys is not None else ArchiveKeys(),
                                      allow_unencrypted=allow_unencrypted))
        return held[0]

    infos = [i for i in store.list(segments.segments_prefix(source_name)) if segments.is_segment_name(i.name)]
    prefix = index_prefix(segments.segment_name(source_name, 0))  # (the index of every segment of the source)

    def read(info: ArchiveInfo, reader: ArchiveReader) -> Segment:
        if keyed and authenticate == AUTH_ALL:
            _authenticate(reader, keys, allow_unencrypted)  # type: ignore[arg-type]
        seg = _segment_of(info.name, info.url, reader)
        if seg.source != source_name:
            raise ArchiveError(f"a segment of source {seg.source!r}, not of {source_name!r} (moved in)")
        return seg

    def linked(got: list[IndexedRead]) -> tuple[list[Segment], list[tuple[str, str]], list[Chain], list[str],
                                                dict[str, str | None]]:
        good = [g.value for g in got if g.error is None]
        bad = [(g.info.url, str(g.error)) for g in got if g.error is not None]
        good, trimmed = _trimmed_view(good, trusted, {g.info.name for g in got})
        chains, problems = segments.build_chains(good)
        return good, bad, chains, problems, trimmed

    distrusted = set(distrust)
    for attempt in range(2):
        got = read_indexed(store, infos, read, prefix=prefix, skip=distrusted)
        good, bad, chains, problems, trimmed = linked(got)
        if problems:
            # a link that does not hold: read the segments it names from the objects themselves
            named = {s.name for s in good if any(s.url in p or s.name in p for p in problems)}
            named |= {s.prev_name for s in good if s.name in named and s.prev_name}
            if any(g.from_index and g.info.name in named for g in got):
                distrusted |= named
                got = read_indexed(store, infos, read, prefix=prefix, skip=distrusted)
                good, bad, chains, problems, trimmed = linked(got)
        found = Chains(chains, problems, bad,
                       {g.info.name: (g.info, g.entry) for g in got if g.error is None and g.entry is not None},
                       {g.info.name for g in got if g.from_index}, trimmed)
        if not keyed or authenticate != AUTH_ENDS:
            return found
        failed = _authenticate_ends(store, found, keys, allow_unencrypted)  # type: ignore[arg-type]
        suspects = {seg.name for seg, _ in failed if seg.name in found.from_index}
        if attempt == 0 and suspects:
            distrusted |= suspects  # an entry that did not authenticate: read those objects, link again
            continue
        found.bad.extend((seg.url, why) for seg, why in failed)
        return found
    raise AssertionError("unreachable")



def has_chain(store: ArchiveStore, source_name: str, keys: ArchiveKeys, allow_unencrypted: bool = False) -> bool:
    """Whether ``source_name`` has a change chain (``burrow capture``), whose end a failover and
    the daily rehearsal restore by default: a listing of its segments and their index, no read
    per segment."""
    return bool(read_chains(store, source_name, keys if keys.keyring else None,
                            allow_unencrypted=allow_unencrypted).chains)


def authenticate_segment(store: ArchiveStore, found: Chains, seg: Segment, keys: ArchiveKeys,
                         allow_unencrypted: bool = False) -> None:
    """Check ``seg``'s manifest MAC on the bytes it was read from (no request) and, when they do
    not pass (a forged index entry), on the object itself, which must then be the manifest the
    chain was linked by. ArchiveError (or KeyMismatch) naming the segment when neither passes."""
    held = found.entries.get(seg.name)
    if held is not None:
        try:
            _authenticate(entry_reader(*held), keys, allow_unencrypted)
            return
        except ArchiveError:
            pass  # a forged or damaged entry: the object decides (a wrong key fails there too)
    try:
        with open_stored(store, seg.name) as reader:
            _authenticate(reader, keys, allow_unencrypted)
            if reader.manifest.get("manifest_sha256") != seg.sha:
                raise ArchiveError(f"{seg.url} changed after its chain was read (replaced meanwhile, or a forged "
                                   "index entry)")
    except StoreError as exc:
        raise ArchiveError(f"{seg.url}: {exc}") from None


def _authenticate_ends(store: ArchiveStore, found: Chains, keys: ArchiveKeys,
                       allow_unencrypted: bool) -> list[tuple[Segment, str]]:
    """Cut each chain back to its last segment whose MAC holds (AUTH_ENDS); return the segments
    cut off for that, with why."""
    kept, failed = [], []
    for chain in found.chains:
        for i in range(len(chain.segments) - 1, -1, -1):
            seg = chain.segments[i]
            try:
                authenticate_segment(store, found, seg, keys, allow_unencrypted)
            except (ArchiveError, KeyMismatch) as exc:
                failed.append((seg, str(exc)))
                continue
            chain.segments = chain.segments[: i + 1]
            kept.append(chain)
            break
    found.chains = kept
    return failed


def trusted_fulls(store: ArchiveStore, source_name: str, keys: ArchiveKeys, *,
                  allow_unencrypted: bool = False, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The source's full archives whose claims can be trusted (the one selector,
    tasks/catalog.py ``select_archives``), each with the ``position`` its manifest records.
    ``rows``: the store's catalog, when the caller has read it already (under ``keys``)."""
    if rows is None:
        rows = describe_archives(store, keys if keys.keyring else None)
    sel = select_archives(rows, source_name, keyed=bool(keys.keyring), allow_unencrypted=allow_unencrypted)

    def position(info: ArchiveInfo, reader: ArchiveReader) -> int | None:
        # from the catalog's index (no request), when it holds the manifest the row was trusted by
        m = reader.manifest
        if m.get("manifest_sha256") != by_name[info.name].get("manifest_sha256") or \
                m.get("manifest_sha256") != manifest_digest(m):
            raise ArchiveError(f"{info.url} is not the archive its catalog row described")
        return segments.base_position(m)

    by_name = {str(r["name"]): r for r in sel.trusted}
    infos = [ArchiveInfo(name=str(r["name"]), size=int(r["size"]), modified=str(r.get("modified")), url=str(r["url"]),
                         etag=r.get("etag")) for r in sel.trusted]
    got = read_indexed(store, infos, position, prefix=INDEX_PREFIX, merge=False)
    return [{**by_name[g.info.name], "position": g.value} for g in got if g.error is None]


def resolve_point(
    store: ArchiveStore, source_name: str, keys: ArchiveKeys, *, at_time: int | None = None,
    at_position: int | None = None, latest: bool = False, allow_unencrypted: bool = False,
) -> Point:
    """What restoring ``source_name`` to the point takes (burrow/segments.py ``choose``).

    The chains are read without a MAC check (from the index: no request per segment), the
    point is chosen, and then the segments it relies on are authenticated: each one it applies
    and the one whose time or position placed the point. Each link before them is a manifest's
    checksum named by an authenticated manifest, so the chain is vouched for back to its start,
    and a segment before the start archive's position is never read. A segment that cannot be
    read or is not bound to its name refuses the restore (a chain with a hole in it has no
    trustworthy state after the hole), and so does one the point relies on that is not
    authenticated; an index entry that fails only costs a second reading, from the objects."""
    distrust: set[str] = set()
    for _ in range(2):
        fulls = trusted_fulls(store, source_name, keys, allow_unencrypted=allow_unencrypted)
        found = read_chains(store, source_name, keys, allow_unencrypted=allow_unencrypted, authenticate=AUTH_NONE,
                            distrust=distrust, fulls=fulls)
        if found.bad:
            url, why = found.bad[0]
            more = f" (and {len(found.bad) - 1} more)" if len(found.bad) > 1 else ""
            raise ArchiveError(f"the change chain of {source_name!r} holds a segment that is damaged, forged or "
                               f"moved in: {url}: {why}{more}; nothing was written")
        point = segments.choose(found.chains, found.problems, fulls, source=source_name, at_time=at_time,
                                at_position=at_position, latest=latest)
        relied = _relied_on(point)
        failed: list[tuple[Segment, str]] = []
        for seg in relied:
            try:
                authenticate_segment(store, found, seg, keys, allow_unencrypted)
            except ArchiveError as exc:
                failed.append((seg, str(exc)))
        if not failed:
            break
        suspects = {seg.name for seg, _ in failed if seg.name in found.from_index} - distrust
        if not suspects:
            seg, why = failed[0]
            raise ArchiveError(f"the change chain of {source_name!r} holds a segment that is not authenticated: "
                               f"{why if seg.url in why else seg.url + ': ' + why}; nothing was written")
        distrust |= suspects  # read them from the objects themselves, and choose again
    start = store.url(point.start_name) if point.start_name else "a resync"
    logger().info("point in time: %s + %d change segments (%d authenticated of %d in the store); %s", start,
                  len(point.segments), len(relied), sum(len(c.segments) for c in found.chains),
                  found.window().describe())
    return point


def _relied_on(point: Point) -> list[Segment]:
    """The segments a point relies on: those it applies, the one that placed it (the last
    segment at or before its time or position, which may hold no change after the start), and
    the chain's last: its links vouch for every segment's ``late_from`` up to it, which decided
    whether a later segment holds changes the point includes (a forged index entry could
    otherwise hide one)."""
    placed = None
    for s in point.chain.live():
        if point.at_position is not None:
            if s.first_position - 1 <= point.at_position:
                placed = s
        elif s.first_time <= (point.at_time or 0):
            placed = s
    out = list(point.segments)
    for seg in (placed, point.chain.live()[-1] if point.chain.live() else None):
        if seg is not None and all(s.name != seg.name for s in out):
            out.append(seg)
    return out


@task(name="resolve-point", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def resolve_point_task(
    store: ArchiveStore, source_name: str, keys: ArchiveKeys, at_time: int | None = None,
    at_position: int | None = None, latest: bool = False, allow_unencrypted: bool = False,
) -> Point:
    """Prefect task wrapper of :func:`resolve_point`."""
    return resolve_point(store, source_name, keys, at_time=at_time, at_position=at_position, latest=latest,
                         allow_unencrypted=allow_unencrypted)


def _segment_records(store: ArchiveStore, point: Point, keys: ArchiveKeys, workdir: Path,
                     allow_unencrypted: bool) -> Iterator[Record]:
    """The change records of the point's segments, in chain order, each segment downloaded and
    checked again as it is read (the manifest read now must be the one the chain was linked by)."""
    for i, seg in enumerate(point.segments):
        local = workdir / f"segment-{i:06d}.burrow"
        store.get(seg.name, local)
        try:
            with open(local, "rb") as f:
                reader = ArchiveReader(f, label=seg.url)
                reader.check_downgrade(keys, allow_unencrypted=allow_unencrypted)
                if reader.manifest.get("manifest_sha256") != seg.sha or reader.check_binding(seg.name) is not True:
                    raise ArchiveError(f"{seg.url} changed after its chain was checked (replaced meanwhile)")
                yield from reader.records(keys)
        finally:
            local.unlink(missing_ok=True)


def materialize_point(
    store: ArchiveStore, point: Point, base_path: Path | None, keys: ArchiveKeys, workdir: Path, *,
    allow_unencrypted: bool = False,
) -> tuple[str, ArchiveKeys, dict[str, Any]]:
    """Write the state at ``point`` (the start archive at ``base_path``, already validated, or
    none when the point starts from a resync segment, plus the point's changes) as a private
    archive in ``workdir``, encrypted under a key that lives only in this process. Returns its
    path, the keys that open it (for the plan) and its manifest. Any failed check of any
    segment raises before the archive is finished."""
    ephemeral = WriteKeys(mode="symmetric", recipients=[SymmetricKey.generate()], origin="point-in-time")
    state_keys = ArchiveKeys(ephemeral.keyring())
    out_path = workdir / "point-in-time.burrow"
    with contextlib.ExitStack() as stack:
        if base_path is not None:
            base = ArchiveReader(stack.enter_context(open(base_path, "rb")), label="the start archive")
            m, records = base.manifest, base.records(keys)
        else:
            first = point.segments[0]
            with open_stored(store, first.name) as reader:
                m, records = reader.manifest, iter(())
        with scratch_writes("point-in-time state", workdir):
            fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                writer = ArchiveWriter(out, service=m["service"], encryptor=StreamEncryptor(ephemeral))
                changes = _segment_records(store, point, keys, workdir, allow_unencrypted)
                for record in segments.materialize(records, changes, point, workdir):
                    writer.add(record)
                manifest = writer.finish({
                    "service": m["service"], "source": m.get("source"), "source_url": m.get("source_url"),
                    "root": m.get("root", "/"), "point_in_time": True,
                    "service_info": {"start_archive": point.start_name, "segments": len(point.segments)},
                })
    logger().info("point in time: the state holds %d keys", manifest["keys"])
    return str(out_path), state_keys, manifest


@task(name="materialize-point")
def materialize(
    store: ArchiveStore, point: Point, base_path: str | None, keys: ArchiveKeys, workdir: str,
    allow_unencrypted: bool = False,
) -> tuple[str, ArchiveKeys, dict[str, Any]]:
    """Prefect task wrapper of :func:`materialize_point`."""
    return materialize_point(store, point, Path(base_path) if base_path else None, keys, Path(workdir),
                             allow_unencrypted=allow_unencrypted)


@dataclass
class ChainPrune:
    """What :func:`prune_chains` did (or, on a dry run, would do): the segments deleted and why,
    the segments it left alone and why (``url: why``, as prune lists archives), how many of those
    are under Object Lock, and the full archives a chain still starts from (name -> why), which
    the prune must not delete."""

    deleted: list[tuple[str, str]] = field(default_factory=list)
    left_alone: list[tuple[str, str]] = field(default_factory=list)
    locked: int = 0
    protect: dict[str, str] = field(default_factory=dict)


def _to_delete(chain: Chain, kept_fulls: list[dict[str, Any]], base_kept: bool, cutoff: int, within: str,
               last_stays: bool) -> tuple[int, list[str]]:
    """How many segments of ``chain``, from its start, prune deletes, and why each.

    A segment is needed when a kept full archive restores its instants (one before it: the
    chain's base, or for etcd any kept archive at a revision the chain covers before its end)
    and it ended within the window (``cutoff``). The segments from the start that are not needed
    go (every one, when the chain needs none and ``last_stays`` does not hold: its capture may
    continue it), but only up to a segment the chain can start from without them (``trim_anchor``
    with a kept archive, or a resync), so that what is left reads as a chain and restores from
    that archive; and never up to one whose own instants in the window a kept archive before it
    restores, but a start inside it would not (a start inside a segment restores its end)."""
    segs = chain.segments
    first = chain.first
    etcd = first.service in (None, "etcd")
    starts = [first.base_position] if base_kept else []
    starts += [int(r["position"]) for r in kept_fulls if etcd and r.get("service") == "etcd"
               and type(r.get("position")) is int and int(r["position"]) >= first.base_position]
    earliest = min(starts, default=None)
    reasons: list[str] = []
    for seg in segs:
        if earliest is None or earliest >= seg.last_position:
            reasons.append(f"change segment that no kept full archive needs (its chain's base archive "
                           f"{first.base_name} is not kept, nor any archive before it)")
        elif seg.last_time < cutoff:
            reasons.append(f"change segment older than --keep-changes-within {within}")
        else:
            break
    unneeded = len(reasons)
    if unneeded == len(segs) and not last_stays:
        return unneeded, reasons
    for b in range(min(unneeded, len(segs) - 1), 0, -1):
        seg = segs[b]
        if starts_resync(seg):
            return b, reasons[:b]
        row = trim_anchor(seg, kept_fulls)
        if row is None:
            continue
        exact = row["position"] == seg.first_position - 1
        if exact or seg.last_time < cutoff or not any(p <= seg.first_position - 1 for p in starts):
            return b, reasons[:b]
    return 0, []


def _cut_to(segs: list[Segment], upto: int, kept_fulls: list[dict[str, Any]]) -> int:
    """The largest ``b <= upto`` at which the chain ``segs`` can start once the segments before
    it are deleted (a kept archive's revision, or a resync); 0 when there is none."""
    for b in range(upto, 0, -1):
        if starts_resync(segs[b]) or trim_anchor(segs[b], kept_fulls) is not None:
            return b
    return 0


def prune_chains(
    store: ArchiveStore, sources: list[str], remaining: set[str], keys: ArchiveKeys | None, keep_within: timedelta,
    *, dry_run: bool = False, now: datetime | None = None, within: str | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> ChainPrune:
    """Delete the change segments no kept full archive needs (``prune --keep-changes-within``).

    Per source, ``remaining`` being the full archives this prune keeps: each chain loses the
    segments from its start that no kept archive needs or that ended before the window
    (``_to_delete``), up to a segment it can start from without them, so the window's start
    moves on while everything in the window stays restorable; a chain that needs none goes
    whole, but for the newest one not ended by a gap (a capture may be continuing it), whose
    last segment stays. Segments go from the cut back to the chain's start, so one that a
    delete refused, or that an interruption stopped at, leaves two chains that each read whole:
    the rest of the old start, and the kept part. A segment under Object Lock is left alone
    (tasks/retention.py ``lock_reason``, the rule prune applies to archives) and with it the
    segments before it, down to where the chain can start again. Without a key nothing is
    deleted: a segment's manifest must be authenticated first, as an archive's is. The archives
    a chain still starts from after this (its first segment was kept, and follows an archive
    that is not kept) are returned in ``protect``: deleting one would leave the chain without a
    start. ``rows``: the store's catalog, as the prune read it (else it is read here)."""
    log = logger()
    now = now or datetime.now(UTC)
    cutoff = int((now - keep_within).timestamp() * 1_000_000)
    within = within or age_text(keep_within)
    keyed = keys is not None and bool(keys.keyring)
    out = ChainPrune()
    for source in sources:
        fulls = trusted_fulls(store, source, keys if keys is not None else ArchiveKeys(), rows=rows)
        found = read_chains(store, source, keys, fulls=fulls)
        if not found.chains:
            continue
        kept_fulls = [r for r in fulls if str(r["name"]) in remaining]
        newest = max(found.chains, key=lambda c: (c.last.last_time, c.last.name))
        plans = []
        for chain in found.chains:
            last_stays = chain is newest and not chain.ended_by_gap
            n, why = _to_delete(chain, kept_fulls, chain.first.base_name in remaining, cutoff, within, last_stays)
            plans.append((chain, n, why))
        if not keyed and any(n for _, n, _ in plans):
            log.warning("prune: the change segments of %s are kept: no read key to authenticate them", source)
            plans = [(chain, 0, []) for chain, _, _ in plans]
        for chain, n, why in plans:
            segs = chain.segments
            gone: set[str] = set()
            upto = n  # delete segs[:upto], from segs[upto - 1] back to segs[0]
            while upto > 0:
                stopped = None
                for i in range(upto - 1, -1, -1):
                    seg = segs[i]
                    # a dry run asks for the lock; a real one lets the delete refuse (the store checks
                    # the lock itself: one request per segment saved) and asks why only then
                    lock = lock_reason(store, seg.name) if dry_run else None
                    if not dry_run:
                        try:
                            store.delete(seg.name)
                        except ArchiveNotFound:
                            pass  # (gone meanwhile)
                        except StoreError as exc:
                            lock = lock_reason(store, seg.name) or str(exc)
                    if lock is not None:
                        stopped = i
                        out.locked += int("Object Lock" in lock)
                        break
                    log.info("prune: %s %s: %s", "would delete" if dry_run else "deleted", seg.url, why[i])
                    out.deleted.append((seg.url, why[i]))
                    gone.add(seg.name)
                if stopped is None:
                    break
                # what is left from the start reads whole up to the refused segment; the segments
                # before it stay with it down to where the chain can start again, the rest go
                restart = _cut_to(segs, stopped, kept_fulls)
                with_it = stopped - restart
                note = (f"; the {with_it} segment{'s' if with_it != 1 else ''} of its chain before it "
                        "stay with it (a chain is cut from its start only)") if with_it else ""
                log.warning("prune: leaving %s alone: %s%s", segs[stopped].url, lock, note)
                out.left_alone.append((segs[stopped].url, f"{lock}{note}"))
                upto = restart
            # the chain's start stays (nothing was to go, or a delete was refused): when prune cut it
            # there before, the archive it starts from must stay too
            anchor = found.trimmed.get(segs[0].name) if segs[0].name not in gone else None
            if anchor is not None and anchor not in remaining:
                out.protect[anchor] = (f"the change chain of {source!r} starts from it ({segs[0].url}: the segments "
                                       "before that were pruned); kept while that segment is")
    return out


@task(name="prune-changes", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def prune_changes(
    store: ArchiveStore, sources: list[str], remaining: set[str], keys: ArchiveKeys | None, keep_within: str = "7d",
    dry_run: bool = False, rows: list[dict[str, Any]] | None = None,
) -> ChainPrune:
    """Prefect task wrapper of :func:`prune_chains` (``keep_within``: a duration, ``7d``)."""
    from burrow.naming import parse_duration

    return prune_chains(store, sources, remaining, keys, parse_duration(keep_within, "--keep-changes-within"),
                        dry_run=dry_run, within=keep_within, rows=rows)
