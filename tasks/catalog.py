"""Catalog: what is in a store, as archive listings with manifest summaries (the ``catalog``
task that prune and failover start with), and opening one archive for inspection.

A file in the store that does not open as a Burrow archive (half-written by another tool,
truncated, not an archive at all) never fails the catalog: its row carries ``error``, a
warning names it, and prune keeps it while failover passes it by. Only a transient store
failure (StoreUnavailable) fails the catalog, and the task retries that.

On object storage the catalog keeps an index beside the archives (``_catalog/*.index`` sidecars):
for each archive, the exact bytes a ranged read would fetch (header frame, manifest frame and
footer), bound to the object's size and entity tag. A listing then costs one LIST and a few
index reads instead of one ranged GET per archive. The index is an untrusted cache: every entry
goes through the same ArchiveReader checks and, with a key, the same manifest authentication as
bytes read from the archive itself; an entry whose size or tag differs from the listing is
ignored, and so is one whose manifest is bound to another object name (another archive's
genuine bytes under this one's name, size and tag: the archive itself is read instead).

Every row carries ``bound`` (``True``, ``"legacy"`` or ``False``: see
ArchiveReader.check_binding and docs/FORMAT.md, "Binding"). :func:`select_archives` is the one
place that decides which archives may be acted on and in which order: by the signed
``created``, never by a name or a listing. Backups add a one-entry index object for the archive they publish; a catalog that had
to read archives by range, or found many index objects, writes one merged index and removes the
objects it merged. Failing to write the index (a read-only credential) only costs speed.

Change segments (burrow/segments.py) are indexed the same way, per source, under
``_catalog/<slug>/changes/`` (:func:`index_prefix`): the capture adds each segment as it seals
it, and tasks/chain.py reads a chain through :func:`read_indexed`, this module's reading of
listed objects over their entries, with the same rules. Writers that add entries often merge
them by size class (:func:`_merge_small`), so no object is rewritten once per entry added.
"""

from __future__ import annotations

import base64
import io
import math
import re
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from blocks.resolve import archive_from_ref
from blocks.store import SIDECAR_SUFFIX, ArchiveInfo, ArchiveStore, open_stored
from burrow.archive import BOUND_ELSEWHERE, ArchiveReader, canonical_json
from burrow.crypto import ArchiveKeys, encryption_summary
from burrow.errors import (
    ArchiveError,
    ArchiveNotFound,
    KeyMismatch,
    StoreError,
    StoreUnavailable,
    should_retry,
)
from burrow.naming import age_text
from burrow.runlog import logger
from burrow.segments import is_segment_name
from tasks import task

SUMMARY_FIELDS = (
    "service", "source", "keys", "raw_bytes", "created", "encrypted", "content_sha256", "manifest_sha256",
)
INDEX_PREFIX = "_catalog/"
INDEX_SUFFIX = ".index" + SIDECAR_SUFFIX
INDEX_FORMAT = "burrow-catalog-index/1"
#: More index objects than this and the catalog merges them into one.
INDEX_MAX_OBJECTS = 16
#: The most entries one index object holds: a merge writes several objects beyond this, so that
#: no object grows without bound (a source's change segments: 8,640 a day at the default seal).
INDEX_MAX_ENTRIES = 8192
#: When a writer adds an entry, it merges the index objects of one size class once this many of
#: them have gathered (classes grow by this factor): each entry is rewritten a few times over its
#: life, never once per object written, and the objects stay a few dozen at most.
INDEX_MERGE_FANOUT = 4
_INDEX_COUNT_RE = re.compile(r"-n(\d+)" + re.escape(".index" + SIDECAR_SUFFIX) + "$")
#: Why a pre-binding archive under a name Burrow does not give is never chosen automatically.
UNBOUND = ("not bound to its name (written before archives named their object, under a name Burrow does not give): "
           "used only when named explicitly")


@contextmanager
def open_archive(ref: str) -> Iterator[ArchiveReader]:
    """Open an archive for reading: in place when local, via a private download otherwise."""
    store, name = archive_from_ref(ref)
    with open_stored(store, name) as reader:
        yield reader


def _summary_problem(manifest: dict[str, Any]) -> str | None:
    """Why the manifest's summary fields cannot be used to sort and select archives, if so."""
    source, created = manifest.get("source"), manifest.get("created")
    if not isinstance(source, str) or not source:
        return "its manifest names no source"
    if not isinstance(created, str):
        return "its manifest has no creation time"
    try:
        datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return "its manifest has an unreadable creation time"
    return None


