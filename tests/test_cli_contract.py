"""The CLI contract, through the real ``burrow`` console script: backup prints the archive
URL last, list/inspect/verify/dump read it back, restore reports conflicts with exit 3 and
--dry-run writes nothing, usage errors exit 2. Independent commands run concurrently to keep
the suite fast."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import run_cli
from test_orchestrator import all_events, wait_for
from zkutil import full_snapshot, kazoo, unique_root

SECRET_VALUE = b"s3cr3t-value-never-printed-by-restore"


def last_stderr_line(r) -> str:
    lines = r.err.strip().splitlines()
    return lines[-1] if lines else ""


def concurrently(*calls: tuple[str, ...]) -> list:
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda args: run_cli(*args), calls))


@pytest.fixture(scope="module")
def backed_up(zk_a, tmp_path_factory):
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root, b"top")
        c.create(root + "/text", b"hello world")
        c.create(root + "/bin", b"\x00\x01\xfe\xff")
        c.create(root + "/empty", b"")
        c.create(root + "/uni", "grüße ☃".encode())
        c.create(root + "/secret", SECRET_VALUE)
        c.create(root + "/dir/leaf", b"leaf", makepath=True)
    store = tmp_path_factory.mktemp("cli-store")
    r = run_cli("backup", f"zk://{zk_a.url}", "--to", str(store), "--name", "dc-cli", "--root", root,
                "--no-encryption")
    return root, store, r


def test_backup_last_stdout_line_is_the_archive_url(backed_up):
    root, store, r = backed_up
    assert r.code == 0, r
    url = r.last_line
    assert url.startswith("file://") and url.endswith(".burrow"), r
    path = unquote(url.removeprefix("file://"))
    assert path.startswith(str(store.resolve())) and "/dc-cli/" in path
    with open(path, "rb") as f:
        assert f.read(4) == b"\x5b\x2a\x4d\x18"  # a zstd skippable frame: the header


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in-process (same code as the console script, without a new interpreter)."""
    from cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_inspect_verify_dump_read_it_back(backed_up, zk_a, capsys):
    root, store, r = backed_up
    url = r.last_line
    ls_json, insp_json, dump = concurrently(
        ("list", str(store), "--json"),
        ("inspect", url, "--json", "--keys"),
        ("dump", f"zk://{zk_a.url}", "--subtree", root),
    )
    for res in (ls_json, insp_json, dump):
        assert res.code == 0, res
    rows = json.loads(ls_json.out)
    assert len(rows) == 1 and rows[0]["url"] == url
    assert rows[0]["source"] == "dc-cli" and rows[0]["keys"] == 8 and rows[0]["service"] == "zookeeper"
    assert rows[0]["encrypted"] is False

    info = json.loads(insp_json.out)
    assert info["source"] == "dc-cli" and info["keys"] == 8 and info["version"] == 1
    assert info["service"] == "zookeeper" and info["root"] == root
    assert sorted(info["key_list"]) == sorted(
        [root] + [f"{root}/{n}" for n in ("text", "bin", "empty", "uni", "secret", "dir", "dir/leaf")]
    )
    assert SECRET_VALUE.decode() not in insp_json.out  # inspect shows no values

    lines = {ln.split("  ")[0]: ln for ln in dump.out.splitlines()}
    assert "'hello world'" in lines[f"{root}/text"]
    assert "hex:0001feff" in lines[f"{root}/bin"]
    assert "(empty)" in lines[f"{root}/empty"]
    assert "grüße ☃" in lines[f"{root}/uni"]
    assert "[4 B]" in lines[f"{root}/bin"]
    assert "8 keys" in dump.err

    code, out, _ = run_main(capsys, "list", f"file://{store}")
    assert code == 0 and url in out and "dc-cli" in out and "keys=8" in out and "plain" in out
    code, out, _ = run_main(capsys, "inspect", url)
    assert code == 0 and "source: dc-cli" in out and "keys: 8" in out
    code, out, _ = run_main(capsys, "verify", url)
    assert code == 0 and out.strip().splitlines()[-1].startswith(f"ok: {url}: 8 keys")
    code, out, _ = run_main(capsys, "dump", f"zk://{zk_a.url}", "--subtree", root + "/dir", "--no-values")
    assert code == 0 and out.splitlines() == [f"{root}/dir  [0 B]", f"{root}/dir/leaf  [4 B]"]


