"""``--list`` and ``--list-file`` write every planned create, on real runs and dry runs alike.

The list is streamed from the plan's spool by the process that planned (never capped, never
held in memory), and the hint shown without ``--list`` counts every line the list would have.
Checked against real ZooKeeper servers, the nodes compared one by one with kazoo.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from kazoo.exceptions import NoNodeError
from zkutil import kazoo, unique_root

#: The big tree: a root, DIRS directories of one node each and LEAVES leaves below each:
#: 1 + 7 * (1 + 2856) = 20,000 nodes, so 20,000 creates into an empty place.
DIRS, LEAVES = 7, 2856
BIG = 1 + DIRS * (1 + LEAVES)
SMALL = 1234  # above the 1,000 lines the list used to stop at


def _create_all(c, paths: list[str], batch: int = 1000, window: int = 16) -> None:
    """Create ``paths`` (parents first) in pipelined transactions of ``batch``."""
    pending = []
    for start in range(0, len(paths), batch):
        t = c.transaction()
        for p in paths[start:start + batch]:
            t.create(p, p.encode())
        pending.append(t.commit_async())
        if len(pending) >= window:
            _check(pending.pop(0).get())
    for p in pending:
        _check(p.get())


def _check(results: list) -> None:
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[0]


def _tree(root: str, dirs: int, leaves: int) -> list[str]:
    paths = [root]
    for d in range(dirs):
        paths.append(f"{root}/d{d}")
        paths += [f"{root}/d{d}/k{i:05d}" for i in range(leaves)]
    return paths


def _walk(c, root: str) -> set[str]:
    """Every node at and below ``root``, level by level with pipelined kazoo reads."""
    if c.exists(root) is None:
        return set()
    found, level = {root}, [root]
    while level:
        asks = [(p, c.get_children_async(p)) for p in level]
        level = [f"{p}/{child}" for p, a in asks for child in a.get()]
        found.update(level)
    return found


def _created(lines: list[str]) -> list[str]:
    """The paths of a list's ``create`` lines (a parent the restore makes carries a label)."""
    assert all(ln.startswith("create   ") for ln in lines), [ln for ln in lines if not ln.startswith("create ")][:3]
    return [ln[len("create   "):].split(" (", 1)[0] for ln in lines]


def _backup(zk_url: str, root: str, store, name: str) -> str:
    r = run_cli("backup", f"zk://{zk_url}", "--root", root, "--to", str(store), "--no-encryption", "--name", name,
                timeout=300)
    assert r.code == 0, r
    return r.last_line


@pytest.fixture(scope="module")
def big(zk_a, tmp_path_factory) -> tuple[str, str, list[str]]:
    """An archive of a 20,000-node tree: (url, root, every node's path)."""
    root = unique_root()
    paths = _tree(root, DIRS, LEAVES)
    assert len(paths) == BIG
    with kazoo(zk_a.url) as c:
        _create_all(c, paths)
    return _backup(zk_a.url, root, tmp_path_factory.mktemp("big-store"), "list-big"), root, paths


@pytest.fixture(scope="module")
def small(zk_a, tmp_path_factory) -> tuple[str, str, list[str]]:
    """An archive of a 1,234-node tree: (url, root, every node's path)."""
    root = unique_root()
    paths = [root] + [f"{root}/k{i:05d}" for i in range(SMALL - 1)]
    with kazoo(zk_a.url) as c:
        _create_all(c, paths)
    return _backup(zk_a.url, root, tmp_path_factory.mktemp("small-store"), "list-small"), root, paths


def test_a_real_restore_writes_every_create_into_the_list_file(big, zk_b, tmp_path):
    url, root, paths = big
    listed = tmp_path / "created.txt"
    with kazoo(zk_b.url) as c:
        assert c.exists(root) is None  # an empty place: every node is a create
    r = run_cli("restore", url, "--into", f"zk://{zk_b.url}", "--list-file", str(listed), timeout=600)
    assert r.code == 0, r
    assert f"created={BIG}" in r.out, r
    lines = listed.read_text().splitlines()
    assert len(lines) == BIG, (len(lines), lines[-3:])
    created = _created(lines)
    assert len(set(created)) == BIG and set(created) == set(paths)
    with kazoo(zk_b.url) as c:
        assert _walk(c, root) == set(created)  # the list names exactly what the target now holds
    assert f"burrow: wrote {BIG} create lines to {listed}" in r.err, r
    assert not any(ln.startswith("create ") for ln in r.out.splitlines()), r  # the file, not stdout
    assert "truncated" not in listed.read_text() + r.out + r.err


