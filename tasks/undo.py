"""Undo: the exact list of keys a restore or failover created, sealed in the store, and the
version-guarded deletion of those keys (``burrow undo RUN --from STORE``).

**Recording.** Replay (tasks/replay.py) writes every key it created, with the version it was
created at (the source session's ``created_versions``: ZooKeeper czxid, etcd create_revision,
Consul CreateIndex), to a sealed staging spool as it goes (:class:`CreatedLog`, bounded memory),
beside the plan spool. When the replay ends, however it ends (success, an error, an
interrupt), the list is sealed into the store the run read its archive from (:func:`seal_created`)
as ``_undo/<run name>/<run id>/part-NNNNN.burrow-meta``: the run's Prefect flow run name and id
(either finds it), PART_ENTRIES keys a part.

**Sealing.** The list names key paths, and a key path can be a secret in itself, so no path
is in the store in plaintext: each part is compressed, then encrypted and authenticated with
AES-256-GCM under a key derived (HKDF) from the *reader key* of the run's keyring
(burrow/crypto.py ``reader_seal``: only holders of a secret identity can read or make one;
a backup worker with public keys only cannot). The object's name, its header and the run's
identity are authenticated with it, so a part copied under another run's name, edited or
planted does not open: an undo never deletes on the word of bytes it did not authenticate.
A run with no secret key (an unencrypted archive, no key configured) keeps no list: one
warning says undo is unavailable for it.

**Undoing** (:func:`load_undo_list`, :func:`undo_keys`): the parts are authenticated, their
keys sorted deepest first (a bounded external sort), then deleted with the session's
``delete_if_version``: each only if its modification version still equals its creation
version, so a key changed since, a node that gained children, is kept and listed. A dry run
answers the same question and deletes nothing.
"""

from __future__ import annotations

import base64
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from blocks.source import SourceBlock
from blocks.store import SIDECAR_SUFFIX, ArchiveStore
from burrow.crypto import ArchiveKeys
from burrow.errors import (
    ArchiveError,
    ArchiveNotFound,
    BurrowError,
    StoreError,
    StoreUnavailable,
    UsageError,
    should_retry,
)
from burrow.extsort import ExternalSorter
from burrow.naming import slug
from burrow.records import Record, decode_record, display_key, encode_record, read_records
from burrow.runlog import logger
from burrow.staging import open_spool_reader, open_spool_writer, scratch_writes
from tasks import task

UNDO_PREFIX = "_undo/"
UNDO_KIND = "burrow-undo-list"
UNDO_VERSION = 1
#: The HKDF info of the part key and the first bytes of what is authenticated beside a part.
UNDO_DOMAIN = b"burrow/v1/undo-list"
MAGIC = b"BURROW-UNDO/1\n"
#: The staging spool of the keys a replay created (in the plan's directory, beside the plan spool).
CREATED_SPOOL = "created.jsonl"
#: Keys per sealed part: a part is built and sealed in memory (a few MB), never the whole list.
PART_ENTRIES = 50_000
#: Keys handed to ``delete_if_version`` at once.
DELETE_BATCH = 1000
#: Kept keys listed in the summary (``--list``) and the artifact.
KEPT_LISTED = 100_000
LIST_LIMIT = 1000
RUN_BYTES = 32 * 1024 * 1024
_PART_RE = re.compile(r"^part-(\d{5})" + re.escape(SIDECAR_SUFFIX) + "$")
#: What :func:`seal_created` said of each list this process sealed, oldest first: the CLI ends a
#: restore or failover with its ``to undo:`` line from it, however the run ended.
_sealed: list[dict[str, Any]] = []


def sealed_lists() -> list[dict[str, Any]]:
    """The undo lists sealed in this process so far (``undo_run``, ``undo_run_id``, ``undo_store``,
    ``undo_keys``), oldest first."""
    return list(_sealed)


# ---------------------------------------------------------------------------- recording


@dataclass
class UndoSink:
    """Where and as whom a run seals the list of keys it created: the store it read its
    archive from, the keyring (its reader key seals the list), the run's name and id."""

    store: ArchiveStore
    keys: ArchiveKeys | None
    run_id: str
    run_name: str
    kind: str  # restore | failover


