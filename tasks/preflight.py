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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from blocks.source import SourceBlock, WalkStats
from burrow.archive import ArchiveReader, BodyDecryptor
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
from burrow.paths import KeyMapper, translate
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
            log.info("preflight: target %s answers", label)
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


# ---------------------------------------------------------------------------- the wrong cluster

#: Keys the target may already hold outside the archive's namespace, in percent of the archive's
#: key count, before the wrong-cluster guard refuses (``--foreign-keys-max``, flow parameter
#: ``foreign_keys_max``): a standby's few keys of its own pass, another system's tree does not.
FOREIGN_KEYS_MAX_PCT = 1.0


def _canon(key: bytes) -> bytes:
    """A key in one form for every service: ``/a/b`` (Consul's ``a/b/`` and etcd's ``a/b`` too)."""
    return b"/" + key.strip(b"/")


def _prefix(key: bytes, depth: int) -> bytes:
    """The first ``depth`` levels of ``key``, in its own style (the key itself when shallower)."""
    parts = [p for p in key.split(b"/") if p]
    if len(parts) <= depth:
        return key
    return (b"/" if key.startswith(b"/") else b"") + b"/".join(parts[:depth])


def _depth(path: str | bytes | None) -> int:
    if not path:
        return 0
    raw = path.encode("utf-8") if isinstance(path, str) else path
    return len([p for p in raw.split(b"/") if p])


@dataclass
class Namespace:
    """The paths an archive holds, in the target's key space (canonical ``/a/b`` form): its
    root, or its top-level paths when it was taken of a whole cluster, as ``--subtree`` and
    ``--map`` place them. A target key at, below or above one of them belongs to the archive's
    namespace; any other key is foreign."""

    roots: set[bytes] = field(default_factory=set)
    parents: set[bytes] = field(default_factory=set)

    def add(self, root: bytes) -> None:
        root = _canon(root)
        if root in self.roots:
            return
        self.roots.add(root)
        parts = [p for p in root.split(b"/") if p]
        for i in range(1, len(parts)):
            self.parents.add(b"/" + b"/".join(parts[:i]))

    def holds(self, key: bytes) -> bool:
        canon = _canon(key)
        if canon == b"/" or canon in self.parents or b"/" in self.roots:
            return True
        parts = [p for p in canon.split(b"/") if p]
        return any(b"/" + b"/".join(parts[:i]) in self.roots for i in range(1, len(parts) + 1))


def archive_namespace(archive_path: str | Path, target_service: str, *, subtree: str | None = None,
                      maps: list[str] | None = None, decryptor: BodyDecryptor | None = None) -> Namespace:
    """The :class:`Namespace` of the archive at ``archive_path`` (validated already): one pass
    over its records, keeping only their first levels (as deep as the archive's root or
    ``--subtree``), renamed by ``--map`` and translated to the target's service."""
    mapper = KeyMapper(subtree, maps)
    ns = Namespace()
    with open(archive_path, "rb") as f:
        reader = ArchiveReader(f)
        service = reader.manifest["service"]
        depth = max(_depth(reader.manifest.get("root")), _depth(subtree), 1)
        seen: set[bytes] = set()
        for rec in reader.records(decryptor):
            if mapper(rec.key) is None:
                continue  # outside --subtree: never restored (its parents are "above" the roots)
            first = _prefix(rec.key, depth)
            if first in seen:
                continue
            seen.add(first)
            renamed = mapper.rename(first)
            ns.add(translate(renamed if renamed is not None else b"/", service, target_service))
    for _old, new in mapper.maps:  # where --map puts keys whose OLD is deeper than these levels
        ns.add(translate(new, service, target_service))
    return ns


def count_foreign(target: SourceBlock, namespace: Namespace, limit: int) -> int:
    """How many keys of ``target`` lie outside ``namespace``: a read-only walk that stops once
    it has counted ``limit + 1`` (so the answer is at most that). Burrow's own scratch keys and
    the service's own tree (ZooKeeper's ``/zookeeper``, which the walk excludes) never count."""
    session = target.connect()
    try:
        if target.service == "zookeeper" and session.lookup([b"/"])[0] is None:
            return 0  # the chroot does not exist yet: nothing there at all
        foreign = 0
        walker = session.walk(b"/", WalkStats())
        try:
            for rec in walker:
                if namespace.holds(rec.key) or _canon(rec.key).startswith(b"/.burrow-"):
                    continue
                foreign += 1
                if foreign > limit:
                    break
        finally:
            walker.close()
        return foreign
    finally:
        session.close()


