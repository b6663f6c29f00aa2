"""Failover: rebuild a cluster from the newest archive of a source that verifies."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from zkutil import kazoo, snapshot, unique_root

from burrow.errors import ArchiveNotFound, KeyMismatch
from burrow.keys import keygen
from burrow.testing.servers import free_port
from flows.backup import backup
from flows.failover import failover

#: The failed primary these tests fail over from: nothing listens there. (The archives record
#: zk_a, which is alive: without --primary the split-brain guard would refuse, as
#: tests/test_failover_drill.py checks.)
DEAD = f"zk://127.0.0.1:{free_port()}"


@pytest.fixture
def standby(zk_b) -> str:
    """A private corner of zk_b (a chroot of its own, ``host:port/chroot``) as one test's failover
    target: zk_b is shared by every test of the session, and the wrong-cluster guard rightly
    refuses a target that holds other tests' keys (tests/test_wrong_cluster.py)."""
    top = unique_root()
    with kazoo(zk_b.url) as c:
        c.ensure_path(top)
    return f"{zk_b.url}{top}"


def flip_byte(path: Path, offset_from_middle: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 + offset_from_middle] ^= 0x01
    path.write_bytes(bytes(data))


def test_failover_skips_a_corrupt_newest_archive_and_never_overwrites(standby, cli, zk_a, zk_b, store, tmp_path):
    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/cfg/a", b"v1", makepath=True)
        old = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-x", root=root, key_file=str(key))
        old_state = snapshot(c, root)
        time.sleep(0.05)
        c.create(root + "/cfg/b", b"added later")
        new = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-x", root=root, key_file=str(key))
    assert old["url"] != new["url"]

    # The newest archive is damaged: failover must report it and fall back to the older one.
    flip_byte(Path(new["url"].removeprefix("file://")))
    with kazoo(standby) as c:
        c.create(root + "/cfg/a", b"changed in the target", makepath=True)
    r = cli("failover", "dc-x", "--from", str(store), "--into", f"zk://{standby}", "--key-file", str(key),
            "--primary", DEAD)
    assert r.code == 3, r  # the pre-existing, different /cfg/a is a conflict, kept as it is
    assert f"failover from {old['url']}" in r.out
    assert f"conflict {root}/cfg/a" in r.out
    with kazoo(standby) as c:
        after = snapshot(c, root)
    assert after[root + "/cfg/a"] == b"changed in the target"
    assert root + "/cfg/b" not in after  # only in the damaged newest archive
    assert {k: v for k, v in after.items() if k != root + "/cfg/a"} == {
        k: v for k, v in old_state.items() if k != root + "/cfg/a"
    }


def test_failover_picks_the_newest_and_stops_on_a_wrong_key(standby, zk_a, zk_b, store, tmp_path):
    key, other = tmp_path / "k.key", tmp_path / "other.key"
    keygen(key, x25519=False)
    keygen(other, x25519=False)
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/x", b"1", makepath=True)
        backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-y", root=root, key_file=str(key))
        c.create(root + "/y", b"2")
        newest = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-y", root=root, key_file=str(key))
        expected = snapshot(c, root)

    with pytest.raises(KeyMismatch):
        failover(source="dc-y", store=str(store), into=f"zk://{standby}", primary=DEAD, key_files=[str(other)])
    with kazoo(standby) as c:
        assert c.exists(root) is None  # nothing written

    with pytest.raises(ArchiveNotFound):
        failover(source="no-such-source", store=str(store), into=f"zk://{standby}", primary=DEAD, key_files=[str(key)])

    dry = failover(source="dc-y", store=str(store), into=f"zk://{standby}", primary=DEAD, key_files=[str(key)], dry_run=True)
    assert dry["archive"] == newest["url"] and dry["planned_create"] == len(expected)
    with kazoo(standby) as c:
        assert c.exists(root) is None

    done = failover(source="dc-y", store=str(store), into=f"zk://{standby}", primary=DEAD, key_files=[str(key)])
    assert done["created"] == len(expected) and done["conflicts"] == 0
    with kazoo(standby) as c:
        assert snapshot(c, root) == expected


