"""Consul KV as a source and restore target, over Consul's HTTP API (httpx + orjson).

* Backup is one consistent recursive read (``?recurse&consistent``): Consul answers from
  the leader after confirming leadership, so the archive is the KV store at one raft
  index (recorded as X-Consul-Index). Flags, empty values and folder keys (trailing
  ``/``) are kept; keys held by a session lock keep the session id in their metadata.
  The answer (one JSON array) is read as a stream and parsed a few hundred entries at a
  time, so memory does not grow with the store's size (see ``_json_array_batches``).
* Restore uses /v1/txn in batches of at most 64 ``cas`` ops with index 0 (create only if
  absent). When a batch fails, Consul names the ops whose key exists; the others are
  created one ``cas`` each. Flags are restored; sessions never are (reported instead).

py-consul is not used here: it decodes with the standard json module and gives no access
to the raw body, and the hot paths (one large recursive read, txn batches) are several
times faster with httpx and orjson.
"""

from __future__ import annotations

import base64
import binascii
import collections
import itertools
import os
import re
import socket
import ssl
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import httpx
import ijson
import orjson
from pydantic import Field, SecretStr

from blocks.source import ChangeBatch, SourceBlock, WalkStats
from burrow.errors import AuthError, BurrowError, SourceError, SourceUnavailable, UsageError
from burrow.hosts import is_transient_resolution_failure
from burrow.paths import foreign_metadata
from burrow.records import Record, display_key

#: Consul's own environment variables, read when the block leaves the setting empty.
ENV_TOKEN = "CONSUL_HTTP_TOKEN"
ENV_CACERT = "CONSUL_CACERT"
ENV_CERT = "CONSUL_CLIENT_CERT"
ENV_KEY = "CONSUL_CLIENT_KEY"
ENV_VERIFY = "CONSUL_HTTP_SSL_VERIFY"
ENV_SERVER_NAME = "CONSUL_TLS_SERVER_NAME"

MAX_TXN_OPS = 64  # Consul's hard limit per /v1/txn
ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
_OP_OVERHEAD = 96  # JSON bytes of one cas op besides its key and value

# A rolled-back /v1/txn answers 409 with {"Errors": [{"OpIndex": i, "What": text}]}. Which
# op failed is OpIndex; why is the form of What, which Consul builds with Go's %q for the key
# (state store, txn.go): a key cannot fake these forms, since %q escapes any quote in it.
_GO_STRING = r'"((?:[^"\\]|\\.)*)"'
_STALE = re.compile(r"failed to set key " + _GO_STRING + r", index is stale")  # cas: the key exists
_ABSENT = re.compile(r"key " + _GO_STRING + r" doesn't exist")  # get: no such key (or not readable)
_DELETE_STALE = re.compile(r"failed to delete key " + _GO_STRING + r", index is stale")  # delete-cas: changed
# ACL refusals: "Permission denied" (Consul 1.8), "Permission denied: token with AccessorID
# '...' lacks permission 'key:write' on <the key>" (1.11 and later), "ACL not found".
_DENIED = re.compile(r"(?:rpc error making call: )?(?:Permission denied|ACL not found)(?::.*)?", re.DOTALL)
_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
               "\\": "\\", '"': '"', "'": "'"}


def _normalize_prefix(prefix: str | None) -> str:
    return (prefix or "").strip("/")


class ConsulCluster(SourceBlock):
    """A Consul datacenter's KV store: agent address, TLS, ACL token, optional prefix."""

    _block_type_name: ClassVar[str] = "Burrow Consul Cluster"
    _block_type_slug: ClassVar[str] = "burrow-consul-cluster"
    _description: ClassVar[str] = "A Consul KV store Burrow backs up from and restores into."
    service: ClassVar[str] = "consul"
    scheme: ClassVar[str] = "consul"

    address: str = Field(default="127.0.0.1:8500", description="host:port of a Consul agent's HTTP(S) API")
    http_scheme: Literal["http", "https"] = Field(default="http", description="http or https")
    datacenter: str | None = Field(default=None, description="Datacenter to use (default: the agent's)")
    prefix: str | None = Field(
        default=None, description="Work below this key prefix only (like a chroot; keys are stored relative to it)"
    )
    token: SecretStr | None = Field(default=None, description="ACL token (else CONSUL_HTTP_TOKEN)")
    ca_cert: str | None = Field(default=None, description="CA bundle: a file path or PEM text")
    client_cert: str | None = Field(default=None, description="Client certificate: a file path or PEM text")
    client_key: SecretStr | None = Field(default=None, description="Client private key: a file path or PEM text")
    tls_verify: bool = Field(default=True, description="Verify the server's certificate")
    tls_server_name: str | None = Field(default=None, description="Expected server name in its certificate")
    connect_timeout: float = Field(default=10.0, description="Seconds to wait for a connection")
    request_timeout: float = Field(default=300.0, description="Seconds one request may take")
    txn_ops: int = Field(default=MAX_TXN_OPS, description="Ops per /v1/txn (Consul allows at most 64)")
    txn_bytes: int = Field(default=448 * 1024, description="Request bytes per /v1/txn (Consul txn_max_req_len: 512 KiB)")
    window: int = Field(default=8, description="Requests in flight at once on restore and lookup")
    max_value_bytes: int = Field(
        default=512 * 1024, description="Largest value the agent accepts (Consul kv_max_value_size, default 512 KiB)"
    )

    def describe(self) -> str:
        scheme = "consuls" if self.http_scheme == "https" else "consul"
        url = f"{scheme}://{self.address}"
        p = _normalize_prefix(self.prefix)
        if p:
            url += "/" + quote(p, safe="/")
        if self.datacenter:
            url += "?dc=" + quote(self.datacenter, safe="")
        return url

    def connect(self) -> ConsulSession:
        return ConsulSession(self)