def undo_sink(store: ArchiveStore, keys: ArchiveKeys | None, kind: str) -> UndoSink | None:
    """The sink of the flow run this is called in (``prefect.runtime.flow_run``); None outside
    a flow run (nothing to name the list by)."""
    from prefect.runtime import flow_run

    run_id, run_name = flow_run.id, flow_run.name
    if not run_id or not run_name:
        return None
    return UndoSink(store=store, keys=keys, run_id=str(run_id), run_name=str(run_name), kind=kind)


class CreatedLog:
    """The keys a replay created, each with its creation version, streamed to a sealed staging
    spool (nothing readable on disk, memory bounded by the spool's buffer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._out: BinaryIO | None = None
        #: The batch being created right now (replay lists what it made should the create stop half way).
        self.inflight: list[Record] = []

    def add(self, entries: list[tuple[bytes, int]]) -> None:
        if not entries:
            return
        if self._out is None:
            self._out = open_spool_writer(self.path)
        with scratch_writes("list of created keys", self.path.parent):  # (one write per batch, not per key)
            self._out.write(b"".join([encode_record(Record(key, b"%d" % version)) for key, version in entries]))
        self.count += len(entries)

    def close(self) -> None:
        if self._out is not None:
            out, self._out = self._out, None
            out.close()


def created_spool(plan_ops_path: str | Path) -> Path:
    """Where the replay of the plan whose spool is ``plan_ops_path`` lists what it created."""
    return Path(plan_ops_path).parent / CREATED_SPOOL


def read_created(path: Path) -> Iterator[tuple[bytes, int]]:
    """The ``(key, creation version)`` entries of a :class:`CreatedLog` spool, in creation order."""
    with open_spool_reader(path) as f:
        for r in read_records(f):
            yield r.key, int(r.value)


def _part_name(run_name: str, run_id: str, part: int) -> str:
    return f"{UNDO_PREFIX}{slug(run_name)}/{slug(run_id)}/part-{part:05d}{SIDECAR_SUFFIX}"


def _aad(name: str, header: bytes) -> bytes:
    return UNDO_DOMAIN + b"\x00" + name.encode("utf-8") + b"\x00" + header


def _seal_part(keys: ArchiveKeys, name: str, body: dict[str, Any]) -> bytes:
    plaintext = zlib.compress(orjson.dumps(body), 6)
    signer = keys.reader_signers()[0]  # the key reader_seal seals with: the keyring's first reader key
    header = orjson.dumps({"kind": UNDO_KIND, "version": UNDO_VERSION, "signer": signer,
                           "scheme": "aes256gcm-hkdf-sha256:burrow/v1/undo-list"}, option=orjson.OPT_SORT_KEYS)
    used, sealed = keys.reader_seal(UNDO_DOMAIN, plaintext, _aad(name, header))
    if used != signer:
        raise ValueError("the keyring's reader keys changed while sealing")
    return MAGIC + header + b"\n" + sealed


def _open_part(keys: ArchiveKeys, name: str, data: bytes) -> dict[str, Any]:
    """The body of a sealed part; ArchiveError when it does not authenticate."""
    if not data.startswith(MAGIC):
        raise ArchiveError(f"{name} is not a sealed undo list")
    header, sep, sealed = data[len(MAGIC):].partition(b"\n")
    try:
        head = orjson.loads(header) if sep else None
    except orjson.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or head.get("kind") != UNDO_KIND or not isinstance(head.get("signer"), str):
        raise ArchiveError(f"{name} is not a sealed undo list")
    try:
        body = orjson.loads(zlib.decompress(keys.reader_open(UNDO_DOMAIN, head["signer"], sealed, _aad(name, header))))
    except ValueError as exc:  # (zlib.error and JSONDecodeError are ValueErrors too: authenticated but malformed)
        raise ArchiveError(f"the undo list {name} cannot be opened: {exc}") from None
    if not isinstance(body, dict) or body.get("kind") != UNDO_KIND:
        raise ArchiveError(f"the undo list {name} is malformed")
    return body


def seal_created(sink: UndoSink, created: CreatedLog, target: SourceBlock) -> dict[str, Any]:
    """Seal the list of keys ``created`` holds into ``sink.store`` (see the module docstring);
    returns what the run summary says of it (``undo_run``: what ``burrow undo`` takes, the run's
    name or, when another run of that name keeps a list too, its id; ``undo_run_name``,
    ``undo_run_id``, ``undo_store``, ``undo_keys``), or ``{}`` when nothing was created or nothing could be sealed (one warning
    says why: a run never fails over its undo list)."""
    created.close()
    if not created.count:
        return {}
    log = logger()
    keys = sink.keys
    if keys is None or not keys.can_reader_sign():
        log.warning("undo is unavailable for this run: the list of the %d keys it created names key paths and is "
                    "kept only sealed, which needs a secret key (a key file, an identity or a passphrase), and none "
                    "is configured", created.count)
        return {}
    started = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    common = {
        "kind": UNDO_KIND, "version": UNDO_VERSION, "run_id": sink.run_id, "run_name": sink.run_name,
        "run_kind": sink.kind, "target": target.describe(), "service": target.service, "sealed": started,
    }
    part, entries, written = 0, [], 0
    try:
        source = read_created(created.path)
        for key, version in source:
            entries.append([base64.b64encode(key).decode("ascii"), version])
            if len(entries) >= PART_ENTRIES:
                _put_part(sink, common, part, entries, last=False)
                written += len(entries)
                part, entries = part + 1, []
        _put_part(sink, common, part, entries, last=True)
        written += len(entries)
    except (StoreError, StoreUnavailable, NotImplementedError, ValueError) as exc:
        log.warning("undo is unavailable for this run: its list of created keys could not be sealed into %s (%s)",
                    sink.store.describe(), exc)
        return {}
    log.info("undo: the %d keys this run created are listed, sealed, in %s (burrow undo %s)",
             written, sink.store.describe(), sink.run_name)
    sealed = {"undo_run": _unambiguous(sink), "undo_run_name": sink.run_name, "undo_run_id": sink.run_id,
              "undo_store": sink.store.describe(), "undo_keys": written}
    _sealed.append(sealed)
    return sealed


def _unambiguous(sink: UndoSink) -> str:
    """What ``burrow undo`` finds this run by: its name, unless another run of the same name
    (a failover of the same source into the same target, run again) keeps a list in the store
    too; then its id (a name that names several runs is refused, never guessed)."""
    try:
        others = {n.split("/")[2] for n in sink.store.list_sidecars(f"{UNDO_PREFIX}{slug(sink.run_name)}/")}
    except (StoreError, StoreUnavailable, NotImplementedError):
        return sink.run_id
    return sink.run_name if others <= {slug(sink.run_id)} else sink.run_id


def _put_part(sink: UndoSink, common: dict[str, Any], part: int, entries: list[Any], *, last: bool) -> None:
    name = _part_name(sink.run_name, sink.run_id, part)
    body = dict(common, part=part, last=last, entries=entries)
    sink.store.put_sidecar(name, _seal_part(sink.keys, name, body))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- undoing


@dataclass
class UndoList:
    """A run's authenticated list of created keys, sorted deepest first into a staging spool."""

    run_id: str
    run_name: str
    run_kind: str
    target: str
    service: str
    sealed: str
    keys: int
    path: str  # sealed staging spool: one record per key, the value its creation version
    complete: bool = True
    warnings: list[str] = field(default_factory=list)