def test_dump_is_sorted_depth_first_so_dumps_diff(zk_a, capsys):
    """Nodes created in a scrambled order come out as a sorted, depth-first listing (a node,
    then its subtree, siblings by name: ``a``, ``a/x``, ``a-b``, ``ab``), the same every time."""
    root = unique_root()
    names = ["b", "a-b", "a/x/2", "a/x/10", "ab", "a/y", "a/x/1", "c"]
    with kazoo(zk_a.url) as c:
        for n in names:
            c.create(f"{root}/{n}", b"v", makepath=True)
    first = run_main(capsys, "dump", f"zk://{zk_a.url}", "--subtree", root, "--no-values")
    second = run_main(capsys, "dump", f"zk://{zk_a.url}", "--subtree", root, "--no-values")
    assert first[0] == 0 and first[1] == second[1]
    order = [ln.split("  ")[0].removeprefix(root) for ln in first[1].splitlines()]
    assert order == ["", "/a", "/a/x", "/a/x/1", "/a/x/10", "/a/x/2", "/a/y", "/a-b", "/ab", "/b", "/c"], order


def test_external_sort_spills_and_keeps_depth_first_order(tmp_path):
    """The dump's sort with a tiny run size: every run is spilled (sealed: no key in clear on
    disk) and merged back into the same order an in-memory sort gives."""
    import random

    from burrow.extsort import ExternalSorter, tree_sort_key

    keys = [f"/n{i % 7}/m{i % 13}/leaf-{i}".encode() for i in range(3000)] + [b"/", b"/n1", b"/n1\nx", b"/n1\x00y"]
    random.Random(7).shuffle(keys)
    sorter = ExternalSorter(tmp_path, run_bytes=4096)
    for k in keys:
        sorter.add(tree_sort_key(k) + k.hex().encode() + b"\n")
    assert len(sorter.runs) > 10
    assert all(b"leaf-" not in p.read_bytes() for p in sorter.runs)  # sealed runs
    merged = [bytes.fromhex(line[line.index(b"\x00") + 1:-1].decode()) for line in sorter]
    sorter.close()
    assert not list(tmp_path.iterdir())
    parts = lambda k: [p for p in k.split(b"/") if p]  # noqa: E731 - component-wise order
    assert merged == sorted(keys, key=parts)


def test_every_exit_code_is_documented():
    """Each EXIT_* code of burrow.errors is a row of the README's exit code table, and the
    table documents no code that does not exist."""
    import re

    from burrow import errors

    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("### Exit codes", 1)[1].split("\n\n", 2)[1]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert documented == codes, (documented, codes)


def test_restore_dry_run_writes_nothing_and_conflicts_exit_3(backed_up, zk_b):
    root, store, r = backed_up
    url = r.last_line
    with kazoo(zk_b.url) as c:
        c.create(root, b"top")  # identical
        c.create(root + "/secret", b"target's own value")  # conflict
        before = full_snapshot(c, root)

        dry = run_cli("restore", url, "--into", f"zk://{zk_b.url}", "--dry-run", "--list")
        assert dry.code == 0, dry
        assert full_snapshot(c, root) == before
        lines = dry.out.splitlines()
        assert lines[0] == f"dry run: nothing was written to zk://{zk_b.url}"  # the summary first
        assert "planned_create=6" in lines[1] and "created=0" in lines[1] and "conflicts=1" in lines[1]
        creates = {ln.split(None, 1)[1] for ln in lines if ln.startswith("create ")}
        assert creates == {f"{root}/{n}" for n in ("text", "bin", "empty", "uni", "dir", "dir/leaf")}
        assert f"conflict {root}/secret" in lines

        res = run_cli("restore", url, "--into", f"zk://{zk_b.url}")
        assert res.code == 3, res
        after = full_snapshot(c, root)
        assert {p: after[p] for p in before} == before  # not a byte changed
        assert c.get(root + "/text")[0] == b"hello world" and c.get(root + "/dir/leaf")[0] == b"leaf"
    counts = res.out.splitlines()[0]
    assert f"conflict {root}/secret" in res.out.splitlines()
    assert "created=6" in counts and "identical=1" in counts and "conflicts=1" in counts, res
    assert "1 existing keys differ" in last_stderr_line(res)
    assert SECRET_VALUE.decode() not in res.out + res.err and "target's own value" not in res.out + res.err


