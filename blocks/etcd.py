"""etcd v3 as a source and restore target, through gRPC.

The client is grpcio with the generated etcd v3 stubs shipped by ``aetcd`` (``aetcd.rpc``),
on a synchronous channel we build ourselves: that gives Range with ``limit`` and
``revision``, TLS and message-size options, which aetcd's high-level API lacks. See
docs/etcd-client.md for why (with numbers).

* Backup is point-in-time: the first Range page is read at the current revision R, every
  later page at R, so the archive is exactly the keyspace at R while writers run. Page
  sizes adapt to the bytes a page returned so a response stays far below the gRPC
  receive limit, even with 1 MiB values.
* Leased keys are skipped and counted, or with ``include_leased`` kept with their
  remaining TTL; a restore gives them a fresh lease with that TTL.
* Restore writes txn batches (at most ``txn_ops`` puts) guarded by ``version == 0`` on
  every key. When a batch fails, its failure branch tells which keys exist; the others
  are then created one guarded txn each, so nothing is ever overwritten.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import grpc
from aetcd import rpc
from pydantic import Field, SecretStr

from blocks.source import ChangeBatch, HistoryCompacted, SourceBlock, WalkStats
from burrow.errors import AuthError, BurrowError, SourceError, SourceUnavailable, UsageError
from burrow.hosts import check_resolvable
from burrow.paths import foreign_metadata
from burrow.records import Record, display_key

#: Environment variables read when the block leaves the setting empty.
ENV_USER = "BURROW_ETCD_USER"
ENV_PASSWORD = "BURROW_ETCD_PASSWORD"
ENV_CACERT = "BURROW_ETCD_CACERT"
ENV_CERT = "BURROW_ETCD_CERT"
ENV_KEY = "BURROW_ETCD_KEY"

GROWTH = 8  # most a page's key limit grows from one page to the next

_TRANSIENT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}
_TLS_MARKERS = ("ssl", "handshake", "certificate", "tsi_", "x509", "tls")
#: etcd's own auth errors that come with a code other than UNAUTHENTICATED / PERMISSION_DENIED
#: (etcdserver/api/v3rpc/rpctypes: INVALID_ARGUMENT or FAILED_PRECONDITION, fixed texts).
_AUTH_DETAILS = (
    "etcdserver: authentication failed, invalid user id or password",
    "etcdserver: user name is empty",
    "etcdserver: user name not found",
    "etcdserver: authentication is not enabled",
)
_AUTH_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
#: RESOURCE_EXHAUSTED is four different things; etcd's two are fixed texts (rpctypes).
_NOSPACE = "etcdserver: mvcc: database space exceeded"  # the NOSPACE alarm: the backend quota is full
_TOO_MANY_REQUESTS = "etcdserver: too many requests"  # the apply loop is behind: back off and retry
#: Pauses before re-sending a request etcd refused as "too many requests". etcd refuses it
#: before proposing it to raft, so re-sending is safe for writes too (and a replay, which
#: no task retries, gets through a short overload).
TOO_MANY_BACKOFF = (0.1, 0.2, 0.5, 1.0, 2.0, 2.0)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end)."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def _normalize_prefix(prefix: str | None) -> bytes:
    if not prefix or prefix.strip("/") == "":
        return b""
    return prefix.rstrip("/").encode("utf-8")


def _pem_or_file(value: str | None, what: str) -> bytes | None:
    """PEM text as given, or the contents of the file it names."""
    if not value:
        return None
    if "-----BEGIN" in value:
        return value.encode("utf-8")
    try:
        return Path(value).expanduser().read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the etcd TLS {what} file {value}: {exc.strerror or type(exc).__name__}") from None


class EtcdCluster(SourceBlock):
    """An etcd v3 cluster: endpoints, TLS, user/password, optional key prefix."""

    _block_type_name: ClassVar[str] = "Burrow etcd Cluster"
    _block_type_slug: ClassVar[str] = "burrow-etcd-cluster"
    _description: ClassVar[str] = "An etcd v3 cluster Burrow backs up from and restores into."
    service: ClassVar[str] = "etcd"
    scheme: ClassVar[str] = "etcd"

    endpoints: list[str] = Field(default_factory=lambda: ["127.0.0.1:2379"], description="host:port of each member")
    prefix: str | None = Field(
        default=None, description="Work below this key prefix only (like a chroot; keys are stored relative to it)"
    )
    tls: bool = Field(default=False, description="Use TLS (implied by a CA, client cert or client key)")
    ca_cert: str | None = Field(default=None, description="CA bundle: a file path or PEM text")
    client_cert: str | None = Field(default=None, description="Client certificate: a file path or PEM text")
    client_key: SecretStr | None = Field(default=None, description="Client private key: a file path or PEM text")
    tls_server_name: str | None = Field(default=None, description="Expected server name in its certificate")
    user: str | None = Field(default=None, description="etcd user (auth enabled clusters)")
    password: SecretStr | None = Field(default=None, description="Password of the etcd user")
    connect_timeout: float = Field(default=10.0, description="Seconds to wait for a member to answer")
    request_timeout: float = Field(default=120.0, description="Seconds one request may take")
    page_size: int = Field(default=50_000, description="Most keys per Range page")
    page_bytes: int = Field(default=8 * 1024 * 1024, description="Target bytes per Range page")
    max_message_bytes: int = Field(default=64 * 1024 * 1024, description="gRPC send/receive message limit")
    include_leased: bool = Field(default=False, description="Back up leased keys with their remaining TTL")
    txn_ops: int = Field(default=128, description="Puts per restore txn (etcd --max-txn-ops, default 128)")
    txn_bytes: int = Field(default=1024 * 1024, description="Payload bytes per restore txn")
    window: int = Field(default=8, description="Requests in flight at once on restore and lookup")

    def uses_tls(self) -> bool:
        return bool(
            self.tls or self.ca_cert or self.client_cert or self.client_key
            or any(e.startswith("https://") for e in self.endpoints)
        )

    def hostports(self) -> list[str]:
        """The endpoints as host:port (an ``http://`` or ``https://`` in front is accepted)."""
        return [e.split("://", 1)[-1].rstrip("/") for e in self.endpoints]

    def describe(self) -> str:
        scheme = "etcds" if self.uses_tls() else "etcd"
        base = f"{scheme}://{','.join(self.hostports())}"
        p = _normalize_prefix(self.prefix).decode("utf-8")
        if not p:
            return base
        if p.startswith("/"):
            return base + quote(p, safe="/")
        return base + "?prefix=" + quote(p, safe="/")

    def connect(self) -> EtcdSession:
        return EtcdSession(self)


class EtcdSession:
    """An open gRPC channel to one etcd member plus the batched operations Burrow needs."""

    service = "etcd"

    def __init__(self, block: EtcdCluster) -> None:
        self.block = block
        self.label = block.describe()
        self.prefix = _normalize_prefix(block.prefix)
        self.timeout = block.request_timeout
        self.user = block.user or os.environ.get(ENV_USER) or None
        if block.password is not None:
            self._password = block.password.get_secret_value()
        else:
            self._password = os.environ.get(ENV_PASSWORD, "")
        self._token: str | None = None
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._auth_lock = threading.Lock()
        self._leases: dict[int, int] = {}  # archived lease id -> lease granted on this target
        self._lease_lock = threading.Lock()
        creds = self._credentials()
        self.channel, self.endpoint = self._open(creds)
        self.kv = rpc.KVStub(self.channel)
        self.leases = rpc.LeaseStub(self.channel)
        self.auth = rpc.AuthStub(self.channel)
        if self.user:
            try:
                self._authenticate()
            except BaseException:
                self.channel.close()
                raise

    # -- connection ---------------------------------------------------------------------
    def _credentials(self) -> grpc.ChannelCredentials | None:
        b = self.block
        ca = b.ca_cert or os.environ.get(ENV_CACERT)
        cert = b.client_cert or os.environ.get(ENV_CERT)
        key = b.client_key.get_secret_value() if b.client_key else os.environ.get(ENV_KEY)
        if not (b.uses_tls() or ca or cert or key):
            return None
        if bool(cert) != bool(key):
            raise UsageError("etcd TLS needs both a client certificate and a client key, or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem_or_file(ca, "CA"),
            private_key=_pem_or_file(key, "client key"),
            certificate_chain=_pem_or_file(cert, "client certificate"),
        )

    def _open(self, creds: grpc.ChannelCredentials | None) -> tuple[grpc.Channel, str]:
        b = self.block
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", b.max_message_bytes),
            ("grpc.max_send_message_length", b.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        if b.tls_server_name:
            options.append(("grpc.ssl_target_name_override", b.tls_server_name))
        if not b.endpoints:
            raise UsageError("an etcd cluster needs at least one endpoint")
        failures: list[str] = []
        # A host name that does not exist fails here, at once and for good (gRPC would report
        # UNAVAILABLE, which is retried like a member that is down).
        for endpoint in check_resolvable(b.hostports(), "etcd", self.label):
            if creds is not None:
                channel = grpc.secure_channel(endpoint, creds, options=options)
            else:
                channel = grpc.insecure_channel(endpoint, options=options)
            try:
                rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=b.connect_timeout)
                return channel, endpoint
            except grpc.RpcError as exc:
                channel.close()
                err = self._wrap(exc, f"connecting to {endpoint}")
                if not isinstance(err, SourceUnavailable):
                    raise err from None
                failures.append(f"{endpoint}: {_reason(exc)}")
        raise SourceUnavailable(f"cannot reach etcd at {self.label} ({'; '.join(failures)})") from None

    def _authenticate(self) -> None:
        try:
            resp = self.auth.Authenticate(
                rpc.AuthenticateRequest(name=self.user, password=self._password), timeout=self.block.connect_timeout
            )
        except grpc.RpcError as exc:
            err = self._wrap(exc, f"authenticating user {self.user!r}")
            if not isinstance(err, AuthError):
                raise err from None
            raise AuthError(
                f"etcd at {self.label} refused user {self.user!r}: authentication failed "
                f"(check the user and password; {ENV_USER}/{ENV_PASSWORD} when not in the block)"
            ) from None
        self._token = resp.token
        self._metadata = (("token", resp.token),)

    # -- errors -------------------------------------------------------------------------
    def _wrap(self, exc: grpc.RpcError, action: str) -> BurrowError:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else "") or ""
        low = details.lower()
        name = code.name if code is not None else type(exc).__name__
        if any(m in low for m in _TLS_MARKERS):
            return SourceError(
                f"TLS with etcd at {self.label} failed while {action} (check the CA, client certificate "
                f"and key, and the server name): {name}"
            )
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or (
            code in _AUTH_CODES and low.strip().startswith(_AUTH_DETAILS)
        ):
            who = f"user {self.user!r}" if self.user else "an anonymous client (no user set)"
            return AuthError(f"etcd at {self.label} denied {action} to {who}: {_short(details)}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return self._exhausted(low, details, action)
        if code == grpc.StatusCode.OUT_OF_RANGE or "compacted" in low:
            return SourceUnavailable(
                f"etcd at {self.label} compacted the backup's revision while {action}; a retry starts over"
            )
        if code in _TRANSIENT_CODES:
            if low.startswith("etcdserver:"):  # the member answered: no leader, not capable (yet), ...
                return SourceUnavailable(f"etcd at {self.label} is unavailable while {action} ({_short(details)})")
            return SourceUnavailable(f"lost the connection to etcd at {self.label} while {action} ({name})")
        return SourceError(f"etcd at {self.label} failed {action}: {name}: {_short(details)}")

    def _exhausted(self, low: str, details: str, action: str) -> BurrowError:
        """RESOURCE_EXHAUSTED: etcd out of space, etcd overloaded, or a message over a size limit."""
        text = low.strip()
        if text == _NOSPACE:
            return SourceError(
                f"etcd at {self.label} is out of space (NOSPACE alarm: the database reached its quota, "
                f"--quota-backend-bytes) while {action}; keys created before this stay. Free space (compact "
                "and defragment), disarm the alarm (etcdctl alarm disarm), then run the restore again: it "
                "creates only what is still missing"
            )
        if text == _TOO_MANY_REQUESTS:
            return SourceUnavailable(f"etcd at {self.label} is overloaded (too many requests) while {action}")
        if "grpc: received message larger than max" in low:
            return SourceError(
                f"etcd at {self.label} refused a request as too large while {action} (its --max-request-bytes); "
                "lower txn_bytes on the block"
            )
        if "sent message larger than max" in low:
            return SourceError(
                f"a request to etcd at {self.label} was larger than max_message_bytes "
                f"({self.block.max_message_bytes} bytes) while {action}; lower txn_bytes or raise max_message_bytes"
            )
        if "received message larger than max" in low or "send message larger than max" in low:
            return _TooLarge(f"etcd at {self.label}: an answer was larger than max_message_bytes while {action}")
        return SourceError(f"etcd at {self.label} failed {action}: RESOURCE_EXHAUSTED: {_short(details)}")

    def _call(self, method: Callable[..., Any], request: Any, action: str, timeout: float | None = None) -> Any:
        """One unary call with the auth token; re-authenticates once when the token expired,
        and backs off and re-sends while etcd answers "too many requests" (TOO_MANY_BACKOFF)."""
        reauthed = False
        pauses = iter(TOO_MANY_BACKOFF)
        while True:
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if not reauthed and self._expired(exc):
                    reauthed = True
                    self._reauth()
                    continue
                if _too_many(exc):
                    pause = next(pauses, None)
                    if pause is not None:
                        time.sleep(pause)
                        continue
                    raise SourceUnavailable(
                        f"etcd at {self.label} is overloaded (too many requests) while {action}, still after "
                        f"backing off for {sum(TOO_MANY_BACKOFF):g}s"
                    ) from None
                raise self._wrap(exc, action) from None

    def _expired(self, exc: grpc.RpcError) -> bool:
        return bool(self.user) and "invalid auth token" in ((exc.details() or "").lower())

    def _reauth(self) -> None:
        with self._auth_lock:
            self._authenticate()

    def _many(self, method: Callable[..., Any], requests: Iterable[Any], action: str) -> list[Any]:
        """Run unary calls with up to ``window`` in flight (a sliding window over a lazily
        built request stream, so building requests overlaps the server's work); results
        come back in request order."""
        window = max(1, self.block.window)
        out: list[Any] = []
        inflight: deque[tuple[int, Any, Any]] = deque()

        def collect() -> None:
            i, fut, req = inflight.popleft()
            try:
                out[i] = fut.result()
            except grpc.RpcError as exc:
                if self._expired(exc) or _too_many(exc):
                    if self._expired(exc):
                        self._reauth()
                    out[i] = self._call(method, req, action)  # backs off while etcd is overloaded
                    return
                for _, other, _ in inflight:
                    other.cancel()
                raise self._wrap(exc, action) from None

        for i, req in enumerate(requests):
            out.append(None)
            inflight.append((i, method.future(req, timeout=self.timeout, metadata=self._metadata), req))
            if len(inflight) >= window:
                collect()
        while inflight:
            collect()
        return out

    # -- keys ---------------------------------------------------------------------------
    def full_key(self, key: bytes) -> bytes:
        """The etcd key for an archive key (which is relative to the prefix)."""
        if not self.prefix:
            return key
        return self.prefix + (key if key.startswith(b"/") else b"/" + key)

    def _range_for(self, root: bytes) -> tuple[bytes | None, bytes, bytes]:
        """(exact key or None, range start, range end) covering ``root`` and below."""
        r = root if root not in (b"", b"/") else b""
        if r:
            r = r.rstrip(b"/") or r
        if not r:
            if self.prefix:
                start = self.prefix + b"/"
                return None, start, prefix_end(start)
            return None, b"\0", b"\0"
        exact = self.full_key(r)
        start = exact + b"/"
        return exact, start, prefix_end(start)

    # -- backup -------------------------------------------------------------------------
    def walk(self, root: bytes, stats: WalkStats) -> Iterator[Record]:
        """Every key below ``root`` at one revision, in key order (so parents come first).

        Pages are pipelined: as soon as a page arrives the next one is requested (at the
        same revision), and this page's records are handed out while etcd reads the next.
        """
        b = self.block
        exact, start, end = self._range_for(root)
        cut = len(self.prefix)
        include_leased = b.include_leased
        ttls: dict[int, tuple[int, int]] = {}
        leased_skipped = leased_kept = 0
        revision = 0
        pages = 0
        # The first page is small (nothing is known of value sizes yet); later pages grow
        # at most GROWTH times per page and are sized by bytes to stay near page_bytes.
        req = rpc.RangeRequest(key=start, range_end=end, limit=max(1, min(b.page_size, 4)))
        pending: Any = self._range_future(req)
        try:
            while pending is not None:
                resp, req = self._range_result(pending, req)
                pages += 1
                kvs: Any = resp.kvs
                if revision == 0:
                    revision = resp.header.revision
                    stats.info.update(
                        revision=revision,
                        cluster_id=f"{resp.header.cluster_id:x}",
                        member_id=f"{resp.header.member_id:x}",
                        endpoint=self.endpoint,
                        point_in_time=True,
                    )
                    if self.prefix:
                        self._note_prefix_key(revision, stats)
                    if exact is not None:
                        ex = self._call(
                            self.kv.Range, rpc.RangeRequest(key=exact, revision=revision),
                            "reading " + display_key(exact),
                        )
                        kvs = list(ex.kvs) + list(kvs)
                pending = None
                if resp.more and resp.kvs:
                    per_key = max(1, resp.ByteSize() // len(resp.kvs))
                    limit = max(1, min(b.page_size, req.limit * GROWTH, b.page_bytes // per_key))
                    req = rpc.RangeRequest(
                        key=resp.kvs[-1].key + b"\0", range_end=end, limit=limit, revision=revision
                    )
                    pending = self._range_future(req)
                for kv in kvs:
                    lease = kv.lease
                    # mod_revision shows the key as of the backup's revision; creation revision
                    # and version are left out (informational only, and ~1 µs a key to encode).
                    meta: dict[str, Any] = {"mod_revision": kv.mod_revision}
                    if lease:
                        if not include_leased:
                            leased_skipped += 1
                            continue
                        ttl = ttls.get(lease)
                        if ttl is None:
                            ttl = ttls[lease] = self._time_to_live(lease)
                        if ttl[0] <= 0:
                            stats.vanished += 1  # its lease expired while we read: gone from the store now
                            continue
                        meta["lease"] = {"id": lease, "ttl": ttl[0], "granted_ttl": ttl[1]}
                        leased_kept += 1
                    yield Record(kv.key[cut:] if cut else kv.key, kv.value, meta)
        finally:
            if pending is not None:
                pending.cancel()
        stats.skipped_ephemeral += leased_skipped
        stats.info["leased_skipped"] = leased_skipped
        stats.info["leased_kept"] = leased_kept
        stats.info["pages"] = pages
        if leased_skipped:
            stats.warn(
                f"{leased_skipped} leased keys were skipped (use --include-leased to keep them with their TTL)"
            )

    def _range_future(self, req: rpc.RangeRequest) -> Any:
        return self.kv.Range.future(req, timeout=self.timeout, metadata=self._metadata)

    def _range_result(self, pending: Any, req: rpc.RangeRequest) -> tuple[Any, rpc.RangeRequest]:
        """Wait for a Range page; shrink and re-ask when it was over the receive limit."""
        while True:
            try:
                return pending.result(), req
            except grpc.RpcError as exc:
                if self._expired(exc):
                    self._reauth()
                    pending = self._range_future(req)
                    continue
                if _too_many(exc):
                    return self._call(self.kv.Range, req, "reading " + display_key(req.key)), req
                err = self._wrap(exc, "reading " + display_key(req.key))
                if not isinstance(err, _TooLarge):
                    raise err from None
                if req.limit <= 1:
                    raise SourceError(
                        f"a single etcd key at {self.label} is larger than max_message_bytes "
                        f"({self.block.max_message_bytes} bytes); raise it on the block"
                    ) from None
                # Larger than max_message_bytes (values grew suddenly): same page, fewer keys.
                req = rpc.RangeRequest(
                    key=req.key, range_end=req.range_end, limit=max(1, req.limit // 4), revision=req.revision
                )
                pending = self._range_future(req)

    def _note_prefix_key(self, revision: int, stats: WalkStats) -> None:
        resp = self._call(
            self.kv.Range,
            rpc.RangeRequest(key=self.prefix, revision=revision, count_only=True),
            "reading " + display_key(self.prefix),
        )
        if resp.count:
            stats.skipped_excluded += 1
            stats.warn(
                f"the key {display_key(self.prefix)} equals the prefix itself and is not below it: not backed up"
            )

    def _time_to_live(self, lease: int) -> tuple[int, int]:
        resp = self._call(self.leases.LeaseTimeToLive, rpc.LeaseTimeToLiveRequest(ID=lease), "reading a lease TTL")
        return int(resp.TTL), int(resp.grantedTTL)

    # -- restore ------------------------------------------------------------------------
    def lookup(self, keys: list[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        wanted = list(range(len(keys)))
        if len(keys) >= 16:
            # One keys-only Range over the batch's key interval says which keys exist at
            # all; only those are then read. (Restoring into an empty or sparse target
            # costs one small request per batch instead of one txn per 128 keys.)
            present = self._present_in_interval([self.full_key(k) for k in keys])
            if present is not None:
                wanted = [i for i, k in enumerate(keys) if self.full_key(k) in present]
        if not wanted:
            return out
        for i, v in zip(wanted, self._lookup_values([keys[i] for i in wanted]), strict=True):
            out[i] = v
        return out

    def holds_no_keys(self) -> bool:
        """Whether the prefix (the whole keyspace without one) holds no key at all: one
        keys-only Range with limit 1. Planning then looks nothing up: every key is missing."""
        _, start, end = self._range_for(b"")
        resp = self._call(
            self.kv.Range, rpc.RangeRequest(key=start, range_end=end, keys_only=True, limit=1), "listing keys"
        )
        return not resp.kvs

    def _present_in_interval(self, full: list[bytes]) -> set[bytes] | None:
        """The keys between min(full) and max(full) that exist, or None when there are many
        more of them than in ``full`` (then point lookups are cheaper)."""
        lo, hi = min(full), max(full)
        resp = self._call(
            self.kv.Range,
            rpc.RangeRequest(key=lo, range_end=hi + b"\0", keys_only=True, limit=2 * len(full) + 1),
            "listing keys",
        )
        if resp.more:
            return None
        return {kv.key for kv in resp.kvs}

    def _lookup_values(self, keys: list[bytes]) -> list[bytes | None]:
        n = max(1, min(self.block.txn_ops, 128))
        chunks = [keys[i : i + n] for i in range(0, len(keys), n)]
        try:
            results = self._lookup_chunks(chunks)
        except _TooLarge:
            # Some answers were over the receive limit (big values): ask in halves, one at a time.
            results = [self._lookup_split(c) for c in chunks]
        return [v for chunk in results for v in chunk]

    def _lookup_split(self, keys: list[bytes]) -> list[bytes | None]:
        try:
            return self._lookup_chunks([keys])[0]
        except _TooLarge:
            if len(keys) == 1:
                raise SourceError(
                    f"the etcd key {display_key(keys[0])} at {self.label} is larger than max_message_bytes "
                    f"({self.block.max_message_bytes} bytes); raise it on the block"
                ) from None
            mid = len(keys) // 2
            return self._lookup_split(keys[:mid]) + self._lookup_split(keys[mid:])

    def _lookup_chunks(self, chunks: list[list[bytes]]) -> list[list[bytes | None]]:
        requests = [
            rpc.TxnRequest(success=[rpc.RequestOp(request_range=rpc.RangeRequest(key=self.full_key(k))) for k in c])
            for c in chunks
        ]
        results: list[list[bytes | None]] = []
        for resp in self._many(self.kv.Txn, requests, "reading keys"):
            values: list[bytes | None] = []
            for r in resp.responses:
                kvs = r.response_range.kvs
                values.append(kvs[0].value if kvs else None)
            results.append(values)
        return results

    def _key_stats(self, keys: list[bytes]) -> list[Any]:
        """Each key's KeyValue without its value (version, lease, ...), or None where it does
        not exist: keys-only ranges, a txn per 128 keys, pipelined."""
        n = max(1, min(self.block.txn_ops, 128))
        requests = (
            rpc.TxnRequest(success=[
                rpc.RequestOp(request_range=rpc.RangeRequest(key=self.full_key(k), keys_only=True))
                for k in keys[i : i + n]
            ])
            for i in range(0, len(keys), n)
        )
        out: list[Any] = []
        for resp in self._many(self.kv.Txn, requests, "reading keys"):
            out.extend(r.response_range.kvs[0] if r.response_range.kvs else None for r in resp.responses)
        return out

    def check_metadata(self, records: list[Record], source_service: str) -> list[str | None]:
        """Post-verify (tasks/postverify.py): for each archived record whose key holds its value,
        "lease" when the key's lease is not what the restore gives it (a key archived as leased,
        with ``--include-leased``, holds a lease; any other holds none), else None."""
        out: list[str | None] = []
        for r, kv in zip(records, self._key_stats([r.key for r in records]), strict=True):
            lease = r.meta.get("lease") if source_service == "etcd" else None
            leased = isinstance(lease, dict) and int(lease.get("ttl") or 0) > 0
            out.append(None if kv is None or bool(kv.lease) == leased else "lease")
        return out

    def leases_held(self, records: list[Record]) -> set[int]:
        """The leases held by the keys of ``records`` that were written once and never since
        (version 1): for a rehearsal's cleanup (tasks/rehearse.py), the leases its restore
        granted them (a restore grants each leased key a fresh lease; a later write by anyone
        would raise the version)."""
        return {int(kv.lease) for kv in self._key_stats([r.key for r in records])
                if kv is not None and kv.lease and kv.version == 1}

    def revoke_unused(self, leases: set[int]) -> int:
        """Revoke each of ``leases`` that no key holds any more (revoking one that still holds
        keys would delete them: those are left to expire). Returns how many were revoked."""
        revoked = 0
        for lease in sorted(leases):
            ttl = self._call(self.leases.LeaseTimeToLive, rpc.LeaseTimeToLiveRequest(ID=lease, keys=True),
                             "reading a lease")
            if int(ttl.TTL) == -1 or ttl.keys:
                continue  # expired already, or holds someone's key
            try:
                self._call(self.leases.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease), "revoking a lease")
            except SourceError as exc:
                if "not found" not in str(exc).lower():
                    raise
                continue  # expired meanwhile
            revoked += 1
        return revoked

    def prepare(self, record: Record, source_service: str) -> tuple[Record, list[str]]:
        meta: dict[str, Any] = {}
        dropped: list[str] = []
        m = record.meta
        if source_service == "etcd":
            lease = m.get("lease")
            if isinstance(lease, dict) and int(lease.get("ttl") or 0) > 0:
                meta["lease"] = {"id": int(lease.get("id") or 0), "ttl": int(lease["ttl"])}
        else:
            dropped = foreign_metadata(m, source_service)
        if m.get("intermediate"):
            meta["intermediate"] = True
        return Record(record.key, record.value, meta), dropped

    def parent_key(self, key: bytes) -> bytes | None:
        return None  # etcd is flat: any key can be created on its own

    def ensure_root(self) -> None:
        return None  # a prefix needs no node of its own

    def _lease_for(self, meta: dict[str, Any]) -> int:
        lease = meta.get("lease")
        if not lease:
            return 0
        source_id, ttl = int(lease.get("id") or 0), int(lease["ttl"])
        cache_key = source_id or -ttl
        with self._lease_lock:
            granted = self._leases.get(cache_key)
            if granted is None:
                resp = self._call(self.leases.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl), "granting a lease")
                granted = self._leases[cache_key] = int(resp.ID)
        return granted

    def _batches(self, records: list[Record]) -> list[list[int]]:
        n = max(1, min(self.block.txn_ops, 128))
        batches: list[list[int]] = []
        cur: list[int] = []
        keys: set[bytes] = set()
        size = 0
        for i, r in enumerate(records):
            rsize = len(r.value) + 2 * len(r.key) + 32
            if cur and (len(cur) >= n or size + rsize > self.block.txn_bytes or r.key in keys):
                batches.append(cur)
                cur, size, keys = [], 0, set()
            cur.append(i)
            keys.add(r.key)
            size += rsize
        if cur:
            batches.append(cur)
        return batches

    def _put(self, r: Record) -> rpc.RequestOp:
        return rpc.RequestOp(
            request_put=rpc.PutRequest(key=self.full_key(r.key), value=r.value, lease=self._lease_for(r.meta))
        )

    def _guarded(self, records: list[Record]) -> rpc.TxnRequest:
        keys = [self.full_key(r.key) for r in records]
        lo, hi = min(keys), max(keys)
        return rpc.TxnRequest(
            compare=[
                rpc.Compare(key=k, result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION, version=0) for k in keys
            ],
            success=[self._put(r) for r in records],
            # When the guard fails, list the keys of the batch's interval that exist, in
            # the same round trip.
            failure=[
                rpc.RequestOp(
                    request_range=rpc.RangeRequest(
                        key=lo, range_end=hi + b"\0", keys_only=True, limit=2 * len(keys) + 1
                    )
                )
            ],
        )

    def create(self, records: list[Record]) -> list[bool]:
        results: list[bool | None] = [None] * len(records)
        batches = self._batches(records)
        requests = (self._guarded([records[i] for i in batch]) for batch in batches)
        responses = self._many(self.kv.Txn, requests, "creating keys")
        retry: list[int] = []
        for batch, resp in zip(batches, responses, strict=True):
            if resp.succeeded:
                for i in batch:
                    results[i] = True
                continue
            # Some keys exist: they are left alone; the rest are created one guarded txn each.
            listed = resp.responses[0].response_range
            if listed.more:
                exists = set(self._existing([self.full_key(records[i].key) for i in batch]))
            else:
                exists = {kv.key for kv in listed.kvs}
            for i in batch:
                if self.full_key(records[i].key) in exists:
                    results[i] = False
                else:
                    retry.append(i)
        if retry:
            singles = self._many(self.kv.Txn, (self._guarded([records[i]]) for i in retry), "creating keys")
            for i, resp in zip(retry, singles, strict=True):
                results[i] = bool(resp.succeeded)
        return [bool(x) for x in results]

    def _existing(self, keys: list[bytes]) -> list[bytes]:
        """Which of ``keys`` (at most txn_ops) exist now."""
        resp = self._call(
            self.kv.Txn,
            rpc.TxnRequest(
                success=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k, count_only=True)) for k in keys]
            ),
            "reading keys",
        )
        return [k for k, r in zip(keys, resp.responses, strict=True) if r.response_range.count]

    def close(self) -> None:
        self.channel.close()

    # -- capture --------------------------------------------------------------------------
    def watch(self, after: int) -> EtcdWatch:
        """The changes after revision ``after`` below the prefix (a capture's feed): EtcdWatch."""
        return EtcdWatch(self, after)

    # -- cleanup (rehearsals) -------------------------------------------------------------
    def delete_if_unchanged(self, records: list[Record]) -> list[bool]:
        """Delete each record's key if it still holds exactly the record's value: one txn per
        key guarding the delete with ``value == record.value`` (a key changed or gone meanwhile
        is left alone), pipelined. True = deleted.

        Added for rehearsals (tasks/rehearse.py), which remove what they restored into a
        scratch prefix once compared: a restore itself never deletes anything."""

        def guarded(r: Record) -> rpc.TxnRequest:
            key = self.full_key(r.key)
            return rpc.TxnRequest(
                compare=[rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, value=r.value)],
                success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))],
            )

        responses = self._many(self.kv.Txn, (guarded(r) for r in records), "deleting keys")
        return [bool(resp.succeeded and resp.responses and resp.responses[0].response_delete_range.deleted)
                for resp in responses]

    # -- undo (version-guarded) -----------------------------------------------------------
    def created_versions(self, keys: list[bytes]) -> list[int | None]:
        """The revision each key was created at (its ``create_revision``), None where it is
        gone: read back right after a restore created them (one txn of ranges per txn_ops
        keys, pipelined), so that ``burrow undo`` can later delete exactly these keys, and
        only while unchanged. The creation revision, not ``mod_revision``: a key changed between
        its create and this read already differs from what is recorded, and undo keeps it."""
        n = max(1, min(self.block.txn_ops, 128))
        chunks = [keys[i : i + n] for i in range(0, len(keys), n)]
        requests = (
            rpc.TxnRequest(success=[
                rpc.RequestOp(request_range=rpc.RangeRequest(key=self.full_key(k), keys_only=True)) for k in chunk
            ])
            for chunk in chunks
        )
        out: list[int | None] = []
        for resp in self._many(self.kv.Txn, requests, "reading keys"):
            for r in resp.responses:
                kvs = r.response_range.kvs
                out.append(int(kvs[0].create_revision) if kvs else None)
        return out

    def delete_if_version(self, items: list[tuple[bytes, int]], *, dry_run: bool = False) -> list[bool]:
        """Delete each ``(key, version)`` whose ``mod_revision`` still equals ``version`` (as
        :meth:`created_versions` recorded it: unchanged since this Burrow created it): one txn
        per key guarding the delete with that comparison, pipelined. True = the key is gone
        (deleted now, or already absent); False = kept, changed since. ``dry_run`` runs the
        same comparison and deletes nothing."""

        def guarded(item: tuple[bytes, int]) -> rpc.TxnRequest:
            key = self.full_key(item[0])
            count = rpc.RequestOp(request_range=rpc.RangeRequest(key=key, count_only=True))
            return rpc.TxnRequest(
                compare=[rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                                     mod_revision=int(item[1]))],
                success=[count if dry_run else rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))],
                failure=[count],  # a key that is absent has no revision to match: it is gone
            )

        responses = self._many(self.kv.Txn, (guarded(i) for i in items), "deleting keys")
        return [bool(resp.succeeded or not resp.responses[0].response_range.count) for resp in responses]