def _matches(name: str, run: str) -> str | None:
    """The run id of the part ``name`` when ``run`` names its run (by name or id), else None."""
    parts = name[len(UNDO_PREFIX):].split("/")
    if len(parts) != 3 or not _PART_RE.match(parts[2]):
        return None
    return parts[1] if run in (parts[0], parts[1]) or slug(run) == parts[0] else None


def load_undo_list(store: ArchiveStore, run: str, keys: ArchiveKeys | None, workdir: Path) -> UndoList:
    """Find the sealed list of ``run`` (its flow run name or id) in ``store``, authenticate every
    part (one that fails stops the undo before anything is deleted) and sort its keys deepest
    first into a staging spool."""
    if not run or "/" in run:
        raise UsageError(f"{run!r} is not a run name or id")
    try:
        names = store.list_sidecars(UNDO_PREFIX)
    except NotImplementedError:
        names = []
    runs: dict[str, list[str]] = {}
    for name in names:
        rid = _matches(name, run)
        if rid is not None:
            runs.setdefault(rid, []).append(name)
    if not runs:
        raise ArchiveNotFound(f"no undo list of run {run!r} in {store.describe()} (a restore or failover that created "
                              "keys keeps one there, in the store it read its archive from)")
    if len(runs) > 1:
        raise UsageError(f"{len(runs)} runs named {run!r} keep an undo list in {store.describe()}: give the run id "
                         f"instead (one of {', '.join(sorted(runs))}; the `to undo:` line of each run names it)")
    (rid, parts), = runs.items()
    if keys is None or not keys.can_reader_sign():
        raise UsageError("the undo list is sealed with a reader key: give the secret key the run had (--key-file, "
                         "--identity, --passphrase-env, --key-env or --key-block, or the BURROW_* environment)")
    parts.sort()
    sorter = ExternalSorter(workdir, RUN_BYTES, "undo list")
    out = workdir / f"undo-{slug(rid)}.jsonl"
    head: dict[str, Any] | None = None
    seen: list[int] = []
    last = False
    count = 0
    try:
        for name in parts:
            body = _open_part(keys, name, store.get_sidecar(name))
            number = int(_PART_RE.match(name.rsplit("/", 1)[1]).group(1))  # type: ignore[union-attr]
            if body.get("run_id") != rid or body.get("part") != number or slug(str(body.get("run_name"))) != name.split("/")[1]:
                raise ArchiveError(f"the undo list {name} is bound to another run or part")
            if head is None:
                head = body
            elif any(body.get(k) != head.get(k) for k in ("run_name", "target", "service", "sealed")):
                raise ArchiveError(f"the parts of the undo list of run {run!r} disagree")
            seen.append(number)
            last = last or bool(body.get("last"))
            for key64, version in body.get("entries") or []:
                key = base64.b64decode(key64)
                depth = min(key.count(b"/"), 999_999)
                sorter.add(b"%06d" % (999_999 - depth) + encode_record(Record(key, b"%d" % int(version))))
                count += 1
        with scratch_writes("undo list", workdir), open_spool_writer(out) as f:
            for line in sorter:
                f.write(line[6:])
    finally:
        sorter.close()
    assert head is not None
    complete = last and seen == list(range(len(seen)))
    warnings = [] if complete else [
        f"the undo list of run {head['run_name']} is incomplete (parts {seen} of a list whose last part is "
        f"{'there' if last else 'missing'}): the keys of the missing parts are not undone"
    ]
    return UndoList(run_id=rid, run_name=str(head["run_name"]), run_kind=str(head.get("run_kind")),
                    target=str(head["target"]), service=str(head["service"]), sealed=str(head.get("sealed")),
                    keys=count, path=str(out), complete=complete, warnings=warnings)


