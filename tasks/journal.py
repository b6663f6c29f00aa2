"""The failover journal: an interrupted failover, run again, finishes with the archive it chose.

A failover that dies half way (the process, the worker, the network) leaves part of the tree in
the target. Run again, it must finish the job with the archive it started with, even if a newer
backup (or rehearsal) appeared meanwhile. So, before its first write, a failover records its
choice beside the archives: a create-only sidecar under ``_failover/<source>/<target>/``
(:func:`open_journal`); a successful run removes it (:func:`close_journal`), and a re-run of the
same source into the same target that finds one resumes with that archive
(:func:`unfinished_failover`), if it is still a trusted candidate: the record only narrows the
choice to an archive the run would accept anyway (the RPO gate, validation against the catalog
row's manifest checksum and the sanity check still apply). ``--archive`` overrides it, and
``--no-resume`` (flow parameter ``resume=False``) starts afresh.

**Trust.** The store is writable by people who must not steer a failover (a backup worker with
public keys and write-only credentials). So a record counts only when it is

* **authenticated** with a reader key (burrow/crypto.py ``ArchiveKeys.reader_sign``: derived
  from a secret identity, which a holder of public keys only cannot derive);
* **bound** to what it describes: the source, the target (its URL without credentials), the
  archive's name and its ``manifest_sha256``; a record copied into another source's or
  target's directory, or naming an archive whose manifest changed, does not count;
* **fresh**: it carries its signed start time and an expiry (default 6 h after it was
  written); an expired one is not resumed, and neither is one older than this run's
  ``resume_within``. A genuine record left behind by a crashed failover weeks ago is not
  resumed: the failover chooses afresh.

A record that fails any of these is ignored, with one warning line per run, and left in place
for ``prune`` to remove (:func:`stale_journal_records`). Without a secret key (read keys of
public keys only, or none) a record cannot be verified: it is ignored the same way.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from blocks.store import SIDECAR_SUFFIX, ArchiveStore
from burrow.crypto import ArchiveKeys
from burrow.errors import BurrowError, StoreError, StoreUnavailable, should_retry
from burrow.naming import parse_signed_time, redact_url, slug
from burrow.runlog import logger
from tasks import task

JOURNAL_PREFIX = "_failover/"
JOURNAL_KIND = "burrow-failover-journal"
JOURNAL_VERSION = 2
#: Domain separation of the journal MAC's message (never a marker's or a manifest's).
JOURNAL_MAC_DOMAIN = b"burrow/v1/failover-journal\x00"
#: How long a record may be resumed after it was written, unless a run says otherwise.
DEFAULT_RESUME_WITHIN = timedelta(hours=6)
#: A record dated this far in the future (clock skew between workers) is still accepted.
CLOCK_SKEW = timedelta(minutes=5)
#: The largest record read back (a record is a few hundred bytes).
MAX_RECORD_BYTES = 16 * 1024
_STAMP = "%Y%m%dT%H%M%S%fZ"


def journal_dir(source: str, target: str) -> str:
    """``_failover/<source>/<target>/``: the records of failovers of ``source`` into ``target``
    (``target`` described without credentials)."""
    return f"{JOURNAL_PREFIX}{slug(source)}/{slug(redact_url(target))}/"


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def build_record(
    source: str, target: str, row: dict[str, Any], keys: ArchiveKeys, *, started: datetime,
    expires_in: timedelta = DEFAULT_RESUME_WITHIN,
) -> dict[str, Any]:
    """The signed record of a failover of ``source`` into ``target`` from ``row``'s archive,
    begun at ``started``. Raises ValueError when ``keys`` holds no secret key."""
    body = {
        "kind": JOURNAL_KIND,
        "version": JOURNAL_VERSION,
        "source": source,
        "target": redact_url(target),
        "archive": row["name"],
        "url": row["url"],
        "manifest_sha256": row.get("manifest_sha256"),
        "started": _iso(started),
        "expires": _iso(started + expires_in),
    }
    return keys.reader_sign(JOURNAL_MAC_DOMAIN, body)


def check_record(
    record: Any, source: str | None, target: str | None, keys: ArchiveKeys | None, *, now: datetime,
    within: timedelta | None = None,
) -> tuple[bool, str | None]:
    """Whether ``record`` may be resumed by a failover of ``source`` into ``target`` at ``now``
    (``None`` for either: the record's own, as prune checks it): ``(True, None)`` or
    ``(False, why)``. ``within`` narrows the record's own expiry to this run's limit."""
    if not isinstance(record, dict) or record.get("kind") != JOURNAL_KIND:
        return False, "unauthenticated: not a signed journal record"
    if keys is None or not keys.can_reader_sign():
        return False, "unverifiable: no secret key is configured to authenticate it"
    ok, why = keys.reader_verify(JOURNAL_MAC_DOMAIN, record)
    if not ok:
        return False, f"unauthenticated: {why}"
    if source is not None and record.get("source") != source:
        return False, "foreign: it names another source"
    if target is not None and record.get("target") != redact_url(target):
        return False, "foreign: it names another target"
    if not isinstance(record.get("archive"), str) or not isinstance(record.get("manifest_sha256"), str):
        return False, "foreign: it names no archive and manifest checksum"
    started, expires = parse_signed_time(record.get("started")), parse_signed_time(record.get("expires"))
    if started is None or expires is None:
        return False, "unauthenticated: its times are malformed"
    if started > now + CLOCK_SKEW:
        return False, "dated in the future"
    if now >= expires or (within is not None and now - started > within):
        return False, "expired"
    return True, None


def _load(store: ArchiveStore, name: str) -> Any:
    try:
        data = store.get_sidecar(name)
    except (BurrowError, NotImplementedError):
        return None
    if len(data) > MAX_RECORD_BYTES:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _records(store: ArchiveStore, prefix: str) -> list[str]:
    try:
        return list(store.list_sidecars(prefix))
    except (StoreError, StoreUnavailable, NotImplementedError) as exc:
        logger().warning("failover: cannot list the failover journal in %s: %s", store.describe(), exc)
        return []


def unfinished_failover(
    store: ArchiveStore, source: str, target: str, keys: ArchiveKeys | None, *, now: datetime | None = None,
    within: timedelta = DEFAULT_RESUME_WITHIN,
) -> dict[str, Any] | None:
    """The genuine record, begun most recently by its signed time, of a failover of ``source``
    into ``target`` that did not finish and may still be resumed; None when there is none.

    Every other record found (unauthenticated, foreign-bound, expired, unreadable) is ignored
    with one warning line for the lot, and left for prune."""
    now = now or datetime.now(UTC)
    good: list[tuple[datetime, str, dict[str, Any]]] = []
    ignored: dict[str, int] = {}
    for name in _records(store, journal_dir(source, target)):
        record = _load(store, name)
        ok, why = check_record(record, source, target, keys, now=now, within=within)
        if ok:
            good.append((parse_signed_time(record["started"]), name, record))  # type: ignore[index]
        else:
            reason = (why or "unreadable").split(":")[0]
            ignored[reason] = ignored.get(reason, 0) + 1
    if ignored:
        total = sum(ignored.values())
        logger().warning(
            "failover: ignoring %d failover journal record%s of %s into %s (%s); choosing afresh unless a genuine "
            "one remains (prune removes them)", total, "s" if total > 1 else "", source, redact_url(target),
            ", ".join(f"{n} {why}" for why, n in sorted(ignored.items())),
        )
    if not good:
        return None
    _, name, record = max(good, key=lambda t: (t[0], t[1]))
    return dict(record, record=name)


def open_journal(
    store: ArchiveStore, source: str, target: str, row: dict[str, Any], keys: ArchiveKeys | None,
    *, expires_in: timedelta = DEFAULT_RESUME_WITHIN,
) -> str | None:
    """Record that a failover of ``source`` into ``target`` from ``row``'s archive is about to
    write; returns the record's name. None, with a warning, when the store takes no writes or
    no secret key can sign the record (a re-run then chooses afresh, or is pinned by hand)."""
    log = logger()
    if keys is None or not keys.can_reader_sign():
        log.warning("failover: the choice of archive is not recorded (no secret key to sign the record with); "
                    "a re-run after an interruption should pin it with --archive %s", row["url"])
        return None
    started = datetime.now(UTC)
    record = build_record(source, target, row, keys, started=started, expires_in=expires_in)
    name = f"{journal_dir(source, target)}{started.strftime(_STAMP)}-{uuid.uuid4().hex[:8]}{SIDECAR_SUFFIX}"
    try:
        store.put_sidecar(name, orjson.dumps(record, option=orjson.OPT_SORT_KEYS))
    except (StoreError, StoreUnavailable, NotImplementedError) as exc:
        log.warning("failover: could not record the choice of archive (%s); a re-run after an interruption "
                    "should pin it with --archive %s", exc, row["url"])
        return None
    return name


@task(name="record-choice", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def record_choice(
    store: ArchiveStore, source: str, target: str, row: dict[str, Any], keys: ArchiveKeys | None,
    expires_in_s: float = DEFAULT_RESUME_WITHIN.total_seconds(),
) -> str | None:
    """Prefect task wrapper of :func:`open_journal`."""
    return open_journal(store, source, target, row, keys, expires_in=timedelta(seconds=expires_in_s))


def close_journal(store: ArchiveStore, source: str, target: str, keys: ArchiveKeys | None) -> None:
    """Remove the genuine records of failovers of ``source`` into ``target`` (this one
    finished); records that do not authenticate are left for prune."""
    now = datetime.now(UTC)
    try:
        for name in _records(store, journal_dir(source, target)):
            ok, why = check_record(_load(store, name), source, target, keys, now=now)
            if ok or why == "expired":
                store.delete_sidecar(name)
    except (StoreError, StoreUnavailable, NotImplementedError) as exc:
        logger().warning("failover: could not clear the record of this failover (%s)", exc)


def stale_journal_records(store: ArchiveStore, keys: ArchiveKeys | None, now: datetime | None = None) -> list[str]:
    """The journal records prune may delete: unauthenticated, foreign-bound (in the directory
    of another source or target than they name), unreadable, or expired. Needs a secret key:
    without one nothing can be told apart, and nothing is returned."""
    if keys is None or not keys.can_reader_sign():
        return []
    now = now or datetime.now(UTC)
    stale = []
    for name in _records(store, JOURNAL_PREFIX):
        record = _load(store, name)
        ok, _ = check_record(record, None, None, keys, now=now)
        if ok and not name.startswith(journal_dir(str(record["source"]), str(record["target"]))):
            ok = False  # a genuine record moved into another pair's directory
        if not ok:
            stale.append(name)
    return stale
