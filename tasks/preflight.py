"""Preflight of a failover: every check that must pass before anything is written.

A failover refuses (``FailoverRefused``, one line naming the flag that overrides it) rather
than write into the wrong place, over a live primary, or from an archive that looks wrong:

* **the target** is reachable and writable, checked first, before any archive is listed,
  downloaded or decrypted (a dead target must cost seconds, not the time to fetch candidates);
* **the split-brain guard**: the failed primary is probed with a short timeout; if it still
  answers, the failover refuses unless ``--force``;
* **the RPO gate**: an archive older than ``--max-age`` is not used;
* **the sanity check**: an archive whose key count dropped by more than half against the
  previous archive of the same source (a prefix typo or an empty read looks exactly like
  this) is refused unless ``--force``.

The choice among candidate archives is tasks/catalog.py ``select_archives`` (a rehearsed one
first when it is recent enough). The pure functions here (RPO, sanity) need no cluster; the
probes are tasks.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from blocks.source import SourceBlock
from burrow.errors import (
    AuthError,
    BurrowError,
    PermanentError,
    SourceError,
    SourceUnavailable,
    UsageError,
    should_retry,
)
from burrow.naming import age_text, redact_url
from burrow.paths import translate
from burrow.records import Record
from burrow.runlog import logger
from tasks import task
from tasks.catalog import created_at, signed_order
from tasks.catalog import rehearsed as rehearsed  # the selector's own test, importable from here too

#: Scratch keys of the writability check start with this (a Burrow-owned name, never a user key).
SCRATCH_PREFIX = b"/.burrow-preflight-"
#: Seconds the primary probe may take to connect (and to answer one read).
PROBE_TIMEOUT = 3.0


class FailoverRefused(PermanentError):
    """A preflight check refused the failover. The message is one line and names the flag
    (``--force``, ``--max-age``, ``--archive``) that overrides it, where one does."""


# ---------------------------------------------------------------------------- the target


def check_target(target: SourceBlock, *, write: bool = True, force: bool = False) -> str:
    """Check that ``target`` answers and (when ``write``) accepts a write; return what was
    checked, as one line for the report.

    Writability is proven by creating one scratch key under a Burrow-owned random name
    (``.burrow-preflight-<hex>``) and deleting it again. The services' own permission APIs
    were not used on purpose: they differ per service (ZooKeeper ACLs, etcd roles, Consul
    policies) and none of them sees the other reasons a write fails (a ZooKeeper server in
    read-only mode or without quorum, an etcd NOSPACE alarm, a Consul cluster without a
    leader). A real create-if-absent exercises exactly the path the restore uses, and where it
    uses it: at the top of the target's root, or, when a ZooKeeper chroot does not exist yet,
    under its nearest existing ancestor, where the restore creates the chroot's first level
    (never at the server's ``/`` when ``/apps`` exists: a target whose ``/`` is read-only but
    whose ``/apps`` is writable takes a restore into ``/apps/new``, so its failover must too).
    User keys are never touched: the scratch key's name is random and Burrow's own; it is
    deleted only if it still holds the value written (``delete_if_unchanged``). A dry run
    writes nothing, so it only connects and reads.

    A refusal of the scratch write names the flag that overrides it (``--force``, flow
    parameter ``force``); with it, the refusal is a warning and the restore finds out itself.
    """
    log = logger()
    label = target.describe()
    session = target.connect()  # SourceUnavailable / AuthError / SourceError: one line each
    where = label
    try:
        key = translate(SCRATCH_PREFIX + uuid.uuid4().hex[:12].encode(), "zookeeper", target.service)
        found = session.lookup([b"/", key] if target.service == "zookeeper" else [key])
        if not write:
            log.info("preflight: target %s answers (dry run: writability not checked)", label)
            return "reachable (dry run: no scratch write)"
        nearest = getattr(target, "nearest_existing", None)
        if target.service == "zookeeper" and found[0] is None and nearest is not None:
            # the chroot does not exist yet (the restore creates it): check writing under its
            # nearest existing ancestor, where the restore will create its first level
            anchor = nearest()
            session.close()
            target = target.model_copy(update={"chroot": None if anchor == "/" else anchor})
            session = target.connect()
            where = f"{label} (under {anchor}, its nearest existing node)"
        record, _ = session.prepare(Record(key, b"burrow failover preflight", {}), target.service)
        try:
            created = session.create([record])
        except AuthError as exc:
            if not force:
                raise AuthError(
                    f"the failover target refused the writability check at {where}: {exc}; the restore would be "
                    "refused the same way: fix the target's credentials or ACL, or pass --force (flow parameter "
                    "force) to fail over anyway"
                ) from None
            log.warning("preflight: the target %s refused the writability check (%s); OVERRIDDEN by --force",
                        where, exc)
            return "reachable; the writability check was refused: OVERRIDDEN (--force)"
        if not created or not created[0]:
            raise SourceError(f"the writability check of {label} found its scratch key already there")
        remove = getattr(session, "delete_if_unchanged", None)
        removed = bool(remove([record])[0]) if remove is not None else False
        if not removed:
            log.warning("preflight: could not remove the scratch key %s from %s; delete it by hand",
                        key.decode(), where)
        log.info("preflight: target %s answers and accepts writes (scratch key created and removed)", where)
        return "reachable and writable (scratch key created" + (" and removed)" if removed else ", NOT removed)")
    except AuthError as exc:
        if str(exc).startswith("the failover target refused"):
            raise
        raise AuthError(f"the failover target refused the writability check: {exc}") from None
    finally:
        session.close()


@task(name="preflight-target", retries=2, retry_delay_seconds=[1, 3], retry_condition_fn=should_retry)
def target_check(target: SourceBlock, write: bool = True, force: bool = False) -> str:
    """Prefect task wrapper of :func:`check_target` (retried: the target may be electing a leader)."""
    return check_target(target, write=write, force=force)


# ---------------------------------------------------------------------------- the primary


def _hosts(url: str) -> set[str]:
    try:
        return {h.lower() for h in urlsplit(url).netloc.rpartition("@")[2].split(",") if h}
    except ValueError:
        return set()


def probe(block: SourceBlock, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Whether the cluster of ``block`` still answers: ``(answers, detail)``.

    It answers when a session opens and one read of a Burrow-owned key that never exists
    returns, or when the server refuses the credentials or the read (a refusal is an
    answer: the server is up). It is down when it cannot be reached within ``timeout``
    seconds (connect timeouts are shortened on a copy of the block, and the whole probe runs
    in a thread given ``3 * timeout + 2`` seconds, so a black-holed host never costs 30 s).
    """
    updates = {f: timeout for f in ("connect_timeout", "request_timeout") if f in type(block).model_fields}
    quick = block.model_copy(update=updates)
    outcome: list[tuple[bool, str]] = []

    def run() -> None:
        try:
            session = quick.connect()
            try:
                session.lookup([translate(b"/.burrow-probe", "zookeeper", quick.service)])
            finally:
                session.close()
            outcome.append((True, "it answered a read"))
        except AuthError:
            outcome.append((True, "it answered (and refused the credentials)"))
        except SourceUnavailable as exc:
            outcome.append((False, f"no answer: {exc}"))
        except SourceError as exc:  # e.g. the host name does not resolve
            outcome.append((False, f"no answer: {exc}"))
        except BurrowError as exc:
            outcome.append((False, f"no answer: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a client library's own error: report, never crash the probe
            outcome.append((False, f"no answer: {type(exc).__name__}"))

    worker = threading.Thread(target=run, name="burrow-primary-probe", daemon=True)
    worker.start()
    worker.join(3 * timeout + 2)
    if not outcome:
        return False, f"no answer within {3 * timeout + 2:g}s"
    return outcome[0]


def guard_primary(primary: SourceBlock | None, target: SourceBlock, *, force: bool, origin: str,
                  timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """The split-brain guard: probe the failed primary and refuse while it answers, unless
    ``force``. ``origin`` says how the primary was found (``--primary``, the source's block,
    the archive's manifest). Returns the guard's report (``primary``, ``primary_answers``,
    ``detail``); raises :class:`FailoverRefused`."""
    log = logger()
    if primary is None:
        return {"primary": None, "detail": f"not probed: {origin}"}
    label = primary.describe()
    if _hosts(label) & _hosts(target.describe()):
        log.info("preflight: the primary %s is the target itself: restoring in place, no split brain to guard", label)
        return {"primary": label, "detail": "not probed: the primary is the target itself (restore in place)"}
    answers, detail = probe(primary, timeout)
    report = {"primary": label, "primary_answers": answers, "detail": f"{detail} ({origin})"}
    if answers:
        if not force:
            raise FailoverRefused(
                f"split-brain guard: the primary {label} still answers ({detail}); a failover now would leave "
                "two live clusters. Check it is really down, or pass --force (flow parameter force) to fail over anyway"
            )
        log.warning("preflight: the primary %s still answers, failing over anyway (--force)", label)
        report["overridden"] = True
    else:
        log.info("preflight: the primary %s does not answer (%s)", label, detail)
    return report


@task(name="preflight-primary")
def primary_guard(primary: SourceBlock | None, target: SourceBlock, force: bool, origin: str) -> dict[str, Any]:
    """Prefect task wrapper of :func:`guard_primary` (not retried: a refusal is the answer)."""
    return guard_primary(primary, target, force=force, origin=origin)


def primary_block(ref: str | None, source: str, manifest_url: str | None, resolve: Any) -> tuple[SourceBlock | None, str]:
    """The block to probe as the failed primary, and where it came from: ``ref`` (``--primary``)
    when given; else the source name, when it is a URL or a saved block's name (a backup names
    its source by the block name, or by the URL without credentials); else the source URL the
    archive's manifest records. ``resolve`` turns a reference into a block
    (``blocks.resolve.source_from_ref``). None when nothing can be probed."""
    log = logger()
    if ref:
        return resolve(ref), "--primary"
    tried: list[tuple[str, str]] = [(source, "the source name")]
    if manifest_url:
        tried.append((manifest_url, "the source URL in the archive's manifest"))
    for candidate, origin in tried:
        try:
            return resolve(candidate), origin
        except UsageError as exc:
            log.debug("preflight: %s %s is not a cluster to probe: %s", origin, redact_url(candidate), exc)
        except Exception as exc:  # noqa: BLE001 - a block that cannot be loaded: nothing to probe, said below
            log.debug("preflight: %s %s cannot be loaded: %s", origin, redact_url(candidate), type(exc).__name__)
    return None, "the primary is unknown (give --primary to probe it)"


# ---------------------------------------------------------------------------- choosing an archive


def rpo_problem(row: dict[str, Any], max_age: timedelta | None, now: datetime | None = None) -> str | None:
    """Why ``row``'s archive is too old for ``--max-age``, or None."""
    if max_age is None:
        return None
    when = created_at(row)
    age = (now or datetime.now(UTC)) - when if when else None
    if age is None or age > max_age:
        shown = age_text(age) if age is not None else "unknown"
        return f"older than --max-age {age_text(max_age)} (age {shown})"
    return None


def previous_archive(row: dict[str, Any], trusted: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trusted archive of the same source made just before ``row``'s (by signed time), or None."""
    older = [r for r in trusted
             if r.get("source") == row.get("source") and r["name"] != row["name"]
             and signed_order(r) < signed_order(row)]
    return max(older, key=signed_order) if older else None


def sanity_problem(keys: int, previous: dict[str, Any] | None) -> str | None:
    """Why an archive of ``keys`` keys looks wrong against the ``previous`` archive of its
    source: its key count dropped by more than half. None when it looks fine."""
    if previous is None:
        return None
    before = previous.get("keys")
    if not isinstance(before, int) or before <= 0:
        return None
    if keys * 2 < before:
        return (f"it holds {keys} keys, less than half of the {before} in the previous archive of the source "
                f"({previous.get('url')}): a prefix typo or an empty read looks like this")
    return None