def test_prune_cli(cli, capsys, zk_a, store):
    from cli import main

    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root, b"r", makepath=True)
    for _ in range(3):
        backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-p", root=root, encryption=False)
    assert main(["prune", str(store), "--keep", "1", "--dry-run"]) == 0
    assert "would delete 2 of 3 archives" in capsys.readouterr().out
    assert len(list(store.rglob("*.burrow"))) == 3
    r = cli("prune", str(store), "--keep", "1")
    assert r.code == 0 and "deleted 2 of 3 archives" in r.out, r
    assert len(list(store.rglob("*.burrow"))) == 1
    assert main(["prune", str(store), "--keep", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_failover_passes_over_an_archive_it_cannot_authenticate(standby, zk_a, zk_b, store, tmp_path):
    """Someone who can write to the store plants a newer archive of the same source, encrypted to
    their own key: with a key configured, its claims are not trusted, so failover skips it (and
    says why) and restores the newest archive it can authenticate; an unknown source name lists
    the sources the store holds."""
    key, theirs = tmp_path / "k.key", tmp_path / "theirs.key"
    keygen(key, x25519=False)
    keygen(theirs, x25519=False)
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/x", b"good", makepath=True)
        good = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-z", root=root, key_file=str(key))
        expected = snapshot(c, root)
        c.set(root + "/x", b"planted")
        backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-z", root=root, key_file=str(theirs))
    done = failover(source="dc-z", store=str(store), into=f"zk://{standby}", primary=DEAD, key_files=[str(key)])
    assert done["archive"] == good["url"] and done["skipped_archives"] == 1
    with kazoo(standby) as c:
        assert snapshot(c, root) == expected
    with pytest.raises(ArchiveNotFound, match="dc-z"):
        failover(source="dc-zz", store=str(store), into=f"zk://{standby}", primary=DEAD, key_files=[str(key)])


def test_the_approval_needs_a_name_and_a_comment_and_an_abort_names_who(monkeypatch):
    """The on-call's answer must carry a name and a comment (Prefect's API checks the run input
    against this schema on resume and refuses one without them); an abort is refused with the
    approver's name, and the answer is in the summary either way."""
    import prefect.flow_runs
    from pydantic import ValidationError

    from flows.failover import FailoverApproval, _approve
    from tasks.preflight import FailoverRefused

    schema = FailoverApproval.with_initial_data(description="d", approve=False).model_json_schema()
    assert set(schema["required"]) == {"approver", "comment"}
    assert schema["properties"]["approver"]["minLength"] == 1 and schema["properties"]["comment"]["pattern"] == r"\S"
    for bad in ({"approver": "", "comment": "x"}, {"approver": "  ", "comment": "x"}, {"approver": "A"},
                {"comment": "x"}):
        with pytest.raises(ValidationError):
            FailoverApproval(approve=True, **bad)

    asked = []

    def pause(wait_for_input, **kw):  # noqa: ANN001, ANN003 - prefect's pause_flow_run, answered at once
        asked.append(wait_for_input)
        return FailoverApproval(approve=False, approver="B. Oncall", comment="wrong\ntarget")

    monkeypatch.setattr(prefect.flow_runs, "pause_flow_run", pause)
    summary = {"source": "dc-us", "target": "zk://h:1/x", "target_block": "dc-eu", "conflict_paths": ["/a"]}
    with pytest.raises(FailoverRefused, match="B. Oncall aborted the failover at the approval step"):
        _approve(1, "file:///s/dc-us/a.burrow", 60, summary)
    assert summary["approval"] == {"approved": False, "approver": "B. Oncall", "comment": "wrong target"}
    # outside a run there is no UI link: the description names the conflicts' table artifact by its key
    assert "the table artifact failover-dc-us-to-dc-eu-conflicts" in asked[0]._description
