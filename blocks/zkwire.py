"""A minimal, single-threaded ZooKeeper client connection for bulk work: pipelined reads
(getData, getACL, getChildren), multi creates and pipelined setACL.

Why not kazoo for these: kazoo runs every request through its I/O thread, with a select(),
a wake-up write and a condition variable per request, which caps a walk at a few thousand
nodes per second. Here many requests go out in one send and replies are parsed straight
from a receive buffer, in order, by the caller's thread. Kazoo still does everything else
(the session Burrow reports errors on, single creates, ensure_path) and this module reuses
its wire serialization and exception classes.

ZooKeeper answers the requests of one session strictly in order, so a reply belongs to the
oldest outstanding request. Errors come back as kazoo exception instances/classes.
"""

from __future__ import annotations

import selectors
import socket
import struct
import time
from collections import deque
from typing import Any

from kazoo.exceptions import AuthFailedError, ConnectionLoss, SessionExpiredError
from kazoo.protocol.serialization import Connect

_INT = struct.Struct("!i")
_REPLY = struct.Struct("!iqi")  # xid, zxid, err
_REQ = struct.Struct("!iii")  # length, xid, type
_STAT = struct.Struct("!qqqqiiiqiiq")
_MULTI = struct.Struct("!iBi")  # type, done, err
_CREATE_HEAD = struct.Struct("!iBii")  # a multi's create op (type, done, err) and its path's length
STAT_SIZE = _STAT.size

OP_CREATE, OP_GETDATA, OP_GETACL, OP_SETACL, OP_GETCHILDREN, OP_MULTI, OP_CLOSE, OP_AUTH = 1, 4, 6, 7, 8, 14, -11, 100
OP_MULTI_READ = 22  # ZooKeeper 3.6+: many getData/getChildren in one request
OP_EXISTS = 3  # needs no permission on the node; the reply is its Stat
OP_ADD_WATCH, OP_PING = 106, 11  # ZooKeeper 3.6+: addWatch; a ping (xid -2) keeps an idle session alive
PERSISTENT, PERSISTENT_RECURSIVE = 0, 1  # addWatch modes
WATCH_XID, PING_XID = -1, -2
#: Watch event types (a persistent recursive watch sends the first three, for every node below it).
NODE_CREATED, NODE_DELETED, NODE_DATA_CHANGED, NODE_CHILDREN_CHANGED = 1, 2, 3, 4
AUTH_XID = -4
NO_WATCH = b"\x00"
RECV_SIZE = 1 << 18
MAX_FRAME = 1 << 30

#: Stat tuple indexes Burrow reads (ZooKeeper's field order: czxid, mzxid, ctime, mtime, version,
#: cversion, aversion, ephemeralOwner, dataLength, numChildren, pzxid).
VERSION, EPHEMERAL_OWNER, NUM_CHILDREN = 4, 7, 9


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return _INT.pack(len(b)) + b


def _buffer(b: bytes | None) -> bytes:
    return _INT.pack(-1) if b is None else _INT.pack(len(b)) + b


def _acl_bytes(acl: tuple[tuple[int, str, str], ...]) -> bytes:
    """An ACL vector on the wire: ``((perms, scheme, id), ...)``."""
    return _INT.pack(len(acl)) + b"".join(_INT.pack(perms) + _string(scheme) + _string(ident) for perms, scheme, ident in acl)


