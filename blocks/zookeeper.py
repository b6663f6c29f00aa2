"""ZooKeeper as a source and restore target, through kazoo.

Reads are pipelined: up to ``read_window`` getData/getACL requests are in flight, and
get_children is only asked of nodes whose stat says they have children. Restores create
missing nodes with multi transactions, several in flight at once. The bulk traffic goes
through a second, pipelined connection (blocks/zkwire.py); kazoo opens the session,
reports connection and auth trouble, and does the single creates of the fallback path.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

from kazoo.client import KazooClient
from kazoo.exceptions import (
    EXCEPTIONS,
    AuthFailedError,
    ConnectionLoss,
    KazooException,
    MarshallingError,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    OperationTimeoutError,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KeeperState
from kazoo.retry import KazooRetry
from kazoo.security import ACL, Id, Permissions, make_digest_acl_credential
from pydantic import Field, SecretStr

from blocks import zkwire
from blocks.source import ChangeBatch, SourceBlock, WalkStats
from burrow.errors import AuthError, SourceError, SourceUnavailable
from burrow.hosts import check_resolvable, unreachable_reason
from burrow.paths import foreign_metadata
from burrow.records import Record, display_key

log = logging.getLogger("burrow.zookeeper")

READ_BYTES_IN_FLIGHT = 64 * 1024 * 1024  # a walk asks for fewer nodes at once when values are big

_TRANSIENT = (ConnectionLoss, SessionExpiredError, OperationTimeoutError, KazooTimeoutError)


def _start_session(client: KazooClient, timeout: float) -> str | None:
    """Start ``client``; None once connected, else why not: "auth", "gave up" or "timeout".

    Unlike ``KazooClient.start``, which waits out the whole timeout even after its connection
    retry policy is spent (its connection thread has ended and nothing will connect), this
    returns as soon as the connection thread ends. The client is stopped and closed unless
    connected.
    """
    live = client.start_async()
    routine = getattr(getattr(client, "_connection", None), "_connection_routine", None)
    deadline = time.monotonic() + timeout
    why = "timeout"
    while not live.wait(max(0.0, min(0.05, deadline - time.monotonic()))):
        if client.client_state == KeeperState.AUTH_FAILED:
            why = "auth"
            break
        if routine is not None and not routine.is_alive():
            why = "gave up"
            break
        if time.monotonic() >= deadline:
            break
    if client.connected:
        return None
    if client.client_state == KeeperState.AUTH_FAILED:
        why = "auth"
    client.stop()
    client.close()
    return why


def _has_redacted(acl: list[list[Any]]) -> bool:
    # ZooKeeper hides digest hashes from readers without ADMIN: "user:x" instead of "user:<hash>".
    for entry in acl:
        if entry[1] == "digest" and str(entry[2]).endswith(":x"):
            return True
    return False


#: Digest credentials for a session whose block (or URL) names none: never in a URL or parameter.
ENV_USER = "BURROW_ZK_USER"
ENV_PASSWORD = "BURROW_ZK_PASSWORD"


#: An ACL as Burrow handles it: ``((perms, scheme, id), ...)``.
Acl = tuple[tuple[int, str, str], ...]

#: Only the restoring session's identity: ZooKeeper's ``auth`` scheme, which the server turns into
#: the session's authenticated ids (``digest:user:hash``), with every permission.
RESTORER_ONLY: Acl = ((Permissions.ALL, "auth", ""),)
WORLD_OPEN: Acl = ((Permissions.ALL, "world", "anyone"),)
_WORLD_READ: Acl = ((Permissions.READ, "world", "anyone"),)
_OPEN_CHOICE: tuple[Acl, None, None] = (WORLD_OPEN, None, None)

#: Why a node got the restorer-only ACL (the restore report lists each such node with its reason).
NOTE_REDACTED = "archived ACL redacted"
NOTE_INTERMEDIATE = "intermediate"
NOTE_FOREIGN = "no ZooKeeper ACL in the archive"
NOTE_CHROOT = "chroot"

REPORT_LIMIT = 1000  # paths listed per report list
_MEMORY = 100_000  # entries kept by a session's bounded memories


def _acl_tuple(acl: Any) -> Acl:
    return tuple((int(p), str(s), str(i)) for p, s, i in acl)


#: Where a getACL reply's stat holds the ACL version: after czxid, mzxid, ctime, mtime, version, cversion.
_AVERSION_AT = 4 * 8 + 2 * 4


def _acl_and_version(frame: bytes, offset: int) -> tuple[list[list[Any]], int]:
    """A getACL reply: the ACL and the node's ACL version (aversion) from the stat after it."""
    acl = zkwire.parse_acl(frame, offset)
    end = offset + 4 + sum(12 + len(s.encode("utf-8")) + len(i.encode("utf-8")) for _, s, i in acl)
    return acl, struct.unpack_from("!i", frame, end + _AVERSION_AT)[0]


def _kazoo_acl(acl: Acl) -> list[ACL]:
    return [ACL(p, Id(s, i)) for p, s, i in acl]


_CREDENTIALS_FIX = (
    "Restore with digest credentials (zk://USER:PASSWORD@HOST:PORT on the command line, a ZooKeeperCluster "
    f"block's digest_user and digest_password, or {ENV_USER} and {ENV_PASSWORD})"
)


def _join(parent: str, child: str) -> str:
    return ("" if parent == "/" else parent) + "/" + child


class ZooKeeperCluster(SourceBlock):
    """A ZooKeeper ensemble: hosts, optional chroot, optional digest auth."""

    _block_type_name: ClassVar[str] = "Burrow ZooKeeper Cluster"
    _block_type_slug: ClassVar[str] = "burrow-zookeeper-cluster"
    _description: ClassVar[str] = "A ZooKeeper ensemble Burrow backs up from and restores into."
    service: ClassVar[str] = "zookeeper"
    scheme: ClassVar[str] = "zk"

    hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1:2181"], description="host:port of each server")
    chroot: str | None = Field(default=None, description="Work below this path only")
    digest_user: str | None = Field(default=None, description="User for digest authentication")
    digest_password: SecretStr | None = Field(default=None, description="Password for digest authentication")
    connect_timeout: float = Field(default=10.0, description="Seconds to wait for a connection")
    session_timeout: float = Field(default=15.0, description="ZooKeeper session timeout in seconds")
    exclude: list[str] = Field(default_factory=lambda: ["/zookeeper"], description="Paths never backed up")
    read_window: int = Field(default=2000, description="Async reads in flight at once")
    read_connections: int = Field(default=4, description="Pipelined connections a backup walk reads through")
    read_group: int = Field(default=100, description="Nodes per multiRead request")
    multi_read: bool = Field(default=True, description="Use multiRead (ZooKeeper 3.6+) when the server has it")
    multi_ops: int = Field(default=1000, description="Creates per multi transaction")
    multi_bytes: int = Field(default=512 * 1024, description="Payload bytes per multi transaction")
    multi_window: int = Field(default=8, description="Multi transactions in flight at once")
    default_acl: Literal["creator", "open"] = Field(
        default="creator",
        description=(
            "ACL of the nodes a restore creates without a usable archived ACL (redacted by the source, empty "
            "parents, the chroot, keys from etcd or Consul): 'creator' gives them to the restoring identity only "
            "(auth scheme, all permissions); 'open' gives them world:anyone with every permission, on purpose"
        ),
    )

    def describe(self) -> str:
        chroot = self.chroot.rstrip("/") if self.chroot and self.chroot != "/" else ""
        return f"zk://{','.join(self.hosts)}{chroot}"

    def connect(self) -> ZooKeeperSession:
        return ZooKeeperSession(self)

    def nearest_existing(self) -> str:
        """The chroot when it exists, else its nearest existing ancestor (``/`` at worst): where a
        restore into this block creates its first node, so where a writability check must write.
        ``exists`` needs no permission on the node, so an unreadable ancestor is still found."""
        path = "/" + (self.chroot or "").strip("/")
        if path == "/":
            return "/"
        root = ZooKeeperSession(self, chroot=False)
        try:
            while path != "/" and root.client.exists(path) is None:
                path = path.rsplit("/", 1)[0] or "/"
        except KazooException as exc:
            raise root._wrap(exc, path, "reading") from None
        finally:
            root.close()
        return path

    def unrooted(self) -> ZooKeeperSession:
        """A session on the whole tree, above the chroot (its paths are absolute): for what
        concerns the chroot's own levels, such as a rehearsal checking which of them exist
        and removing the ones it created (tasks/rehearse.py)."""
        return ZooKeeperSession(self, chroot=False)