class EtcdWatch:
    """etcd's change feed for a capture (blocks/source.py ``ChangeFeed``): one Watch stream over
    the session's prefix from a start revision, with progress notifications.

    Without ``prev_kv``: the capture records the value after each change and never the one
    before it, and etcd 3.4 looks every event's previous value up before sending it, which
    slowed delivery from ~300,000 to 1,000-3,700 events a second here (bench/RESULTS.md,
    "Point-in-time capture"): at 1,000 writes a second the watcher fell behind, etcd refused
    writes, and a watcher left unsynced is where etcd 3.4.23 can send a progress notification
    ahead of the events it covers (etcd-io/etcd#15220). Measured without it: no such case. When
    it happens the capture records those events as late in the next segment (``late_from``) and a
    restore to a point they precede reads them there (docs/FORMAT.md).

    etcd sends a watcher's events in revision order, every event of one revision in one
    response, and answers a progress request (sent on the same stream) only once the watcher
    has caught up, after every event up to the revision it names: so a progress batch's
    position is exact. A start revision etcd has compacted is answered with a cancel carrying
    the compaction's revision: HistoryCompacted, a gap. Leased keys are changes a backup does
    not hold: unless the block includes leased keys, a put with a lease is recorded as a delete
    of the key (marked ``leased``), so the state at any point is what a backup would have held.
    With leased keys included, a leased put carries its lease as a backup records it (``id``,
    the remaining ``ttl`` when the capture saw it, ``granted_ttl``), so a restore to a point
    grants it a fresh lease with that TTL, as a restore of a full backup does. The TTL is read
    once per lease per batch (LeaseTimeToLive); a lease gone by then (its keys' deletes follow
    in the feed) is recorded with a TTL of 1 s, never as no lease."""

    #: A watch from a revision delivers every change after it, however long ago: a capture that
    #: opened it before it held the capture lock drops the changes the run before it sealed
    #: meanwhile and goes on exactly from there (tasks/capture.py ``follow_ahead``).
    RESUMES_EXACTLY = True

    def __init__(self, session: EtcdSession, after: int) -> None:
        import queue

        self.session = session
        self._requests: queue.Queue[Any] = queue.Queue()
        _, start, end = session._range_for(b"")
        self._cut = len(session.prefix)
        self._include_leased = session.block.include_leased
        self._requests.put(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=start, range_end=end, start_revision=after + 1, progress_notify=True,
        )))
        self._stub = rpc.WatchStub(session.channel)
        self._stream = self._stub.Watch(iter(self._requests.get, None), metadata=session._metadata)
        self._closed = False

    def request_progress(self) -> None:
        if not self._closed:
            self._requests.put(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    def close(self) -> None:
        self._closed = True
        self._requests.put(None)
        self._stream.cancel()

    def __iter__(self) -> Iterator[ChangeBatch]:
        s = self.session
        try:
            for resp in self._stream:
                if resp.compact_revision:
                    raise HistoryCompacted(int(resp.compact_revision))
                if resp.canceled:
                    raise SourceError(f"etcd at {s.label} cancelled the capture's watch: "
                                      f"{_short(resp.cancel_reason)}")
                if resp.created:
                    continue  # the watch exists; its header is not a progress mark
                if not resp.events:
                    yield ChangeBatch([], int(resp.header.revision), progress=True)
                    continue
                changes: list[tuple[str, bytes, bytes, int, dict[str, Any]]] = []
                ttls: dict[int, tuple[int, int]] = {}
                for ev in resp.events:
                    kv = ev.kv
                    key = kv.key[self._cut:] if self._cut else kv.key
                    rev = int(kv.mod_revision)
                    if ev.type == rpc.Event.DELETE:
                        changes.append(("del", key, b"", rev, {}))
                    elif kv.lease and not self._include_leased:
                        changes.append(("del", key, b"", rev, {"leased": True}))
                    else:
                        meta: dict[str, Any] = {"mod_revision": rev}
                        if kv.lease:
                            lease = int(kv.lease)
                            ttl = ttls.get(lease)
                            if ttl is None:
                                ttl = ttls[lease] = s._time_to_live(lease)
                            meta["lease"] = {"id": lease, "ttl": max(1, ttl[0]), "granted_ttl": max(1, ttl[1])}
                        changes.append(("put", key, kv.value, rev, meta))
                yield ChangeBatch(changes, int(resp.events[-1].kv.mod_revision))
        except grpc.RpcError as exc:
            if self._closed and exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise s._wrap(exc, "watching for changes") from None


class _TooLarge(SourceError):
    """An answer exceeded the gRPC receive limit (asked for too much at once)."""


def _too_many(exc: grpc.RpcError) -> bool:
    """etcd refused the request because its apply loop is behind (safe to re-send)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.strip().lower() == _TOO_MANY_REQUESTS


def _reason(exc: grpc.RpcError) -> str:
    low = (exc.details() or "").lower()
    for marker, reason in (("refused", "connection refused"), ("timeout", "timed out"), ("deadline", "timed out"),
                           ("resolve", "name not resolved"), ("unreachable", "unreachable")):
        if marker in low:
            return reason
    return exc.code().name if exc.code() else "unavailable"


def _short(details: str) -> str:
    text = details.replace("\n", " ").strip()
    return text[:200] if text else "no details"
