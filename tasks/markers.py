"""Rehearsal markers: the result of a rehearsal, kept next to its archive.

A marker is a store sidecar (blocks/store.py: small, create-only, written atomically) named
``<archive name>.rehearsal-<UTC time>.burrow-meta``. It holds a small JSON object: which
archive (name, manifest and content SHA-256), when, whether the rehearsal passed, how many
keys, how long the restore took (the RTO), where it was rehearsed (a URL without
credentials) and the Burrow version. Never a value, a key path or a secret.

**Authentication.** Anyone who can write to the store can write a sidecar, so a marker counts
only when it is authenticated with the archive's own key: HMAC-SHA256 under a key derived,
with its own context label, from the archive's manifest-MAC key (itself derived from the
archive's file key, burrow/crypto.py). Only a holder of a key that opens the archive can
make or check it, and a marker cannot be moved to another archive (each archive has its own
file key, and the marker names the archive's manifest SHA-256). A public-key (X25519)
archive cannot be MACed by the backup worker, but the rehearsal runs where the identity
lives and can. An unencrypted archive has no key: its markers are always unauthenticated.
An unauthenticated marker is shown as such and never makes failover prefer an archive.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

from blocks.store import SIDECAR_SUFFIX, ArchiveStore, open_stored
from burrow.archive import ArchiveReader, canonical_json
from burrow.crypto import ArchiveKeys
from burrow.errors import ArchiveError, BurrowError, StoreError, should_retry
from burrow.runlog import logger
from burrow.version import __version__
from tasks import task

MARKER_KIND = "burrow-rehearsal-marker"
MARKER_VERSION = 1
MARKER_INFIX = ".rehearsal-"
#: The context label of the marker key, derived from the archive's manifest-MAC key.
MARKER_KEY_LABEL = b"burrow/v1/rehearsal-marker-key"
#: Domain separation of the marker MAC's message (never a manifest's ``burrow/v1/manifest\0``).
MARKER_MAC_DOMAIN = b"burrow/v1/rehearsal-marker\x00"
MAC_SCHEME = "hmac-sha256:burrow/v1/rehearsal-marker"
#: The largest marker read back (a marker is a few hundred bytes).
MAX_MARKER_BYTES = 16 * 1024
_TIME_FORMAT = "%Y%m%dT%H%M%S%fZ"


def marker_name(archive_name: str, at: datetime) -> str:
    """``<archive>.rehearsal-<UTC time to the microsecond>.burrow-meta``: sorts by time per archive."""
    return f"{archive_name}{MARKER_INFIX}{at.astimezone(UTC).strftime(_TIME_FORMAT)}{SIDECAR_SUFFIX}"


def archive_of(sidecar: str) -> str | None:
    """The archive a marker's name belongs to, or None when ``sidecar`` is not a marker."""
    if not sidecar.endswith(SIDECAR_SUFFIX):
        return None
    head, sep, stamp = sidecar[: -len(SIDECAR_SUFFIX)].rpartition(MARKER_INFIX)
    if not sep or not head.endswith(".burrow") or not stamp:
        return None
    try:
        datetime.strptime(stamp, _TIME_FORMAT)
    except ValueError:
        return None
    return head


def marker_key(reader: ArchiveReader, keys: ArchiveKeys | None) -> bytes | None:
    """The key that authenticates markers of the archive ``reader`` has open, or None when
    no configured key opens it (or it is not encrypted, or its manifest fails its MAC).

    Derived from the manifest-MAC subkey (HKDF of the archive's file key) with its own label,
    so it is bound to this one archive and never equal to a key used for anything else."""
    if keys is None or not keys.keyring or not reader.encrypted:
        return None
    try:
        reader.check_metadata(keys)  # unwraps the file key and checks the manifest's MAC
    except ArchiveError:
        return None
    return reader.derived_key(keys, MARKER_KEY_LABEL)


def _mac(key: bytes, body: dict[str, Any]) -> str:
    return hmac.new(key, MARKER_MAC_DOMAIN + canonical_json(body), hashlib.sha256).hexdigest()


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
    key: bytes | None = None,
) -> dict[str, Any]:
    """The marker object (MACed when ``key`` is given). ``scratch`` is described without
    credentials; ``error`` is a one-line BurrowError message (never a value)."""
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
    if key is not None:
        body["mac_scheme"] = MAC_SCHEME
        body["mac"] = _mac(key, body)
    return body