#: Deletes per multi transaction when a rehearsal cleans its scratch chroot.
DELETE_MULTI = 500


class ZooKeeperSession:
    """An open kazoo client plus the batched operations Burrow needs."""

    service = "zookeeper"

    def __init__(self, block: ZooKeeperCluster, *, chroot: bool = True) -> None:
        self.block = block
        self.label = block.describe()
        self._use_chroot = chroot
        self._wire: zkwire.WireSession | None = None
        auth = None
        user = block.digest_user or os.environ.get(ENV_USER) or None
        if user:
            if block.digest_password is not None:
                password = block.digest_password.get_secret_value()
            else:
                password = os.environ.get(ENV_PASSWORD, "")
            auth = [("digest", f"{user}:{password}")]
        hosts = ",".join(block.hosts)
        if chroot and block.chroot and block.chroot != "/":
            hosts += "/" + block.chroot.strip("/")
        self.client = KazooClient(
            hosts=hosts,
            timeout=block.session_timeout,
            auth_data=auth,
            connection_retry=KazooRetry(max_tries=3, delay=0.2, max_delay=2, ignore_expire=False),
            command_retry=None,
            logger=logging.getLogger("burrow.kazoo"),
        )
        self._auth = auth
        # A host name that does not exist fails here, at once and for good; kazoo would skip
        # it and retry as if a server were down.
        check_resolvable(block.hosts, "ZooKeeper", self.label)
        started = time.monotonic()
        try:
            why = _start_session(self.client, block.connect_timeout)
        except KazooException as exc:
            self.client.close()
            raise AuthError(f"ZooKeeper at {self.label} refused the session: {type(exc).__name__}") from None
        if why == "auth":
            raise AuthError(f"ZooKeeper at {self.label} rejected the credentials (AUTH_FAILED)")
        if why is not None:
            # kazoo's connection retries (3 rounds over the hosts) are spent, or connect_timeout
            # is: say what the servers do and how long this took. (The task that opened the
            # session may retry it: each attempt says its own time.)
            took = time.monotonic() - started
            reason = unreachable_reason(block.hosts, 2181, timeout=min(1.0, block.connect_timeout))
            when = f"(gave up after {took:.1f}s)" if why == "gave up" else f"within {block.connect_timeout:g}s"
            raise SourceUnavailable(f"cannot connect to ZooKeeper at {self.label} {when}: {reason}")
        # Who this session is, for reading ACLs: anyone, plus its digest identity when it has one.
        # (ZooKeeper may know more: a super user, an ip or sasl identity. Burrow only warns from
        # what it can tell, and where it cannot tell it takes the path that works for everyone.)
        ids = {("world", "anyone")}
        redacted_ids = set()  # what a reader without ADMIN sees of an entry for this identity
        for scheme, credential in auth or []:
            if scheme == "digest":
                user, _, secret = credential.partition(":")
                ids.add(("digest", make_digest_acl_credential(user, secret)))
                redacted_ids.add(("digest", user + ":x"))
        self._ids = frozenset(ids)
        self._redacted_ids = frozenset(redacted_ids)
        # What the server makes of RESTORER_ONLY for this session (the ``auth`` scheme becomes each of its
        # digest identities, with every permission): how a node a restore left on it looks when read back.
        self._placeholder: Acl = tuple(sorted((Permissions.ALL, s, i) for s, i in ids if s == "digest"))
        self._identified = len(ids) > 1
        self._local_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self._acl_seen: dict[tuple, tuple[Acl, Acl | None, None]] = {}
        self._last_acl: tuple[Any, tuple[Acl, Acl | None, None] | None] = (None, None)  # (archived, _choose's)
        self._grant_seen: dict[tuple, bool] = {}
        self._inherit: OrderedDict[bytes, Acl] = OrderedDict()  # anonymous: ACL new nodes below a path get
        self._restrictive: set[bytes] = set()  # anonymous planning: archived ACL lets it create no children
        self._has_children: set[bytes] = set()  # anonymous planning: parents of planned keys
        self._parents_checked: OrderedDict[bytes, bool] = OrderedDict()
        self._denied: list[str] = []  # existing parents this identity may not create children under
        self._denied_count = 0
        self._restricted: list[str] = []  # nodes created with RESTORER_ONLY, with the reason
        self._restricted_count = 0
        self._deferred: list[tuple[str, Acl]] = []  # created with RESTORER_ONLY; archived ACL set by finish()
        self._resumed: list[tuple[str, Acl]] = []  # left on RESTORER_ONLY by an interrupted run; set by finish()

    # -- errors -------------------------------------------------------------------------
    def _wrap(self, exc: BaseException, path: str, action: str) -> Exception:
        if isinstance(exc, _TRANSIENT):
            return SourceUnavailable(f"lost the connection to ZooKeeper at {self.label} while {action} {path}")
        if isinstance(exc, AuthFailedError):
            return AuthError(f"ZooKeeper at {self.label} rejected the credentials")
        if isinstance(exc, NoAuthError):
            return AuthError(
                f"ZooKeeper at {self.label} denied {action} {path} (check the digest user/password and the node's ACL)"
            )
        return SourceError(f"ZooKeeper at {self.label} failed {action} {path}: {type(exc).__name__}")

    # -- backup -------------------------------------------------------------------------
    def walk(self, root: bytes, stats: WalkStats) -> Iterator[Record]:
        c = self.client
        root_s = root.decode("utf-8") or "/"
        if root_s != "/":
            root_s = "/" + root_s.strip("/")
        excluded = [e.rstrip("/") for e in self.block.exclude if e and e != "/"]

        def is_excluded(p: str) -> bool:
            return any(p == e or p.startswith(e + "/") for e in excluded)

        max_zxid = 0
        stack: list[str] = []
        try:
            if root_s == "/":
                stat = c.exists("/")
                max_zxid = max(stat.mzxid, stat.pzxid) if stat else 0
            elif c.exists(root_s) is None:
                raise SourceError(f"path {root_s} does not exist in ZooKeeper at {self.label}")
            else:
                stack.append(root_s)
            multi_read = self.block.multi_read and self._probe_multi_read(root_s)
            conns = [self._wire_session()]
            for _ in range(max(1, self.block.read_connections) - 1):
                conns.append(self._new_wire())
        except KazooException as exc:
            raise self._wrap(exc, root_s, "reading") from None
        # Each connection answers in the order it was asked. A group of nodes is one
        # multiRead of getData (or one getData each, on old servers) followed by one getACL
        # per node; the children of a group's parents are one multiRead of getChildren.
        # Groups are dealt round-robin over the connections: ZooKeeper spends far less CPU
        # per request when several sessions keep it busy than when one does.
        NODES, CHILDREN = 0, 1  # noqa: N806
        pending: deque[tuple[zkwire.WireSession, int, list[str]]] = deque()
        nconn = len(conns)
        turn = outstanding = 0
        group = max(1, self.block.read_group)
        window = max(group, self.block.read_window // 2)
        avg_size = 256.0  # running mean of value sizes: bounds the bytes in flight
        parse_data, parse_acl, parse_children = zkwire.parse_data, zkwire.parse_acl, zkwire.parse_children
        parse_multi_read = zkwire.parse_multi_read
        NUM_CHILDREN, EPHEMERAL_OWNER = zkwire.NUM_CHILDREN, zkwire.EPHEMERAL_OWNER  # noqa: N806
        no_node = NoNodeError.code
        p = root_s

        def ask_children(wire: zkwire.WireSession, parents: list[str]) -> None:
            if multi_read:
                wire.multi_read(zkwire.OP_GETCHILDREN, parents)
            else:
                for q in parents:
                    wire.get_children(q)
            pending.append((wire, CHILDREN, parents))

        def read_multi(wire: zkwire.WireSession) -> list[tuple[int, Any]]:
            frame, err, off = wire.reply()
            if err:
                raise EXCEPTIONS[err]()
            return parse_multi_read(frame, off)

        try:
            if root_s == "/":
                ask_children(conns[0], ["/"])
            while stack or pending:
                limit = max(group, min(window, int(READ_BYTES_IN_FLIGHT / avg_size)))
                if stack and outstanding <= limit // 2:
                    batch: list[str] = []
                    while stack and outstanding + len(batch) < limit:
                        p = stack.pop()
                        if excluded and is_excluded(p):
                            stats.skipped_excluded += 1
                            continue
                        batch.append(p)
                    for i in range(0, len(batch), group):
                        paths = batch[i : i + group]
                        turn += 1
                        wire = conns[turn % nconn]
                        if multi_read:
                            wire.multi_read(zkwire.OP_GETDATA, paths)
                        else:
                            for q in paths:
                                wire.get_data(q)
                        for q in paths:
                            wire.get_acl(q)
                        pending.append((wire, NODES, paths))
                        outstanding += len(paths)
                    for wire in conns:
                        wire.flush()
                    if not pending:
                        continue
                wire, kind, paths = pending.popleft()
                if kind == CHILDREN:
                    if multi_read:
                        listed = read_multi(wire)
                    else:
                        listed = []
                        for _ in paths:
                            frame, err, off = wire.reply()
                            listed.append((err, None if err else parse_children(frame, off)))
                    for p, (err, children) in zip(paths, listed, strict=True):
                        if err:
                            if err == no_node:
                                stats.vanished += 1  # deleted after we read it
                                continue
                            raise EXCEPTIONS[err]()
                        for child in sorted(children, reverse=True):
                            stack.append(_join(p, child))
                    continue
                if multi_read:
                    got = read_multi(wire)
                else:
                    got = []
                    for _ in paths:
                        frame, err, off = wire.reply()
                        got.append((err, None if err else parse_data(frame, off)))
                acls = [wire.reply() for _ in paths]
                outstanding -= len(paths)
                parents: list[str] = []
                for p, (derr, node), (aframe, aerr, aoff) in zip(paths, got, acls, strict=True):
                    if derr or aerr:
                        if no_node in (derr, aerr):
                            stats.vanished += 1  # deleted while we walked: not part of the backup
                            continue
                        raise EXCEPTIONS[derr or aerr]()
                    data, stat = node
                    if stat[EPHEMERAL_OWNER]:
                        stats.skipped_ephemeral += 1
                        continue
                    avg_size += (len(data) - avg_size) * 0.01
                    acl = parse_acl(aframe, aoff)
                    czxid, mzxid, ctime, mtime, version = stat[0], stat[1], stat[2], stat[3], stat[4]
                    pzxid = stat[10]
                    meta: dict[str, Any] = {
                        "acl": acl, "ctime": ctime, "mtime": mtime, "version": version,
                        "czxid": czxid, "mzxid": mzxid, "pzxid": pzxid,
                    }
                    for e in acl:
                        if e[1] == "digest" and e[2].endswith(":x"):
                            meta["acl_redacted"] = True
                            stats.redacted_acls += 1
                            stats.warn(
                                "ZooKeeper redacted digest ACLs (user:x) because the reader lacks ADMIN on some "
                                "nodes; those ACLs cannot be restored verbatim: a restore gives those nodes an ACL only the "
                                "restoring identity holds (the target block's default_acl) and lists them"
                            )
                            break
                    if mzxid > max_zxid or pzxid > max_zxid or czxid > max_zxid:
                        max_zxid = max(max_zxid, czxid, mzxid, pzxid)
                        stats.info["max_zxid"] = max_zxid
                    yield Record(p.encode("utf-8"), data, meta)
                    if stat[NUM_CHILDREN] > 0:
                        parents.append(p)
                if parents:
                    ask_children(wire, parents)
        except KazooException as exc:
            self._drop_wire()
            raise self._wrap(exc, p, "reading") from None
        except GeneratorExit:
            if pending:
                self._drop_wire()  # replies still in flight: this connection is out of step
            raise
        finally:
            for extra in conns[1:]:
                extra.close()
        stats.info["max_zxid"] = max_zxid

    def _probe_multi_read(self, path: str) -> bool:
        """Whether the server answers multiRead (ZooKeeper 3.6+)."""
        wire = self._wire_session()
        try:
            wire.multi_read(zkwire.OP_GETDATA, [path])
            frame, err, off = wire.reply()
            return not err and len(zkwire.parse_multi_read(frame, off)) == 1
        except (KazooException, struct.error, IndexError, ValueError):
            self._drop_wire()  # an old server may just hang up: the next use reconnects
            return False

    # -- restore ------------------------------------------------------------------------
    def lookup(self, keys: list[bytes]) -> list[bytes | None]:
        out = self._pipelined(keys, zkwire.WireSession.get_data, lambda frame, off: zkwire.parse_data(frame, off)[0])
        try:
            self._check_parents(keys, out)
        except KazooException as exc:
            self._drop_wire()
            raise self._wrap(exc, display_key(keys[0]) if keys else "", "reading") from None
        return out

    def _pipelined(self, keys: list[bytes], send: Callable[[zkwire.WireSession, str], None],
                   parse: Callable[[bytes, int], Any], *, absent: tuple[int, ...] = (NoNodeError.code,),
                   what: str = "reading") -> list[Any]:
        """One read per key on the bulk wire connection, ``read_window`` requests in flight at a
        time (kazoo's one call at a time costs a wake-up each): ``send`` queues the request for
        a path, ``parse`` reads a reply; None where the reply is an error of ``absent`` (by
        default: the node does not exist). Any other error names the key and ``what``."""
        out: list[Any] = []
        window = max(1, self.block.read_window)
        path = display_key(keys[0]) if keys else ""
        try:
            wire = self._wire_session()
            for start in range(0, len(keys), window):
                chunk = keys[start : start + window]
                for key in chunk:
                    send(wire, key.decode("utf-8"))
                for n, key in enumerate(chunk):
                    frame, err, off = wire.reply()
                    if err in absent:
                        out.append(None)
                    elif err:
                        if n + 1 < len(chunk):
                            self._drop_wire()  # replies still in flight: this connection is out of step
                        path = display_key(key)
                        raise EXCEPTIONS[err]()
                    else:
                        out.append(parse(frame, off))
        except KazooException as exc:
            self._drop_wire()
            raise self._wrap(exc, path, what) from None
        return out

    def holds_no_keys(self) -> bool:
        """Whether this session's tree holds no node at all, told with one request: its chroot
        does not exist yet. Planning then looks nothing up (every node is below the missing
        chroot); whether this identity may create the chroot is still checked (plan_warnings).
        An existing chroot, even an empty one, says False: its top nodes are looked up, which
        also checks that this identity may create under it."""
        if not self._use_chroot or not (self.block.chroot or "").strip("/"):
            return False
        try:
            return self.client.exists("/") is None
        except KazooException as exc:
            raise self._wrap(exc, self.block.chroot or "/", "reading") from None

    def _check_parents(self, keys: list[bytes], found: list[bytes | None]) -> None:
        """Note the existing nodes that missing keys would be created under and that do not let
        this session create children (planning reports them: the creates would be refused).

        A parent that is itself missing is created by the restore (with an ACL that lets the
        restorer create below it), so only parents that exist now are asked for their ACL.
        """
        missing = {k for k, v in zip(keys, found, strict=True) if v is None}
        if not missing:
            return
        checked = self._parents_checked
        ask: list[bytes] = []
        for k, v in zip(keys, found, strict=True):
            if v is not None:
                continue
            parent = k.rsplit(b"/", 1)[0] or b"/"
            if parent in missing or parent in checked:
                continue
            checked[parent] = True  # (settled below)
            ask.append(parent)
        if not ask:
            return
        wire = self._wire_session()
        for parent in ask:
            wire.get_acl(parent.decode("utf-8"))
        no_node, no_auth = NoNodeError.code, NoAuthError.code
        for parent in ask:
            frame, err, off = wire.reply()
            if err == no_node:
                continue  # missing too: this restore creates it
            if err and err != no_auth:
                raise EXCEPTIONS[err]()
            # NoAuth: not even READ or ADMIN on it, so almost surely no CREATE either
            if err or not self._grants(_acl_tuple(zkwire.parse_acl(frame, off)), Permissions.CREATE):
                checked[parent] = False
                self._denied_count += 1
                if len(self._denied) < REPORT_LIMIT:
                    self._denied.append(display_key(parent))
        while len(checked) > _MEMORY:
            checked.popitem(last=False)

    def unfinished_acls(self, records: list[Record]) -> list[bool]:
        """Which of ``records`` (prepared for this target; each node exists and holds the record's
        value, as planning found) a restore that was interrupted left on Burrow's placeholder:
        nodes whose archived ACL is set only once their children exist (see :meth:`_choose`) and
        whose ACL is still exactly RESTORER_ONLY as the server made it for this identity, never
        changed since (ACL version 0). A re-run hands them back to replay marked ``acl_pending``
        (tasks/plan.py): :meth:`create` skips them and :meth:`finish` sets their archived ACL, as
        in a run that was not interrupted. A node with any other ACL (someone else's, or one an
        administrator set) is never recognised, so never touched."""
        out = [False] * len(records)
        if not self._placeholder:
            return out  # an anonymous session never creates nodes on the placeholder
        ask: list[int] = []
        for i, r in enumerate(records):
            _, final, _ = self._choose(r)
            if final is not None and tuple(sorted(final)) != self._placeholder:
                ask.append(i)
        got = self._pipelined(
            [records[i].key for i in ask], zkwire.WireSession.get_acl, _acl_and_version,
            # gone, or not even readable to this identity: not its placeholder
            absent=(NoNodeError.code, NoAuthError.code), what="reading the ACL of",
        )
        for i, found in zip(ask, got, strict=True):
            if found is not None:
                acl, aversion = found
                out[i] = aversion == 0 and tuple(sorted(_acl_tuple(acl))) == self._placeholder
        return out

    def expected_acl(self, record: Record, source_service: str) -> Acl | None:
        """The ACL a restore through this session gives ``record``'s node (an archived record,
        its key in this target's key space), sorted; None where that depends on the target
        (an anonymous session's invented nodes take their parent's). As :meth:`prepare` and
        :meth:`_choose` decide: the archived ACL, else (redacted by the source, or no ZooKeeper
        ACL in the archive) world:anyone with ``default_acl='open'``, else the placeholder."""
        acl_meta = record.meta.get("acl") if source_service == "zookeeper" else None
        if acl_meta and not _has_redacted(acl_meta):
            return tuple(sorted(set(_acl_tuple(acl_meta))))
        if self.block.default_acl == "open":
            return WORLD_OPEN
        return self._placeholder or None

    def check_metadata(self, records: list[Record], source_service: str) -> list[str | None]:
        """Post-verify (tasks/postverify.py): for each archived record whose node holds its value,
        "acl" when the node's ACL is not the one the restore gives it (:meth:`expected_acl`), else
        None. Read as this session's identity: without ADMIN on a node ZooKeeper shows its digest
        entries as ``user:x``, and the expected ACL is compared in that form then."""
        out: list[str | None] = [None] * len(records)
        want = [self.expected_acl(r, source_service) for r in records]
        ask = [i for i, w in enumerate(want) if w is not None]
        # (a node deleted since its value was read is not an ACL question)
        acls = self._pipelined([records[i].key for i in ask], zkwire.WireSession.get_acl, zkwire.parse_acl,
                               what="reading the ACL of")
        for i, acl in zip(ask, acls, strict=True):
            if acl is None:
                continue
            got = tuple(sorted(set(_acl_tuple(acl))))
            expected = want[i]
            if _has_redacted([list(e) for e in got]):
                expected = tuple(sorted({
                    (p, s, ident.split(":", 1)[0] + ":x" if s == "digest" else ident)
                    for p, s, ident in expected  # type: ignore[union-attr]
                }))
            if got != expected:
                out[i] = "acl"
        return out

    def plan_warnings(self) -> list[str]:
        """What planning found that would make the restore fail although it writes nothing
        yet: existing nodes (the chroot's parent included) under which this session's identity
        may not create the missing keys. A dry run reports them instead of "0 conflicts"."""
        self._check_chroot_parent()
        if not self._denied_count:
            return []
        shown = ", ".join(self._denied[:5]) + (", ..." if self._denied_count > 5 else "")
        return [
            f"this session's identity lacks CREATE on {self._denied_count} existing ZooKeeper node(s) that the "
            f"restore would create keys under ({shown}): ZooKeeper would refuse those creates and the restore "
            "would stop there. Restore as an identity that holds CREATE on them (README, ZooKeeper notes)"
        ]

    def _check_chroot_parent(self) -> None:
        """When the chroot does not exist yet, whether this identity may create it."""
        chroot = (self.block.chroot or "").strip("/")
        if not chroot or not self._use_chroot:
            return
        ancestor = "/" + chroot
        try:
            if self.client.exists("/") is not None:
                return
            root = ZooKeeperSession(self.block, chroot=False)
            try:
                while ancestor != "/" and root.client.exists(ancestor) is None:
                    ancestor = ancestor.rsplit("/", 1)[0] or "/"
                acl, _ = root.client.get_acls(ancestor)
            finally:
                root.close()
        except NoAuthError:
            acl = []
        except KazooException as exc:
            raise self._wrap(exc, "/" + chroot, "reading") from None
        if not self._grants(tuple((a.perms, a.id.scheme, a.id.id) for a in acl), Permissions.CREATE):
            self._denied_count += 1
            self._denied.append(f"{ancestor} (to create the chroot /{chroot})")

    def _grants(self, acl: Acl, perm: int) -> bool:
        """Whether ``acl`` gives this session ``perm``, as far as Burrow can tell (world, its
        digest identity, its address)."""
        for perms, scheme, ident in acl:
            if not perms & perm:
                continue
            if (scheme, ident) in self._ids or (scheme, ident) in self._redacted_ids:
                return True
            if scheme == "ip" and self._ip_matches(ident):
                return True
        return False

    def _ip_matches(self, ident: str) -> bool:
        if self._local_ip is None:
            try:
                self._local_ip = ipaddress.ip_address(self._wire_session().sock.getsockname()[0])
            except (OSError, ValueError, KazooException):
                return False
        try:
            return self._local_ip in ipaddress.ip_network(ident, strict=False)
        except ValueError:
            return False

    def prepare(self, record: Record, source_service: str) -> tuple[Record, list[str]]:
        dropped: list[str] = []
        meta: dict[str, Any] = {"acl": None}
        if source_service == "zookeeper":
            acl_meta = record.meta.get("acl")
            if acl_meta and _has_redacted(acl_meta):
                # Keeping only the readable entries could leave a node nobody may write or
                # administer, and the target's default ACL (world:anyone) would leave protected
                # data the most exposed: the node goes to the restoring identity only.
                dropped.append("acl (redacted by the source)")
                meta["acl_note"] = NOTE_REDACTED
                if self.block.default_acl == "creator" and not self._identified:
                    raise AuthError(self._anonymous_refusal(display_key(record.key)))
            elif acl_meta:
                meta["acl"] = acl_meta
        else:
            dropped.extend(foreign_metadata(record.meta, source_service))
            meta["acl_note"] = NOTE_FOREIGN
        if not self._identified:
            self._track_restrictive(record.key, meta["acl"])
        return Record(record.key, record.value, meta), dropped

    def _anonymous_refusal(self, path: str) -> str:
        return (
            f"{path}: the source redacted its ACL (ZooKeeper hid the digest hashes from the backup user), so "
            "a restore gives it an ACL only the restoring identity holds, but this session to ZooKeeper at "
            f"{self.label} has no identity. {_CREDENTIALS_FIX}, or set the target block's default_acl to "
            "'open' to give such nodes world:anyone on purpose. Nothing was written"
        )

    def _track_restrictive(self, key: bytes, acl_meta: Any) -> None:
        """Anonymous planning: a node whose archived ACL lets no anonymous session create
        children, that the restore must create, and that has children to restore, is refused
        (prepare sees parents and children in any order: either may come first)."""
        parent = key.rsplit(b"/", 1)[0]
        if parent:
            if parent in self._restrictive:
                self._refuse_if_missing(parent)
            elif len(self._has_children) < _MEMORY:
                self._has_children.add(parent)
        if not acl_meta:
            return
        if acl_meta[0][1] == "world" and acl_meta[0][0] & Permissions.CREATE:
            return  # (the common case, and cheap)
        try:
            seen: tuple | None = tuple(map(tuple, acl_meta))
            ok = self._grant_seen.get(seen)
        except TypeError:
            seen = ok = None
        if ok is None:
            ok = self._grants(_acl_tuple(acl_meta), Permissions.CREATE)
            if seen is not None and len(self._grant_seen) < 10000:
                self._grant_seen[seen] = ok
        if ok:
            return
        if key in self._has_children:
            self._refuse_if_missing(key)
        elif len(self._restrictive) < _MEMORY:
            self._restrictive.add(key)

    def _refuse_if_missing(self, parent: bytes) -> None:
        self._restrictive.discard(parent)
        try:
            exists = self.client.exists(parent.decode("utf-8")) is not None
        except KazooException as exc:
            raise self._wrap(exc, display_key(parent), "reading") from None
        if not exists:
            raise AuthError(
                f"cannot restore below {display_key(parent)} into ZooKeeper at {self.label} without an "
                "identity: its archived ACL lets no anonymous session create children, and Burrow creates "
                "such a node with a temporary ACL that only the restoring identity holds, creates its "
                f"children, then sets the archived ACL. {_CREDENTIALS_FIX}. Nothing was written"
            )

    def parent_key(self, key: bytes) -> bytes | None:
        parent = key.rsplit(b"/", 1)[0]
        return parent or None

    def ensure_root(self) -> None:
        """Create the chroot when it does not exist, each missing level with the ACL of a node
        Burrow invents (restorer-only by default; the restore report lists them)."""
        chroot = self.block.chroot
        if not chroot or chroot == "/":
            return
        root = ZooKeeperSession(self.block, chroot=False)
        path = ""
        try:
            acl: Acl | None = None
            for part in chroot.strip("/").split("/"):
                parent, path = path or "/", path + "/" + part
                if root.client.exists(path) is not None:
                    continue
                if acl is None:
                    acl = self._new_node_acl(root, parent)
                try:
                    root.client.create(path, b"", acl=_kazoo_acl(acl))
                except NodeExistsError:
                    continue
                if acl is RESTORER_ONLY:
                    self._note_restricted(path, NOTE_CHROOT)
        except KazooException as exc:
            raise self._wrap(exc, path or chroot, "creating chroot") from None
        finally:
            root.close()

    def _new_node_acl(self, root: ZooKeeperSession, parent: str) -> Acl:
        if self.block.default_acl == "open":
            return WORLD_OPEN
        if self._identified:
            return RESTORER_ONLY
        got, _ = root.client.get_acls(parent)
        return tuple((a.perms, a.id.scheme, a.id.id) for a in got)

    def _choose(self, record: Record) -> tuple[Acl, Acl | None, str | None]:
        """How to create ``record``'s node: ``(ACL to create it with, archived ACL to set once
        its children exist, or None; why it gets the restorer-only ACL, or None)``."""
        meta = record.meta
        acl_meta = meta.get("acl")
        if acl_meta:
            if acl_meta == self._last_acl[0]:  # runs of nodes share one ACL: a list compare
                return self._last_acl[1]
            try:
                key: tuple | None = tuple(map(tuple, acl_meta))
                hit = self._acl_seen.get(key)  # most nodes share a handful of ACLs
            except TypeError:
                key = hit = None
            if hit is None:
                acl = _acl_tuple(acl_meta)
                if not self._identified or self._grants(acl, Permissions.CREATE):
                    hit = (acl, None, None)
                else:
                    # The archived ACL denies this identity CREATE, so no child could be created
                    # under it: the node starts restorer-only and gets its ACL in finish().
                    hit = (RESTORER_ONLY, acl, None)
                if key is not None and len(self._acl_seen) < 10000:
                    self._acl_seen[key] = hit
            if key is not None:
                self._last_acl = (acl_meta, hit)
            return hit
        if self.block.default_acl == "open":
            return _OPEN_CHOICE
        note = meta.get("acl_note")
        if note != NOTE_REDACTED and meta.get("intermediate"):
            note = NOTE_INTERMEDIATE
        if self._identified:
            return (RESTORER_ONLY, None, note or NOTE_FOREIGN)
        if note == NOTE_REDACTED:  # planning refuses this first; never fall back to a wider ACL
            raise AuthError(self._anonymous_refusal(display_key(record.key)))
        return (self._inherited(record.key), None, None)

    def _inherited(self, key: bytes) -> Acl:
        """Anonymous session: a node Burrow invents gets the ACL of the existing node it is
        created under (that ACL let this session create there; the restore opens nothing more)."""
        parent = key.rsplit(b"/", 1)[0] or b"/"
        acl = self._inherit.get(parent)
        if acl is None:
            try:
                got, _ = self.client.get_acls(parent.decode("utf-8"))
                acl = tuple((a.perms, a.id.scheme, a.id.id) for a in got)
            except NoNodeError:
                acl = _WORLD_READ  # the parent is gone: creating the node fails on that anyway
            except KazooException as exc:
                raise self._wrap(exc, display_key(parent), "reading the ACL of") from None
        self._inherit[key] = acl
        if len(self._inherit) > _MEMORY:
            self._inherit.popitem(last=False)  # the oldest: long created, never a batch in flight
        return acl

    def _note_restricted(self, path: str, why: str) -> None:
        self._restricted_count += 1
        if len(self._restricted) < REPORT_LIMIT:
            self._restricted.append(f"{path} ({why})")

    def create(self, records: list[Record]) -> list[bool]:
        if any(r.meta.get("acl_pending") for r in records):
            return self._create_resuming(records)
        results = [False] * len(records)
        window = max(1, self.block.multi_window)
        no_node, exists = NoNodeError.code, NodeExistsError.code
        inflight: deque[tuple[range, int]] = deque()
        failed: list[range] = []
        choices = [self._choose(r) for r in records]  # may refuse: before anything is sent
        # Every node a multi transaction creates has that transaction's zxid as its czxid: the
        # reply's zxid is what undo records (created_versions), with no read-back of the node.
        made_at: dict[bytes, int] = {}
        self._made_at = made_at

        def settle(batch: range, expected: int) -> None:
            frame, err, off = wire.reply()
            if not err and zkwire.created_all(frame, off, expected):
                codes: list[int | None] = []  # (the usual case: told without parsing every result)
            else:
                codes = zkwire.parse_multi(frame, off) if not err else [err] * len(batch)
            if all(code is None for code in codes):
                results[batch.start : batch.stop] = [True] * len(batch)
                made_at.update(dict.fromkeys([records[i].key for i in batch], zkwire.reply_zxid(frame)))
                return
            # 0 = rolled back, -2 = not run: only the op that failed tells why
            for i, code in zip(batch, codes, strict=False):
                if code not in (None, 0, -2, exists, no_node):
                    raise self._wrap(EXCEPTIONS[code](), display_key(records[i].key), "creating")
            failed.append(batch)

        try:
            wire = self._wire_session()
            start = 0
            # A sliding window of multi transactions: ZooKeeper applies them in order, so a
            # batch may hold the children of the batch before it.
            for size in self._batch_sizes(records):
                batch = range(start, start + size)
                start += size
                expected = wire.multi_create([(records[i].key, records[i].value, choices[i][0]) for i in batch])
                inflight.append((batch, expected))
                if len(inflight) >= window:
                    settle(*inflight.popleft())
            while inflight:
                settle(*inflight.popleft())
        except KazooException as exc:
            self._drop_wire()
            raise self._wrap(exc, display_key(records[0].key) if records else "", "creating") from None
        except BaseException:
            if inflight:
                self._drop_wire()
            raise
        # A batch hit an existing node (or a parent from an earlier failed batch): fall back
        # to one atomic create per node, in order, so the rest of it is still created.
        try:
            for batch in failed:
                for i in batch:
                    results[i] = self._create_one(records[i], choices[i][0])
        finally:
            self._note_created(records, results, choices)
        return results

    def _create_resuming(self, records: list[Record]) -> list[bool]:
        """:meth:`create` for a batch holding nodes planning found on the placeholder an interrupted
        run left (meta ``acl_pending``, see :meth:`unfinished_acls`): they exist, so they are not
        created (False); their archived ACL is queued for :meth:`finish`. The rest are created."""
        rest: list[int] = []
        for i, r in enumerate(records):
            if not r.meta.get("acl_pending"):
                rest.append(i)
                continue
            _, final, _ = self._choose(r)
            if final is not None:
                self._resumed.append((r.key.decode("utf-8"), final))
        results = [False] * len(records)
        if rest:
            for i, ok in zip(rest, self.create([records[i] for i in rest]), strict=True):
                results[i] = ok
        return results

    def _note_created(self, records: list[Record], results: list[bool], choices: list[tuple]) -> None:
        """Remember what finish() sets and the report lists: only nodes this run created."""
        for r, ok, (_, final, note) in zip(records, results, choices, strict=True):
            if not ok or (final is None and note is None):
                continue
            if final is not None:
                self._deferred.append((r.key.decode("utf-8"), final))
            else:
                self._note_restricted(display_key(r.key), note)

    def finish(self) -> dict[str, Any]:
        """Complete a restore whose creates all succeeded: set the archived ACL on the nodes
        this run created with a temporary restorer-only ACL (an archived ACL that denies this
        identity CREATE), now that their children exist, and on the nodes an interrupted run
        left on that placeholder (:meth:`unfinished_acls`). The only change Burrow makes to a
        node after creating it, and only to a node a restore created with the placeholder:
        each setACL is guarded by ACL version 0, so an ACL someone changed meanwhile is left alone.

        Returns the ACL part of the restore report: ``acl_set_after_children`` counts every
        archived ACL set, ``acl_resumed`` those of them an interrupted run had left."""
        deferred, self._deferred = self._deferred, []
        resumed, self._resumed = self._resumed, []
        applied = resumed_applied = 0
        not_applied: list[str] = []
        failures = 0
        work = deferred + resumed
        first_resumed = len(deferred)
        if work:
            window = max(1, self.block.read_window)
            try:
                wire = self._wire_session()
                for start in range(0, len(work), window):
                    chunk = work[start : start + window]
                    for path, acl in chunk:
                        wire.set_acl(path, acl, 0)
                    for n, (path, _) in enumerate(chunk):
                        _, err, _ = wire.reply()
                        if not err:
                            applied += 1
                            if start + n >= first_resumed:
                                resumed_applied += 1
                            continue
                        failures += 1
                        if len(not_applied) < REPORT_LIMIT:
                            not_applied.append(f"{display_key(path.encode('utf-8'))} ({EXCEPTIONS[err].__name__})")
            except KazooException as exc:
                self._drop_wire()
                raise self._wrap(exc, "", "setting archived ACLs") from None
            if failures:
                log.warning(
                    "%d node(s) created with a temporary restorer-only ACL kept it: their archived ACL "
                    "could not be set (listed in the restore report)", failures,
                )
        return {
            "acl_restricted": self._restricted_count,
            "acl_restricted_paths": list(self._restricted),
            "acl_set_after_children": applied,
            "acl_resumed": resumed_applied,
            "acl_not_applied": failures,
            "acl_not_applied_paths": not_applied,
        }

    def _batch_sizes(self, records: list[Record]) -> Iterator[int]:
        n = size = 0
        max_ops, max_bytes = self.block.multi_ops, self.block.multi_bytes
        for r in records:
            rsize = len(r.value) + len(r.key) + 64
            if n and (n >= max_ops or size + rsize > max_bytes):
                yield n
                n = size = 0
            n += 1
            size += rsize
        if n:
            yield n

    def acl_accepted(self, scheme: str, ident: str) -> bool:
        """Whether this server takes an ACL entry ``scheme``/``ident`` (its auth providers
        decide), asked without writing anything: a multi that creates a node below a parent
        that does not exist (ZooKeeper checks the ACL first), then checks a version the new
        node cannot have, so it rolls back even should that parent exist. (Used by the
        restore planner, tasks/plan.py, for schemes it cannot judge itself.)"""
        import uuid

        from kazoo.exceptions import InvalidACLError

        probe = f"/.burrow-acl-probe-{uuid.uuid4().hex}/p"
        txn = self.client.transaction()
        txn.create(probe, b"", acl=[ACL(Permissions.READ, Id(scheme, ident))])
        txn.check(probe, 1)
        try:
            results = txn.commit()
        except KazooException as exc:
            raise self._wrap(exc, "an ACL", "checking") from None
        return not isinstance(results[0], InvalidACLError)

    def _wire_session(self) -> zkwire.WireSession:
        """The pipelined connection for bulk reads and creates (opened on first use)."""
        if self._wire is None:
            self._wire = self._new_wire()
        return self._wire

    def _new_wire(self) -> zkwire.WireSession:
        return zkwire.WireSession(
            self.block.hosts, chroot=self.block.chroot if self._use_chroot else None, auth=self._auth,
            session_timeout=self.block.session_timeout, connect_timeout=self.block.connect_timeout,
        )

    def _drop_wire(self) -> None:
        if self._wire is not None:
            wire, self._wire = self._wire, None
            try:
                wire.sock.close()
            except OSError:
                pass

    def _create_one(self, r: Record, acl: Acl) -> bool:
        path = r.key.decode("utf-8")
        try:
            self.client.create(path, r.value, acl=_kazoo_acl(acl))
            return True
        except NodeExistsError:
            return False
        except NoNodeError:
            raise SourceError(
                f"cannot create {path} in ZooKeeper at {self.label}: its parent does not exist "
                "(deleted while restoring?)"
            ) from None
        except MarshallingError:
            raise SourceError(f"ZooKeeper at {self.label} rejected {path}: invalid ACL") from None
        except KazooException as exc:
            raise self._wrap(exc, path, "creating") from None

    def close(self) -> None:
        try:
            if self._wire is not None:
                self._wire.close()
                self._wire = None
            self.client.stop()
        finally:
            self.client.close()

    # -- capture --------------------------------------------------------------------------
    def watch(self, after: int) -> ZkWatch:
        """The tree's changes through a persistent recursive watch (a capture's feed): ZkWatch."""
        return ZkWatch(self, after)


    # -- cleanup (rehearsals) -------------------------------------------------------------
    def _delete_at_versions(self, deletes: list[tuple[int, str, int]], results: list[bool], wait: float, *,
                            gone_is_deleted: bool) -> int:
        """Delete ``(index, path, data version)`` nodes, children before their parents, setting
        ``results[index]`` for each one deleted. One multi transaction per DELETE_MULTI deletes
        (one quorum write instead of one each); if any of them would fail (changed meanwhile,
        gained a child), the multi changes nothing and those nodes are deleted one by one, each at
        its version. ``gone_is_deleted``: a node already gone counts as deleted. Returns how many
        one-by-one deletes this identity was denied (NoAuth): kept, never an error."""
        from kazoo.exceptions import BadVersionError, NotEmptyError

        denied = 0
        path = ""
        try:
            for first in range(0, len(deletes), DELETE_MULTI):
                group = deletes[first : first + DELETE_MULTI]
                txn = self.client.transaction()
                for _, deleting, version in group:  # in order: children before their parents
                    txn.delete(deleting, version=version)
                path = group[0][1]
                outcome = txn.commit_async().get(timeout=wait)
                if all(r is True for r in outcome):
                    for i, _, _ in group:
                        results[i] = True
                    continue
                for i, deleting, version in group:
                    path = deleting  # (named by the error, should this one fail)
                    try:
                        self.client.delete_async(deleting, version=version).get(timeout=wait)
                        results[i] = True
                    except NoNodeError:
                        results[i] = gone_is_deleted
                    except (BadVersionError, NotEmptyError):
                        continue
                    except NoAuthError:
                        denied += 1
        except (KazooException, KazooTimeoutError) as exc:
            raise self._wrap(exc, path, "deleting") from None
        return denied

    def delete_if_unchanged(self, records: list[Record]) -> list[bool]:
        """Delete each record's node if it still holds exactly the record's data, guarded by
        the version read just before (a node changed meanwhile is left alone). Records come
        children first; a node that has children is left alone too. True = deleted.

        Added for rehearsals (tasks/rehearse.py), which remove what they restored into a
        scratch chroot once compared: a restore itself never deletes anything."""

        results = [False] * len(records)
        window = max(1, self.block.read_window)
        wait = max(self.block.session_timeout, 1.0)
        path = ""
        try:
            for start in range(0, len(records), window):
                chunk = records[start : start + window]
                gets = [self.client.get_async(r.key.decode("utf-8")) for r in chunk]
                deletes = []
                for n, (r, pending) in enumerate(zip(chunk, gets, strict=True)):
                    path = r.key.decode("utf-8")
                    try:
                        data, stat = pending.get(timeout=wait)
                    except NoNodeError:
                        continue
                    if (data or b"") != r.value or stat.ephemeralOwner:
                        continue
                    deletes.append((start + n, path, stat.version))
                self._delete_at_versions(deletes, results, wait, gone_is_deleted=False)
        except (KazooException, KazooTimeoutError) as exc:
            raise self._wrap(exc, path, "deleting") from None
        return results

    # -- undo (version-guarded) -----------------------------------------------------------
    def created_versions(self, keys: list[bytes]) -> list[int | None]:
        """The zxid each node was created at (its ``czxid``), None where it is gone: read back
        right after a restore created them, so that ``burrow undo`` can later delete exactly
        these nodes, and only while unchanged. ``exists`` calls pipelined on the bulk wire
        connection (as :meth:`lookup`; kazoo's one call at a time cost a wake-up each), which
        need no permission on the node (an archived ACL may deny this identity READ).

        The creation zxid, not the current ``mzxid``: should a node be changed between its
        create and this read, its ``mzxid`` already differs from what is recorded, and undo
        keeps it. Nodes the last :meth:`create` made in its multi transactions need no read:
        their czxid is the zxid of the transaction's reply."""
        made_at: dict[bytes, int] = getattr(self, "_made_at", None) or {}
        if all(k in made_at for k in keys):  # all made by the last create's multi transactions
            return [made_at[k] for k in keys]
        def czxid(frame: bytes, off: int) -> int | None:
            stat = zkwire.parse_stat(frame, off)
            return None if stat[7] else int(stat[0])  # ephemeralOwner, czxid

        return self._pipelined(keys, zkwire.WireSession.exists, czxid)

    def delete_if_version(self, items: list[tuple[bytes, int]], *, dry_run: bool = False) -> list[bool]:
        """Delete each ``(key, version)`` node whose ``mzxid`` still equals ``version`` (as
        :meth:`created_versions` recorded it: unchanged since this Burrow created it). Items
        come children first. True = the node is gone (deleted now, or already absent); False =
        kept: changed since, it has children (someone added one), or this identity may not
        delete it.

        The deletes go in multi transactions of DELETE_MULTI, each node at the data version
        read with its ``mzxid`` (one quorum write per few hundred nodes); a multi that fails
        changes nothing, and its nodes are then deleted one by one, each at its version.

        ``dry_run`` deletes nothing and says what a real run would do, counting a node whose
        only children would be deleted before it as deleted (the session remembers, across
        calls, how many children of each node it judged gone)."""

        results = [False] * len(items)
        window = max(1, self.block.read_window)
        wait = max(self.block.session_timeout, 1.0)
        gone_children: dict[str, int] = self.__dict__.setdefault("_dry_run_gone", {})
        denied = 0
        path = ""
        try:
            for start in range(0, len(items), window):
                chunk = [(k.decode("utf-8"), int(v)) for k, v in items[start : start + window]]
                pending = [self.client.exists_async(p) for p, _ in chunk]
                deletes: list[tuple[int, str, int]] = []
                for n, ((path, version), asked) in enumerate(zip(chunk, pending, strict=True)):
                    stat = asked.get(timeout=wait)
                    if stat is None:
                        results[start + n] = True
                    elif stat.mzxid != version or stat.ephemeralOwner:
                        continue
                    elif dry_run:
                        if stat.numChildren - gone_children.pop(path, 0) <= 0:
                            results[start + n] = True
                            parent = path.rsplit("/", 1)[0] or "/"
                            gone_children[parent] = gone_children.get(parent, 0) + 1
                    else:
                        deletes.append((start + n, path, stat.version))
                denied += self._delete_at_versions(deletes, results, wait, gone_is_deleted=True)
        except (KazooException, KazooTimeoutError) as exc:
            raise self._wrap(exc, path, "deleting") from None
        if denied:
            log.warning("%d node(s) unchanged since they were created were kept: ZooKeeper at %s denied deleting "
                        "them (their parent's ACL)", denied, self.label)
        return results


class ZkWatch:
    """ZooKeeper's change feed for a capture (blocks/source.py ``ChangeFeed``): a persistent
    recursive watch (``addWatch``, ZooKeeper 3.6+) on the root, on a wire connection of its own.

    Each notification is followed by a read of the node (getData and getACL, pipelined), and
    the node is recorded as that read found it, with its ``mzxid``: writes to one node between
    two reads collapse into the value read. A node gone when read is a delete; ephemeral nodes
    and excluded subtrees are skipped, as a backup skips them. Positions are the zxid of each
    read's reply (ZooKeeper's last zxid when it answered): they only grow.

    The watch does not fire on setACL (a changed ACL reaches the chain with the node's next
    change, or the next full backup), and a connection that was lost has missed notifications:
    so every (re)connection starts with a resync, a walk of the whole tree (the state at that
    moment), recorded as such. The watch is added before the walk, so nothing between the two
    is missed. The walk is handed on in pieces of about RESYNC_PIECE bytes as it goes (never
    the whole tree in memory); its keys all stand at the zxid the watch was added at, and the
    last piece carries the zxid after the walk."""

    RECONNECT_FOR = 120.0  # seconds a capture keeps trying to reconnect before it gives up
    RESYNC_PIECE = 1024 * 1024  # bytes of a resync handed on at once
    PING_EVERY = 1.0  # seconds between pings of an idle capture: its progress reports (their answers)

    def __init__(self, session: ZooKeeperSession, after: int) -> None:
        self.session = session
        self.floor = after
        self._closed = False
        excluded = [e.rstrip("/") for e in session.block.exclude if e and e != "/"]
        self._excluded = excluded

    def request_progress(self) -> None:
        return None  # every read reports its zxid

    def close(self) -> None:
        self._closed = True

    def _skip(self, path: str) -> bool:
        return path == "/" or any(path == e or path.startswith(e + "/") for e in self._excluded)

    def __iter__(self) -> Iterator[ChangeBatch]:
        lost_since: float | None = None
        while not self._closed:
            try:
                for batch in self._follow():
                    lost_since = None
                    yield batch
            except (ConnectionLoss, SessionExpiredError, OSError, SourceUnavailable) as exc:
                if self._closed:
                    return
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > self.RECONNECT_FOR:
                    raise SourceUnavailable(f"lost ZooKeeper at {self.session.label} for more than "
                                            f"{self.RECONNECT_FOR:g}s while capturing ({type(exc).__name__})") from None
                time.sleep(1.0)

    def _follow(self) -> Iterator[ChangeBatch]:
        s = self.session
        wire = s._new_wire()
        try:
            wire.add_watch("/", zkwire.PERSISTENT_RECURSIVE)
            frame, err, _ = wire.reply()
            if err:
                raise SourceError(f"ZooKeeper at {s.label} refused the capture's watch (addWatch needs ZooKeeper "
                                  f"3.6 or later): {EXCEPTIONS[err].__name__}")
            start = max(zkwire.reply_zxid(frame), self.floor + 1)
            self.floor = start
            piece: list[tuple[str, bytes, bytes, int, dict[str, Any]]] = []
            size, continued = 0, False
            walker = ZooKeeperSession(s.block)  # a session of its own: the last one may have died with the server
            try:
                for r in walker.walk(b"/", WalkStats()):
                    piece.append(("put", r.key, r.value, start, r.meta))
                    size += len(r.key) + len(r.value) + 64
                    if size >= self.RESYNC_PIECE:
                        yield ChangeBatch(piece, start, resync=True, more=True, continued=continued)
                        piece, size, continued = [], 0, True
            finally:
                walker.close()
            wire.exists("/")
            frame, _, _ = wire.reply()
            pos = max(zkwire.reply_zxid(frame), self.floor)
            self.floor = pos
            yield ChangeBatch(piece, pos, resync=True, continued=continued)
            # Progress is reported only when the server answers a ping (every notification due
            # until then has arrived before the answer), never because a wait ran out: a
            # connection that went silent without closing reports nothing, and one that stays
            # silent longer than the session timeout is lost (a reconnection, a resync).
            every = min(self.PING_EVERY, s.block.session_timeout / 3)
            answered, heard = wire.answered, time.monotonic()
            wire.ping()
            last_ping = heard
            while not self._closed:
                event = wire.next_event(every)
                now = time.monotonic()
                fresh = wire.answered != answered
                if fresh:
                    answered, heard = wire.answered, now
                elif now - heard > s.block.session_timeout:
                    raise ConnectionLoss(f"ZooKeeper at {s.label} answered no ping for {now - heard:.0f}s")
                if now - last_ping >= every:
                    wire.ping()
                    last_ping = now
                if event is None:
                    if fresh:
                        yield ChangeBatch([], self.floor, progress=True)
                    continue
                paths = [event[1]]
                while len(paths) < 1000 and (more := wire.next_event(0)) is not None:
                    paths.append(more[1])
                yield self._read(wire, list(dict.fromkeys(p for p in paths if not self._skip(p))))
        finally:
            wire.close()

    def _read(self, wire: zkwire.WireSession, paths: list[str]) -> ChangeBatch:
        """Read each notified node (data, then ACL): a put as found, a delete when gone."""
        for p in paths:
            wire.get_data(p)
            wire.get_acl(p)
        changes: list[tuple[str, bytes, bytes, int, dict[str, Any]]] = []
        no_node = NoNodeError.code
        for p in paths:
            dframe, derr, doff = wire.reply()
            aframe, aerr, aoff = wire.reply()
            pos = max(zkwire.reply_zxid(dframe), zkwire.reply_zxid(aframe), self.floor)
            self.floor = pos
            if no_node in (derr, aerr):
                changes.append(("del", p.encode("utf-8"), b"", pos, {}))
                continue
            if derr or aerr:
                raise EXCEPTIONS[derr or aerr]()
            data, stat = zkwire.parse_data(dframe, doff)
            if stat[zkwire.EPHEMERAL_OWNER]:
                continue
            meta: dict[str, Any] = {
                "acl": zkwire.parse_acl(aframe, aoff), "ctime": stat[2], "mtime": stat[3], "version": stat[4],
                "czxid": stat[0], "mzxid": stat[1], "pzxid": stat[10],
            }
            if any(e[1] == "digest" and e[2].endswith(":x") for e in meta["acl"]):
                meta["acl_redacted"] = True
            changes.append(("put", p.encode("utf-8"), data, pos, meta))
        return ChangeBatch(changes, self.floor)
