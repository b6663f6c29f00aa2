"""Drift: ``burrow verify ARCHIVE --against SOURCE`` diffs an archive with the live cluster and
lists keys added, removed and changed by path (never by value); exit 4 means drift."""

from __future__ import annotations

import json

from kvutil import Etcd, unique
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from zkutil import kazoo, unique_root

from burrow.keys import keygen
from cli import main
from flows.backup import backup
from flows.verify import verify
from tasks.drift import Drift, merge_diff

SECRET = b"drift-canary-value-0b7c"
CHANGED = b"drift-canary-changed-44e1"


def test_zookeeper_drift_added_removed_changed_exit_4_and_exit_0_without_drift(cli, capsys, zk_a, store, tmp_path):
    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/keep", b"k", makepath=True)
        c.create(root + "/gone", b"g")
        c.create(root + "/gone/child", b"")
        c.create(root + "/edit", SECRET)
        c.create(root + "/eph", b"e", ephemeral=True)  # skipped by backup and by the live walk alike
        made = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-d", root=root, key_file=str(key))

        same = cli("verify", made["url"], "--against", f"zk://{zk_a.url}", "--key-file", str(key))
        assert same.code == 0, same
        assert same.last_line == f"no drift: zk://{zk_a.url} matches {made['url']} (5 keys)"

        c.delete(root + "/gone", recursive=True)
        c.set(root + "/edit", CHANGED)
        c.create(root + "/new", SECRET)
    r = cli("verify", made["url"], "--against", f"zk://{zk_a.url}", "--key-file", str(key))
    assert r.code == 4, r
    lines = r.out.splitlines()
    assert sorted(lines) == sorted([
        f"added    {root}/new", f"removed  {root}/gone", f"removed  {root}/gone/child", f"changed  {root}/edit",
    ])
    assert r.error_line == (
        f"burrow: error: zk://{zk_a.url} has drifted from {made['url']}: 1 added, 2 removed, 1 changed"
    )
    for canary in (SECRET, CHANGED):
        assert canary.decode() not in r.out + r.err

    # --root narrows the comparison to a subtree (in-process: cheaper than a subprocess)
    code = main(["verify", made["url"], "--against", f"zk://{zk_a.url}", "--root", root + "/keep",
                 "--key-file", str(key)])
    out, err = capsys.readouterr()
    assert code == 4 and f"removed  {root}/edit" in out and f"added    {root}/new" not in out, (out, err)

    # --json: one JSON object on stdout, paths included, and exit 4
    code = main(["verify", made["url"], "--against", f"zk://{zk_a.url}", "--key-file", str(key), "--json"])
    out, err = capsys.readouterr()
    got = json.loads(out)
    assert code == 4 and got["exit_code"] == 4 and got["status"] == "drift", (out, err)
    assert (got["added_paths"], got["changed_paths"]) == ([f"{root}/new"], [f"{root}/edit"])
    assert "has drifted" in err and SECRET.decode() not in out + err

    # bad input: usage errors, before any flow
    assert main(["verify", made["url"], "--against", f"zk://{zk_a.url}", "--structure-only"]) == 2
    assert "cannot be --structure-only" in capsys.readouterr().err
    assert main(["verify", made["url"], "--root", "/x", "--key-file", str(key)]) == 2
    assert "--root goes with --against" in capsys.readouterr().err
    assert main(["verify", made["url"], "--against", "zk:/nohost", "--key-file", str(key)]) == 2

    # the whole subtree gone: every archived key is removed (the flow, in-process)
    with kazoo(zk_a.url) as c:
        c.delete(root, recursive=True)
    gone = verify(archive=made["url"], against=f"zk://{zk_a.url}", key_files=[str(key)])
    assert gone["status"] == "drift" and gone["removed"] == 5 and gone["added"] == gone["changed"] == 0


def test_etcd_drift_flow_summary_and_artifact(etcd_a, store):
    prefix = unique("drift")
    e = Etcd(etcd_a.url)
    host = etcd_a.url.split("://", 1)[1]
    try:
        e.put_many({f"/{prefix}/a".encode(): b"1", f"/{prefix}/b".encode(): SECRET, f"/{prefix}/c".encode(): b"3"})
        made = backup(source=f"etcd://{host}/{prefix}", store=str(store), name="etcd-d", encryption=False)
        e.delete(f"/{prefix}/a".encode())
        e.put(f"/{prefix}/b".encode(), CHANGED)
        e.put(f"/{prefix}/d".encode(), b"4")
        state = verify(archive=made["url"], against=f"etcd://{host}/{prefix}", return_state=True)
    finally:
        e.close()
    s = state.result()
    assert s["status"] == "drift" and s["drift"] == 3 and s["unchanged"] == 1
    assert (s["added_paths"], s["removed_paths"], s["changed_paths"]) == (["/d"], ["/a"], ["/b"])
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    (art,) = [a for a in arts if a.type == "markdown"]  # (the others: the run's facts table)
    assert art.key == "drift-etcd-d" and "| drift | 3 |" in art.data and "- `/d`" in art.data
    assert SECRET.decode() not in art.data and CHANGED.decode() not in art.data


def _line(key: bytes, digest: str) -> bytes:
    return key.hex().encode() + b" " + digest.encode() + b"\n"


def test_merge_diff_on_prefix_keys_and_duplicates():
    """Keys that are prefixes of one another, and a key twice in one stream (two archived keys
    landing on one target key): the merge-join stays in step."""
    archive = sorted([_line(b"/a", "1"), _line(b"/a/b", "2"), _line(b"/ab", "3"), _line(b"/ab", "9")])
    live = sorted([_line(b"/a", "1"), _line(b"/a/b", "X"), _line(b"/a/c", "4")])
    d = merge_diff(archive, live, Drift())
    assert (d.same, d.changed_paths, d.removed_paths, d.added_paths) == (1, ["/a/b"], ["/ab"], ["/a/c"])