@task(name="load-undo-list", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def load_undo(store: ArchiveStore, run: str, keys: ArchiveKeys | None, workdir: str) -> UndoList:
    """Prefect task wrapper of :func:`load_undo_list`."""
    return load_undo_list(store, run, keys, Path(workdir))


@dataclass
class Undone:
    """What an undo did (or, dry, would do)."""

    deleted: int = 0
    kept: int = 0
    kept_paths: list[str] = field(default_factory=list)


def undo_keys(undo: UndoList, target: SourceBlock, *, dry_run: bool = False) -> Undone:
    """Delete the keys of ``undo`` from ``target``, deepest first, each only if unchanged since
    it was created (``delete_if_version``); with ``dry_run``, say what would be deleted."""
    log = logger()
    done = Undone()
    session = target.connect()
    try:
        if getattr(session, "delete_if_version", None) is None:
            raise BurrowError(f"{target.service} targets cannot be undone by this Burrow (no version-guarded delete)")
        batch: list[tuple[bytes, int]] = []

        def flush() -> None:
            for (key, _), gone in zip(batch, session.delete_if_version(batch, dry_run=dry_run), strict=True):
                if gone:
                    done.deleted += 1
                    continue
                done.kept += 1
                if len(done.kept_paths) < KEPT_LISTED:
                    done.kept_paths.append(display_key(key))
            batch.clear()

        with open_spool_reader(undo.path) as f:
            for line in iter(f.readline, b""):
                r = decode_record(line)
                batch.append((r.key, int(r.value)))
                if len(batch) >= DELETE_BATCH:
                    flush()
        flush()
    finally:
        session.close()
    verb = "would delete" if dry_run else "deleted"
    log.info("undo: %s %d of the %d keys run %s created in %s; %d changed since (or gained children) and %s kept",
             verb, done.deleted, undo.keys, undo.run_name, target.describe(), done.kept,
             "would be" if dry_run else "were")
    return done


@task(name="undo")
def undo_task(undo: UndoList, target: SourceBlock, dry_run: bool = False) -> Undone:
    """Prefect task wrapper of :func:`undo_keys`. Not retried blindly: a half-done undo is safe
    to run again (a key already deleted is gone; the rest are still guarded by their version)."""
    return undo_keys(undo, target, dry_run=dry_run)
