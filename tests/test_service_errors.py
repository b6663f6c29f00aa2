"""What a cluster's errors mean: Consul txn errors read by their structure (a permission error
on ``cassandra/seeds`` is not a conflict), etcd's RESOURCE_EXHAUSTED told apart (out of space,
too many requests, a message over a size limit), "not capable" not taken for an auth error, a
host name that does not exist failing at once for good, and a refused ZooKeeper port failing
soon with a message that says what happened."""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import SESSION_DIR
from kvutil import Etcd, backup_kwargs, consul_client, consul_snapshot, unique
from pydantic import SecretStr

from blocks.consul import ConsulCluster, ConsulSession
from blocks.etcd import EtcdCluster
from blocks.local import LocalStore
from blocks.resolve import register
from burrow.archive import ArchiveWriter
from burrow.errors import (
    EXIT_FAILURE,
    AuthError,
    PermanentError,
    SourceError,
    SourceUnavailable,
    is_transient,
)
from burrow.records import Record
from burrow.testing.servers import LocalServer, free_port, start_consul, start_etcd
from cli import main
from flows.backup import backup
from flows.restore import restore
from tasks.extract import extract

MASTER_TOKEN = "6e1c2b1a-0000-4000-8000-burrowmaster2"


def write_archive(store: Path, service: str, records: list[Record], source: str = "src") -> str:
    """An unencrypted archive of ``records`` in the local store ``store``; returns its URL."""
    buf = io.BytesIO()
    w = ArchiveWriter(buf, service=service)
    for r in records:
        w.add(r)
    w.finish({"source": source, "service": service})
    tmp = store.parent / f"{unique('a')}.burrow"
    tmp.write_bytes(buf.getvalue())
    return LocalStore(path=str(store)).put(f"{source}/{unique(source)}.burrow", tmp).url


# --------------------------------------------------------------------------- Consul


@pytest.fixture(scope="module")
def consul_acl() -> Iterator[tuple[LocalServer, str]]:
    """Consul with ACLs (default deny) and a token that reads everything but cassandra/ and
    may write below ok/ only."""
    server = start_consul(
        SESSION_DIR / "consul-acl-errors",
        extra_config={"acl": {"enabled": True, "default_policy": "deny", "tokens": {"master": MASTER_TOKEN}}},
    )
    rules = 'key_prefix "" { policy = "read" }\nkey_prefix "ok/" { policy = "write" }\n' \
            'key_prefix "cassandra/" { policy = "deny" }'
    with httpx.Client(base_url=server.url, headers={"X-Consul-Token": MASTER_TOKEN}, trust_env=False) as c:
        c.put("/v1/acl/policy", json={"Name": "restore-ok", "Rules": rules}).raise_for_status()
        resp = c.put("/v1/acl/token", json={"Policies": [{"Name": "restore-ok"}]})
        resp.raise_for_status()
        token = resp.json()["SecretID"]
    yield server, token
    server.stop()


def _as_newer_consul(monkeypatch: pytest.MonkeyPatch) -> None:
    """Answer txn ACL refusals as Consul 1.11 and later word them, naming the key (Consul 1.8,
    the agent here, says only "Permission denied")."""
    real = ConsulSession._txn

    def txn(self: ConsulSession, ops: list[dict[str, Any]], action: str, *, results: bool = True) -> Any:
        got, errors = real(self, ops, action, results=results)
        for e in errors:
            if e.get("What") == "Permission denied":
                key = ops[e["OpIndex"]]["KV"]["Key"]
                e["What"] = (f"Permission denied: token with AccessorID 'f00d-1234' lacks permission "
                             f"'key:write' on \"{key}\"")
        return got, errors

    monkeypatch.setattr(ConsulSession, "_txn", txn)


