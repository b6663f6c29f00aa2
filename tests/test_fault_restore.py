"""Restore fault matrix on real ZooKeeper servers (issue 8): a restore killed with SIGKILL at
ten points and run again, a restore racing another client that creates some of the same keys,
and a restore into a target serving a steady read/write load.

Every row checks the final state node by node with an independent client (kazoo): the value
and ACL each archived node must have, and what the restore may create besides (empty parents
that only the restoring identity holds). Nodes whose ACL the source redacted must come back
restorer-only, never world-writable (issue 8, item 2).

The restores that are killed, and the one under load, run in child processes forked from a
forkserver that imported the restore code once, so the ten kill runs cost no interpreter start.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError, NoNodeError
from kazoo.security import make_acl, make_digest_acl, make_digest_acl_credential
from zkutil import kazoo, unique_root

ADMIN = ("fault-admin", "fault-admin-pw")  # backs up and restores: holds ADMIN on most nodes
OWNER = ("fault-owner", "fault-owner-pw")  # the only ADMIN of a few nodes: their ACL comes back redacted
RESTORER_ONLY = ((31, "digest", make_digest_acl_credential(*ADMIN)),)
PARENTS, CHILDREN = 16, 40

Acl = tuple[tuple[int, str, str], ...]


# ------------------------------------------------------------------------------ helpers


def tree_state(c: KazooClient, top: str, acls: bool = True) -> dict[str, tuple[bytes, Any, Acl | None]]:
    """``path -> (data, stat, sorted ACL)`` for ``top`` and everything below it, read level by
    level with kazoo's async calls ({} when ``top`` does not exist). Children are listed of
    the nodes whose stat counts any."""
    out: dict[str, tuple[bytes, Any, Acl | None]] = {}
    level = [top]
    while level:
        asked = [(p, c.get_async(p), c.get_acls_async(p) if acls else None) for p in level]
        parents = []
        for p, got, acl in asked:
            try:
                data, stat = got.get(timeout=60)
                entries = acl.get(timeout=60)[0] if acl is not None else None
            except NoNodeError:
                continue
            if stat.ephemeralOwner:
                continue
            sorted_acl = tuple(sorted((a.perms, a.id.scheme, a.id.id) for a in entries)) if entries is not None else None
            out[p] = (data or b"", stat, sorted_acl)
            if stat.numChildren:
                parents.append((p, c.get_children_async(p)))
        level = []
        for p, children in parents:
            try:
                level += [("" if p == "/" else p) + "/" + n for n in children.get(timeout=60)]
            except NoNodeError:
                continue
    return out


def expected_state(fault: dict[str, Any], target: str) -> dict[str, tuple[bytes, Acl]]:
    """What ``target`` must hold once the archive is restored there (mapped from its root):
    each archived node's value and ACL (restorer-only where the source redacted it), and the
    empty parents above ``target``, restorer-only."""
    root = fault["root"]
    want: dict[str, tuple[bytes, Acl]] = {}
    for p, (data, _, acl) in fault["source"].items():
        redacted = any(s == "digest" and i.endswith(":x") for _, s, i in acl)
        want[target + p[len(root) :]] = (data, RESTORER_ONLY if redacted else acl)
    parts = target.split("/")
    for n in range(2, len(parts)):
        want["/".join(parts[:n])] = (b"", RESTORER_ONLY)
    return want


def top_of(path: str) -> str:
    return "/" + path.strip("/").split("/")[0]


def restore_child(archive: str, hosts: str, source_root: str, target: str, workdir: str, kill_at: int,
                  result_path: str) -> None:
    """A restore (plan + replay, as the restore flow runs them) in a child process. With
    ``kill_at`` > 0 the process SIGKILLs itself right after the ``kill_at``-th reply from
    ZooKeeper arrives during replay (what it had sent before is applied by the server);
    ``kill_at`` = -1 kills it at the first reply while planning."""
    begun = time.monotonic()
    from pydantic import SecretStr

    from blocks import zkwire
    from blocks.zookeeper import ZooKeeperCluster
    from tasks.plan import plan_restore
    from tasks.replay import replay_plan

    replies = 0
    replaying = False
    reply = zkwire.WireSession.reply

    def counted(self: zkwire.WireSession) -> tuple[bytes, int, int]:
        nonlocal replies
        if kill_at == -1:
            os.kill(os.getpid(), signal.SIGKILL)
        if replaying:
            replies += 1
            if replies == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return reply(self)

    zkwire.WireSession.reply = counted  # type: ignore[method-assign]
    # small transactions, few in flight: the ten kill points land at different depths
    block = ZooKeeperCluster(hosts=[hosts], digest_user=ADMIN[0], digest_password=SecretStr(ADMIN[1]),
                             multi_ops=25, multi_window=2)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    plan = plan_restore(Path(archive), block, Path(workdir), maps=[f"{source_root}={target}"])
    replaying = True
    started = time.monotonic()
    done = replay_plan(plan, block)
    ended = time.monotonic()
    result = {
        "created": done.created, "intermediate_created": done.intermediate_created,
        "identical": plan.identical + done.identical, "conflicts": plan.conflicts + done.conflicts,
        "conflict_paths": plan.conflict_paths + done.conflict_paths, "replies": replies,
        "begun": begun, "replay_started": started, "replay_ended": ended, **getattr(done, "target_report", {}),
    }
    Path(result_path).write_text(json.dumps(result))
    sys.exit(3 if result["conflicts"] else 0)


def run_child(ctx: Any, fault: dict[str, Any], hosts: str, target: str, workdir: Path,
              kill_at: int = 0) -> tuple[int | None, dict[str, Any]]:
    result = workdir / "result.json"
    proc = ctx.Process(target=restore_child, args=(
        str(fault["archive"]), hosts, fault["root"], target, str(workdir), kill_at, str(result),
    ))
    proc.start()
    proc.join(180)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        pytest.fail(f"the restore child for {target} did not finish")
    return proc.exitcode, json.loads(result.read_text()) if result.exists() else {}


def assert_final(c: KazooClient, fault: dict[str, Any], target: str,
                 others: dict[str, bytes] | None = None) -> dict[str, tuple]:
    """The target holds exactly the archive (``others``: nodes another client created first,
    which keep that client's value and ACL)."""
    others = others or {}
    want = expected_state(fault, target)
    got = tree_state(c, top_of(target))
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    for p, (data, acl) in want.items():
        if p in others:
            assert got[p][0] == others[p], p
            assert got[p][2] == ((31, "world", "anyone"),) and got[p][1].aversion == 0, p
            continue
        assert got[p][0] == data, p
        assert got[p][2] == acl, p
        assert got[p][1].version == 0 and got[p][1].aversion == 0, p  # created once, never changed
    return got


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fault(zk_a, tmp_path_factory) -> dict[str, Any]:
    """One archive for the matrix: 1 + 16 x (1 + 40) nodes, small random values, mixed ACLs;
    every 37th node's ACL is redacted to the backup identity (it lacks ADMIN there)."""
    from pydantic import SecretStr

    from blocks.zookeeper import ZooKeeperCluster
    from flows.backup import backup

    root = unique_root()
    rng = random.Random(8)
    admin_acl = [make_digest_acl(*ADMIN, all=True), make_acl("world", "anyone", read=True)]
    owned = [make_acl("world", "anyone", read=True), make_digest_acl(*OWNER, all=True)]
    redacted = 0
    with kazoo(zk_a.url, auth=ADMIN) as c:
        c.create(root, b"fault-root")
        for i in range(PARENTS):
            t = c.transaction()
            t.create(f"{root}/p{i:02d}", f"parent-{i}".encode(), acl=admin_acl if i % 4 == 0 else None)
            for j in range(CHILDREN):
                n = i * CHILDREN + j
                acl = owned if n % 37 == 5 else admin_acl if j % 5 == 0 else None
                redacted += acl is owned
                t.create(f"{root}/p{i:02d}/c{j:03d}", rng.randbytes(rng.randrange(0, 64)), acl=acl)
            assert not any(isinstance(r, Exception) for r in t.commit())
        source = tree_state(c, root)
    assert len(source) == 1 + PARENTS * (1 + CHILDREN)
    block = "fault-source-" + root.strip("/")  # a saved block: flows take no credentials in URLs
    ZooKeeperCluster(hosts=[zk_a.url], digest_user=ADMIN[0], digest_password=SecretStr(ADMIN[1])).save(block)
    store = tmp_path_factory.mktemp("fault-store")
    s = backup(source=block, store=str(store), root=root, encryption=False)
    assert s["keys"] == len(source) and s["redacted_acls"] == redacted > 0
    return {"root": root, "archive": Path(s["url"].removeprefix("file://")), "source": source}


@pytest.fixture(scope="module")
def forkserver() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tasks.plan", "tasks.replay", "blocks.zookeeper", __name__])
    return ctx


@pytest.fixture
def admin_zk(zk_b):  # noqa: ANN201
    with kazoo(zk_b.url, auth=ADMIN) as c:
        yield c


# ------------------------------------------------------------------------------ the rows


def test_restore_killed_with_sigkill_at_ten_points_then_run_again(fault, zk_b, admin_zk, forkserver, tmp_path):
    c = admin_zk
    # A whole restore first: how many replies its replay reads, and that it restores the archive.
    ref = unique_root() + "/in/restored"
    code, res = run_child(forkserver, fault, zk_b.url, ref, tmp_path / "ref")
    assert code == 0, res
    assert_final(c, fault, ref)
    archived = len(fault["source"])
    assert res["created"] == archived and res["intermediate_created"] == 2 and res["conflicts"] == 0
    total = res["replies"]
    # killed while planning, then at nine points spread over the replay's replies
    points = [-1] + sorted({1 + (total - 2) * i // 8 for i in range(9)})
    assert len(points) == 10, total

    present_counts = set()
    for n, kill_at in enumerate(points):
        target = unique_root() + "/in/restored"
        code, _ = run_child(forkserver, fault, zk_b.url, target, tmp_path / f"kill-{n}", kill_at=kill_at)
        assert code == -signal.SIGKILL, (kill_at, code)
        want = expected_state(fault, target)
        killed = tree_state(c, top_of(target))
        present_counts.add(len(killed))
        # whatever the kill left is already right: the archived value and ACL, or restorer-only
        for p, (data, _, acl) in killed.items():
            assert p in want, p
            assert (data, acl) == want[p], p

        code, again = run_child(forkserver, fault, zk_b.url, target, tmp_path / f"again-{n}")
        assert code == 0, (kill_at, again)
        got = assert_final(c, fault, target)
        # nothing created twice: what the killed run created is the very same node
        for p, (_, stat, _) in killed.items():
            assert got[p][1].czxid == stat.czxid and got[p][1].mzxid == stat.mzxid, p
        archived_present = len([p for p in killed if p == target or p.startswith(target + "/")])
        assert again["created"] == archived - archived_present
        assert again["identical"] == archived_present and again["conflicts"] == 0
        assert again["intermediate_created"] == 2 - (len(killed) - archived_present)
    # the kill points fell at different depths of the restore (before the first write too)
    assert min(present_counts) == 0 and len(present_counts) >= 5, sorted(present_counts)


def test_restore_while_another_client_creates_the_same_keys(fault, zk_b, admin_zk, tmp_path):
    from pydantic import SecretStr

    from blocks.zookeeper import ZooKeeperCluster
    from tasks.plan import plan_restore
    from tasks.replay import replay_plan

    c = admin_zk
    target = unique_root() + "/in/restored"
    want = expected_state(fault, target)
    # The other client writes some archived keys, parents before children: every 7th one,
    # half with the archive's own value, half with its own.
    chosen = [p for p in sorted(want) if p.startswith(target)][::7]
    other_values = {p: (want[p][0] if k % 2 else b"other-" + p.encode()) for k, p in enumerate(chosen)}
    block = ZooKeeperCluster(hosts=[zk_b.url], digest_user=ADMIN[0], digest_password=SecretStr(ADMIN[1]),
                             multi_ops=40, multi_window=2)
    plan = plan_restore(fault["archive"], block, tmp_path, maps=[f"{fault['root']}={target}"])
    assert plan.to_create == len(fault["source"]) and plan.conflicts == 0  # the target was empty

    created: dict[str, bytes] = {}  # what the other client did create (it lost a race on the rest)
    errors: list[BaseException] = []
    go = threading.Event()

    def other() -> None:
        # The first third appears between planning and replay, the rest while replay runs.
        try:
            with kazoo(zk_b.url, auth=ADMIN) as o:  # (below restorer-only parents: the same identity)
                for n, p in enumerate(chosen):
                    if n == len(chosen) // 3:
                        go.set()
                    for q in [q for q in _ancestors(p) if q not in created] + [p]:
                        value = other_values.get(q, b"other-parent")
                        try:
                            o.create(q, value)
                            created[q] = value
                        except NodeExistsError:
                            pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            go.set()

    thread = threading.Thread(target=other)
    thread.start()
    go.wait(30)
    done = replay_plan(plan, block)
    thread.join(60)
    assert not errors, errors
    assert created, "the other client created nothing"

    # 0 of the other client's values overwritten; everything else is the archive
    assert_final(c, fault, target, others=created)
    archived_by_other = {p: v for p, v in created.items() if p == target or p.startswith(target + "/")}
    differ = sorted(p for p, v in archived_by_other.items() if v != want[p][0])
    assert done.created == len(fault["source"]) - len(archived_by_other)
    assert done.conflicts == len(differ) and sorted(done.conflict_paths) == differ
    assert done.identical == len(archived_by_other) - len(differ)
    # the restore's own report: its restorer-only nodes (redacted ones, parents it created)
    listed = {p.rsplit(" (", 1)[0] for p in done.target_report["acl_restricted_paths"]}
    mine = {p for p, (_, acl) in want.items() if acl == RESTORER_ONLY and p not in created}
    assert listed == mine


def test_restore_into_a_target_serving_steady_load(fault, zk_b, admin_zk, forkserver, tmp_path):
    c = admin_zk
    target = unique_root() + "/in/restored"
    want = expected_state(fault, target)
    # The application owns part of the tree before the restore: the root, one parent and ten
    # of its children, which it keeps rewriting and reading back while the restore runs.
    owned = [target, target + "/p03"] + [f"{target}/p03/c{j:03d}" for j in range(0, CHILDREN, 4)]
    scratch = target + "/p03/zz-load-scratch"  # created and deleted over and over
    last: dict[str, bytes] = {}
    with kazoo(zk_b.url) as app:
        for p in owned:
            app.ensure_path(p.rsplit("/", 1)[0])
            app.create(p, b"app-0")
            last[p] = b"app-0"
    before = {p for p in tree_state(c, top_of(target), acls=False)}
    stop = threading.Event()
    errors: list[BaseException] = []
    served: list[float] = []  # when each request of the load was answered

    def load() -> None:
        try:
            with kazoo(zk_b.url) as app:
                n = 0
                while not stop.is_set():
                    n += 1
                    for p in owned:
                        value = b"app-%d" % n
                        app.set(p, value)
                        last[p] = value
                        served.append(time.monotonic())
                        assert app.get(p)[0] == value
                        served.append(time.monotonic())
                    app.create(scratch, b"scratch")
                    app.delete(scratch)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        code, res = run_child(forkserver, fault, zk_b.url, target, tmp_path / "load")
        # and it is still answered after the restore
        after = len(served)
        deadline = time.monotonic() + 60
        while len(served) <= after and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    assert code == 3, res  # conflicts: the application's nodes were left as they are
    # the load kept being answered while the restore ran (ordering, not timing: CLOCK_MONOTONIC
    # is one clock for both processes)
    assert any(res["begun"] < t < res["replay_ended"] for t in served), "no load served during the restore"
    assert served[-1] > res["replay_ended"]

    # 0 overwrites: every node the application owns holds its own last value
    others = {p: last.get(p, b"") for p in before}  # (ensure_path made the empty parents)
    assert_final(c, fault, target, others=others)
    archived_owned = [p for p in before if p in want and (p == target or p.startswith(target + "/"))]
    assert sorted(res["conflict_paths"]) == sorted(archived_owned)
    assert res["conflicts"] == len(archived_owned) and res["identical"] == 0
    assert res["created"] == len(fault["source"]) - len(archived_owned)


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:n]) for n in range(2, len(parts))]