def describe_archives(store: ArchiveStore, keys: ArchiveKeys | None = None) -> list[dict[str, Any]]:
    """Every complete archive in ``store`` with its manifest summary. A file that does not
    read as an archive gets an ``error`` (and a warning) instead of a summary."""
    log = logger()
    # Change segments (``<slug>/changes/``, burrow/segments.py) are links of a capture's chain,
    # not full archives: never listed, chosen or pruned as such (tasks/chain.py reads them).
    infos = [i for i in store.list() if not is_segment_name(i.name)]
    indexed = _indexed(store)
    index_names, cached = _read_index(store) if indexed and infos else ([], {})
    fresh: dict[str, dict[str, Any]] = {}

    def describe(info: ArchiveInfo) -> dict[str, Any]:
        entry = cached.get(info.name)
        if entry is not None and (entry.get("size") != info.size or entry.get("etag") != info.etag):
            entry = None  # replaced since it was indexed (or a stale or forged entry): read the archive
        row, new_entry = _describe(store, info, log, keys, entry, want_entry=indexed and entry is None)
        if entry is not None and (row.get("error") or row.get("authenticated") is False
                                  or row.get("unbound_reason") == BOUND_ELSEWHERE):
            # a damaged (or forged) entry must not hide a good archive: judge the archive itself.
            # An entry holding another archive's genuine bytes under this name, size and tag is
            # caught by the binding (the manifest names another object).
            row, new_entry = _describe(store, info, log, keys, None, want_entry=True)
        if new_entry is not None:
            fresh[info.name] = new_entry
        return row

    # object stores answer one request at a time per connection: read several archives at once
    workers = 1 if not indexed or len(infos) < 2 else 8
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="burrow-catalog") as pool:
        rows = list(pool.map(describe, infos))
    if indexed:
        log.debug("catalog: %d archives from the index, %d read by range", len(infos) - len(fresh), len(fresh))
        stale = len(cached.keys() - {i.name for i in infos})
        if fresh or len(index_names) > INDEX_MAX_OBJECTS or stale > len(infos) // 4 + INDEX_MAX_OBJECTS:
            # every readable listed archive, by the entry it was described from (fresh wins)
            entries = {**cached, **fresh}
            readable = sorted(r["name"] for r in rows if not r.get("error") and r["name"] in entries)
            _write_index(store, [entries[n] for n in readable], replaces=index_names)
    _flag_copies(rows)
    return rows


#: Why a bound archive's second copy, under a longer name, is not acted on.
COPY_UNDER_LONGER_NAME = "a copy of {url} under a longer name (the same manifest; only the original is acted on)"


def _flag_copies(rows: list[dict[str, Any]]) -> None:
    """One archive, one row. A manifest's binding accepts ``name`` ending with
    ``/<object_name>`` (a store opened one directory up), so a copy of an archive under a
    longer name (``evil/<name>``) would pass as bound too, and a copy of each of the newest
    archives would fill a keep-last rule with duplicates so that prune deletes what it should
    keep. Rows that share a manifest are one archive: the one under the shortest name is the
    original (a copy that passes the suffix test is always longer), the others are unbound
    copies, never chosen and never deleted by prune (which keeps what it cannot act on)."""
    by_manifest: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        digest = row.get("manifest_sha256")
        if not row.get("error") and row.get("bound") in (True, "legacy") and isinstance(digest, str):
            by_manifest.setdefault(digest, []).append(row)
    for same in by_manifest.values():
        if len(same) < 2:
            continue
        same.sort(key=lambda r: (str(r["name"]).count("/"), len(str(r["name"])), str(r["name"])))
        original = same[0]
        for copy in same[1:]:
            copy.update(bound=False, unbound_reason=COPY_UNDER_LONGER_NAME.format(url=original.get("url")))


def _indexed(store: ArchiveStore) -> bool:
    """Whether the store keeps a catalog index: object storage, where every read is a request."""
    return getattr(store, "open_ranged", None) is not None