def test_consul_permission_error_is_not_a_conflict(consul_acl, store, monkeypatch, capsys) -> None:
    """A key the token may not write fails the run (exit 1) whatever the key is called; it is
    never counted as a conflict and silently left unwritten (exit 3). Real conflicts, on keys
    whose names hold quotes, backslashes or the words of Consul's own messages, still are."""
    server, token = consul_acl
    url = write_archive(store, "consul", [Record(b"ok/new", b"1"), Record(b"cassandra/seeds", b"10.0.0.1")])
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", token)
    into = f"consul://127.0.0.1:{server.port}"
    assert main(["restore", url, "--into", into]) == EXIT_FAILURE  # Consul 1.8's words
    _as_newer_consul(monkeypatch)
    capsys.readouterr()
    assert main(["restore", url, "--into", into]) == EXIT_FAILURE  # 1.11+: the key is in the message
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("burrow: error:")]
    assert "denied" in line and "conflict" not in line.lower()
    assert "skipped conflicts" not in err and "were left as they are" not in err  # never reported as conflicts
    with pytest.raises(AuthError, match="denied creating keys"):
        restore(archive=url, into=register(ConsulCluster(address=f"127.0.0.1:{server.port}",
                                                         token=SecretStr(token))))
    assert token not in err
    assert "cassandra/seeds" not in consul_snapshot(consul_client(server.url, token=MASTER_TOKEN), "cassandra")

    odd = ['ok/a"b', "ok/back\\slash", "ok/tab\there", "ok/ключ", "ok/ctl\x01", "ok/cassandra/seeds",
           'ok/x", index is stale', "ok/Permission denied"]
    session = ConsulCluster(address=f"127.0.0.1:{server.port}", token=SecretStr(token)).connect()
    try:
        records = [Record(k.encode(), b"v", {}) for k in odd]
        assert session.create(records) == [True] * len(odd)
        assert session.create(records) == [False] * len(odd)  # each exists: a conflict, not an error
        assert [session._create_one(r) for r in records] == [False] * len(odd)
    finally:
        session.close()


def test_consul_keys_the_token_may_not_read_fail_clearly(consul_acl, store) -> None:
    """Consul leaves keys a token may not read out of a txn's results; the restore says so
    (an AuthError) instead of failing on mismatched results."""
    server, token = consul_acl
    consul_client(server.url, token=MASTER_TOKEN).kv.put("cassandra/hosts", "10.9.9.9")
    url = write_archive(store, "consul", [Record(b"cassandra/hosts", b"10.0.0.1"), Record(b"ok/b", b"2")])
    target = register(ConsulCluster(address=f"127.0.0.1:{server.port}", token=SecretStr(token)))
    with pytest.raises(AuthError, match="may not read"):
        restore(archive=url, into=target)


# --------------------------------------------------------------------------- etcd


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_etcd_out_of_space_is_permanent_and_says_so(tmp_path, store) -> None:
    """A real NOSPACE (an etcd with a 1 MiB quota, filled until it raised the alarm): a
    permanent error that names the cause and what to do, not "an answer was larger than
    max_message_bytes"."""
    server = start_etcd(tmp_path / "etcd-tiny", extra_args=["--quota-backend-bytes", str(1024 * 1024)])
    e = Etcd(server.url)
    try:
        for i in range(1000):  # fill it (the quota is checked against the size after each commit)
            try:
                e.put(b"/fill/k%04d" % i, os.urandom(64 * 1024))
            except httpx.HTTPStatusError as exc:
                assert "database space exceeded" in exc.response.text
                break
        else:
            raise AssertionError("etcd never ran out of space")
        url = write_archive(store, "etcd", [Record(b"/full/k%03d" % i, b"v%d" % i) for i in range(8)])
        with pytest.raises(SourceError, match="out of space") as err:
            restore(archive=url, into=f"etcd://127.0.0.1:{server.port}")
        assert "NOSPACE" in str(err.value) and "alarm disarm" in str(err.value)
        assert not is_transient(err.value)
    finally:
        e.close()
        server.stop()