def _pem_file(value: str | None, what: str, tmp: list[str]) -> str | None:
    """A file path for a path-or-PEM setting (PEM text goes to a private temporary file)."""
    if not value:
        return None
    if "-----BEGIN" not in value:
        if not Path(value).expanduser().is_file():
            raise UsageError(f"the Consul TLS {what} file {value} does not exist")
        return str(Path(value).expanduser())
    fd, path = tempfile.mkstemp(prefix="burrow-tls-", suffix=".pem")
    with os.fdopen(fd, "w") as f:
        f.write(value)
    tmp.append(path)
    return path


class ConsulSession:
    """An HTTP client bound to one Consul agent plus the batched operations Burrow needs."""

    service = "consul"

    def __init__(self, block: ConsulCluster) -> None:
        self.block = block
        self.label = block.describe()
        self.prefix = _normalize_prefix(block.prefix)
        token = block.token.get_secret_value() if block.token is not None else os.environ.get(ENV_TOKEN, "")
        headers = {"Accept-Encoding": "identity", "User-Agent": "burrow"}
        if token:
            headers["X-Consul-Token"] = token
        self.params: dict[str, str] = {"dc": block.datacenter} if block.datacenter else {}
        verify = self._tls_context() if block.http_scheme == "https" else False
        window = max(1, block.window)
        self.http = httpx.Client(
            base_url=f"{block.http_scheme}://{block.address}",
            headers=headers,
            verify=verify,
            timeout=httpx.Timeout(block.request_timeout, connect=block.connect_timeout),
            limits=httpx.Limits(max_connections=window + 2, max_keepalive_connections=window + 2),
            trust_env=False,
        )
        self._pool: ThreadPoolExecutor | None = None
        self._listing = True  # lookups may list a batch's common prefix first
        name = block.tls_server_name or os.environ.get(ENV_SERVER_NAME)
        self._extensions = {"sni_hostname": name} if name and block.http_scheme == "https" else None
        try:
            resp = self._request("GET", "/v1/status/leader", "connecting")
            leader = resp.content.strip()
            if leader in (b"", b'""'):
                raise SourceUnavailable(f"Consul at {self.label} has no cluster leader")
            self.acl = self._check_token()
        except BaseException:
            self.http.close()
            raise

    def _check_token(self) -> str:
        """"disabled", "anonymous" or "token"; an unknown token is refused here, before any read."""
        resp = self._request("GET", "/v1/acl/token/self", "checking the ACL token", ok=(200, 401, 403))
        if resp.status_code == 200:
            body = orjson.loads(resp.content) if resp.content else {}
            return "anonymous" if body.get("AccessorID") == ANONYMOUS_ACCESSOR else "token"
        text = resp.text.lower()
        if "acl support disabled" in text or "acl disabled" in text:
            return "disabled"
        if "acl not found" in text:
            raise AuthError(
                f"Consul at {self.label} does not know the ACL token (ACL not found); "
                "check the block's token or CONSUL_HTTP_TOKEN"
            )
        return "token"  # the token is valid but may not read itself: the reads will tell

    def _tls_context(self) -> ssl.SSLContext:
        b = self.block
        ca = b.ca_cert or os.environ.get(ENV_CACERT)
        cert = b.client_cert or os.environ.get(ENV_CERT)
        key = b.client_key.get_secret_value() if b.client_key else os.environ.get(ENV_KEY)
        verify = b.tls_verify and os.environ.get(ENV_VERIFY, "true").lower() not in ("0", "false", "no")
        if bool(cert) != bool(key):
            raise UsageError("Consul TLS needs both a client certificate and a client key, or neither")
        tmp: list[str] = []
        try:
            ca_path = _pem_file(ca, "CA", tmp)
            try:
                ctx = ssl.create_default_context(cafile=ca_path)
            except (ssl.SSLError, OSError):
                raise UsageError("the Consul TLS CA bundle is not valid PEM") from None
            if not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if cert:
                try:
                    ctx.load_cert_chain(_pem_file(cert, "client certificate", tmp), _pem_file(key, "client key", tmp))
                except (ssl.SSLError, OSError):
                    raise UsageError("the Consul TLS client certificate or key is not valid PEM") from None
            return ctx
        finally:
            for p in tmp:
                Path(p).unlink(missing_ok=True)

    # -- HTTP ---------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        action: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        merged = {**self.params, **(params or {})}
        with self._guard(action):
            resp = self.http.request(method, path, params=merged, content=content, extensions=self._extensions)
        if resp.status_code in ok:
            return resp
        raise self._http_error(resp, action)

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Turn httpx's transport errors into Burrow's (unreachable, timed out, TLS, cut off)."""
        try:
            yield
        except httpx.ConnectError as exc:
            if _is_tls(exc):
                raise SourceError(
                    f"TLS with Consul at {self.label} failed while {action} "
                    "(check the CA, client certificate and key, and the server name)"
                ) from None
            gai = _gaierror(exc)
            if gai is not None and not is_transient_resolution_failure(gai):
                raise SourceError(
                    f"the Consul host name of {self.label} does not exist ({gai.strerror or gai}); check the address"
                ) from None
            if gai is not None:
                raise SourceUnavailable(
                    f"cannot resolve the Consul host name of {self.label} for now while {action} ({gai.strerror or gai})"
                ) from None
            raise SourceUnavailable(f"cannot reach Consul at {self.label} while {action}") from None
        except httpx.TimeoutException:
            raise SourceUnavailable(f"Consul at {self.label} timed out while {action}") from None
        except httpx.TransportError as exc:
            if _is_tls(exc):
                raise SourceError(f"TLS with Consul at {self.label} failed while {action}") from None
            raise SourceUnavailable(
                f"lost the connection to Consul at {self.label} while {action} ({type(exc).__name__})"
            ) from None

    def _http_error(self, resp: httpx.Response, action: str) -> BurrowError:
        text = resp.text.strip().replace("\n", " ")[:200]
        code = resp.status_code
        if code in (401, 403):
            hint = "check the ACL token (block token or CONSUL_HTTP_TOKEN)"
            return AuthError(f"Consul at {self.label} denied {action} ({code}: {_safe(text)}); {hint}")
        if code == 400 and "tls" in text.lower():
            return SourceError(f"Consul at {self.label} expects TLS (use consuls:// or http_scheme=https)")
        if code == 413:
            return SourceError(f"Consul at {self.label} refused a request as too large while {action}: {_safe(text)}")
        if code >= 500 or code == 429:
            return SourceUnavailable(f"Consul at {self.label} failed {action} ({code}: {_safe(text)})")
        return SourceError(f"Consul at {self.label} failed {action} ({code}: {_safe(text)})")

    def _txn(
        self, ops: list[dict[str, Any]], action: str, *, results: bool = True
    ) -> tuple[list[Any] | None, list[dict[str, Any]]]:
        """Run one /v1/txn; returns (results, []) when it committed, (None, errors) when rolled
        back. With ``results=False`` a committed txn's answer is not even parsed."""
        resp = self._request("PUT", "/v1/txn", action, content=orjson.dumps(ops), ok=(200, 409))
        if resp.status_code == 200 and not results:
            return [], []
        body = orjson.loads(resp.content) if resp.content else {}
        if resp.status_code == 200:
            return body.get("Results") or [], []
        return None, body.get("Errors") or []

    def _map(self, fn: Any, items: list[Any]) -> list[Any]:
        if len(items) <= 1 or self.block.window <= 1:
            return [fn(x) for x in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, self.block.window), thread_name_prefix="burrow-consul")
        return list(self._pool.map(fn, items))

    # -- keys ---------------------------------------------------------------------------
    def full_key(self, key: bytes) -> str:
        """The Consul key for an archive key (which is relative to the prefix)."""
        try:
            k = key.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(f"Consul keys are UTF-8 text; {display_key(key)} is not") from None
        if not self.prefix:
            return k
        return self.prefix + "/" + k

    # -- backup -------------------------------------------------------------------------
    def walk(self, root: bytes, stats: WalkStats) -> Iterator[Record]:
        rel_root = root.decode("utf-8").strip("/")
        p = self.prefix
        if rel_root:
            full_root = f"{p}/{rel_root}" if p else rel_root
            ask = full_root
        else:
            full_root = ""
            ask = p + "/" if p else ""
        action = "reading " + (ask or "the KV store")
        with self._recursive_read("/v1/kv/" + quote(ask, safe="/"), action, {"consistent": ""}) as (resp, body):
            yield from self._walk_entries(resp, body, action, full_root, stats)

    @contextmanager
    def _recursive_read(self, path: str, action: str,
                        params: dict[str, str]) -> Iterator[tuple[httpx.Response, Iterator[bytes]]]:
        """A ``?recurse`` GET of ``path`` read as it arrives: the response (its headers now) and
        its body's chunks (none for a 404: nothing under the prefix); any other status raised."""
        request = self.http.build_request("GET", path, params={**self.params, "recurse": "", **params},
                                          extensions=self._extensions)
        with self._guard(action):
            resp = self.http.send(request, stream=True)  # headers now, the body as it is read
        try:
            if resp.status_code != 200:
                with self._guard(action):
                    resp.read()  # 404 (nothing under the prefix) has an empty body; errors, a message
                if resp.status_code != 404:
                    raise self._http_error(resp, action)
            yield resp, self._body(resp, action) if resp.status_code == 200 else iter(())
        finally:
            resp.close()

    def _walk_entries(self, resp: httpx.Response, body: Iterator[bytes], action: str, full_root: str,
                      stats: WalkStats) -> Iterator[Record]:
        index = resp.headers.get("X-Consul-Index")
        stats.info.update(
            consul_index=int(index) if index and index.isdigit() else None,
            known_leader=resp.headers.get("X-Consul-KnownLeader") == "true",
            point_in_time=True,
        )
        if self.block.datacenter:
            stats.info["datacenter"] = self.block.datacenter
        stats.info["acl"] = self.acl
        if self.acl == "anonymous":
            stats.warn(
                "reading with the anonymous ACL token: Consul silently leaves out of recursive reads the keys "
                "a token may not read; give a token (block or CONSUL_HTTP_TOKEN) that can read the whole prefix"
            )
        p = self.prefix
        cut = len(p) + 1 if p else 0
        exact_child = full_root + "/"
        locked = 0
        a2b = binascii.a2b_base64
        for entries in _entry_batches(body, self.label, action):
            for e in entries:
                key: str = e["Key"]
                if full_root and key != full_root and not key.startswith(exact_child):
                    continue  # a sibling sharing the raw prefix (``ab`` when asking for ``a``)
                rel = key[cut:] if cut else key
                if not rel:
                    stats.skipped_excluded += 1
                    stats.warn(f"the key {key} equals the prefix folder itself and is not below it: not backed up")
                    continue
                value = e.get("Value")
                # Only what a restore needs (flags) or must report (a session lock): per-key
                # indexes are left out, the read's index is in the manifest (consul_index).
                meta: dict[str, Any] = {}
                flags = e.get("Flags")
                if flags:
                    meta["flags"] = flags
                session = e.get("Session")
                if session:
                    locked += 1
                    meta["session"] = session
                    meta["lock_index"] = e.get("LockIndex")
                yield Record(rel.encode("utf-8"), a2b(value) if value else b"", meta)
        stats.info["locked_keys"] = locked
        if locked:
            stats.warn(
                f"{locked} keys are held by a session lock: backed up with the session noted, "
                "restored without it"
            )

    def _body(self, resp: httpx.Response, action: str) -> Iterator[bytes]:
        """The response body as it arrives (transport errors mapped like ``_request``'s)."""
        chunks = resp.iter_bytes()
        while True:
            with self._guard(action):
                chunk = next(chunks, None)
            if chunk is None:
                return
            if chunk:
                yield chunk

    # -- restore ------------------------------------------------------------------------
    def lookup(self, keys: list[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        wanted = list(range(len(keys)))
        if len(keys) >= 16 and self._listing:
            # One key listing of the batch's common prefix says which keys exist at all;
            # only those are then read (one small request per batch into an empty target).
            present = self._present_under_prefix([self.full_key(k) for k in keys])
            if present is not None:
                wanted = [i for i, k in enumerate(keys) if self.full_key(k) in present]
        if not wanted:
            return out
        n = max(1, min(self.block.txn_ops, MAX_TXN_OPS))
        chunks = [wanted[i : i + n] for i in range(0, len(wanted), n)]
        for chunk, values in zip(chunks, self._map(self._lookup_chunk, [[keys[i] for i in c] for c in chunks]),
                                 strict=True):
            for i, v in zip(chunk, values, strict=True):
                out[i] = v
        return out

    def holds_no_keys(self) -> bool:
        """Whether the prefix (the whole KV store without one) holds no key at all: one
        ``?keys&separator=/`` listing of its top level (404 when empty). Planning then looks
        nothing up: every key is missing. A token that may not list says False (lookups follow).

        Only where the agent has ACLs turned off: with ACLs, a listing silently leaves out the
        keys the token may not read, so an empty answer does not mean an empty prefix (and the
        lookups must run, to refuse such keys before the first write)."""
        if not self._acls_disabled():
            return False
        ask = self.prefix + "/" if self.prefix else ""
        try:
            resp = self.http.get(
                "/v1/kv/" + quote(ask, safe="/"), params={**self.params, "keys": "", "separator": "/"},
                extensions=self._extensions,
            )
        except httpx.HTTPError:
            return False  # the lookups that follow report any real trouble
        if resp.status_code == 404:
            return True
        return resp.status_code == 200 and not orjson.loads(resp.content)

    def _acls_disabled(self) -> bool:
        """Whether the agent runs without ACLs (``/v1/acl/token/self`` answers "ACL support
        disabled"); False on any other answer or error."""
        try:
            resp = self.http.get("/v1/acl/token/self", params=self.params, extensions=self._extensions)
        except httpx.HTTPError:
            return False
        return resp.status_code in (401, 403) and "ACL support disabled" in resp.text

    def _present_under_prefix(self, full: list[str]) -> set[str] | None:
        """Keys that exist under the common prefix of ``full``, or None when that listing
        would be much larger than the batch (then listings are not tried again)."""
        prefix = os.path.commonprefix(full)
        if prefix.startswith("/") or "//" in prefix:
            return None  # not addressable in a URL path
        cap = max(64 * 1024, 4 * sum(len(k) + 4 for k in full))
        chunks: list[bytes] = []
        size = 0
        try:
            with self.http.stream(
                "GET", "/v1/kv/" + quote(prefix, safe="/"), params={**self.params, "keys": ""},
                extensions=self._extensions,
            ) as resp:
                if resp.status_code == 404:
                    return set()
                if resp.status_code != 200:
                    self._listing = False  # e.g. a token that may read keys but not list them
                    return None
                for chunk in resp.iter_raw(65536):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > cap:
                        self._listing = False  # the target holds far more under these prefixes
                        return None
        except httpx.HTTPError:
            return None  # the point lookups that follow report any real trouble
        return set(orjson.loads(b"".join(chunks)))

    def _lookup_chunk(self, keys: list[bytes]) -> list[bytes | None]:
        return [None if e is None else base64.b64decode(e["Value"]) if e.get("Value") else b""
                for e in self._read_chunk(keys)]

    def _read_chunk(self, keys: list[bytes]) -> list[dict[str, Any] | None]:
        """Each key's KV entry as Consul's txn ``get`` answers it (Value in base64, Flags, ...),
        or None where the key does not exist."""
        values: list[dict[str, Any] | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        full = [self.full_key(k) for k in keys]
        for _ in range(10):
            if not pending:
                break
            ops = [{"KV": {"Verb": "get", "Key": full[i]}} for i in pending]
            results, errors = self._txn(ops, "reading keys")
            if results is not None:
                if len(results) != len(pending):
                    # Consul leaves out of a txn's results the keys the token may not read.
                    got = {(r.get("KV") or {}).get("Key") for r in results}
                    hidden = [full[i] for i in pending if full[i] not in got]
                    raise AuthError(
                        f"Consul at {self.label} left {len(hidden) or 'some'} keys out of its answer that the ACL "
                        f"token may not read (such as {hidden[0] if hidden else '?'}); check the ACL token "
                        "(block token or CONSUL_HTTP_TOKEN)"
                    )
                for i, r in zip(pending, results, strict=True):
                    values[i] = r.get("KV") or {}
                return values
            missing = self._failed_ops(errors, [full[i] for i in pending], _ABSENT, "reading keys")
            # A failed read-only txn returns no results: ask again for the keys that exist.
            pending = [i for j, i in enumerate(pending) if j not in missing]
        else:
            raise SourceUnavailable(f"keys at Consul {self.label} kept changing while being read")
        return values

    def _failed_ops(self, errors: list[dict[str, Any]], keys: list[str], expected: re.Pattern[str],
                    action: str) -> set[int]:
        """The ops of a rolled-back txn (indexes into ``keys``) that failed in the ``expected``
        way for their own key; any other error fails the run with its own class."""
        failed: set[int] = set()
        for err in errors:
            what = str(err.get("What", ""))
            i = err.get("OpIndex")
            m = expected.fullmatch(what)
            if not (isinstance(i, int) and 0 <= i < len(keys) and m and _go_unquote(m.group(1)) == keys[i]):
                raise self._txn_error(what, action)
            failed.add(i)
        return failed

    def _txn_error(self, what: str, action: str) -> BurrowError:
        if _DENIED.fullmatch(what):
            return AuthError(
                f"Consul at {self.label} denied {action}: {_safe(what)}; check the ACL token "
                "(block token or CONSUL_HTTP_TOKEN)"
            )
        return SourceError(f"Consul at {self.label} failed {action}: {_safe(what)}")

    def check_metadata(self, records: list[Record], source_service: str) -> list[str | None]:
        """Post-verify (tasks/postverify.py): for each archived record whose key holds its value,
        "flags" when the key's flags are not the ones the restore writes (the archived flags from
        Consul, 0 from another service), else None."""
        want = [int(r.meta.get("flags") or 0) if source_service == "consul" else 0 for r in records]
        n = max(1, min(self.block.txn_ops, MAX_TXN_OPS))
        chunks = [records[i : i + n] for i in range(0, len(records), n)]
        entries = [e for got in self._map(self._read_chunk, [[r.key for r in c] for c in chunks]) for e in got]
        return [None if e is None or int(e.get("Flags") or 0) == w else "flags"
                for e, w in zip(entries, want, strict=True)]

    def prepare(self, record: Record, source_service: str) -> tuple[Record, list[str]]:
        # Fail while planning, before anything is written, on what Consul would refuse.
        key = self.full_key(record.key)
        if len(record.value) > self.block.max_value_bytes:
            raise SourceError(
                f"{key} holds {len(record.value)} bytes but Consul at {self.label} accepts at most "
                f"{self.block.max_value_bytes} (kv_max_value_size; raise max_value_bytes on the block if the "
                "agent allows more); nothing was written"
            )
        meta: dict[str, Any] = {}
        m = record.meta
        if source_service == "consul":
            dropped = ["session"] if m.get("session") else []
            if m.get("flags"):
                meta["flags"] = int(m["flags"])
        else:
            dropped = foreign_metadata(m, source_service)
        if m.get("intermediate"):
            meta["intermediate"] = True
        return Record(record.key, record.value, meta), dropped

    def parent_key(self, key: bytes) -> bytes | None:
        return None  # Consul KV is flat: folders are optional

    def ensure_root(self) -> None:
        return None

    def _op(self, r: Record) -> dict[str, Any]:
        return {
            "KV": {
                "Verb": "cas",
                "Key": self.full_key(r.key),
                "Value": base64.b64encode(r.value).decode("ascii"),
                "Flags": int(r.meta.get("flags") or 0),
                "Index": 0,
            }
        }

    def create(self, records: list[Record]) -> list[bool]:
        results: list[bool | None] = [None] * len(records)
        n = max(1, min(self.block.txn_ops, MAX_TXN_OPS))
        limit = self.block.txn_bytes
        batches: list[list[int]] = []
        large: list[int] = []
        cur: list[int] = []
        size = 0
        for i, r in enumerate(records):
            rsize = len(r.key) + (len(r.value) + 2) // 3 * 4 + _OP_OVERHEAD
            if rsize > limit:
                large.append(i)  # too big for any txn: a cas=0 PUT of the raw value
                continue
            if cur and (len(cur) >= n or size + rsize > limit):
                batches.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += rsize
        if cur:
            batches.append(cur)

        def run(batch: list[int]) -> list[tuple[int, bool]]:
            got, errors = self._txn([self._op(records[i]) for i in batch], "creating keys", results=False)
            if got is not None:
                return [(i, True) for i in batch]
            existed = self._failed_ops(errors, [self.full_key(records[i].key) for i in batch], _STALE, "creating keys")
            # Rolled back: keys that exist stay as they are; the others are created one by one.
            out = []
            for j, i in enumerate(batch):
                out.append((i, False) if j in existed else (i, self._create_one(records[i])))
            return out

        for outcome in self._map(run, batches):
            for i, ok in outcome:
                results[i] = ok
        for i in large:
            results[i] = self._put_large(records[i])
        return [bool(x) for x in results]

    def _create_one(self, r: Record) -> bool:
        action = "creating " + display_key(r.key)
        got, errors = self._txn([self._op(r)], action, results=False)
        if got is not None:
            return True
        if not errors:
            raise self._txn_error("", action)
        self._failed_ops(errors, [self.full_key(r.key)], _STALE, action)
        return False  # the key exists

    def _put_large(self, r: Record) -> bool:
        key = self.full_key(r.key)
        if key.startswith("/") or "//" in key or any(s in (".", "..") for s in key.split("/")):
            raise SourceError(
                f"cannot create {key} in Consul at {self.label}: its value is too large for a transaction "
                "and the key cannot be addressed in a URL"
            )
        params = {"cas": "0"}
        if r.meta.get("flags"):
            params["flags"] = str(int(r.meta["flags"]))
        resp = self._request("PUT", "/v1/kv/" + quote(key, safe="/"), "creating " + key, params=params, content=r.value)
        return resp.content.strip() == b"true"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.http.close()

    # -- capture --------------------------------------------------------------------------
    def watch(self, after: int) -> ConsulWatch:
        """The prefix's changes as blocking queries see them (a capture's feed): ConsulWatch."""
        return ConsulWatch(self, after)

    def _delete_cas(self, keys: list[str], indexes: list[int]) -> list[int]:
        """Delete each of ``keys`` (one txn's worth) at its ``ModifyIndex`` with ``delete-cas``,
        in one txn; a txn rolled back by keys changed meanwhile runs again without them (up to
        10 times). Returns the positions of the keys deleted."""
        todo = list(range(len(keys)))
        for _ in range(10):
            if not todo:
                break
            ops = [{"KV": {"Verb": "delete-cas", "Key": keys[j], "Index": indexes[j]}} for j in todo]
            got, errors = self._txn(ops, "deleting keys", results=False)
            if got is not None:
                return todo
            stale = self._failed_ops(errors, [keys[j] for j in todo], _DELETE_STALE, "deleting keys")
            todo = [j for k, j in enumerate(todo) if k not in stale]
        return []

    # -- cleanup (rehearsals) -------------------------------------------------------------
    def delete_if_unchanged(self, records: list[Record]) -> list[bool]:
        """Delete each record's key if it still holds exactly the record's value: read value
        and ModifyIndex in one txn per batch, then ``delete-cas`` at that index (a key changed
        meanwhile is left alone). True = deleted.

        Added for rehearsals (tasks/rehearse.py), which remove what they restored into a
        scratch prefix once compared: a restore itself never deletes anything."""
        results = [False] * len(records)
        n = max(1, min(self.block.txn_ops, MAX_TXN_OPS))
        chunks = [list(range(i, min(i + n, len(records)))) for i in range(0, len(records), n)]

        def run(chunk: list[int]) -> list[int]:
            full = [self.full_key(records[i].key) for i in chunk]
            index: dict[str, int] = {}  # key -> ModifyIndex, for the keys whose value is still the record's
            pending = list(range(len(chunk)))
            for _ in range(10):
                if not pending:
                    break
                ops = [{"KV": {"Verb": "get", "Key": full[j]}} for j in pending]
                got, errors = self._txn(ops, "reading keys to delete")
                if got is not None:
                    expected = {full[j]: records[chunk[j]].value for j in pending}
                    for r in got:
                        kv = r.get("KV") or {}
                        key = str(kv.get("Key"))
                        value = base64.b64decode(kv["Value"]) if kv.get("Value") else b""
                        if key in expected and expected[key] == value and kv.get("ModifyIndex"):
                            index[key] = int(kv["ModifyIndex"])
                    break
                missing = self._failed_ops(errors, [full[j] for j in pending], _ABSENT, "reading keys to delete")
                pending = [j for k, j in enumerate(pending) if k not in missing]
            held = [j for j in range(len(chunk)) if full[j] in index]
            done = self._delete_cas([full[j] for j in held], [index[full[j]] for j in held])
            return [chunk[held[d]] for d in done]

        for deleted in self._map(run, chunks):
            for i in deleted:
                results[i] = True
        return results

    # -- undo (version-guarded) -----------------------------------------------------------
    def _indexes(self, full: list[str]) -> dict[str, tuple[int, int]]:
        """``key -> (CreateIndex, ModifyIndex)`` of those of ``full`` (one txn's worth) that
        exist: a txn of gets, run again without the keys it found absent."""
        found: dict[str, tuple[int, int]] = {}
        pending = list(range(len(full)))
        for _ in range(10):
            if not pending:
                break
            got, errors = self._txn([{"KV": {"Verb": "get", "Key": full[j]}} for j in pending], "reading keys")
            if got is not None:
                for r in got:
                    kv = r.get("KV") or {}
                    if kv.get("ModifyIndex"):
                        found[str(kv.get("Key"))] = (int(kv.get("CreateIndex") or 0), int(kv["ModifyIndex"]))
                break
            missing = self._failed_ops(errors, [full[j] for j in pending], _ABSENT, "reading keys")
            pending = [j for k, j in enumerate(pending) if k not in missing]
        return found

    def created_versions(self, keys: list[bytes]) -> list[int | None]:
        """The index each key was created at (its ``CreateIndex``), None where it is gone: read
        back right after a restore created them, so that ``burrow undo`` can later delete
        exactly these keys, and only while unchanged. The creation index, not ``ModifyIndex``:
        a key changed between its create and this read already differs from what is recorded,
        and undo keeps it."""
        n = max(1, min(self.block.txn_ops, MAX_TXN_OPS))
        chunks = [[self.full_key(k) for k in keys[i : i + n]] for i in range(0, len(keys), n)]
        out: list[int | None] = []
        for full, found in zip(chunks, self._map(self._indexes, chunks), strict=True):
            out += [found[k][0] if k in found else None for k in full]
        return out

    def delete_if_version(self, items: list[tuple[bytes, int]], *, dry_run: bool = False) -> list[bool]:
        """Delete each ``(key, version)`` whose ``ModifyIndex`` still equals ``version`` (as
        :meth:`created_versions` recorded it: unchanged since this Burrow created it), with
        ``delete-cas`` at that index, one txn per batch (a batch rolled back by a key changed
        meanwhile runs again without it). True = the key is gone (deleted now, or already
        absent: Consul's ``delete-cas`` succeeds on a missing key); False = kept, changed since.
        ``dry_run`` reads the indexes and deletes nothing."""
        results = [False] * len(items)
        n = max(1, min(self.block.txn_ops, MAX_TXN_OPS))
        chunks = [list(range(i, min(i + n, len(items)))) for i in range(0, len(items), n)]

        def run(chunk: list[int]) -> list[int]:
            full = [self.full_key(items[i][0]) for i in chunk]
            if dry_run:
                found = self._indexes(full)
                return [i for i, k in zip(chunk, full, strict=True)
                        if k not in found or found[k][1] == int(items[i][1])]
            done = self._delete_cas(full, [int(items[i][1]) for i in chunk])
            return [chunk[d] for d in done]

        for gone in self._map(run, chunks):
            for i in gone:
                results[i] = True
        return results


_WS = b" \t\r\n"
_SCAN = 64  # "}" looked at per chunk when looking for the end of the last complete element
_FAILS = 8  # failed guesses (a "}" inside a string) before the rest goes to ijson


def _entry_batches(body: Iterable[bytes], label: str, action: str) -> Iterator[list[dict[str, Any]]]:
    """The entries of a recursive read's ``body`` as they arrive, batch by batch
    (:func:`_json_array_batches`); malformed JSON is the server's fault, named as such."""
    batches = _json_array_batches(body)
    while True:
        try:
            batch = next(batches, None)
        except (ValueError, ijson.JSONError):  # orjson.JSONDecodeError is a ValueError
            raise SourceError(f"Consul at {label} answered {action} with malformed JSON") from None
        if batch is None:
            return
        yield batch


def _json_array_batches(chunks: Iterable[bytes]) -> Iterator[list[Any]]:
    """The elements of the JSON array whose text arrives as ``chunks``, a batch per chunk.

    orjson parses everything up to the last complete element of what has arrived: a "}"
    followed by "," or "]" is a guess at the end of an element, checked by parsing (text
    cut inside a string or a nested value is not valid JSON). What follows the cut stays
    for the next chunk. Held at once: about one chunk and its parsed elements, or one
    element when it is larger. If guesses keep failing (keys full of "}," say), the rest
    is parsed by ijson's incremental parser instead: slower, same elements.
    """
    it = iter(chunks)
    buf = b""
    head = b""  # b"[" until the first batch, then b"[0" (a dummy element before the leading comma)
    fails = 0
    for chunk in it:
        buf = buf + chunk if buf else chunk
        if not head:
            buf = buf.lstrip(_WS)
            if not buf:
                continue
            if buf[:1] != b"[":
                raise ValueError("not a JSON array")
            head, buf = b"[", buf[1:]
        cut = buf.rfind(b"}")
        for _ in range(_SCAN):
            if cut < 0:
                break
            if buf[cut + 1 : cut + 33].lstrip(_WS)[:1] in (b"", b",", b"]"):
                try:
                    batch = orjson.loads(head + buf[: cut + 1] + b"]")
                except orjson.JSONDecodeError:
                    fails += 1
                else:
                    buf = buf[cut + 1 :]
                    yield batch if head == b"[" else batch[1:]
                    head, fails = b"[0", 0
                    break
            if fails >= _FAILS:
                yield from _ijson_batches(itertools.chain([head + buf], it), skip=0 if head == b"[" else 1)
                return
            cut = buf.rfind(b"}", 0, cut)
    if not head:
        return  # an empty body: no entries
    batch = orjson.loads(head + buf)
    yield batch if head == b"[" else batch[1:]


def _ijson_batches(chunks: Iterable[bytes], skip: int) -> Iterator[list[Any]]:
    """``_json_array_batches`` with ijson (its C backend), leaving out the first ``skip`` elements."""
    out = ijson.sendable_list()
    # Not use_float=True: with it the C backend fails on integers above 2**63 (Flags are
    # uint64). Consul's entries hold no fractions, so no Decimal turns up either way.
    parser = ijson.items_coro(out, "item")
    for chunk in chunks:
        parser.send(chunk)
        if out:
            batch = out[skip:]
            skip = max(0, skip - len(out))
            del out[:]
            if batch:
                yield batch
    parser.close()
    if out[skip:]:
        yield out[skip:]


def _go_unquote(body: str) -> str | None:
    """The text a Go ``%q`` literal (``body``: between its quotes) stands for; None if malformed."""
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c != "\\":
            out += c.encode("utf-8", "surrogateescape")
            i += 1
            continue
        e = body[i + 1 : i + 2]
        if e in _GO_ESCAPES:
            out += _GO_ESCAPES[e].encode("ascii")
            i += 2
        elif e in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i + 2 : i + 2 + width]
            try:
                v = int(digits, 16) if len(digits) == width else -1
                out += bytes([v]) if e == "x" else chr(v).encode("utf-8", "surrogatepass")
            except ValueError:
                return None
            i += 2 + width
        elif e and e in "01234567" and len(body) >= i + 4:
            try:
                out.append(int(body[i + 1 : i + 4], 8))
            except ValueError:
                return None
            i += 4
        else:
            return None
    return out.decode("utf-8", "surrogateescape")


def _gaierror(exc: BaseException) -> socket.gaierror | None:
    """The name-resolution failure behind a connection error, if that is what it was."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _is_tls(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        text = str(seen).lower()
        if "ssl" in text or "certificate" in text or "tls" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _safe(text: str) -> str:
    """Consul's error text, which names keys and limits but never values or tokens."""
    return text or "no details"


class ConsulWatch:
    """Consul's change feed for a capture (blocks/source.py ``ChangeFeed``): blocking queries on
    the recursive prefix with ``index`` and ``wait``.

    Each answer is the whole prefix at its ``X-Consul-Index``; changes are found by comparing
    every key's ``ModifyIndex`` with the state tracked from the previous answer, and a key gone
    from the answer is a delete (at the answer's index: Consul does not say when). So writes to
    one key between two answers collapse into the last value. The first answer, and any answer
    whose index went backwards (a restored or rebuilt cluster), is a resync: the whole state.
    Positions are Consul indexes, shifted up after an index went backwards so that they only
    ever grow along a chain."""

    WAIT = 2  # seconds a blocking query waits for a change: also how often progress is reported
    #: The least time between two reads of the prefix. Every answer is the whole prefix, so a
    #: busy prefix read again after each change cost the Consul agent 4x its CPU and its own
    #: writers' p99 latency 8 -> 52 ms at 200 changes a second (bench/RESULTS.md). A 1,000-key
    #: prefix read every 2 s (~300 KB of JSON, built on one core): the writers' p99 +0.8% on an
    #: agent with two cores, +30% on an agent with one, where they wait behind the read; every
    #: 4 s still +15% there, for 2 s more RPO (p99 12.0 -> 13.9 s). Changes in between are in the
    #: next answer (one ModifyIndex comparison); writes to one key within these 2 s collapse.
    MIN_INTERVAL = 2.0
    RESYNC_PIECE = 1024 * 1024  # bytes of a resync handed on at once

    def __init__(self, session: ConsulSession, after: int) -> None:
        self.session = session
        self.index = 0
        self.offset = 0
        self.floor = after  # positions stay above the chain's end
        self.tracked: dict[str, int] = {}
        self._closed = False
        p = session.prefix
        self._path = "/v1/kv/" + quote(p + "/" if p else "", safe="/")
        self._cut = len(p) + 1 if p else 0

    def request_progress(self) -> None:
        return None  # every answer (a change, or the wait running out) reports the index

    def close(self) -> None:
        self._closed = True

    @contextmanager
    def _answer(self) -> Iterator[tuple[int, Iterator[bytes]]]:
        """One read of the prefix (a blocking query once the index is known): its index, and its
        body as it arrives (``_entries`` parses it batch by batch: the whole prefix is never held
        at once, only the changes found in it)."""
        s = self.session
        params = {"index": str(self.index), "wait": f"{self.WAIT}s"} if self.index else {}
        with s._recursive_read(self._path, "watching for changes", params) as (resp, body):
            header = resp.headers.get("X-Consul-Index", "")
            if not header.isdigit():
                raise SourceError(f"Consul at {s.label} answered a blocking query without an index")
            yield int(header), body

    def _entries(self, body: Iterator[bytes]) -> Iterator[list[dict[str, Any]]]:
        """The entries of an answer's ``body``, batch by batch."""
        return _entry_batches(body, self.session.label, "a watch")

    def _keyed(self, batches: Iterator[list[dict[str, Any]]]) -> Iterator[tuple[str, int, dict[str, Any]]]:
        """(key below the prefix, ModifyIndex, entry) of every entry of an answer."""
        cut = self._cut
        for batch in batches:
            for e in batch:
                rel = e["Key"][cut:] if cut else e["Key"]
                if rel:
                    yield rel, int(e.get("ModifyIndex") or 0), e

    def _resync(self, batches: Iterator[list[dict[str, Any]]], pos: int) -> Iterator[ChangeBatch]:
        """The whole prefix as a resync, handed on in pieces of about RESYNC_PIECE bytes as the
        answer arrives (its order is Consul's; the chain's reader sorts). ``tracked`` is rebuilt
        from it."""
        a2b = binascii.a2b_base64
        self.tracked = {}
        piece: list[tuple[str, bytes, bytes, int, dict[str, Any]]] = []
        size, continued = 0, False
        for k, mi, e in self._keyed(batches):
            self.tracked[k] = mi
            value = a2b(e["Value"]) if e.get("Value") else b""
            piece.append(("put", k.encode("utf-8"), value, pos, _meta(e)))
            size += len(k) + len(value) + 64
            if size >= self.RESYNC_PIECE:
                yield ChangeBatch(piece, pos, resync=True, more=True, continued=continued)
                piece, size, continued = [], 0, True
        yield ChangeBatch(piece, pos, resync=True, continued=continued)

    def _changes(self, batches: Iterator[list[dict[str, Any]]], pos_now: int) -> list[tuple[str, bytes, bytes, int,
                                                                                            dict[str, Any]]]:
        """The puts and deletes since the last answer: every key whose ModifyIndex is not the one
        tracked, and every tracked key the answer lacks (only those values are decoded and held)."""
        a2b = binascii.a2b_base64
        seen: dict[str, int] = {}
        changes = []
        for k, mi, e in self._keyed(batches):
            seen[k] = mi
            if self.tracked.get(k) != mi:
                pos = min(pos_now, max(mi + self.offset, self.floor + 1))
                changes.append(("put", k.encode("utf-8"), a2b(e["Value"]) if e.get("Value") else b"", pos, _meta(e)))
        changes += [("del", k.encode("utf-8"), b"", pos_now, {}) for k in self.tracked if k not in seen]
        changes.sort(key=lambda c: c[3])
        self.tracked = seen
        return changes

    def __iter__(self) -> Iterator[ChangeBatch]:
        last_read = 0.0
        while not self._closed:
            if (pause := self.MIN_INTERVAL - (time.monotonic() - last_read)) > 0:
                time.sleep(pause)
            last_read = time.monotonic()
            with self._answer() as (index, body):
                if self._closed:
                    return
                resync = not self.index or index < self.index
                if index < self.index:
                    self.offset += self.index - index + 1  # positions keep growing past a reset index
                pos_now = max(index + self.offset, self.floor + 1)
                if resync:
                    self.index, self.floor = index, pos_now
                    yield from self._resync(self._entries(body), pos_now)
                    continue
                if index == self.index:  # the wait ran out: nothing changed (read, not parsed)
                    collections.deque(body, maxlen=0)
                    changes = None
                else:
                    changes = self._changes(self._entries(body), pos_now)
            if changes is None:
                yield ChangeBatch([], self.floor, progress=True)
                continue
            self.index, self.floor = index, pos_now
            yield ChangeBatch(changes, pos_now)


def _meta(entry: dict[str, Any]) -> dict[str, Any]:
    """What a backup records of a Consul key (``walk``): its flags, and a session lock."""
    meta: dict[str, Any] = {}
    if entry.get("Flags"):
        meta["flags"] = entry["Flags"]
    if entry.get("Session"):
        meta["session"] = entry["Session"]
        meta["lock_index"] = entry.get("LockIndex")
    return meta