class WireSession:
    """One ZooKeeper session on a raw socket. Not thread-safe; use from one thread."""

    def __init__(
        self,
        hosts: list[str],
        *,
        chroot: str | None = None,
        auth: list[tuple[str, str]] | None = None,
        session_timeout: float = 15.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.prefix = "/" + chroot.strip("/") if chroot and chroot.strip("/") else ""
        self.timeout = session_timeout
        self._xid = 0
        self._expect: deque[int] = deque()
        self._out = bytearray()
        self._buf = bytearray()
        self._pos = 0
        self._acl_cache: dict[tuple, bytes] = {}
        #: Watch notifications that arrived among replies, kept when not None (a capture's
        #: connection: :meth:`add_watch`, :meth:`next_event`); otherwise they are skipped.
        self.watch_events: deque[bytes] | None = None
        #: Ping replies received: ZooKeeper answers a session's requests in order and sends the
        #: notifications of changes made before a request ahead of its reply, so each answer to a
        #: :meth:`ping` says every notification due until it was sent has arrived.
        self.answered = 0
        self.sock = self._connect(hosts, connect_timeout, session_timeout)
        try:
            for scheme, credential in auth or []:
                body = _INT.pack(0) + _string(scheme) + _buffer(credential.encode("utf-8"))
                self._out += _REQ.pack(8 + len(body), AUTH_XID, OP_AUTH) + body
                self._expect.append(AUTH_XID)
                self.flush()
                _, err, _ = self.reply()
                if err:
                    raise AuthFailedError()
        except BaseException:
            self.sock.close()
            raise

    # -- connection ---------------------------------------------------------------------
    def _connect(self, hosts: list[str], connect_timeout: float, session_timeout: float) -> socket.socket:
        last: BaseException | None = None
        deadline = time.monotonic() + connect_timeout
        for hostport in hosts:
            host, _, port = hostport.rpartition(":")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                sock = socket.create_connection((host.strip("[]"), int(port)), timeout=left)
            except OSError as exc:
                last = exc
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                request = bytes(Connect(0, 0, int(session_timeout * 1000), 0, b"\x00" * 16, False).serialize())
                sock.sendall(_INT.pack(len(request)) + request)
                self.sock = sock
                frame = self._frame()
                response, _ = Connect.deserialize(frame, 0)
                if response.time_out <= 0:
                    raise SessionExpiredError()
                sock.settimeout(session_timeout)
                return sock
            except (OSError, ConnectionLoss, SessionExpiredError) as exc:
                sock.close()
                last = exc
        raise ConnectionLoss(f"cannot open a session: {type(last).__name__ if last else 'timeout'}")

    def close(self) -> None:
        """End the session politely (so the server frees it now), then close the socket."""
        try:
            self._xid += 1
            self.sock.settimeout(1.0)
            self.sock.sendall(bytes(self._out) + _REQ.pack(8, self._xid, OP_CLOSE))
        except OSError:
            pass
        finally:
            self._out.clear()
            self.sock.close()

    # -- sending ------------------------------------------------------------------------
    def _queue(self, op: int, body: bytes) -> None:
        self._xid = (self._xid % 0x7FFFFFF0) + 1
        self._out += _REQ.pack(8 + len(body), self._xid, op)
        self._out += body
        self._expect.append(self._xid)

    @property
    def outstanding(self) -> int:
        return len(self._expect)

    def _path(self, path: str) -> str:
        if not self.prefix:
            return path
        return self.prefix if path == "/" else self.prefix + path

    def get_data(self, path: str) -> None:
        self._queue(OP_GETDATA, _string(self._path(path)) + NO_WATCH)

    def get_acl(self, path: str) -> None:
        self._queue(OP_GETACL, _string(self._path(path)))

    def exists(self, path: str) -> None:
        """Queue an exists (no watch): its reply body is the node's Stat (:func:`parse_stat`)."""
        self._queue(OP_EXISTS, _string(self._path(path)) + NO_WATCH)

    def get_children(self, path: str) -> None:
        self._queue(OP_GETCHILDREN, _string(self._path(path)) + NO_WATCH)

    def set_acl(self, path: str, acl: tuple[tuple[int, str, str], ...], version: int) -> None:
        """Queue a setACL, applied only while the node's ACL version (aversion) is ``version``."""
        self._queue(OP_SETACL, _string(self._path(path)) + _acl_bytes(acl) + _INT.pack(version))

    def multi_read(self, op: int, paths: list[str]) -> None:
        """Queue one multiRead of getData (``op=OP_GETDATA``) or getChildren ops."""
        head = _MULTI.pack(op, 0, -1)
        path = self._path
        parts = [head + _string(path(p)) + NO_WATCH for p in paths]
        parts.append(_MULTI.pack(-1, 1, -1))
        self._queue(OP_MULTI_READ, b"".join(parts))

    def multi_create(self, ops: list[tuple[bytes, bytes, tuple[tuple[int, str, str], ...]]]) -> int:
        """Queue one multi transaction creating ``(path, data, ((perms, scheme, id), ...))``
        (``path``: the node's path as UTF-8 bytes, below the chroot). Returns the length of the
        reply frame should every create succeed (:func:`created_all`)."""
        parts: list[bytes] = []
        add = parts.extend
        head, length = _CREATE_HEAD.pack, _INT.pack
        prefix = self.prefix.encode("utf-8")
        acl_cache = self._acl_cache
        paths = 0
        for path, data, acl in ops:
            tail = acl_cache.get(acl)  # the ACL vector and the flags (0: a persistent node)
            if tail is None:
                tail = _acl_bytes(acl) + b"\x00\x00\x00\x00"
                if len(acl_cache) < 10000:
                    acl_cache[acl] = tail
            if prefix:
                path = prefix + path
            paths += len(path)
            add((head(OP_CREATE, 0, -1, len(path)), path, length(len(data)), data, tail))
        parts.append(_MULTI.pack(-1, 1, -1))
        self._queue(OP_MULTI, b"".join(parts))
        # reply header, then per create its result (type, done, err) and the path created, then the end mark
        return _REPLY.size + len(ops) * (_CREATE_HEAD.size) + paths + _MULTI.size

    def flush(self) -> None:
        """Send everything queued. Replies that arrive meanwhile are buffered, so a full
        pipeline in both directions cannot deadlock."""
        out = self._out
        if not out:
            return
        view = memoryview(out)
        sent = 0
        sock = self.sock
        try:
            sock.setblocking(False)
            while sent < len(view):
                try:
                    sent += sock.send(view[sent:])
                    continue
                except BlockingIOError:
                    pass
                with selectors.DefaultSelector() as sel:
                    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
                    ready = sel.select(self.timeout)
                if not ready:
                    raise ConnectionLoss("timed out sending to ZooKeeper")
                if ready[0][1] & selectors.EVENT_READ:
                    chunk = sock.recv(RECV_SIZE)
                    if not chunk:
                        raise ConnectionLoss("ZooKeeper closed the connection")
                    self._buf += chunk
        except OSError as exc:
            raise ConnectionLoss(f"socket error: {type(exc).__name__}") from None
        finally:
            view.release()
            out.clear()
            try:
                sock.settimeout(self.timeout)
            except OSError:
                pass

    # -- receiving ----------------------------------------------------------------------
    def _frame(self) -> bytes:
        buf = self._buf
        while True:
            pos = self._pos
            avail = len(buf) - pos
            if avail >= 4:
                n = _INT.unpack_from(buf, pos)[0]
                if not 0 <= n <= MAX_FRAME:
                    raise ConnectionLoss(f"malformed reply from ZooKeeper (frame length {n})")
                if avail >= 4 + n:
                    self._pos = pos + 4 + n
                    return bytes(buf[pos + 4 : pos + 4 + n])
            if pos:
                del buf[:pos]
                self._pos = 0
            try:
                chunk = self.sock.recv(RECV_SIZE)
            except TimeoutError:
                raise ConnectionLoss("ZooKeeper did not answer in time") from None
            except OSError as exc:
                raise ConnectionLoss(f"socket error: {type(exc).__name__}") from None
            if not chunk:
                raise ConnectionLoss("ZooKeeper closed the connection")
            buf += chunk

    def reply(self) -> tuple[bytes, int, int]:
        """The next reply: ``(frame, err, offset of the body)``. ``err`` is 0 or a ZooKeeper
        error code (kazoo's ``EXCEPTIONS`` maps it to an exception)."""
        if self._out:
            self.flush()
        expected = self._expect.popleft()
        while True:
            frame = self._frame()
            xid, _zxid, err = _REPLY.unpack_from(frame, 0)
            if xid == expected:
                return frame, err, _REPLY.size
            if xid in (-1, -2):  # a watch event or ping reply: not ours
                if xid == WATCH_XID and self.watch_events is not None:
                    self.watch_events.append(frame)
                elif xid == PING_XID:
                    self.answered += 1
                continue
            raise ConnectionLoss(f"reply out of order (xid {xid}, expected {expected})")


    # -- watches (capture) -------------------------------------------------------------
    def add_watch(self, path: str, mode: int = PERSISTENT_RECURSIVE) -> None:
        """Queue an addWatch (ZooKeeper 3.6+): with PERSISTENT_RECURSIVE, every create, delete
        and data change of ``path`` and every node below it is notified until the session ends
        (not setACL, and not while disconnected: a new session must resync). Notifications are
        kept from now on (:meth:`next_event`)."""
        if self.watch_events is None:
            self.watch_events = deque()
        self._queue(OP_ADD_WATCH, _string(self._path(path)) + _INT.pack(mode))

    def ping(self) -> None:
        """Send a ping: keeps a session that only waits for events alive; its reply is counted
        in :attr:`answered`, not returned."""
        self._out += _REQ.pack(8, PING_XID, OP_PING)
        self.flush()

    def next_event(self, timeout: float) -> tuple[int, str] | None:
        """The next watch notification as ``(event type, path below the chroot)``, or None when
        none arrived within ``timeout`` seconds. Call with no request outstanding."""
        if self.watch_events is None:
            self.watch_events = deque()
        while not self.watch_events:
            if self._pos + 4 > len(self._buf) or self._pos + 4 + _INT.unpack_from(self._buf, self._pos)[0] > len(self._buf):
                with selectors.DefaultSelector() as sel:
                    sel.register(self.sock, selectors.EVENT_READ)
                    if not sel.select(timeout):
                        return None
            frame = self._frame()
            xid = _REPLY.unpack_from(frame, 0)[0]
            if xid == WATCH_XID:
                self.watch_events.append(frame)
            elif xid == PING_XID:
                self.answered += 1
            else:
                raise ConnectionLoss(f"reply out of order (xid {xid}, no request outstanding)")
        return parse_watch_event(self.watch_events.popleft(), self.prefix)


# -- reply parsers -------------------------------------------------------------------------


def parse_watch_event(frame: bytes, prefix: str = "") -> tuple[int, str]:
    """A notification's ``(type, path)`` (WatcherEvent: type, state, path), the chroot cut off."""
    kind = _INT.unpack_from(frame, _REPLY.size)[0]
    n = _INT.unpack_from(frame, _REPLY.size + 8)[0]
    path = frame[_REPLY.size + 12 : _REPLY.size + 12 + max(n, 0)].decode("utf-8")
    if prefix:
        path = (path[len(prefix):] or "/") if path == prefix or path.startswith(prefix + "/") else path
    return kind, path


def parse_data(frame: bytes, offset: int) -> tuple[bytes, tuple]:
    n = _INT.unpack_from(frame, offset)[0]
    offset += 4
    if n < 0:
        data = b""
    else:
        data = frame[offset : offset + n]
        offset += n
    return data, _STAT.unpack_from(frame, offset)


def reply_zxid(frame: bytes) -> int:
    """The zxid of a reply's header: for a multi transaction that succeeded, the czxid (and
    mzxid) of every node it created."""
    return _REPLY.unpack_from(frame, 0)[1]


def parse_stat(frame: bytes, offset: int) -> tuple:
    """A Stat: (czxid, mzxid, ctime, mtime, version, cversion, aversion, ephemeralOwner,
    dataLength, numChildren, pzxid)."""
    return _STAT.unpack_from(frame, offset)


def parse_acl(frame: bytes, offset: int) -> list[list[Any]]:
    count = _INT.unpack_from(frame, offset)[0]
    offset += 4
    acl = []
    unpack = _INT.unpack_from
    for _ in range(max(count, 0)):
        perms = unpack(frame, offset)[0]
        n = unpack(frame, offset + 4)[0]
        scheme = frame[offset + 8 : offset + 8 + n].decode("utf-8")
        offset += 8 + n
        n = unpack(frame, offset)[0]
        ident = frame[offset + 4 : offset + 4 + n].decode("utf-8")
        offset += 4 + n
        acl.append([perms, scheme, ident])
    return acl


def parse_children(frame: bytes, offset: int) -> list[str]:
    count = _INT.unpack_from(frame, offset)[0]
    offset += 4
    out = []
    unpack = _INT.unpack_from
    for _ in range(max(count, 0)):
        n = unpack(frame, offset)[0]
        out.append(frame[offset + 4 : offset + 4 + n].decode("utf-8"))
        offset += 4 + n
    return out


def parse_multi_read(frame: bytes, offset: int) -> list[tuple[int, Any]]:
    """Per-op ``(err, result)`` of a multiRead reply: result is ``(data, stat)`` for getData,
    the child names for getChildren, None on error."""
    out: list[tuple[int, Any]] = []
    while True:
        op, done, _err = _MULTI.unpack_from(frame, offset)
        offset += _MULTI.size
        if done:
            return out
        if op == OP_GETDATA:
            n = _INT.unpack_from(frame, offset)[0]
            offset += 4
            data = frame[offset : offset + n] if n > 0 else b""
            offset += max(n, 0)
            out.append((0, (data, _STAT.unpack_from(frame, offset))))
            offset += STAT_SIZE
        elif op == OP_GETCHILDREN:
            count = _INT.unpack_from(frame, offset)[0]
            offset += 4
            names = []
            for _ in range(max(count, 0)):
                n = _INT.unpack_from(frame, offset)[0]
                names.append(frame[offset + 4 : offset + 4 + n].decode("utf-8"))
                offset += 4 + n
            out.append((0, names))
        elif op == -1:
            out.append((_INT.unpack_from(frame, offset)[0], None))
            offset += 4
        else:
            raise ConnectionLoss(f"unexpected multiRead result type {op}")


def created_all(frame: bytes, offset: int, expected: int) -> bool:
    """Whether the reply of a multi of creates says every create succeeded, told without
    parsing each result: ZooKeeper answers a multi that failed with an error result for every
    op (rolled back or not run), so one that succeeded starts with a create result, and then
    holds exactly the created paths (``expected``: what :meth:`WireSession.multi_create`
    returned; an error result is shorter than a create result). Anything else: parse it
    (:func:`parse_multi`)."""
    return len(frame) == expected and _MULTI.unpack_from(frame, offset)[0] == OP_CREATE


def parse_multi(frame: bytes, offset: int) -> list[int | None]:
    """Per-op outcome of a multi reply of creates: None = created, else the error code
    (0 = rolled back because another op failed)."""
    codes: list[int | None] = []
    while True:
        op, done, _err = _MULTI.unpack_from(frame, offset)
        offset += _MULTI.size
        if done:
            return codes
        if op == -1:
            codes.append(_INT.unpack_from(frame, offset)[0])
            offset += 4
        elif op == OP_CREATE:
            n = _INT.unpack_from(frame, offset)[0]
            offset += 4 + max(n, 0)
            codes.append(None)
        else:
            raise ConnectionLoss(f"unexpected multi result type {op}")