def guard_cluster(target: SourceBlock, archive_path: str | Path, manifest: dict[str, Any], *, force: bool,
                  cross_service: bool = False, foreign_keys_max: float = FOREIGN_KEYS_MAX_PCT,
                  subtree: str | None = None, maps: list[str] | None = None,
                  decryptor: BodyDecryptor | None = None) -> str:
    """The wrong-cluster guard, before anything is written (the writability check's scratch key
    included): refuse, in one line naming ``--force``, a target of another service than the
    archive's (unless ``cross_service``: on purpose), or one that already holds more keys
    outside the archive's namespace than ``foreign_keys_max`` percent of the archive's key count
    (a failover of Consul's ``app/`` into the etcd that holds Kubernetes' ``/registry`` looks
    exactly like this). Returns the preflight line. Counts only: never a key path."""
    log = logger()
    label = target.describe()
    service = str(manifest.get("service"))
    problems: list[str] = []
    if service != target.service and not cross_service:
        problems.append(f"the archive is of a {service} cluster and the target {label} is {target.service}; pass "
                        "--cross-service (flow parameter cross_service) to restore across services on purpose")
    keys = int(manifest.get("keys") or 0)
    limit = int(keys * max(0.0, foreign_keys_max) / 100)
    namespace = archive_namespace(archive_path, target.service, subtree=subtree, maps=maps, decryptor=decryptor)
    foreign = count_foreign(target, namespace, limit)
    if foreign > limit:
        held = "keys" if not limit else f"more than {limit} keys"
        problems.append(f"the target {label} already holds {held} outside the paths the archive holds (at most "
                        f"{foreign_keys_max:g}% of its {keys} keys may be, --foreign-keys-max): it looks like another "
                        "system's cluster; check --into")
    if problems and not force:
        raise FailoverRefused("wrong-cluster guard: " + "; and ".join(problems)
                              + "; or pass --force (flow parameter force) to fail over into it anyway")
    if problems:
        log.warning("preflight: wrong-cluster guard OVERRIDDEN by --force: %s", "; and ".join(problems))
        return "OVERRIDDEN (--force): " + "; and ".join(problems)
    what = f"a {service} archive" + (f" into {target.service} (--cross-service)" if service != target.service else "")
    held = "no key" if not foreign else f"{foreign} keys (at most {limit} allowed)"
    log.info("preflight: %s; the target holds %s outside its namespace", what, held)
    return f"{what}; the target holds {held} outside the archive's paths"


@task(name="preflight-cluster", retries=2, retry_delay_seconds=[1, 3], retry_condition_fn=should_retry)
def cluster_guard(target: SourceBlock, archive_path: str, manifest: dict[str, Any], force: bool = False,
                  cross_service: bool = False, foreign_keys_max: float = FOREIGN_KEYS_MAX_PCT,
                  subtree: str | None = None, maps: list[str] | None = None,
                  decryptor: BodyDecryptor | None = None) -> str:
    """Prefect task wrapper of :func:`guard_cluster` (its reads are retried; a refusal is not)."""
    return guard_cluster(target, archive_path, manifest, force=force, cross_service=cross_service,
                         foreign_keys_max=foreign_keys_max, subtree=subtree, maps=maps, decryptor=decryptor)


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
    answer: the server is up). It is down only when two attempts, ``timeout`` then twice
    ``timeout`` seconds, both find no answer: a primary that is alive but slow (a loaded
    machine, a JVM in a pause) answers the second, and calling it down would let a failover
    make two live clusters. Connect timeouts are shortened on a copy of the block, and each
    attempt runs in a thread given ``3 * its timeout + 2`` seconds, so a black-holed host costs
    about ``3 * timeout`` seconds, never 30 s."""
    answers, detail = _probe_once(block, timeout)
    if answers:
        return answers, detail
    logger().info("preflight: the primary %s gave no answer (%s); asking once more, with twice the time",
                  block.describe(), detail)
    return _probe_once(block, 2 * timeout)


def _probe_once(block: SourceBlock, timeout: float) -> tuple[bool, str]:
    """One attempt of :func:`probe` with ``timeout``."""
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