class _IndexedBytes:
    """A read-only view of an archive made of the bytes its index entry holds (header frame at
    the start, manifest frame and footer at the end). Reading anything else is an error: the
    catalog never needs the body."""

    def __init__(self, size: int, head: bytes, tail: bytes) -> None:
        self.size, self.head, self.tail = size, head, tail
        self.tail_start = size - len(tail)
        self.pos = 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        if end <= len(self.head):
            data = self.head[self.pos : end]
        elif self.pos >= self.tail_start:
            data = self.tail[self.pos - self.tail_start : end - self.tail_start]
        else:
            raise ArchiveError("catalog index entry does not hold the bytes the catalog needs")
        self.pos = end
        return data


def _index_entry(info: ArchiveInfo, reader: ArchiveReader) -> dict[str, Any]:
    """The bytes of ``reader``'s archive that the catalog reads, as an index entry."""
    f = reader.f
    f.seek(0)
    head = f.read(reader.body_start)
    f.seek(reader.manifest_offset)
    tail = f.read(reader.size - reader.manifest_offset)
    return {"name": info.name, "size": info.size, "etag": info.etag,
            "head": base64.b64encode(head).decode(), "tail": base64.b64encode(tail).decode()}


def index_prefix(name: str) -> str:
    """Where the index entry of the stored object ``name`` lives: a change segment's in its
    source's own index (``_catalog/<slug>/changes/``), so that reading a chain never loads the
    archives' entries and a listing of archives never loads a chain's; every other archive's in
    the catalog's (``_catalog/``)."""
    if is_segment_name(name):
        return f"{INDEX_PREFIX}{name.rsplit('/', 1)[0]}/"
    return INDEX_PREFIX


def _index_names(store: ArchiveStore, prefix: str = INDEX_PREFIX) -> list[str]:
    """The names of the index objects directly under ``prefix`` (none when the store cannot
    list them): the catalog's own are not mixed with the per-source indexes below them."""
    try:
        return [n for n in store.list_sidecars(prefix) if n.endswith(INDEX_SUFFIX) and "/" not in n[len(prefix):]]
    except (StoreError, StoreUnavailable, NotImplementedError) as exc:
        logger().debug("catalog: no index (%s)", exc)
        return []


