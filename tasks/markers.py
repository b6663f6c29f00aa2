"""Rehearsal markers: the result of a rehearsal, kept next to its archive.

A marker is a store sidecar (blocks/store.py: small, create-only, written atomically) named
``<archive name>.rehearsal-<UTC time>.burrow-meta``. It holds a small JSON object: which
archive (its full name in the store, manifest and content SHA-256), when (``at``), whether the
rehearsal passed, how many keys, how long the restore took (the RTO), where it was rehearsed (a
URL without credentials) and the Burrow version. Never a value, a key path or a secret: its
``error`` names a class and a count (flows/rehearse.py), the paths stay in the run's logs.

**Authentication.** Anyone who can write to the store can write a sidecar, so a marker counts
only when it is MACed with a *reader key* (burrow/crypto.py, ``ArchiveKeys.reader_sign``):
HMAC-SHA256 under a key derived from the secret side of a keyring identity (a symmetric key,
an X25519 private key, a passphrase). The marker names the key by a public id (``signer``). A
backup worker that holds public keys only cannot make one, though it knows the file key of
every archive it wrote (which is why the archive's own key is no longer used).

**Binding.** A marker counts for an archive only when it names that archive (by its full name,
compared by suffix: a store opened one directory up names it with a prefix) and its
``manifest_sha256``: a marker copied next to another archive fails. The markers of an archive
are ordered by their signed time ``at``, never by their file names: the newest authenticated
marker wins, and a marker whose file name's time is not its signed time is ignored as
"renamed" (a passing marker's bytes copied under a newer name cannot hide a newer FAILED one).

**Legacy markers** (version 1, MACed with a key derived from the archive's file key) are still
read and shown, but as unauthenticated: a public-key backup worker could have made them. So
are markers read without a secret key, and markers signed by a key not configured here. An
unauthenticated marker never makes failover prefer an archive.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

from blocks.store import SIDECAR_SUFFIX, ArchiveStore
from burrow.crypto import ArchiveKeys
from burrow.errors import StoreError, should_retry
from burrow.naming import parse_signed_time
from burrow.runlog import logger
from burrow.version import __version__
from tasks import task

MARKER_KIND = "burrow-rehearsal-marker"
#: Version 2: MACed with a reader key, bound to the archive's full name and manifest checksum.
MARKER_VERSION = 2
MARKER_INFIX = ".rehearsal-"
#: Domain separation of the marker MAC's message (never a journal record's or a manifest's).
MARKER_MAC_DOMAIN = b"burrow/v1/rehearsal-marker\x00"
#: The MAC scheme of version-1 markers (the archive's own key): read, never trusted.
LEGACY_MAC_SCHEME = "hmac-sha256:burrow/v1/rehearsal-marker"
#: The largest marker read back (a marker is a few hundred bytes).
MAX_MARKER_BYTES = 16 * 1024
#: How many ignored markers a summary lists (with their reasons).
IGNORED_LIMIT = 10
_TIME_FORMAT = "%Y%m%dT%H%M%S%fZ"


def marker_name(archive_name: str, at: datetime) -> str:
    """``<archive>.rehearsal-<UTC time to the microsecond>.burrow-meta`` (the time is the
    marker's signed ``at``; a name with another time marks a renamed copy)."""
    return f"{archive_name}{MARKER_INFIX}{at.astimezone(UTC).strftime(_TIME_FORMAT)}{SIDECAR_SUFFIX}"


def _split(sidecar: str) -> tuple[str, datetime] | None:
    if not sidecar.endswith(SIDECAR_SUFFIX):
        return None
    head, sep, stamp = sidecar[: -len(SIDECAR_SUFFIX)].rpartition(MARKER_INFIX)
    if not sep or not head.endswith(".burrow") or not stamp:
        return None
    try:
        return head, datetime.strptime(stamp, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def archive_of(sidecar: str) -> str | None:
    """The archive a marker's name belongs to, or None when ``sidecar`` is not a marker."""
    split = _split(sidecar)
    return split[0] if split else None


def same_archive(named: str, archive_name: str) -> bool:
    """Whether a record naming ``named`` is about ``archive_name``: equal, or one is the other
    below a directory (a store opened one directory up names its archives with a prefix)."""
    return bool(named) and (
        named == archive_name or archive_name.endswith("/" + named) or named.endswith("/" + archive_name)
    )


def build_marker(
    archive_name: str,
    manifest: dict[str, Any],
    *,
    at: datetime,
    ok: bool,
    keys: int,
    restore_s: float,
    scratch: str,
    error: str | None = None,
    details: dict[str, Any] | None = None,
    signer: ArchiveKeys | None = None,
) -> dict[str, Any]:
    """The marker object, MACed with ``signer``'s reader key when it holds a secret identity
    (else unauthenticated). ``archive_name`` is the archive's full name in the store;
    ``scratch`` is described without credentials; ``error`` is a one-line message naming a
    class and a count, never a value or a key path."""
    body: dict[str, Any] = {
        "kind": MARKER_KIND,
        "version": MARKER_VERSION,
        "archive": archive_name,
        "manifest_sha256": manifest.get("manifest_sha256"),
        "content_sha256": manifest.get("content_sha256"),
        "source": manifest.get("source"),
        "at": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "ok": bool(ok),
        "keys": int(keys),
        "restore_s": round(float(restore_s), 3),
        "scratch": scratch,
        "burrow_version": __version__,
    }
    if error:
        body["error"] = error[:500]
    if details:
        body["details"] = details
    if signer is not None and signer.can_reader_sign():
        body = signer.reader_sign(MARKER_MAC_DOMAIN, body)
    return body


def check_marker(
    marker: Any, archive_name: str, manifest_sha256: str | None, keys: ArchiveKeys | None,
    sidecar: str | None = None,
) -> tuple[bool, str | None]:
    """Whether ``marker`` is an authentic marker of the archive ``archive_name`` whose
    manifest checksum is ``manifest_sha256``: ``(True, None)``, or ``(False, why)``.
    ``sidecar`` is the name the marker was read under: its time must be the signed ``at``."""
    if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND:
        return False, "not a rehearsal marker"
    named = marker.get("archive")
    if not isinstance(named, str) or not same_archive(named, archive_name):
        return False, "it names another archive"
    if marker.get("mac_scheme") == LEGACY_MAC_SCHEME or marker.get("version") == 1:
        return False, ("legacy marker: MACed with the archive's own key, which a public-key backup worker also "
                       "holds, so it cannot be authenticated")
    if keys is None or not keys.can_reader_sign():
        return False, "no read key is configured to authenticate it"
    ok, why = keys.reader_verify(MARKER_MAC_DOMAIN, marker)
    if not ok:
        return False, why
    if not manifest_sha256:
        return False, "the archive's manifest checksum is unknown, so the marker cannot be bound to it"
    if marker.get("manifest_sha256") != manifest_sha256:
        return False, "its manifest_sha256 is not the archive's (copied from another archive)"
    at = parse_signed_time(marker.get("at"))
    if at is None:
        return False, "its signed time is malformed"
    if sidecar is not None:
        split = _split(sidecar.rsplit("/", 1)[-1])
        if split is None or split[1] != at.astimezone(UTC):
            return False, "renamed: its file name's time is not its signed time"
    return True, None


def write_marker_record(store: ArchiveStore, archive_name: str, marker: dict[str, Any]) -> str:
    """Store ``marker`` next to its archive (create-only and atomic); returns its name."""
    at = datetime.fromisoformat(str(marker["at"]).replace("Z", "+00:00"))
    name = marker_name(archive_name, at)
    data = orjson.dumps(marker, option=orjson.OPT_SORT_KEYS)
    store.put_sidecar(name, data)
    logger().info(
        "rehearsal marker %s written (%s, %s)", name, "passed" if marker.get("ok") else "FAILED",
        "authenticated" if marker.get("mac") else "unauthenticated: no secret key configured",
    )
    return name


@task(name="write-marker", retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=should_retry)
def write_marker(store: ArchiveStore, archive_name: str, marker: dict[str, Any]) -> str:
    """Prefect task wrapper of :func:`write_marker_record`."""
    return write_marker_record(store, archive_name, marker)


# ---------------------------------------------------------------------------- reading markers


def _markers_by_archive(store: ArchiveStore) -> dict[str, list[str]]:
    """Marker names per archive, in listing order (names are no evidence of time or trust)."""
    by: dict[str, list[str]] = {}
    for name in store.list_sidecars():
        archive = archive_of(name)
        if archive is not None:
            by.setdefault(archive, []).append(name)
    for names in by.values():
        names.sort(reverse=True)
    return by


def _load(store: ArchiveStore, name: str) -> Any:
    try:
        data = store.get_sidecar(name)
    except StoreError as exc:
        logger().warning("rehearsal marker %s cannot be read: %s", name, exc)
        return None
    if len(data) > MAX_MARKER_BYTES:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _summary(marker: dict[str, Any], authenticated: bool, why: str | None, name: str) -> dict[str, Any]:
    def num(v: Any, kind: Any) -> Any:
        return v if isinstance(v, kind) and not isinstance(v, bool) else None

    out: dict[str, Any] = {
        "at": str(marker.get("at")) if isinstance(marker.get("at"), str) else None,
        "keys": num(marker.get("keys"), int),
        "restore_s": num(marker.get("restore_s"), (int, float)),
        "ok": marker.get("ok") is True,
        "authenticated": authenticated,
        "marker": name,
    }
    if why:
        out["unauthenticated_reason"] = why
    if isinstance(marker.get("error"), str):
        out["error"] = marker["error"][:500]
    return out


def _claimed(marker: dict[str, Any]) -> datetime:
    return parse_signed_time(marker.get("at")) or datetime.min.replace(tzinfo=UTC)


def rehearsal_of(
    store: ArchiveStore, row: dict[str, Any], names: list[str], keys: ArchiveKeys | None
) -> dict[str, Any] | None:
    """The rehearsal summary of one archive from its markers ``names``: the authenticated
    marker with the newest *signed* time; else the unauthenticated one claiming the newest
    time, shown with ``authenticated: False`` and why. Markers that were ignored beside an
    authenticated one are listed under ``ignored`` (name and reason, the first few)."""
    good: list[tuple[datetime, str, dict[str, Any]]] = []
    bad: list[tuple[datetime, str, dict[str, Any], str]] = []
    for name in names:
        marker = _load(store, name)
        if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND:
            continue
        ok, why = check_marker(marker, str(row["name"]), row.get("manifest_sha256"), keys, name)
        if ok:
            good.append((_claimed(marker), name, marker))
        else:
            bad.append((_claimed(marker), name, marker, why or "not authenticated"))
    if good:
        _, name, marker = max(good, key=lambda t: (t[0], t[1]))
        out = _summary(marker, True, None, name)
        if bad:
            out["ignored"] = [{"marker": n, "reason": why} for _, n, _, why in sorted(bad, reverse=True)][:IGNORED_LIMIT]
            out["ignored_count"] = len(bad)
        return out
    if bad:
        _, name, marker, why = max(bad, key=lambda t: (t[0], t[1]))
        return _summary(marker, False, why, name)
    return None


def annotate(store: ArchiveStore, rows: list[dict[str, Any]], keys: ArchiveKeys | None) -> None:
    """Set ``row["rehearsal"] = {"at", "keys", "restore_s", "ok", "authenticated", ...}`` on
    every catalog row (tasks/catalog.py) whose archive has a rehearsal marker: its newest
    authenticated marker by signed time (else the newest unauthenticated one, with
    ``authenticated: False`` and why).

    One ``list_sidecars`` call for the whole store; markers are read only for archives that
    have some, and no archive is opened: a marker is bound to the row's ``manifest_sha256``.
    Rows without a marker are left without the field. Failover prefers an archive only when
    ``rehearsal["ok"] and rehearsal["authenticated"]``."""
    if not rows:
        return
    try:
        by = _markers_by_archive(store)
    except StoreError as exc:
        logger().warning("cannot list the rehearsal markers of %s: %s", store.describe(), exc)
        return
    for row in rows:
        names = by.get(str(row.get("name")))
        if names:
            found = rehearsal_of(store, row, names, keys)
            if found is not None:
                row["rehearsal"] = found


def iter_markers(store: ArchiveStore, archive_name: str) -> Iterator[tuple[str, Any]]:
    """Every marker of one archive (by name, not by trust), as ``(name, parsed JSON or None)``."""
    for name in _markers_by_archive(store).get(archive_name, []):
        yield name, _load(store, name)


@task(name="annotate-rehearsals", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def annotate_task(store: ArchiveStore, rows: list[dict[str, Any]], keys: ArchiveKeys | None) -> list[dict[str, Any]]:
    """Prefect task wrapper of :func:`annotate`; returns the rows."""
    annotate(store, rows, keys)
    return rows


def rehearsal_text(r: dict[str, Any] | None) -> str:
    """``rehearsed at T, N keys, restore took S`` for list and status (``never rehearsed`` when None,
    ``rehearsal FAILED at T`` when the newest marker by signed time says so), with the markers
    ignored beside it counted: a forged or renamed marker is an anomaly worth seeing."""
    if not r:
        return "never rehearsed"
    auth = "" if r.get("authenticated") else " (UNAUTHENTICATED marker)"
    took = r.get("restore_s")
    took_s = f"{took:.1f}s" if isinstance(took, (int, float)) else "?"
    n = r.get("ignored_count")
    ignored = ""
    if isinstance(n, int) and n > 0:
        first = (r.get("ignored") or [{}])[0].get("reason", "")
        ignored = f"; {n} other marker{'s' if n > 1 else ''} ignored ({str(first).split(':')[0]}{', ...' if n > 1 else ''})"
    if r.get("ok"):
        return f"rehearsed at {r.get('at')}, {r.get('keys')} keys, restore took {took_s}{auth}{ignored}"
    return f"rehearsal FAILED at {r.get('at')}{auth}{ignored}"