def test_usage_errors_exit_2(tmp_path, capsys):
    res = run_cli("backup", "foo://somewhere", "--to", str(tmp_path), "--no-encryption")
    assert res.code == 2, res
    assert last_stderr_line(res).startswith("burrow: error: unknown source URL scheme foo://"), res
    for args, needle in [
        (("restore", f"file://{tmp_path}/x.burrow", "--into", "ftp://host:21"), "unknown source URL scheme ftp://"),
        (("restore", f"file://{tmp_path}/x.burrow", "--into", "zk://127.0.0.1:1", "--map", "no-equals-sign"),
         "--map takes OLD=NEW"),
        (("restore", f"{tmp_path}/not-an-archive.txt", "--into", "zk://127.0.0.1:1"), "does not name a .burrow"),
        (("list", "ftp://host/dir"), "unknown store URL scheme ftp://"),
        (("backup", "zk://127.0.0.1:1?bogus=1", "--to", str(tmp_path), "--no-encryption"), "unknown zk URL option"),
        (("backup", "zk://127.0.0.1:1", "--to", str(tmp_path), "--level", "99", "--no-encryption"), "--level"),
        (("backup", "zk://127.0.0.1:1"), "--to"),
        (("frobnicate",), "invalid choice"),
    ]:
        code, out, err = run_main(capsys, *args)
        assert code == 2, (args, out, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("burrow: error:") and needle in last, (args, err)
    assert list(tmp_path.iterdir()) == []


def test_a_niceness_out_of_range_is_a_usage_error_on_the_cli_and_as_a_flow_parameter(tmp_path, capsys):
    """One check (burrow/proc.py ``check_niceness``) names the option or the parameter: ``--nice 20``
    exits 2 before any flow runs; a deployment's ``nice: -1`` fails its run before it connects."""
    import os

    from burrow.errors import UsageError
    from flows.capture import capture

    for bad in ("20", "-1"):
        code, out, err = run_main(capsys, "capture", "zk://127.0.0.1:1", "--to", str(tmp_path), "--nice", bad)
        assert code == 2, (bad, out, err)
        assert err.strip().splitlines()[-1] == "burrow: error: --nice takes a niceness from 0 to 19", err
    niceness = os.nice(0)
    with pytest.raises(UsageError, match=r"^nice takes a niceness from 0 to 19$"):
        capture(source="zk://127.0.0.1:1", store=str(tmp_path), encryption=False, nice=-1)
    assert os.nice(0) == niceness  # this process's priority untouched
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the heartbeat replacement

_HEARTBEAT_PROBE = """
import json, sys
{before}
from prefect import flow_engine
print(json.dumps(flow_engine._send_heartbeats.__module__ + "." + flow_engine._send_heartbeats.__qualname__))
"""


def _heartbeat_in_fresh_interpreter(before: str) -> str:
    import os
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "-c", _HEARTBEAT_PROBE.format(before=before)], capture_output=True,
                          text=True, cwd=str(REPO), env=os.environ.copy(), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_prompt_heartbeat_is_installed_by_the_cli_only(tmp_path):
    """A worker runs a flow by importing its module: Prefect's heartbeat stays there. A flow
    command of the CLI (``main``, as the console script calls it) installs Burrow's."""
    prefect_own = "prefect.flow_engine._send_heartbeats"
    assert _heartbeat_in_fresh_interpreter("import flows.backup, flows.restore, flows.failover") == prefect_own
    cli = (f"from cli import main\nassert main(['prune', {str(tmp_path)!r}, '--dry-run', "
           "'--keep-last', '1']) == 0")
    assert _heartbeat_in_fresh_interpreter(cli) == "flows.common._prompt_heartbeats"


@pytest.mark.parametrize("mismatch", ["hash", "version"])
def test_a_changed_prefect_keeps_its_own_heartbeat_and_runs_still_beat(mismatch, zk_a, tmp_path, monkeypatch):
    """When Prefect's release or the replaced function's source is not what the replacement
    was written for, it is not installed: Prefect's heartbeat stays, a flow still runs, and its
    heartbeat event still reaches the API."""
    from datetime import timedelta

    from prefect import flow_engine
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    import flows.common as common
    from flows.backup import backup

    original = flow_engine._send_heartbeats
    if original is common._prompt_heartbeats:  # an earlier test of this process installed it
        original = flow_engine._burrow_replaced_send_heartbeats
        monkeypatch.setattr(flow_engine, "_send_heartbeats", original)
    version, digest = common.PROMPT_HEARTBEATS_FOR
    assert common.heartbeat_source_digest() == digest, "Prefect's heartbeat changed: see PROMPT_HEARTBEATS_FOR"
    wrong = (version, "0" * 64) if mismatch == "hash" else ("3.0.0", digest)
    monkeypatch.setattr(common, "PROMPT_HEARTBEATS_FOR", wrong)
    assert common.install_prompt_heartbeats() is False
    assert flow_engine._send_heartbeats is original

    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/k", b"v", makepath=True)
    store = tmp_path / "store"
    store.mkdir()
    state = backup(source=f"zk://{zk_a.url}{root}", store=str(store), name="dc-prefect-beat", encryption=False,
                   return_state=True)
    assert state.is_completed(), state
    run_id = state.state_details.flow_run_id
    flt = EventFilter(occurred=EventOccurredFilter(since=state.timestamp - timedelta(minutes=5)),
                      event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                      resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]))
    # the server's event persister writes in batches
    beats = wait_for("the run's heartbeat event", lambda: all_events(flt), timeout=120)
    assert beats[0].resource.id == f"prefect.flow-run.{run_id}"