def _read_index(store: ArchiveStore, names: list[str] | None = None,
                prefix: str = INDEX_PREFIX) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The names of the index objects under ``prefix`` (listed unless given), and their entries
    by archive name. An index object that cannot be read or parsed is ignored (its archives are
    read by range)."""
    import orjson
    import zstandard

    log = logger()
    names = _index_names(store, prefix) if names is None else names

    def load(name: str) -> list[dict[str, Any]]:
        try:
            data = zstandard.ZstdDecompressor().decompress(store.get_sidecar(name), max_output_size=256 << 20)
            doc = orjson.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT or not isinstance(doc.get("entries"), list):
                raise ValueError("not a catalog index")
            return [e for e in doc["entries"] if isinstance(e, dict) and isinstance(e.get("name"), str)]
        except (StoreError, StoreUnavailable, ArchiveNotFound, ValueError, zstandard.ZstdError) as exc:
            log.debug("catalog: ignoring index object %s: %s", name, exc)
            return []

    entries: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="burrow-index") as pool:
        for got in pool.map(load, names):
            for e in got:
                entries[e["name"]] = e
    return names, entries


def _write_index(store: ArchiveStore, entries: list[dict[str, Any]], replaces: Sequence[str] = (),
                 prefix: str = INDEX_PREFIX) -> None:
    """Publish ``entries`` as new index objects under ``prefix`` (one per ``INDEX_MAX_ENTRIES``,
    each named with its entry count, which only schedules merges), then remove the objects it
    ``replaces``. Never fails the caller: without the index, listings are slower, not wrong."""
    import zstandard

    log = logger()
    if not entries:
        return
    written = []
    for i in range(0, len(entries), INDEX_MAX_ENTRIES):
        part = entries[i : i + INDEX_MAX_ENTRIES]
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{prefix}{stamp}-{uuid.uuid4().hex[:8]}-n{len(part)}{INDEX_SUFFIX}"
        data = zstandard.ZstdCompressor(level=3).compress(canonical_json({"format": INDEX_FORMAT, "entries": part}))
        try:
            store.put_sidecar(name, data)
        except (StoreError, StoreUnavailable, NotImplementedError) as exc:
            log.info("catalog: index not updated (%s); listings stay correct, only slower", exc)
            return  # (what was written holds entries the objects it would replace hold too)
        written.append(name)
    for old in replaces:
        if old not in written:
            try:
                store.delete_sidecar(old)
            except (StoreError, StoreUnavailable, ArchiveNotFound) as exc:  # already merged by someone else, or not ours to delete
                log.debug("catalog: index object %s not removed: %s", old, exc)


def index_new_archive(store: ArchiveStore, name: str, info: ArchiveInfo | None = None,
                      local: Path | None = None) -> None:
    """Add a just-published archive (or change segment: :func:`index_prefix`) to the store's
    index (a one-entry index object), so the next listing need not read it. ``info``: the
    archive's listing entry when the caller has it (saves a HEAD); ``local``: the file just
    uploaded, when the caller still has it (its bytes are read there, not from the store).
    Never fails the backup or the capture."""
    if not _indexed(store):
        return
    log = logger()
    prefix = index_prefix(name)
    try:
        info = info or store.head(name)
        if local is not None and local.stat().st_size == info.size:
            with open(local, "rb") as f:
                entry = _index_entry(info, ArchiveReader(f, label=info.url))
        else:
            with open_stored(store, name, info.size) as reader:
                entry = _index_entry(info, reader)
        _write_index(store, [entry], prefix=prefix)
    except (ArchiveError, StoreError, StoreUnavailable, OSError) as exc:
        log.info("catalog: %s not indexed (%s); listings read it by range", name, exc)
        return
    _merge_small(store, prefix)


def _index_count(name: str) -> int:
    """The entry count an index object's name declares (1 when it declares none: an older
    name). Only merges are scheduled by it: the entries themselves are checked as they are read."""
    m = _INDEX_COUNT_RE.search(name)
    return max(1, int(m.group(1))) if m else 1


def _merge_small(store: ArchiveStore, prefix: str) -> None:
    """Keep the index under ``prefix`` a few objects, even where it is written often (a capture
    seals every few seconds) and read rarely, without rewriting it whole each time: the objects
    are size classes (by ``INDEX_MERGE_FANOUT``), and once ``INDEX_MERGE_FANOUT`` objects of the
    smallest class gather they become one of the next class (a full object, ``INDEX_MAX_ENTRIES``,
    never merges again). So each entry is rewritten about log(n) times, and a reader gets a few
    dozen objects at most."""
    for _ in range(8):
        names = _index_names(store, prefix)
        classes: dict[int, list[str]] = {}
        for n in names:
            count = _index_count(n)
            if count < INDEX_MAX_ENTRIES:
                classes.setdefault(int(math.log(count, INDEX_MERGE_FANOUT) + 1e-9), []).append(n)
        due = next((classes[c] for c in sorted(classes) if len(classes[c]) >= INDEX_MERGE_FANOUT), None)
        if due is None:
            return
        _, entries = _read_index(store, due, prefix)
        _write_index(store, [e for _, e in sorted(entries.items())], replaces=due, prefix=prefix)


def _authenticate(reader: ArchiveReader, keys: ArchiveKeys) -> tuple[bool, str | None]:
    """Whether the manifest's claims (source, created, counts) can be trusted: its MAC checks
    under a configured key. An unencrypted archive's manifest cannot be authenticated."""
    if not reader.encrypted:
        return False, "unencrypted: its manifest cannot be authenticated (anyone who can write to the store could have made it)"
    try:
        reader.check_metadata(keys)
    except KeyMismatch:
        return False, "no configured key opens it"
    except ArchiveError as exc:
        return False, str(exc)
    return True, None