def test_etcd_resource_exhausted_and_unavailable_are_told_apart(etcd_a) -> None:
    session = EtcdCluster(endpoints=[f"127.0.0.1:{etcd_a.port}"]).connect()
    try:
        def wrap(code: grpc.StatusCode, details: str) -> Exception:
            return session._wrap(FakeRpcError(code, details), "creating keys")

        ex = grpc.StatusCode.RESOURCE_EXHAUSTED
        assert isinstance(wrap(ex, "etcdserver: too many requests"), SourceUnavailable)  # retried
        nospace = wrap(ex, "etcdserver: mvcc: database space exceeded")
        assert isinstance(nospace, SourceError) and "out of space" in str(nospace)
        big = wrap(ex, "grpc: received message larger than max (11534346 vs. 11010048)")
        assert isinstance(big, SourceError) and "refused a request as too large" in str(big)
        answer = wrap(ex, "CLIENT: Received message larger than max (3867764 vs. 1000)")
        assert "answer was larger than max_message_bytes" in str(answer)
        # "not capable" comes with UNAVAILABLE (a cluster still settling its version): not auth.
        capable = wrap(grpc.StatusCode.UNAVAILABLE, "etcdserver: not capable")
        assert isinstance(capable, SourceUnavailable) and not isinstance(capable, AuthError)
        assert isinstance(wrap(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"), AuthError)
        assert isinstance(wrap(grpc.StatusCode.INVALID_ARGUMENT,
                               "etcdserver: authentication failed, invalid user ID or password"), AuthError)
    finally:
        session.close()


class Overloaded:
    """A stub method that answers "etcdserver: too many requests" ``times`` times (as etcd does
    while its apply loop is behind, before proposing anything), then calls the real one."""

    def __init__(self, real: Any, times: int) -> None:
        self.real, self.left, self.refused = real, times, 0

    def _refuse(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        self.refused += 1
        return True

    def __call__(self, req: Any, **kw: Any) -> Any:
        if self._refuse():
            raise FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests")
        return self.real(req, **kw)

    def future(self, req: Any, **kw: Any) -> Any:
        if self._refuse():
            class Refused:
                def result(self) -> Any:
                    raise FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests")

                def cancel(self) -> None:
                    pass

            return Refused()
        return self.real.future(req, **kw)


def test_etcd_too_many_requests_is_backed_off_and_sent_again(etcd_a, monkeypatch) -> None:
    """Writes too: etcd refuses an overloaded request before proposing it, and a replay is not
    retried by its task, so the block itself backs off and re-sends."""
    monkeypatch.setattr("blocks.etcd.TOO_MANY_BACKOFF", (0.01, 0.01, 0.01), raising=False)
    root = "/" + unique("busy")
    session = EtcdCluster(endpoints=[f"127.0.0.1:{etcd_a.port}"]).connect()
    try:
        txn = Overloaded(session.kv.Txn, times=3)
        monkeypatch.setattr(session, "kv", type("KV", (), {"Txn": txn, "Range": session.kv.Range})())
        records = [Record(f"{root}/k{i}".encode(), b"v%d" % i) for i in range(300)]
        assert session.create(records) == [True] * 300
        assert txn.refused == 3
        assert session.lookup([r.key for r in records[:3]]) == [b"v0", b"v1", b"v2"]
        txn.left = 10  # overloaded for longer than the backoff: transient, and says so
        with pytest.raises(SourceUnavailable, match="too many requests") as err:
            session.create([Record(f"{root}/late".encode(), b"x")])
        assert is_transient(err.value)
    finally:
        session.close()


# --------------------------------------------------------------------------- host names and ports


@pytest.mark.parametrize("url", ["zk://no-such-host.invalid:2181", "etcd://no-such-host.invalid:2379",
                                 "consul://no-such-host.invalid:8500"])
def test_a_host_name_that_does_not_exist_fails_at_once_for_good(url, store) -> None:
    started = time.monotonic()
    with pytest.raises(SourceError, match="no-such-host.invalid .*does not exist|does not exist") as err:
        backup(source=url, store=str(store), **backup_kwargs())
    assert isinstance(err.value, PermanentError) and not is_transient(err.value)
    assert time.monotonic() - started < 10  # was 42-44 s for ZooKeeper: three attempts of 10 s and more
    assert not [p for p in store.rglob("*") if p.is_file()]


def test_a_refused_zookeeper_port_fails_soon_and_says_what_happened(store, monkeypatch) -> None:
    """Transient, so the extract task retries it, but each attempt ends when kazoo's own
    connection retries are spent (about a second) instead of waiting out connect_timeout, and
    the message says "refused" and how long the attempt took, not "within 10s"."""
    port = free_port()
    with socket.socket() as s:  # nothing listens there
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    monkeypatch.setattr("flows.backup.extract", extract.with_options(retry_delay_seconds=[0, 0]))
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="cannot connect to ZooKeeper.*connection refused by 127.0.0.1") as err:
        backup(source=f"zk://127.0.0.1:{port}", store=str(store), **backup_kwargs())
    took = time.monotonic() - started
    assert "within 10s" not in str(err.value) and "gave up after" in str(err.value)
    assert took < 20  # was 3 attempts x 10 s