def test_a_dry_run_prints_every_create_after_the_summary(big, zk_b):
    url, root, paths = big
    elsewhere = unique_root()  # mapped to a place where nothing exists yet
    r = run_cli("restore", url, "--into", f"zk://{zk_b.url}", "--map", f"{root}={elsewhere}", "--dry-run", "--list",
                timeout=600)
    assert r.code == 0, r
    out = r.out.splitlines()
    assert out[0] == f"dry run: nothing was written to zk://{zk_b.url}", r.out[:500]
    assert f"planned_create={BIG}" in out[1], out[1]
    creates = [ln for ln in out if ln.startswith("create ")]
    assert len(creates) == BIG and out.index(creates[0]) > 1, (len(creates), out[:3])
    assert set(_created(creates)) == {elsewhere + p[len(root):] for p in paths}
    assert "not shown" not in r.err and "truncated" not in r.out, r
    with kazoo(zk_b.url) as c:
        assert c.exists(elsewhere) is None  # a dry run writes nothing


def test_the_hint_counts_every_line_the_list_would_have(small, zk_b, tmp_path):
    url, root, paths = small
    elsewhere = unique_root()
    r = run_cli("restore", url, "--into", f"zk://{zk_b.url}", "--map", f"{root}={elsewhere}", "--dry-run")
    assert r.code == 0, r
    assert f"planned_create={SMALL}" in r.out, r
    hints = [ln for ln in r.err.splitlines() if "lines not shown" in ln]
    assert hints == [f"burrow: {SMALL} create lines not shown (--list shows them, --list-file PATH saves them)"], r
    assert not any(ln.startswith("create ") for ln in r.out.splitlines()), r
    # --json with --list-file: the object on stdout, the whole list in the file
    listed = tmp_path / "plan.txt"
    j = run_cli("restore", url, "--into", f"zk://{zk_b.url}", "--map", f"{root}={elsewhere}", "--dry-run", "--json",
                "--list-file", str(listed))
    assert j.code == 0, j
    summary = json.loads(j.out)
    assert summary["planned_create"] == SMALL and summary["list_lines"] == SMALL, summary
    assert set(_created(listed.read_text().splitlines())) == {elsewhere + p[len(root):] for p in paths}
    with kazoo(zk_b.url) as c:
        assert c.exists(elsewhere) is None


def test_a_real_restore_with_list_prints_every_create(small, zk_b):
    url, root, paths = small
    elsewhere = unique_root()
    r = run_cli("restore", url, "--into", f"zk://{zk_b.url}", "--map", f"{root}={elsewhere}", "--list")
    assert r.code == 0, r
    out = r.out.splitlines()
    assert f"created={SMALL}" in out[0], out[:2]  # the summary first
    creates = _created([ln for ln in out if ln.startswith("create ")])
    assert len(creates) == SMALL
    with kazoo(zk_b.url) as c:
        assert _walk(c, elsewhere) == set(creates)
        data, _ = c.get(f"{elsewhere}/k00007")
        assert data == f"{root}/k00007".encode()  # the archived value, not just a node


def test_a_list_file_that_cannot_be_written_is_a_usage_error_before_anything_runs(small, zk_b, tmp_path):
    url, root, _ = small
    elsewhere = unique_root()
    r = run_cli("restore", url, "--into", f"zk://{zk_b.url}", "--map", f"{root}={elsewhere}",
                "--list-file", str(tmp_path / "no-such-dir" / "list.txt"))
    assert r.code == 2, r
    assert r.error_line.startswith("burrow: error: --list-file ") and "does not exist" in r.error_line, r
    with kazoo(zk_b.url) as c:
        with pytest.raises(NoNodeError):
            c.get(elsewhere)  # nothing was restored
    # said by the parser, before any probe: a failover whose store does not exist says it too
    f = run_cli("failover", "list-small", "--from", str(tmp_path / "no-store"), "--into", f"zk://{zk_b.url}",
                "--list-file", str(tmp_path))
    assert f.code == 2 and f.error_line == f"burrow: error: --list-file {tmp_path}: is a directory; name a file", f


def test_a_failover_lists_every_create_on_a_dry_run_and_into_the_file_on_a_real_run(small, zk_b, tmp_path):
    url, root, paths = small
    store = url.split("://", 1)[1].rsplit("/", 2)[0]  # the store directory the backup wrote to
    target = f"zk://{zk_b.url}/{unique_root().strip('/')}"  # an empty chroot: nothing else is there
    dead = "zk://127.0.0.1:9"  # the failed primary: nothing answers
    common = ("failover", "list-small", "--from", store, "--into", target, "--primary", dead)
    dry = run_cli(*common, "--dry-run", "--list")
    assert dry.code == 0, dry
    creates = _created([ln for ln in dry.out.splitlines() if ln.startswith("create ")])
    assert sorted(creates) == sorted(paths), (len(creates), creates[:3])
    listed = tmp_path / "failover.txt"
    real = run_cli(*common, "--list-file", str(listed))
    assert real.code == 0, real
    assert f"created={SMALL}" in real.out, real
    lines = _created(listed.read_text().splitlines())
    assert sorted(lines) == sorted(paths)
    chroot = target.split(zk_b.url, 1)[1]
    with kazoo(zk_b.url) as c:
        assert {chroot + p for p in lines} == _walk(c, chroot + root)
