"""The wrong-cluster guard (issue 17, item 2): a failover cannot silently land in the wrong
cluster. A Consul archive into an etcd that holds another system's keys (Kubernetes'
``/registry``) is refused before anything is written, in one line naming ``--force``; the dry
run says the same; ``--cross-service`` allows a restore across services on purpose, and
``--force`` a target that holds keys outside the archive's paths. What the target holds is read
back with etcd's own API (its JSON gateway) and Consul's HTTP API, never through Burrow."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from kvutil import Etcd, consul_client, consul_snapshot, unique

from burrow.keys import keygen
from burrow.testing.servers import free_port
from cli import main
from flows.backup import backup
from flows.failover import failover
from tasks.preflight import FailoverRefused

ARCHIVED = 200  # the Consul archive's keys: 1% of them is 2 keys


def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("burrow: error:")]


@pytest.fixture
def key(tmp_path: Path) -> Path:
    k = tmp_path / "k.key"
    keygen(k, x25519=False)
    return k


@pytest.fixture
def consul_archive(consul_a, store: Path, key: Path) -> str:
    """An archive of a Consul prefix holding ``app/k0`` .. ``app/k199``; its source name."""
    src, name = unique("wc-src"), unique("consul-us")
    c = consul_client(consul_a.url)
    for i in range(ARCHIVED):
        c.kv.put(f"{src}/app/k{i}", f"v{i}")
    backup(source=f"consul://127.0.0.1:{consul_a.port}/{src}", store=str(store), name=name, key_file=str(key))
    return name


def _dead(scheme: str) -> str:
    return f"{scheme}://127.0.0.1:{free_port()}"


def test_a_consul_archive_into_an_etcd_holding_other_data_is_refused_then_forced(
        consul_archive, etcd_b, store, key, capsys):
    prefix = "/" + unique("k8s")
    etcd = Etcd(etcd_b.url)
    try:
        etcd.put_many({f"{prefix}/registry/pods/p{i}".encode(): b"pod" for i in range(50)})  # another system's keys
        before = etcd.snapshot(prefix.encode())
        revision = etcd.revision()
        into = f"etcd://127.0.0.1:{etcd_b.port}{prefix}"
        base = ["failover", consul_archive, "--from", str(store), "--into", into, "--key-file", str(key),
                "--primary", _dead("consul")]

        # refused, real run and dry run alike: one line naming --force (and --cross-service), no key path
        for extra in ([], ["--dry-run"], ["--cross-service"]):
            capsys.readouterr()
            assert main([*base, *extra]) == 1
            out, err = capsys.readouterr()
            line = errors(err)
            assert len(line) == 1 and "wrong-cluster guard" in line[0] and "--force" in line[0], err
            assert ("--cross-service" in line[0]) == ("--cross-service" not in extra), line
            assert "outside the paths the archive holds" in line[0] and "registry" not in line[0], line
            assert "preflight archive:" in out  # the preflight so far is on stdout
            # nothing written: not a key, not even the writability check's scratch key
            assert etcd.snapshot(prefix.encode()) == before
            assert etcd.revision() == revision

        # --force (with --cross-service: on purpose) proceeds; the other system's keys stay as they were
        capsys.readouterr()
        assert main([*base, "--cross-service", "--force"]) == 0
        out, err = capsys.readouterr()
        assert "preflight cluster: OVERRIDDEN (--force)" in out and "post-verify: 200 keys checked, 200 match" in out
        after = etcd.snapshot(prefix.encode())
        created = {k: v for k, v in after.items() if k not in before}
        assert created == {f"{prefix}/app/k{i}".encode(): f"v{i}".encode() for i in range(ARCHIVED)}
        assert {k: after[k] for k in before} == before

        # the mistake undone: exactly what the failover created goes, but a key changed since stays
        (undo_line,) = [ln for ln in err.splitlines() if ln.startswith("to undo: ")]
        undo = shlex.split(undo_line[len("to undo: "):])
        assert undo[:2] == ["burrow", "undo"] and "--from" in undo, undo_line
        etcd.put(f"{prefix}/app/k7".encode(), b"written by the other system since")
        capsys.readouterr()
        assert main([*undo[1:], "--key-file", str(key)]) == 3  # 3: some keys were kept
        out, _ = capsys.readouterr()
        assert "1" in out and "kept" in out.lower(), out
        assert etcd.snapshot(prefix.encode()) == {**before,
                                                   f"{prefix}/app/k7".encode(): b"written by the other system since"}
    finally:
        etcd.close()


def test_the_service_check_and_the_foreign_key_threshold(consul_archive, etcd_b, consul_b, store, key):
    """Into an empty etcd prefix: only the service differs, so --cross-service suffices. Into a
    Consul prefix (the same service) holding 2 keys of its own (1% of 200): accepted; 3: refused,
    and --foreign-keys-max raises the limit."""
    empty = f"etcd://127.0.0.1:{etcd_b.port}/{unique('empty')}"
    common = {"source": consul_archive, "store": str(store), "primary": _dead("consul"), "key_files": [str(key)],
              "dry_run": True}
    with pytest.raises(FailoverRefused, match="is of a consul cluster and the target .* is etcd.*--cross-service"):
        failover(into=empty, **common)
    dry = failover(into=empty, cross_service=True, **common)
    assert dry["planned_create"] == ARCHIVED
    assert "cluster: a consul archive into etcd (--cross-service); the target holds no key" in "\n".join(
        dry["preflight"])

    c = consul_client(consul_b.url)
    two, three = unique("own2"), unique("own3")
    for i in range(2):
        c.kv.put(f"{two}/standby-own/k{i}", "mine")
        c.kv.put(f"{three}/standby-own/k{i}", "mine")
    c.kv.put(f"{three}/elsewhere", "mine")
    ok = failover(into=f"consul://127.0.0.1:{consul_b.port}/{two}", **common)
    assert ok["planned_create"] == ARCHIVED
    with pytest.raises(FailoverRefused, match=r"already holds more than 2 keys outside .*at most 1% of its 200"):
        failover(into=f"consul://127.0.0.1:{consul_b.port}/{three}", **common)
    assert failover(into=f"consul://127.0.0.1:{consul_b.port}/{three}", foreign_keys_max=1.5, **common)["status"] == "ok"
    # a real run into the refused target writes nothing there
    with pytest.raises(FailoverRefused):
        failover(into=f"consul://127.0.0.1:{consul_b.port}/{three}", **{**common, "dry_run": False})
    assert set(consul_snapshot(c, three)) == {f"{three}/standby-own/k0", f"{three}/standby-own/k1", f"{three}/elsewhere"}
