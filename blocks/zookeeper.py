"""ZooKeeper as a source and restore target, through kazoo.

Reads are pipelined: up to ``read_window`` getData/getACL requests are in flight, and
get_children is only asked of nodes whose stat says they have children. Restores create
missing nodes with multi transactions, several in flight at once. The bulk traffic goes
through a second, pipelined connection (blocks/zkwire.py); kazoo opens the session,
reports connection and auth trouble, and does the single creates of the fallback path.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from collections import deque
from collections.abc import Iterator
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
from kazoo.retry import KazooRetry
from kazoo.security import ACL, OPEN_ACL_UNSAFE, Id, Permissions
from pydantic import Field, SecretStr

from blocks import zkwire
from blocks.source import SourceBlock, WalkStats
from burrow.errors import AuthError, SourceError, SourceUnavailable
from burrow.paths import foreign_metadata
from burrow.records import Record, display_key

log = logging.getLogger("burrow.zookeeper")

READ_BYTES_IN_FLIGHT = 64 * 1024 * 1024  # a walk asks for fewer nodes at once when values are big

_TRANSIENT = (ConnectionLoss, SessionExpiredError, OperationTimeoutError, KazooTimeoutError)


def _has_redacted(acl: list[list[Any]]) -> bool:
    # ZooKeeper hides digest hashes from readers without ADMIN: "user:x" instead of "user:<hash>".
    for entry in acl:
        if entry[1] == "digest" and str(entry[2]).endswith(":x"):
            return True
    return False


#: Digest credentials for a session whose block (or URL) names none: never in a URL or parameter.
ENV_USER = "BURROW_ZK_USER"
ENV_PASSWORD = "BURROW_ZK_PASSWORD"


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
    default_acl: Literal["open", "creator"] = Field(
        default="open", description="ACL for nodes whose archived ACL cannot be used (redacted, foreign)"
    )

    def describe(self) -> str:
        chroot = self.chroot.rstrip("/") if self.chroot and self.chroot != "/" else ""
        return f"zk://{','.join(self.hosts)}{chroot}"

    def connect(self) -> ZooKeeperSession:
        return ZooKeeperSession(self)


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
        try:
            with warnings.catch_warnings():
                # restoring into a chroot that does not exist yet is fine: ensure_root creates it
                warnings.filterwarnings("ignore", message="No chroot path exists")
                self.client.start(timeout=block.connect_timeout)
        except KazooTimeoutError:
            self.client.close()
            raise SourceUnavailable(
                f"cannot connect to ZooKeeper at {self.label} within {block.connect_timeout:g}s"
            ) from None
        except KazooException as exc:
            self.client.close()
            raise AuthError(f"ZooKeeper at {self.label} refused the session: {type(exc).__name__}") from None
        self._default_acl = (
            list(OPEN_ACL_UNSAFE) if block.default_acl == "open" else [ACL(Permissions.ALL, Id("auth", ""))]
        )
        self._default_acl_tuples = tuple((a.perms, a.id.scheme, a.id.id) for a in self._default_acl)
        self._acl_seen: dict[tuple, tuple[tuple[int, str, str], ...]] = {}

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
                                "nodes; those ACLs cannot be restored verbatim and will get the target's default ACL"
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
        out: list[bytes | None] = []
        window = max(1, self.block.read_window)
        no_node = NoNodeError.code
        try:
            wire = self._wire_session()
            for start in range(0, len(keys), window):
                chunk = keys[start : start + window]
                for key in chunk:
                    wire.get_data(key.decode("utf-8"))
                for key in chunk:
                    frame, err, off = wire.reply()
                    if err == no_node:
                        out.append(None)
                    elif err:
                        raise self._wrap(EXCEPTIONS[err](), display_key(key), "reading")
                    else:
                        out.append(zkwire.parse_data(frame, off)[0])
        except KazooException as exc:
            self._drop_wire()
            raise self._wrap(exc, display_key(keys[0]) if keys else "", "reading") from None
        return out

    def prepare(self, record: Record, source_service: str) -> tuple[Record, list[str]]:
        dropped: list[str] = []
        acl_meta = record.meta.get("acl") if source_service == "zookeeper" else None
        if acl_meta and _has_redacted(acl_meta):
            # Keeping only the readable entries could leave a node nobody may write or
            # administer: the whole ACL gives way to the target's default ACL.
            dropped.append("acl (redacted by the source)")
            acl_meta = None
        if source_service != "zookeeper":
            dropped.extend(foreign_metadata(record.meta, source_service))
        return Record(record.key, record.value, {"acl": acl_meta or None}), dropped

    def _acl(self, record: Record) -> list[ACL]:
        meta = record.meta.get("acl")
        if not meta:
            return self._default_acl
        return [ACL(int(p), Id(str(s), str(i))) for p, s, i in meta]

    def parent_key(self, key: bytes) -> bytes | None:
        parent = key.rsplit(b"/", 1)[0]
        return parent or None

    def ensure_root(self) -> None:
        chroot = self.block.chroot
        if not chroot or chroot == "/":
            return
        root = ZooKeeperSession(self.block, chroot=False)
        try:
            root.client.ensure_path("/" + chroot.strip("/"))
        except KazooException as exc:
            raise self._wrap(exc, chroot, "creating chroot") from None
        finally:
            root.close()

    def create(self, records: list[Record]) -> list[bool]:
        results = [False] * len(records)
        window = max(1, self.block.multi_window)
        no_node, exists = NoNodeError.code, NodeExistsError.code
        inflight: deque[range] = deque()
        failed: list[range] = []

        def settle(batch: range) -> None:
            frame, err, off = wire.reply()
            codes = zkwire.parse_multi(frame, off) if not err else [err] * len(batch)
            if all(code is None for code in codes):
                for i in batch:
                    results[i] = True
                return
            # 0 = rolled back, -2 = not run: only the op that failed tells why
            for i, code in zip(batch, codes, strict=False):
                if code not in (None, 0, -2, exists, no_node):
                    raise self._wrap(EXCEPTIONS[code](), display_key(records[i].key), "creating")
            failed.append(batch)

        try:
            wire = self._wire_session()
            acl_of = self._acl_tuples
            start = 0
            # A sliding window of multi transactions: ZooKeeper applies them in order, so a
            # batch may hold the children of the batch before it.
            for size in self._batch_sizes(records):
                batch = range(start, start + size)
                start += size
                wire.multi_create([(records[i].key.decode("utf-8"), records[i].value, acl_of(records[i])) for i in batch])
                inflight.append(batch)
                if len(inflight) >= window:
                    settle(inflight.popleft())
            while inflight:
                settle(inflight.popleft())
        except KazooException as exc:
            self._drop_wire()
            raise self._wrap(exc, display_key(records[0].key) if records else "", "creating") from None
        except BaseException:
            if inflight:
                self._drop_wire()
            raise
        # A batch hit an existing node (or a parent from an earlier failed batch): fall back
        # to one atomic create per node, in order, so the rest of it is still created.
        for batch in failed:
            for i in batch:
                results[i] = self._create_one(records[i])
        return results

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

    def _acl_tuples(self, record: Record) -> tuple[tuple[int, str, str], ...]:
        meta = record.meta.get("acl")
        if not meta:
            return self._default_acl_tuples
        try:
            key: tuple | None = tuple(map(tuple, meta))
            hit = self._acl_seen.get(key)  # most nodes share a handful of ACLs
        except TypeError:
            key = hit = None
        if hit is not None:
            return hit
        acl = tuple((int(p), str(s), str(i)) for p, s, i in meta)
        if key is not None and len(self._acl_seen) < 10000:
            self._acl_seen[key] = acl
        return acl

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

    def _create_one(self, r: Record) -> bool:
        path = r.key.decode("utf-8")
        try:
            self.client.create(path, r.value, acl=self._acl(r))
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