def _describe(
    store: ArchiveStore, info: ArchiveInfo, log: Any, keys: ArchiveKeys | None = None,
    entry: dict[str, Any] | None = None, *, want_entry: bool = False,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The catalog row of one archive (from its index ``entry`` when given, else from the
    archive), and a new index entry when ``want_entry``."""
    row: dict[str, Any] = info.to_dict()
    new_entry = None
    try:
        with _open_for_catalog(store, info, entry) as reader:
            m = reader.manifest
            problem = _summary_problem(m)
            if problem is not None:
                raise ArchiveError(f"{info.url}: {problem}")
            row.update({k: m.get(k) for k in SUMMARY_FIELDS})
            if reader.encrypted:
                enc = encryption_summary(reader.header.get("encryption"))
                row.update(encryption_mode=enc.get("mode"), fingerprints=enc.get("fingerprints", []))
            if keys is not None and keys.keyring:
                row["authenticated"], why = _authenticate(reader, keys)
                if why:
                    row["unauthenticated_reason"] = why
            try:
                row["bound"] = reader.check_binding(info.name)
                if row["bound"] is False:
                    row["unbound_reason"] = UNBOUND
            except ArchiveError:
                row.update(bound=False, unbound_reason=BOUND_ELSEWHERE)
            if want_entry:
                new_entry = _index_entry(info, reader)
    except (ArchiveError, StoreError) as exc:
        # Not an archive (or gone, or unreadable for good): reported, never fatal. A
        # transient StoreUnavailable is not caught: the catalog task retries it.
        row = {**info.to_dict(), "error": str(exc)}
        if entry is None:  # (a bad index entry is retried against the archive itself)
            log.warning("catalog: skipping a file that is not a readable archive: %s", exc)
        new_entry = None
    return row, new_entry


@contextmanager
def _open_for_catalog(store: ArchiveStore, info: ArchiveInfo, entry: dict[str, Any] | None) -> Iterator[ArchiveReader]:
    if entry is not None:
        try:
            view = _IndexedBytes(info.size, base64.b64decode(entry["head"]), base64.b64decode(entry["tail"]))
            reader = ArchiveReader(view, label=info.url)  # type: ignore[arg-type]
        except (ArchiveError, KeyError, TypeError, ValueError):
            reader = None  # a damaged entry: read the archive itself
        if reader is not None:
            yield reader
            return
    with open_stored(store, info.name, info.size) as reader:
        yield reader


@dataclass
class IndexedRead:
    """What :func:`read_indexed` found for one listed object: ``value`` (what the caller's
    ``read`` returned) or ``error`` (why neither its index entry nor the object itself reads),
    and ``entry``: the bytes it was read from (header frame, manifest frame, footer), kept so that
    a later check of the same bytes (a manifest MAC) needs no request."""

    info: ArchiveInfo
    value: Any = None
    error: str | None = None
    entry: dict[str, Any] | None = None
    from_index: bool = False


def entry_reader(info: ArchiveInfo, entry: dict[str, Any]) -> ArchiveReader:
    """An ArchiveReader over the bytes an index ``entry`` holds for the listed object ``info``:
    every check of the archive's own bytes applies (framing, manifest checksum, and whatever the
    caller checks next). ArchiveError when the entry is damaged or not for this object's size
    and tag (replaced since it was indexed, stale or forged)."""
    if entry.get("size") != info.size or entry.get("etag") != info.etag:
        raise ArchiveError(f"{info.url}: its index entry is for another version of the object")
    try:
        view = _IndexedBytes(info.size, base64.b64decode(entry["head"]), base64.b64decode(entry["tail"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArchiveError(f"{info.url}: a damaged index entry ({type(exc).__name__})") from None
    return ArchiveReader(view, label=info.url)  # type: ignore[arg-type]


def read_indexed(store: ArchiveStore, infos: Sequence[ArchiveInfo], read: Callable[[ArchiveInfo, ArchiveReader], Any],
                 *, prefix: str, skip: Collection[str] = (), merge: bool = True) -> list[IndexedRead]:
    """``read(info, reader)`` for each listed object, as the catalog reads archives: over its
    index entry under ``prefix`` (:func:`index_prefix`) when the index holds one for the
    object's size and tag, else over the object itself (ranged reads). The index is an untrusted
    cache: an entry that ``read`` rejects (a damaged, stale, forged or swapped entry: another
    object's genuine bytes fail the binding to this name, forged ones the caller's manifest
    authentication) is never believed, the object itself is read instead. So a listing costs one
    LIST of the index plus a read per index object, and a ranged read only per object the index
    does not hold, whose entry is then added (one merged index, as the catalog does).
    ``read`` raises ArchiveError or StoreError to reject; a transient StoreUnavailable is
    raised to the caller (whose task retries it). ``skip``: names whose entries are not used
    (a caller that found them inconsistent reads those objects themselves). ``merge``: whether
    ``infos`` is the whole listing of what the index under ``prefix`` holds, so that the index may
    be rewritten from it (never for a part of it: the rest would be dropped)."""
    log = logger()
    indexed = _indexed(store)
    index_names, cached = _read_index(store, prefix=prefix) if indexed and infos else ([], {})
    fresh: dict[str, dict[str, Any]] = {}

    def one(info: ArchiveInfo) -> IndexedRead:
        entry = cached.get(info.name) if info.name not in skip else None
        if entry is not None:
            try:
                return IndexedRead(info, read(info, entry_reader(info, entry)), entry=entry, from_index=True)
            except (ArchiveError, StoreError) as exc:
                log.debug("index: not believing the entry of %s: %s", info.url, exc)
        try:
            with open_stored(store, info.name, info.size) as reader:
                new = _index_entry(info, reader) if indexed else None  # (a local file reopens for free)
                value = read(info, reader)
        except (ArchiveError, StoreError) as exc:
            return IndexedRead(info, error=str(exc))
        if new is not None:
            fresh[info.name] = new
        return IndexedRead(info, value, entry=new)

    workers = 1 if not indexed or len(infos) < 2 else 8
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="burrow-indexed") as pool:
        out = list(pool.map(one, infos))
    if indexed and merge:
        stale = len(cached.keys() - {i.name for i in infos})
        log.debug("index %s: %d objects from the index, %d read by range", prefix, len(infos) - len(fresh), len(fresh))
        if fresh or len(index_names) > INDEX_MAX_OBJECTS or stale > len(infos) // 4 + INDEX_MAX_OBJECTS:
            entries = {**cached, **fresh}
            good = sorted(r.info.name for r in out if r.error is None and r.info.name in entries)
            _write_index(store, [entries[n] for n in good], replaces=index_names, prefix=prefix)
    return out


@task(name="catalog", retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=should_retry)
def catalog(store: ArchiveStore, keys: ArchiveKeys | None = None) -> list[dict[str, Any]]:
    """Prefect task wrapper of :func:`describe_archives`."""
    rows = describe_archives(store, keys)
    logger().info(
        "catalog: %d archives in %s (%d unreadable)", len(rows), store.describe(), sum(1 for r in rows if r.get("error"))
    )
    return rows


#: An archive dated later than now plus this is flagged: a clock error or a forgery.
FUTURE_SKEW = timedelta(minutes=5)
#: A manifest dated later than its object's store modification time plus this was signed after
#: the object was stored, so it is not the manifest that was written there (a replay).
STORED_SKEW = timedelta(minutes=5)
#: How far behind the newest trusted archive a rehearsed one may be and still be tried first
#: (``--prefer-rehearsed-within``): a rehearsal proves an archive restores, but not at any price
#: in lost data.
PREFER_REHEARSED_WITHIN = timedelta(hours=2)


def created_at(row: dict[str, Any]) -> datetime | None:
    """The signed creation time a catalog row carries (from the manifest), or None."""
    try:
        when = datetime.fromisoformat(str(row.get("created")).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _stored_at(row: dict[str, Any]) -> datetime | None:
    """When the store says the row's object was last written, or None (a row built by hand)."""
    try:
        return datetime.fromisoformat(str(row.get("modified")).replace("Z", "+00:00"))
    except ValueError:
        return None


