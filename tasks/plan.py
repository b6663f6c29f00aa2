"""Plan: decide, for every archived key, whether the target needs it created, already has
it identical, or holds something different (a conflict). Writes the creates, parents first,
to a private spool for replay. Writes nothing to the cluster; --dry-run stops here.

Everything replay will hand the target is checked here, before the first write: keys the
target cannot hold, malformed metadata, ACLs the target would refuse. A restore stops while
planning on any of them, never halfway through replay.

Into a tree (ZooKeeper) the creates must come parents first, whatever ``--map``,
``--subtree`` or the translation between services did to the archive's own order, and a
parent the restore has to create gets its archived value and metadata whenever the archive
holds it. So the planned records are sorted by path, component by component (a bounded
external sort: runs of at most ``RUN_BYTES`` are sorted in memory and spilled to sealed
spools, then merged). In that order every node comes right before its subtree, so one stack
of the current node's ancestors is all the planner keeps to know which parents exist, are
planned, come from the archive, or must be created empty. Flat stores (etcd, Consul) have no
parents and are planned in archive order."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from blocks.source import SourceBlock, SourceSession
from burrow import progress
from burrow.archive import ArchiveReader, BodyDecryptor
from burrow.errors import ArchiveError, SourceError, should_retry
from burrow.extsort import ExternalSorter
from burrow.paths import (
    KeyMapper,
    folded_folder,
    metadata_problem,
    related,
    translate,
    zookeeper_acl_problem,
    zookeeper_path_problem,
)
from burrow.perf import gc_paused
from burrow.records import Record, decode_record, display_key, encode_record
from burrow.runlog import logger
from burrow.staging import open_spool_reader, open_spool_writer
from tasks import task

BATCH = 1000
LIST_LIMIT = 1000
#: Bytes of planned records sorted in memory at once; beyond that, sorted runs spill to disk.
RUN_BYTES = 32 * 1024 * 1024
MISSING, PRESENT = 0, 1
#: How records that land on one target key rank (the first one decides, see _TreePlanner).
SELECTED, FOLDER, OUTSIDE = 0, 1, 2
#: What a planned item is: an archived key, a folded folder key, a parent the archive holds
#: outside the selection, an empty intermediate parent, or a second key landing on a planned one.
CREATE, FOLDED, PARENT, GAP, DUP = range(5)
_CHECK_CACHE = 10_000
#: Keys planned between two progress reports (a report per key costs as much as a key's check).
PROGRESS_EVERY = 1000


#: Metadata that is never restored, into any service, because it belongs to the source cluster
#: and not to the key: said as such, not as a difference between services.
SOURCE_BOUND_METADATA = {
    "session": "a Consul lock's session lives on the source cluster's agents, so the key is created unlocked",
}

@dataclass
class Plan:
    """The outcome of planning a restore."""

    ops_path: str
    target: str
    to_create: int = 0
    intermediate: int = 0
    identical: int = 0
    conflicts: int = 0
    outside_subtree: int = 0
    conflict_paths: list[str] = field(default_factory=list)
    create_paths: list[str] = field(default_factory=list)  # the first LIST_LIMIT lines of the list
    #: With ``listed``: a sealed spool of every planned create's line, in plan order (:func:`plan_lines`).
    list_path: str | None = None
    dropped_metadata: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the target says would fail (no write yet)
    #: Existing nodes (counted identical, or parents) an interrupted restore left on its placeholder ACL:
    #: replay sets their archived ACL (``acl_pending`` records in the spool; ZooKeeper's ``unfinished_acls``).
    acl_pending: int = 0
    seconds: float = 0.0
    _lines: BinaryIO | None = field(default=None, repr=False, compare=False)  # while planning, with ``listed``

    def listed(self, key: bytes, label: str = "") -> None:
        """A planned create: its line goes to the first LIST_LIMIT (the artifact's) and, when
        the whole list was asked for, to the list spool."""
        if len(self.create_paths) < LIST_LIMIT:
            self.create_paths.append(display_key(key) + label)
        if self._lines is not None:
            self._lines.write(_list_line(key, label))

    def conflict(self, key: bytes) -> None:
        self.conflicts += 1
        if len(self.conflict_paths) < LIST_LIMIT:
            self.conflict_paths.append(display_key(key))

    def compare(self, key: bytes, archived: bytes, current: bytes) -> None:
        if archived == current:
            self.identical += 1
        else:
            self.conflict(key)

    def dropped(self, names: list[str]) -> None:
        for d in names:
            self.dropped_metadata[d] = self.dropped_metadata.get(d, 0) + 1


class _Checker:
    """Checks, while planning, what replay will hand the target: the key (ZooKeeper paths
    have rules), the metadata, and ZooKeeper ACLs (asking the target about schemes only it
    can judge). Raises a one-line error naming the key; never shows a value or an ACL id."""

    def __init__(self, session: SourceSession, source_service: str, target: SourceBlock) -> None:
        self.source = source_service
        self.target = target.service
        self.label = target.describe()
        self.zk = target.service == "zookeeper"
        self.acls = self.zk and source_service == "zookeeper"
        # metadata_problem has rules of its own for a restore into the same service, else it
        # only looks for the planner's mark
        self.meta_rules = source_service == target.service != "zookeeper"  # (ZooKeeper's: the ACL)
        self._ask = getattr(session, "acl_accepted", None)
        self._acl_ok: set[Any] = set()  # ACLs found fine (most nodes share a handful)
        self._last_acl: Any = None  # ... and runs of nodes share one
        self._asked: dict[tuple[str, str], bool] = {}

    def path_ok(self, key: bytes) -> bool:
        return not self.zk or zookeeper_path_problem(key) is None

    def check(self, key: bytes, meta: dict[str, Any]) -> None:
        if self.zk:
            problem = zookeeper_path_problem(key)
            if problem:
                raise SourceError(
                    f"{display_key(key)} cannot be restored into ZooKeeper at {self.label}: {problem}; "
                    "nothing was written"
                )
        if not meta:
            return
        if self.meta_rules or "intermediate" in meta:
            self._check_meta(key, meta)
        if self.acls:
            acl = meta.get("acl")
            if acl is not None and acl != self._last_acl:
                self._check_acl(key, acl)
                self._last_acl = acl

    def _check_meta(self, key: bytes, meta: dict[str, Any]) -> None:
        problem = metadata_problem(meta, self.source, self.target)
        if problem:
            raise ArchiveError(
                f"the archived metadata of {display_key(key)} is malformed: {problem}; nothing was written"
            )

    def _check_acl(self, key: bytes, acl: Any) -> None:
        try:
            seen: Any = tuple(map(tuple, acl))
            if seen in self._acl_ok:
                return
        except TypeError:
            seen = None
        problem = zookeeper_acl_problem(acl, self._accepted if self._ask else None)
        if problem:
            raise SourceError(
                f"the archived ACL of {display_key(key)} cannot be restored into ZooKeeper at {self.label}: "
                f"{problem}; nothing was written"
            )
        if seen is not None and len(self._acl_ok) < _CHECK_CACHE:
            self._acl_ok.add(seen)

    def _accepted(self, scheme: str, ident: str) -> bool:
        ok = self._asked.get((scheme, ident))
        if ok is None:
            ok = bool(self._ask(scheme, ident))  # type: ignore[misc]
            if len(self._asked) < _CHECK_CACHE:
                self._asked[(scheme, ident)] = ok
        return ok


# ---------------------------------------------------------------------------- flat stores


class _FlatPlanner:
    """Plans a flat store (no parents): records in archive order, looked up in batches,
    or not at all when the target holds no key (``empty``): then every key is missing."""

    def __init__(self, session: SourceSession, out: BinaryIO, plan: Plan, empty: bool = False) -> None:
        self.session = session
        self.out = out
        self.plan = plan
        self.empty = empty
        self.batch: list[Record] = []

    def add(self, record: Record) -> None:
        self.batch.append(record)
        if len(self.batch) >= BATCH:
            self.flush()

    def flush(self) -> None:
        batch, self.batch = self.batch, []
        if not batch:
            return
        plan = self.plan
        found = [None] * len(batch) if self.empty else self.session.lookup([r.key for r in batch])
        for r, current in zip(batch, found, strict=True):
            if current is None:
                plan.to_create += 1
                plan.listed(r.key)
                self.out.write(encode_record(r))
            else:
                plan.compare(r.key, r.value, current)


# ---------------------------------------------------------------------------- trees


def _sort_line(key: bytes, rank: int, seq: int, body: bytes) -> bytes:
    """One line of the sort: plain byte order of these lines is path order, component by
    component (``/`` becomes 0x01, the key ends with 0x00: valid ZooKeeper paths hold
    neither), then rank, then archive order."""
    return b"%b\x00%d%012d%b" % (key.replace(b"/", b"\x01"), rank, seq, body)


# A node of the path from the top of the tree to the key being planned, as a list (the
# planner makes one per record): its key, its rank (SELECTED, FOLDER, OUTSIDE, or GAP: no
# record holds it), its record line (OUTSIDE: as archived, not yet prepared) and its state
# (MISSING or PRESENT once known, else None).
_KEY, _RANK, _BODY, _STATE = range(4)

_LABEL = {
    CREATE: "", FOLDED: " (intermediate)", GAP: " (intermediate)", PARENT: " (parent, from the archive)",
}


class _TreePlanner:
    """Plans a tree from records sorted by path (see _sort_line).

    In that order a node comes right before its subtree, so ``stack`` (the current key's
    ancestors, top first) tells everything about its parents. Records landing on one key
    come together, best rank first: the first one decides, a later archived key (a
    collision, etcd ``x`` and ``/x``) is identical or a conflict, and a later folder key
    or outside record adds nothing. A record outside the selection (``--subtree``) waits
    on the stack and is planned only when a selected key below it needs its parent; a level
    no record holds is planned as an empty intermediate node.

    A node below a missing one is missing too, and is never looked up: a batch is looked up
    level by level (a node waits until its parent's answer is in), so into an empty or new
    chroot only the top nodes are asked for, and into a target that holds nothing at all
    (``empty``: the session said so with one request) nothing is.
    """

    def __init__(
        self, session: SourceSession, out: BinaryIO, plan: Plan, checker: _Checker, source_service: str
    ) -> None:
        self.session = session
        self.out = out
        self.plan = plan
        self.checker = checker
        self.source_service = source_service
        self.stack: list[list[Any]] = []
        self.planned = 0  # stack[:planned] are planned
        # ZooKeeper: which existing nodes an interrupted restore left on its placeholder ACL
        self.unfinished = getattr(session, "unfinished_acls", None)
        #: (kind, node, body, parent node or None at the top); a DUP's parent is never needed
        self.batch: list[tuple[int, list[Any], bytes, list[Any] | None]] = []
        self.empty = False  # the target holds no key at all: every node is missing

    def add(self, line: bytes) -> None:
        cut = line.index(b"\x00")
        key = line[:cut].replace(b"\x01", b"/")
        rank = line[cut + 1] - 48
        body = line[cut + 14 :]
        stack = self.stack
        while stack:
            top = stack[-1][_KEY]
            n = len(top)
            if key.startswith(top) and (len(key) == n or key[n] == 47):  # 47: "/"
                break
            stack.pop()
        if self.planned > len(stack):
            self.planned = len(stack)
        if stack and stack[-1][_KEY] == key:
            if rank == SELECTED:  # a second archived key on a planned one: never created
                self.batch.append((DUP, stack[-1], body, None))
                if len(self.batch) >= BATCH:
                    self.flush()
            return
        cut = key.rfind(b"/")
        parent = key[:cut] if cut > 0 else None
        if parent is not None and (not stack or parent != stack[-1][_KEY]):
            base = stack[-1][_KEY] if stack else None
            gaps = []
            while parent is not None and parent != base:
                gaps.append(parent)
                cut = parent.rfind(b"/")
                parent = parent[:cut] if cut > 0 else None
            for g in reversed(gaps):
                stack.append([g, GAP, None, None])
        node = [key, rank, body, None]
        stack.append(node)
        if rank == OUTSIDE:
            return
        batch = self.batch
        last = len(stack) - 1
        if self.planned == last and rank == SELECTED:  # the usual case: every parent is planned
            if last and stack[last - 1][_STATE] == MISSING:
                node[_STATE] = MISSING  # below a missing parent: missing too, no need to ask
            batch.append((CREATE, node, body, stack[last - 1] if last else None))
            self.planned = last + 1
            if len(batch) >= BATCH:
                self.flush()
            return
        for i in range(self.planned, len(stack)):
            node = stack[i]
            r = node[_RANK]
            if r == SELECTED:
                kind = CREATE
            elif r == FOLDER:
                kind = FOLDED
            elif r == OUTSIDE:
                kind, node[_BODY] = PARENT, self._outside_parent(node[_BODY])
            else:
                kind, node[_BODY] = GAP, encode_record(Record(node[_KEY], b"", {"intermediate": True}))
            if i and stack[i - 1][_STATE] == MISSING:
                node[_STATE] = MISSING  # below a missing parent: missing too, no need to ask
            batch.append((kind, node, node[_BODY], stack[i - 1] if i else None))
        self.planned = len(stack)
        if len(batch) >= BATCH:
            self.flush()

    def _outside_parent(self, body: bytes) -> bytes:
        """The record of a parent the archive holds outside the selection: checked and
        prepared like any other, and marked: it only needs to exist."""
        rec = decode_record(body)
        self.checker.check(rec.key, rec.meta)
        prepared, dropped = self.session.prepare(rec, self.source_service)
        self.plan.dropped(dropped)
        prepared.meta["intermediate"] = True
        return encode_record(prepared)

    def flush(self) -> None:
        batch, self.batch = self.batch, []
        if not batch:
            return
        found = self._resolve(batch)
        plan = self.plan
        creates: list[bytes] = []
        present: list[Record] = []  # existing nodes holding the archived value (see below)
        listed = plan.listed if plan._lines is not None else None  # else only the first LIST_LIMIT
        shown = plan.create_paths
        made = intermediate = 0
        for kind, node, body, _ in batch:
            current = None if node[_STATE] == MISSING else found.get(node[_KEY])
            if kind == DUP:
                if current is None:  # the first record on this key is about to create it
                    current = decode_record(node[_BODY]).value
                plan.compare(node[_KEY], decode_record(body).value, current)
            elif current is None:
                node[_STATE] = MISSING
                if kind == CREATE:
                    made += 1
                else:
                    intermediate += 1
                if listed is not None:
                    listed(node[_KEY], _LABEL[kind])
                elif len(shown) < LIST_LIMIT:
                    shown.append(display_key(node[_KEY]) + _LABEL[kind])
                creates.append(body)
            else:
                node[_STATE] = PRESENT
                if kind == CREATE:
                    plan.compare(node[_KEY], decode_record(body).value, current)
                # a parent (intermediate, folder key, outside the selection) only needs to exist
                if self.unfinished is not None and kind in (CREATE, PARENT):
                    rec = decode_record(body)
                    if rec.value == current:
                        present.append(rec)
        plan.to_create += made
        plan.intermediate += intermediate
        if present:
            # An interrupted restore may have left some of them on its placeholder ACL (their
            # archived ACL is set once their children exist): replay finishes those, as the
            # interrupted run would have. Any other existing node stays exactly as it is.
            for rec, left in zip(present, self.unfinished(present), strict=True):  # type: ignore[misc]
                if left:
                    rec.meta["acl_pending"] = True
                    creates.append(encode_record(rec))
                    plan.acl_pending += 1
        self.out.writelines(creates)

    def _resolve(self, batch: list[tuple[int, list[Any], bytes, list[Any] | None]]) -> dict[bytes, bytes]:
        """Settle whether each node of ``batch`` exists (its ``_STATE``); return the current
        value of those that do. Level by level: a node whose parent is known to exist (or that
        has none on the stack: a top node) is looked up, one below a missing parent is missing
        without a request, and one whose parent is still being asked waits for the answer."""
        waiting: list[tuple[list[Any], list[Any] | None]] = []
        seen: set[int] = set()
        for _, node, _, parent in batch:
            if node[_STATE] is None and id(node) not in seen:
                seen.add(id(node))
                if self.empty:
                    node[_STATE] = MISSING
                else:
                    waiting.append((node, parent))
        found: dict[bytes, bytes] = {}
        while waiting:
            ask: list[list[Any]] = []
            later: list[tuple[list[Any], list[Any] | None]] = []
            for node, parent in waiting:  # parents come before their children here
                state = PRESENT if parent is None else parent[_STATE]
                if state == PRESENT:
                    ask.append(node)
                elif state == MISSING:
                    node[_STATE] = MISSING
                else:
                    later.append((node, parent))
            if not ask:  # (cannot happen: a waiting node's parent is asked before it)
                ask, later = [node for node, _ in later], []
            for node, current in zip(ask, self.session.lookup([n[_KEY] for n in ask]), strict=True):
                if current is None:
                    node[_STATE] = MISSING
                else:
                    node[_STATE] = PRESENT
                    found[node[_KEY]] = current
            waiting = later
        return found


# ---------------------------------------------------------------------------- the stage


@gc_paused
def plan_restore(
    archive_path: Path,
    target: SourceBlock,
    workdir: Path,
    *,
    subtree: str | None = None,
    maps: list[str] | None = None,
    decryptor: BodyDecryptor | None = None,
    listed: bool = False,
) -> Plan:
    """Classify every archived key against ``target``; write the creates to a spool.

    ``listed``: also spool every planned create's line (sealed, beside the plan) for
    ``--list`` and ``--list-file``; :func:`plan_lines` streams them back. Without it only
    the first LIST_LIMIT are kept (for the artifact)."""
    log = logger()
    started = time.monotonic()
    mapper = KeyMapper(subtree, maps)
    ops_path = workdir / "plan.jsonl"
    plan = Plan(ops_path=str(ops_path), target=target.describe())
    session = target.connect()
    sorter = ExternalSorter(workdir, RUN_BYTES, "restore plan")
    if listed:
        plan.list_path = str(workdir / "plan-list.sealed")
        plan._lines = open_spool_writer(plan.list_path)
    try:
        tree = session.parent_key(b"/a/b") is not None
        # One request says whether the target holds any key at all (a new chroot, an empty
        # prefix): then nothing is looked up. Create-if-absent at replay still guards every key.
        holds_no_keys = getattr(session, "holds_no_keys", None)
        empty = bool(holds_no_keys()) if holds_no_keys is not None else False
        with open(archive_path, "rb") as f, open_spool_writer(ops_path) as out:  # sealed: no plaintext on disk
            reader = ArchiveReader(f)
            source_service = reader.manifest["service"]
            checker = _Checker(session, source_service, target)
            flat = None if tree else _FlatPlanner(session, out, plan, empty)
            # Outside --subtree, only keys that may be parents of selected ones are kept.
            outside = tree and mapper.subtree is not None
            roots = mapper.selection_roots(source_service, target.service) if outside else None
            # The loop below runs once per archived key: what does not change per key is decided
            # here (no --subtree or --map: every key is selected as is; one service: no translation).
            renames = mapper.subtree is not None or bool(mapper.maps)
            same = source_service == target.service
            check, prepare, add = checker.check, session.prepare, (flat.add if flat is not None else None)
            sort_add = sorter.add
            with progress.stage("plan", total=reader.manifest.get("keys")) as advance:
                seq = -1
                for seq, rec in enumerate(reader.records(decryptor)):
                    if not seq % PROGRESS_EVERY and seq:
                        advance(PROGRESS_EVERY)
                    mapped = mapper(rec.key) if renames else rec.key
                    if mapped is None:
                        plan.outside_subtree += 1
                        if outside and (renamed := mapper.rename(rec.key)) is not None:
                            key = translate(renamed, source_service, target.service)
                            if (roots is None or related(key, roots)) and checker.path_ok(key):
                                body = encode_record(Record(key, rec.value, rec.meta))
                                sort_add(_sort_line(key, OUTSIDE, seq, body))
                        continue
                    key = mapped if same else translate(mapped, source_service, target.service)
                    check(key, rec.meta)
                    # (prepare reads its record and returns a new one)
                    prepared, dropped = prepare(rec if key is rec.key else Record(key, rec.value, rec.meta),
                                                source_service)
                    if dropped:
                        plan.dropped(dropped)
                    rank = SELECTED
                    if not prepared.value and folded_folder(mapped, key):
                        prepared.meta["intermediate"] = True
                        rank = FOLDER
                    if add is not None:
                        add(prepared)
                    else:
                        sort_add(_sort_line(key, rank, seq, encode_record(prepared)))
                advance((seq + 1) - (seq // PROGRESS_EVERY) * PROGRESS_EVERY if seq >= 0 else 0)
            if flat is not None:
                flat.flush()
            else:
                planner = _TreePlanner(session, out, plan, checker, source_service)
                planner.empty = empty
                for line in sorter:
                    planner.add(line)
                planner.flush()
        plan_warnings = getattr(session, "plan_warnings", None)  # ZooKeeper: parents it may not create under
        if plan_warnings is not None:
            plan.warnings = plan_warnings()
    finally:
        sorter.close()
        session.close()
        if plan._lines is not None:
            plan._lines.close()
            plan._lines = None  # a Plan goes on to replay (a task's input): no open file in it
    plan.seconds = time.monotonic() - started
    log.info(
        "plan: %d to create (+%d intermediate), %d identical, %d conflicts, %d outside subtree, in %.2fs",
        plan.to_create, plan.intermediate, plan.identical, plan.conflicts, plan.outside_subtree, plan.seconds,
    )
    if plan.acl_pending:
        log.info("plan: %d existing nodes an interrupted restore left on its restorer-only placeholder ACL get "
                 "their archived ACL", plan.acl_pending)
    for warning in plan.warnings:
        log.warning("plan: %s", warning)
    for name, n in sorted(plan.dropped_metadata.items()):
        if name in SOURCE_BOUND_METADATA:  # the same service too: it belongs to the source cluster
            log.warning("plan: %d keys are created without their %s: %s", n, name, SOURCE_BOUND_METADATA[name])
        else:
            log.warning("plan: %s cannot be carried over to %s for %d keys", name, target.service, n)
    return plan


@task(name="plan", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=should_retry)
def plan(
    archive_path: str,
    target: SourceBlock,
    workdir: str,
    subtree: str | None = None,
    maps: list[str] | None = None,
    decryptor: BodyDecryptor | None = None,
    listed: bool = False,
) -> Plan:
    """Prefect task wrapper of :func:`plan_restore`."""
    return plan_restore(
        Path(archive_path), target, Path(workdir), subtree=subtree, maps=maps, decryptor=decryptor, listed=listed
    )


# ---------------------------------------------------------------------------- the list of creates

#: How a line of the list starts (``create   /a/b``, ``create   /a (intermediate)``).
LIST_PREFIX = "create   "


def _list_line(key: bytes, label: str) -> bytes:
    """One line of the list spool: the key as shown to humans (a line break in a key is
    escaped, so one create is always one line), then its label."""
    shown = display_key(key)
    if "\n" in shown or "\r" in shown:
        shown = shown.replace("\r", "\\r").replace("\n", "\\n")
    return (LIST_PREFIX + shown + label + "\n").encode("utf-8", "backslashreplace")


def plan_lines(p: Plan) -> Iterator[str]:
    """Every planned create's line (with its newline), in plan order, streamed from the
    plan's list spool: never the whole list in memory. The plan must have been made with
    ``listed`` by this process (the spool's key lives only in its memory)."""
    if p.list_path is None:
        raise ValueError("the plan was made without listed=True: it kept no list of its creates")
    with open_spool_reader(p.list_path) as f:
        for line in f:
            yield line.decode("utf-8")


def write_plan_list(p: Plan, path: str, *, sealed: bool = False) -> int:
    """Write every planned create's line into ``path`` (the user's ``--list-file``; with
    ``sealed``, a spool only this process can read back, for ``--list`` on stdout). Returns
    the number of lines, which is ``to_create + intermediate``.

    Written to a temporary name beside ``path`` and renamed over it, so ``path`` is either
    the old file or the whole new list, never a part of one."""
    path = os.path.abspath(os.path.expanduser(path))
    n = 0
    if sealed:
        with open_spool_writer(path) as out:
            for line in plan_lines(p):
                out.write(line.encode("utf-8"))
                n += 1
        return n
    tmp = f"{path}.burrow-{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for line in plan_lines(p):
                out.write(line)
                n += 1
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n