def check_marker(
    marker: Any, archive_name: str, manifest: dict[str, Any] | None, key: bytes | None
) -> tuple[bool, str | None]:
    """Whether ``marker`` is an authentic marker of this archive: ``(True, None)``, or
    ``(False, why)``."""
    if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND:
        return False, "not a rehearsal marker"
    named = marker.get("archive")
    # (compared by the last component: a store opened one directory up names it with a prefix)
    if not isinstance(named, str) or named.rsplit("/", 1)[-1] != archive_name.rsplit("/", 1)[-1]:
        return False, "it names another archive"
    if key is None:
        return False, "no configured key opens the archive, so the marker cannot be authenticated"
    tag = marker.get("mac")
    if not isinstance(tag, str):
        return False, "it carries no MAC"
    body = {k: v for k, v in marker.items() if k != "mac"}
    if not hmac.compare_digest(_mac(key, body).encode(), tag.encode("utf-8", "replace")):
        return False, "its MAC does not match (edited, or not made with the archive's key)"
    if manifest is not None:
        for field_name in ("manifest_sha256", "content_sha256"):
            if manifest.get(field_name) is not None and marker.get(field_name) != manifest.get(field_name):
                return False, f"its {field_name} is not the archive's"
    return True, None


def write_marker_record(store: ArchiveStore, archive_name: str, marker: dict[str, Any]) -> str:
    """Store ``marker`` next to its archive (create-only and atomic); returns its name."""
    at = datetime.fromisoformat(str(marker["at"]).replace("Z", "+00:00"))
    name = marker_name(archive_name, at)
    data = orjson.dumps(marker, option=orjson.OPT_SORT_KEYS)
    store.put_sidecar(name, data)
    logger().info(
        "rehearsal marker %s written (%s, %s)", name, "passed" if marker.get("ok") else "FAILED",
        "authenticated" if marker.get("mac") else "unauthenticated: no key opens the archive",
    )
    return name


@task(name="write-marker", retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=should_retry)
def write_marker(store: ArchiveStore, archive_name: str, marker: dict[str, Any]) -> str:
    """Prefect task wrapper of :func:`write_marker_record`."""
    return write_marker_record(store, archive_name, marker)


# ---------------------------------------------------------------------------- reading markers


def _markers_by_archive(store: ArchiveStore) -> dict[str, list[str]]:
    by: dict[str, list[str]] = {}
    for name in store.list_sidecars():
        archive = archive_of(name)
        if archive is not None:
            by.setdefault(archive, []).append(name)
    for names in by.values():
        names.sort(reverse=True)  # newest first (the name carries the time)
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


def _open_key(store: ArchiveStore, row: dict[str, Any], keys: ArchiveKeys | None) -> tuple[bytes | None, dict | None]:
    """(marker key, manifest) of the archive of ``row``, reading only header, footer and manifest."""
    if keys is None or not keys.keyring or row.get("error") or not row.get("encrypted"):
        return None, None
    try:
        with open_stored(store, row["name"], row.get("size")) as reader:
            return marker_key(reader, keys), dict(reader.manifest)
    except BurrowError as exc:
        logger().warning("cannot open %s to authenticate its rehearsal markers: %s", row.get("url"), exc)
        return None, None


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


def rehearsal_of(
    store: ArchiveStore, row: dict[str, Any], names: list[str], keys: ArchiveKeys | None
) -> dict[str, Any] | None:
    """The rehearsal summary of one archive from its markers (``names``, newest first): the
    newest authenticated marker, else the newest readable one (shown unauthenticated)."""
    key, manifest = _open_key(store, row, keys)
    fallback = None
    for name in names:
        marker = _load(store, name)
        if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND:
            continue
        ok, why = check_marker(marker, row["name"], manifest, key)
        if ok:
            return _summary(marker, True, None, name)
        if fallback is None:
            fallback = _summary(marker, False, why, name)
        if key is None:
            break  # nothing can authenticate the older ones either
    return fallback


def annotate(store: ArchiveStore, rows: list[dict[str, Any]], keys: ArchiveKeys | None) -> None:
    """Set ``row["rehearsal"] = {"at", "keys", "restore_s", "ok", "authenticated", ...}`` on
    every catalog row (tasks/catalog.py) whose archive has a rehearsal marker, from its
    newest authenticated marker (else its newest marker, with ``authenticated: False``).

    One ``list_sidecars`` call for the whole store; markers are read only for archives that
    have some, and an archive is opened (header, footer, manifest) only to authenticate them.
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
    """Every marker of one archive, newest first, as ``(name, parsed JSON or None)``."""
    for name in _markers_by_archive(store).get(archive_name, []):
        yield name, _load(store, name)


@task(name="annotate-rehearsals", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def annotate_task(store: ArchiveStore, rows: list[dict[str, Any]], keys: ArchiveKeys | None) -> list[dict[str, Any]]:
    """Prefect task wrapper of :func:`annotate`; returns the rows."""
    annotate(store, rows, keys)
    return rows


def rehearsal_text(r: dict[str, Any] | None) -> str:
    """``rehearsed at T, N keys, restore took S`` for list and status (``never rehearsed`` when None)."""
    if not r:
        return "never rehearsed"
    auth = "" if r.get("authenticated") else " (UNAUTHENTICATED marker)"
    took = r.get("restore_s")
    took_s = f"{took:.1f}s" if isinstance(took, (int, float)) else "?"
    if r.get("ok"):
        return f"rehearsed at {r.get('at')}, {r.get('keys')} keys, restore took {took_s}{auth}"
    return f"rehearsal FAILED at {r.get('at')}{auth}"
