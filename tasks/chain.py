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
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from blocks.store import ArchiveInfo, ArchiveStore, open_stored
from burrow import segments
from burrow.archive import ArchiveReader, ArchiveWriter, manifest_digest
from burrow.crypto import ArchiveKeys, StreamEncryptor
from burrow.errors import ArchiveError, KeyMismatch, StoreError, should_retry
from burrow.keys import SymmetricKey, WriteKeys
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


#: ``read_chains``' ``authenticate``: every segment's MAC; the MAC of each chain's last segment,
#: whose links (each a manifest's checksum) vouch for every segment before it; or none (the
#: caller authenticates what it relies on: :func:`resolve_point`).
AUTH_ALL, AUTH_ENDS, AUTH_NONE = "all", "ends", "none"


def read_chains(store: ArchiveStore, source_name: str, keys: ArchiveKeys | None, *,
                allow_unencrypted: bool = False, authenticate: str = AUTH_ENDS, distrust: Collection[str] = ()) -> Chains:
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
    never a decision. ``distrust``: segments whose index entries are not used at all."""
    keyed = bool(keys is not None and keys.keyring)
    infos = [i for i in store.list(segments.segments_prefix(source_name)) if segments.is_segment_name(i.name)]
    prefix = index_prefix(segments.segment_name(source_name, 0))  # (the index of every segment of the source)

    def read(info: ArchiveInfo, reader: ArchiveReader) -> Segment:
        if keyed and authenticate == AUTH_ALL:
            _authenticate(reader, keys, allow_unencrypted)  # type: ignore[arg-type]
        seg = _segment_of(info.name, info.url, reader)
        if seg.source != source_name:
            raise ArchiveError(f"a segment of source {seg.source!r}, not of {source_name!r} (moved in)")
        return seg

    def linked(got: list[IndexedRead]) -> tuple[list[Segment], list[tuple[str, str]], list[Chain], list[str]]:
        good = [g.value for g in got if g.error is None]
        bad = [(g.info.url, str(g.error)) for g in got if g.error is not None]
        chains, problems = segments.build_chains(good)
        return good, bad, chains, problems

    distrusted = set(distrust)
    for attempt in range(2):
        got = read_indexed(store, infos, read, prefix=prefix, skip=distrusted)
        good, bad, chains, problems = linked(got)
        if problems:
            # a link that does not hold: read the segments it names from the objects themselves
            named = {s.name for s in good if any(s.url in p or s.name in p for p in problems)}
            named |= {s.prev_name for s in good if s.name in named and s.prev_name}
            if any(g.from_index and g.info.name in named for g in got):
                distrusted |= named
                got = read_indexed(store, infos, read, prefix=prefix, skip=distrusted)
                good, bad, chains, problems = linked(got)
        found = Chains(chains, problems, bad,
                       {g.info.name: (g.info, g.entry) for g in got if g.error is None and g.entry is not None},
                       {g.info.name for g in got if g.from_index})
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
                  allow_unencrypted: bool = False) -> list[dict[str, Any]]:
    """The source's full archives whose claims can be trusted (the one selector,
    tasks/catalog.py ``select_archives``), each with the ``position`` its manifest records."""
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
        found = read_chains(store, source_name, keys, allow_unencrypted=allow_unencrypted, authenticate=AUTH_NONE,
                            distrust=distrust)
        if found.bad:
            url, why = found.bad[0]
            more = f" (and {len(found.bad) - 1} more)" if len(found.bad) > 1 else ""
            raise ArchiveError(f"the change chain of {source_name!r} holds a segment that is damaged, forged or "
                               f"moved in: {url}: {why}{more}; nothing was written")
        fulls = trusted_fulls(store, source_name, keys, allow_unencrypted=allow_unencrypted)
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


def prune_chains(
    store: ArchiveStore, sources: list[str], remaining: set[str], keys: ArchiveKeys | None, keep_within: timedelta,
    *, dry_run: bool = False, now: datetime | None = None,
) -> list[tuple[str, str]]:
    """Delete the change segments no kept full archive needs (``prune --keep-changes-within``):
    per source, every chain but the newest (which a capture may be continuing) whose base
    archive is not among ``remaining`` (the archives this prune keeps) or whose end is older than
    ``keep_within``. A chain goes from its last segment back to its first, so one a delete
    refused (Object Lock) or that an interruption stopped is still a whole chain from its start.
    Without a key nothing is deleted: a segment's manifest must be authenticated first, as an
    archive's is. Returns ``(url, reason)`` of each segment deleted (or, with ``dry_run``, that
    would be)."""
    log = logger()
    now = now or datetime.now(UTC)
    cutoff = int((now - keep_within).timestamp() * 1_000_000)
    out: list[tuple[str, str]] = []
    for source in sources:
        found = read_chains(store, source, keys)
        if len(found.chains) < 2:
            continue
        if keys is None or not keys.keyring:
            log.warning("prune: the change segments of %s are kept: no read key to authenticate them", source)
            continue
        newest = max(found.chains, key=lambda c: (c.last.last_time, c.last.name))
        for chain in found.chains:
            if chain is newest:
                continue
            if chain.first.base_name not in remaining:
                why = f"change segment of a chain whose base archive {chain.first.base_name} is not kept"
            elif chain.last.last_time < cutoff:
                why = "change segment older than --keep-changes-within"
            else:
                continue
            for seg in reversed(chain.segments):
                if not dry_run:
                    try:
                        store.delete(seg.name)
                    except StoreError as exc:
                        log.warning("prune: keeping %s: %s", seg.url, exc)
                        break
                log.info("prune: %s %s: %s", "would delete" if dry_run else "deleted", seg.url, why)
                out.append((seg.url, why))
    return out


@task(name="prune-changes", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def prune_changes(
    store: ArchiveStore, sources: list[str], remaining: set[str], keys: ArchiveKeys | None, keep_within: str = "7d",
    dry_run: bool = False,
) -> list[tuple[str, str]]:
    """Prefect task wrapper of :func:`prune_chains` (``keep_within``: a duration, ``7d``)."""
    from burrow.naming import parse_duration

    return prune_chains(store, sources, remaining, keys, parse_duration(keep_within, "--keep-changes-within"),
                        dry_run=dry_run)