def signed_order(row: dict[str, Any]) -> tuple[datetime, str]:
    """The sort key of trusted rows: the signed ``created``, the name only to break ties (so that
    an order never depends on a listing, and is the same on every run)."""
    return created_at(row) or datetime.min.replace(tzinfo=UTC), str(row.get("name"))


def distrust(row: dict[str, Any], *, keyed: bool, allow_unencrypted: bool = False,
             now: datetime | None = None) -> str | None:
    """Why a catalog row's claims (source, created) must not be acted on, or None: unreadable,
    not bound to its object name (a copy, or a pre-binding archive under a foreign name), dated
    in the future or after its object was stored, or (when a read key is configured) not
    authenticated.

    The one meaning of ``--allow-unencrypted``: with read keys configured, an unencrypted
    archive (whose manifest nothing authenticates) is distrusted unless it is allowed. Without
    keys nothing can be authenticated, and every readable, bound archive is taken at its word."""
    if row.get("error"):
        return "unreadable: " + str(row["error"])
    when = created_at(row)
    if when is None:
        return "no readable creation time"
    if when > (now or datetime.now(UTC)) + FUTURE_SKEW:
        return "dated in the future (a clock error or a forged manifest)"
    if row.get("bound") is False:
        return str(row.get("unbound_reason") or BOUND_ELSEWHERE)
    stored = _stored_at(row)
    if stored is not None and when > stored + STORED_SKEW:
        return "dated after it was stored (its manifest is later than its object: replayed or forged)"
    if keyed and row.get("authenticated") is not True and not (allow_unencrypted and not row.get("encrypted")):
        return "not authenticated: " + str(row.get("unauthenticated_reason") or "no configured key opens it")
    return None


