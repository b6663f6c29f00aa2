"""ZooKeeper as a source and restore target, through kazoo.

Reads are pipelined: up to ``read_window`` async get/getACL requests are in flight, and
get_children is only asked of nodes whose stat says they have children. Restores create
missing nodes with multi transactions, several in flight at once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from kazoo.client import KazooClient
from kazoo.exceptions import (
    ConnectionLoss,
    KazooException,
    MarshallingError,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    OperationTimeoutError,
    RolledBackError,
    RuntimeInconsistency,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry
from kazoo.security import ACL, OPEN_ACL_UNSAFE, Id, Permissions
from pydantic import Field, SecretStr

from blocks.source import SourceBlock, WalkStats
from burrow.errors import AuthError, SourceError, SourceUnavailable
from burrow.records import Record, display_key

log = logging.getLogger("burrow.zookeeper")

_TRANSIENT = (ConnectionLoss, SessionExpiredError, OperationTimeoutError, KazooTimeoutError)


def _acl_to_meta(acls: list[ACL]) -> list[list[Any]]:
    return [[a.perms, a.id.scheme, a.id.id] for a in acls]


def _is_redacted(entry: list[Any]) -> bool:
    # ZooKeeper hides digest hashes from readers without ADMIN: "user:x" instead of "user:<hash>".
    return entry[1] == "digest" and str(entry[2]).endswith(":x")


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
    multi_ops: int = Field(default=200, description="Creates per multi transaction")
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
        auth = None
        if block.digest_user:
            password = block.digest_password.get_secret_value() if block.digest_password else ""
            auth = [("digest", f"{block.digest_user}:{password}")]
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
        try:
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

    # -- errors -------------------------------------------------------------------------
    def _wrap(self, exc: BaseException, path: str, action: str) -> Exception:
        if isinstance(exc, _TRANSIENT):
            return SourceUnavailable(f"lost the connection to ZooKeeper at {self.label} while {action} {path}")
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
        inflight: deque[tuple[str, str, Any, Any]] = deque()
        try:
            if root_s == "/":
                stat = c.exists("/")
                max_zxid = max(stat.mzxid, stat.pzxid) if stat else 0
                inflight.append(("children", "/", c.get_children_async("/"), None))
            else:
                if c.exists(root_s) is None:
                    raise SourceError(f"path {root_s} does not exist in ZooKeeper at {self.label}")
                stack.append(root_s)
        except KazooException as exc:
            if isinstance(exc, SourceError):
                raise
            raise self._wrap(exc, root_s, "reading") from None
        window = max(1, self.block.read_window)
        while stack or inflight:
            while stack and len(inflight) < window:
                p = stack.pop()
                if is_excluded(p):
                    stats.skipped_excluded += 1
                    continue
                inflight.append(("node", p, c.get_async(p), c.get_acls_async(p)))
            kind, p, first, second = inflight.popleft()
            try:
                if kind == "children":
                    for child in sorted(first.get(), reverse=True):
                        stack.append(_join(p, child))
                    continue
                data, stat = first.get()
                acls, _ = second.get()
            except NoNodeError:
                stats.vanished += 1  # deleted while we walked: not part of the backup
                continue
            except KazooException as exc:
                raise self._wrap(exc, p, "reading") from None
            if stat.ephemeralOwner:
                stats.skipped_ephemeral += 1
                continue
            acl = _acl_to_meta(acls)
            meta: dict[str, Any] = {
                "acl": acl,
                "ctime": stat.ctime,
                "mtime": stat.mtime,
                "version": stat.version,
                "czxid": stat.czxid,
                "mzxid": stat.mzxid,
                "pzxid": stat.pzxid,
            }
            if any(_is_redacted(e) for e in acl):
                meta["acl_redacted"] = True
                stats.redacted_acls += 1
                stats.warn(
                    "ZooKeeper redacted digest ACLs (user:x) because the reader lacks ADMIN on some nodes; "
                    "those ACLs cannot be restored verbatim and will get the target's default ACL"
                )
            max_zxid = max(max_zxid, stat.czxid, stat.mzxid, stat.pzxid)
            stats.info["max_zxid"] = max_zxid
            yield Record(p.encode("utf-8"), data or b"", meta)
            if stat.numChildren > 0:
                inflight.append(("children", p, c.get_children_async(p), None))
        stats.info["max_zxid"] = max_zxid

    # -- restore ------------------------------------------------------------------------
    def lookup(self, keys: list[bytes]) -> list[bytes | None]:
        c = self.client
        out: list[bytes | None] = []
        window = max(1, self.block.read_window)
        for start in range(0, len(keys), window):
            chunk = keys[start : start + window]
            pending = [(k, c.get_async(k.decode("utf-8"))) for k in chunk]
            for k, res in pending:
                try:
                    data, _ = res.get()
                    out.append(data or b"")
                except NoNodeError:
                    out.append(None)
                except KazooException as exc:
                    raise self._wrap(exc, display_key(k), "reading") from None
        return out

    def prepare(self, record: Record, source_service: str) -> tuple[Record, list[str]]:
        dropped: list[str] = []
        acl_meta = record.meta.get("acl") if source_service == "zookeeper" else None
        if acl_meta and any(_is_redacted(e) for e in acl_meta):
            # Keeping only the readable entries could leave a node nobody may write or
            # administer: the whole ACL gives way to the target's default ACL.
            dropped.append("acl (redacted by the source)")
            acl_meta = None
        if source_service != "zookeeper":
            dropped.extend(_foreign_meta(record.meta))
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

    def _batches(self, records: list[Record]) -> list[list[Record]]:
        batches: list[list[Record]] = []
        cur: list[Record] = []
        size = 0
        for r in records:
            rsize = len(r.value) + len(r.key) + 64
            if cur and (len(cur) >= self.block.multi_ops or size + rsize > self.block.multi_bytes):
                batches.append(cur)
                cur, size = [], 0
            cur.append(r)
            size += rsize
        if cur:
            batches.append(cur)
        return batches

    def create(self, records: list[Record]) -> list[bool]:
        c = self.client
        results: dict[int, bool] = {}
        index = {id(r): i for i, r in enumerate(records)}
        batches = self._batches(records)
        window = max(1, self.block.multi_window)
        failed: list[list[Record]] = []
        for start in range(0, len(batches), window):
            group = batches[start : start + window]
            pending = []
            for batch in group:
                if len(batch) == 1:
                    pending.append((batch, None))  # single creates go the simple way below
                    continue
                t = c.transaction()
                for r in batch:
                    t.create(r.key.decode("utf-8"), r.value, acl=self._acl(r))
                pending.append((batch, t.commit_async()))
            for batch, res in pending:
                if res is None:
                    failed.append(batch)
                    continue
                try:
                    outcome = res.get()
                except KazooException as exc:
                    raise self._wrap(exc, display_key(batch[0].key), "creating") from None
                errors = [o for o in outcome if isinstance(o, Exception)]
                if not errors:
                    for r in batch:
                        results[index[id(r)]] = True
                    continue
                real = [e for e in errors if not isinstance(e, (RolledBackError, RuntimeInconsistency))]
                if any(not isinstance(e, (NodeExistsError, NoNodeError)) for e in real):
                    bad = next(
                        (r, e)
                        for r, e in zip(batch, outcome, strict=False)
                        if isinstance(e, Exception) and not isinstance(e, (RolledBackError, RuntimeInconsistency))
                    )
                    raise self._wrap(bad[1], display_key(bad[0].key), "creating")
                failed.append(batch)
            # A batch hit an existing node (or a parent from an earlier failed batch):
            # fall back to one atomic create per node, in order, so the rest are still created.
            for batch in failed:
                for r in batch:
                    results[index[id(r)]] = self._create_one(r)
            failed = []
        return [results[i] for i in range(len(records))]

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
            self.client.stop()
        finally:
            self.client.close()


def _foreign_meta(meta: dict[str, Any]) -> list[str]:
    """Names of another service's metadata that ZooKeeper cannot hold."""
    dropped = []
    if meta.get("flags"):
        dropped.append("flags")
    if meta.get("session"):
        dropped.append("session")
    if meta.get("lease") or meta.get("ttl"):
        dropped.append("lease")
    return dropped