def rehearsed(row: dict[str, Any]) -> bool:
    """Whether a catalog row's archive passed a rehearsal whose marker is authenticated."""
    r = row.get("rehearsal")
    return isinstance(r, dict) and r.get("ok") is True and r.get("authenticated") is True


@dataclass
class Selection:
    """What :func:`select_archives` chose: the trusted archives of a source in the order they
    are tried, the newest of them, and every other archive of the source with the reason."""

    candidates: list[dict[str, Any]] = field(default_factory=list)
    newest: dict[str, Any] | None = None
    trusted: list[dict[str, Any]] = field(default_factory=list)  # newest first, by signed time
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (url, why it cannot be acted on)
    #: One line: which archive comes first and why, with the RPO of each choice considered.
    note: str = ""

    @property
    def first(self) -> dict[str, Any] | None:
        return self.candidates[0] if self.candidates else None


def select_archives(
    rows: list[dict[str, Any]],
    source: str | None,
    *,
    keyed: bool,
    allow_unencrypted: bool = False,
    prefer_rehearsed_within: timedelta | None = PREFER_REHEARSED_WITHIN,
    now: datetime | None = None,
) -> Selection:
    """The one selector of "the newest trusted archive" (failover, ``restore --latest``,
    ``rehearse``, ``status``, ``list --latest``).

    Rows of ``source`` (every source when None) that :func:`distrust` passes are ordered by
    their signed ``created``, never by a name or a listing. ``newest`` is the first of them.
    ``candidates`` puts first the archives with a passing, authenticated rehearsal that are no
    more than ``prefer_rehearsed_within`` older than the newest (None: a rehearsed archive is
    preferred only when it is the newest), then every other trusted archive, newest first: a
    month-old rehearsal never outranks today's backup."""
    now = now or datetime.now(UTC)
    window = prefer_rehearsed_within or timedelta(0)
    sel = Selection()
    trusted: list[dict[str, Any]] = []
    for row in rows:
        if source is not None and row.get("source") != source:
            continue
        why = distrust(row, keyed=keyed, allow_unencrypted=allow_unencrypted, now=now)
        if why is None:
            trusted.append(row)
        else:
            sel.skipped.append((str(row.get("url")), why))
    trusted.sort(key=signed_order, reverse=True)
    sel.trusted = trusted
    if not trusted:
        sel.note = "archive: no trusted archive"
        return sel
    newest = sel.newest = trusted[0]
    top = created_at(newest)
    assert top is not None  # distrust passed it
    preferred = [r for r in trusted if rehearsed(r) and top - created_at(r) <= window]  # type: ignore[operator]
    sel.candidates = preferred + [r for r in trusted if not any(r is p for p in preferred)]

    def rpo(r: dict[str, Any]) -> str:
        return age_text(max(timedelta(0), now - created_at(r)))  # type: ignore[operator]

    shown = age_text(window).replace(" 0m", "").replace(" 0h", "")
    first = sel.candidates[0]
    older = next((r for r in trusted if rehearsed(r)), None)
    if first is newest and rehearsed(newest):
        sel.note = f"archive: newest {newest['url']} (RPO {rpo(newest)}), rehearsed"
    elif first is not newest:
        sel.note = (f"archive: rehearsed {first['url']} (RPO {rpo(first)}) preferred over newest {newest['url']} "
                    f"(RPO {rpo(newest)}): within --prefer-rehearsed-within {shown}")
    elif older is not None:
        gap = age_text(top - created_at(older))  # type: ignore[operator]
        sel.note = (f"archive: newest {newest['url']} (RPO {rpo(newest)}) used: the rehearsed {older['url']} "
                    f"(RPO {rpo(older)}) is {gap} older than the newest, beyond --prefer-rehearsed-within {shown}")
    else:
        sel.note = (f"archive: newest {newest['url']} (RPO {rpo(newest)}): no trusted archive of the source has "
                    "a passing, authenticated rehearsal")
    return sel
