"""What a person sees, through the real ``burrow`` console script.

* On a terminal (stderr on a pseudo-terminal): a progress bar per long stage, which appears,
  advances and ends at the right count; no Prefect engine lines.
* Off a terminal (pipes, as in CI or cron): plain lines, no bars, no escape sequences.
* ``--json``: exactly one JSON object on stdout, also on failure.
* A dry run prints its summary first; the planned paths only with ``--list`` or into
  ``--list-file``.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import BURROW, REPO, run_cli
from test_orchestrator import all_events, wait_for
from zkutil import kazoo, unique_root

KEYS = 1200  # below the root: enough for several batches of every stage
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
COUNT = re.compile(r"(\d[\d,]*)/(\d[\d,]*)")


class PtyRun:
    """Run burrow with stderr on a pseudo-terminal (160 columns) and stdout on a pipe."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 240) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        full = os.environ.copy()
        full.update({"TERM": "xterm-256color", "BURROW_PROGRESS_INTERVAL": "0", "COLUMNS": "160"})
        full.pop("NO_COLOR", None)
        full.update(env or {})
        proc = subprocess.Popen([BURROW, *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                                env=full, cwd=str(REPO))
        os.close(slave)
        chunks: list[bytes] = []

        def pump() -> None:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        out = proc.stdout.read().decode()
        self.code = proc.wait(timeout)
        reader.join(timeout)
        os.close(master)
        self.raw = b"".join(chunks).decode("utf-8", "replace")
        self.out = out
        self.frames = [f for f in re.split(r"[\r\n]", ANSI.sub("", self.raw)) if f.strip()]

    def counts(self, stage: str) -> list[tuple[int, int]]:
        """(done, total) of every frame of the bar whose description starts with ``stage``."""
        found = []
        for f in self.frames:
            if stage in f and (m := COUNT.search(f.split(stage, 1)[1])):
                found.append((int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))))
        return found

    def __repr__(self) -> str:
        return f"PtyRun(code={self.code}, out={self.out[-1500:]!r}, tty={self.raw[-3000:]!r})"


@pytest.fixture(scope="module")
def tree(zk_a):
    root = unique_root()
    with kazoo(zk_a.url) as c:
        t = c.transaction()
        t.create(root, b"top")
        for i in range(KEYS // 100):
            t.create(f"{root}/d{i:02d}", b"")
        t.commit()
        for start in range(0, KEYS, 200):
            t = c.transaction()
            for i in range(start, min(start + 200, KEYS)):
                t.create(f"{root}/d{i // 100:02d}/k{i:04d}", b"value %d" % i)
            t.commit()
    total = 1 + KEYS // 100 + KEYS
    return root, total


@pytest.fixture(scope="module")
def backed_up_on_a_tty(zk_a, tree, tmp_path_factory):
    root, total = tree
    store = tmp_path_factory.mktemp("tty-store")
    r = PtyRun("backup", f"zk://{zk_a.url}", "--root", root, "--to", str(store), "--no-encryption",
               "--name", "tty-src")
    return r, store


def test_backup_on_a_terminal_shows_a_walk_bar_ending_at_the_key_count(backed_up_on_a_tty, tree):
    r, _ = backed_up_on_a_tty
    _, total = tree
    assert r.code == 0, r
    assert r.out.strip().splitlines()[-1].startswith("file://"), r
    walk = r.counts("extract ")
    assert walk and walk[-1][0] == walk[-1][1] >= 1000, walk  # a finished bar: done == total
    assert any("/s" in f for f in r.frames if "extract " in f), r  # a rate
    assert "| INFO" not in r.raw and "Beginning flow run" not in r.raw, r  # no engine lines
    assert "extract: walking" in r.raw  # Burrow's own stage lines


def test_the_walk_bar_ends_at_the_key_count(backed_up_on_a_tty, tree):
    r, _ = backed_up_on_a_tty
    _, total = tree
    assert r.counts("extract ")[-1] == (total, total), r.counts("extract ")


def test_restore_on_a_terminal_shows_plan_and_replay_bars_that_advance(backed_up_on_a_tty, tree, zk_b):
    r, _ = backed_up_on_a_tty
    _, total = tree
    url = r.out.strip().splitlines()[-1]
    res = PtyRun("restore", url, "--into", f"zk://{zk_b.url}")
    assert res.code == 0, res
    plan = res.counts("plan ")
    assert plan and plan[-1] == (total, total), plan
    done = [d for d, _ in plan]
    assert done == sorted(done) and len(set(done)) >= 3, plan  # it advanced, frame by frame
    assert all(t == total for _, t in plan), plan  # the total is known from the start: an ETA is shown
    assert any("ETA" in f for f in res.frames if "plan " in f), res
    replay = res.counts("restore into ")
    assert replay and replay[-1][0] == replay[-1][1] == total, replay
    assert f"created={total}" in res.out, res


def test_off_a_terminal_there_are_plain_lines_and_no_bars(backed_up_on_a_tty, tree, zk_b):
    r, _ = backed_up_on_a_tty
    root, total = tree
    url = r.out.strip().splitlines()[-1]
    res = run_cli("restore", url, "--into", f"zk://{zk_b.url}", "--dry-run", env={"BURROW_PROGRESS_INTERVAL": "0"})
    assert res.code == 0, res
    assert "\x1b[" not in res.err and "\r" not in res.err and "━" not in res.err, res
    assert "download: fetched" in res.err and "| INFO" not in res.err, res  # Burrow's lines, not the engine's
    lines = res.out.splitlines()
    assert lines[0] == f"dry run: nothing was written to zk://{zk_b.url}", res  # the summary first
    assert "planned_create=0" in lines[1] and f"identical={total}" in lines[1], res


def test_json_prints_one_object_on_stdout(backed_up_on_a_tty, tree, zk_b, tmp_path):
    r, store = backed_up_on_a_tty
    _, total = tree
    url = r.out.strip().splitlines()[-1]
    # the tree in zk_b first (a no-op when another test of this module restored it already)
    assert run_cli("restore", url, "--into", f"zk://{zk_b.url}").code == 0
    res = run_cli("restore", url, "--into", f"zk://{zk_b.url}", "--dry-run", "--json")
    assert res.code == 0, res
    summary = json.loads(res.out)  # one object, nothing else on stdout
    assert summary["command"] == "restore" and summary["exit_code"] == 0, summary
    assert summary["identical"] == total and summary["planned_create"] == 0, summary
    bad = run_cli("verify", str(tmp_path / "missing.burrow"), "--json")
    assert bad.code == 1, bad
    failed = json.loads(bad.out)
    assert failed["status"] == "failed" and failed["exit_code"] == 1 and failed["error"], failed
    assert bad.error_line == f"burrow: error: {failed['error']}", bad


def test_dry_run_lists_paths_only_on_request(backed_up_on_a_tty, tree, zk_b, tmp_path):
    r, _ = backed_up_on_a_tty
    root, total = tree
    url = r.out.strip().splitlines()[-1]
    target = f"zk://{zk_b.url}/fresh-{root.strip('/')}"  # a chroot where nothing exists yet
    with ThreadPoolExecutor(3) as pool:  # independent dry runs: side by side to keep the suite fast
        quiet, listed, to_file = pool.map(
            lambda extra: run_cli("restore", url, "--into", target, "--dry-run", *extra),
            [(), ("--list",), ("--list-file", str(tmp_path / "plan.txt"))],
        )
    for res in (quiet, listed, to_file):
        assert res.code == 0, res
        assert res.out.splitlines()[0].startswith("dry run: nothing was written"), res
        assert f"planned_create={total}" in res.out.splitlines()[1], res
    assert not any(ln.startswith("create ") for ln in quiet.out.splitlines()), quiet
    assert f"burrow: {total} create lines not shown (--list shows them" in quiet.err, quiet
    creates = [ln for ln in listed.out.splitlines() if ln.startswith("create ")]
    assert len(creates) == total and listed.out.index("planned_create=") < listed.out.index("create "), listed  # every one
    assert not any(ln.startswith("create ") for ln in to_file.out.splitlines()), to_file
    assert (tmp_path / "plan.txt").read_text().splitlines() == creates


# ------------------------------------------------------------------ the console script's exit

#: Installed with PYTHONPATH into the ``burrow`` subprocess: Prefect's events worker takes
#: ``BURROW_TEST_EVENT_DELAY`` seconds per event, as under load, so the run's events are still
#: queued when the command ends. Patched when ``prefect.events.worker`` is first imported (Burrow
#: decides its Prefect API before Prefect is loaded, so nothing imports it earlier).
_SLOW_EVENTS = '''
import importlib.abc, importlib.machinery, os, sys

class _SlowEvents(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "prefect.events.worker":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            handle = module.EventsWorker._handle

            async def slow(self, event):
                import asyncio
                await asyncio.sleep(float(os.environ["BURROW_TEST_EVENT_DELAY"]))
                await handle(self, event)

            module.EventsWorker._handle = slow

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _SlowEvents())
'''


def test_the_last_event_of_a_cli_run_reaches_the_api_and_the_exit_stays_quiet(zk_a, tmp_path):
    """Through the real console script (``run()``, whose exit skips the interpreter's
    teardown): with the run's events still queued when the command ends, they all reach the
    API before the process is gone, and draining them prints nothing (no ``EventsWorker -
    Still processing items`` line after the command's own output)."""
    from datetime import UTC, datetime, timedelta

    from prefect.events.filters import (
        EventAnyResourceFilter,
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
    )

    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/k", b"v", makepath=True)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SLOW_EVENTS)
    store = tmp_path / "store"
    store.mkdir()
    since = datetime.now(UTC) - timedelta(minutes=1)
    r = run_cli("backup", f"zk://{zk_a.url}{root}", "--to", str(store), "--no-encryption", "--name", "exit-src",
                env={"PYTHONPATH": str(hook), "BURROW_TEST_EVENT_DELAY": "0.25"}, timeout=240)
    assert r.code == 0, r
    assert "Still processing" not in r.err and "EventsWorker" not in r.err and " | WARNING" not in r.err, r
    archive = r.last_line
    assert archive.startswith("file://"), r

    # The command has exited: its events are at the server already or lost. The server writes
    # what it received in batches, so it is read until it is there (a lost event never is: the wait then fails).
    flt = EventFilter(occurred=EventOccurredFilter(since=since), event=EventNameFilter(name=["burrow.backup.completed"]),
                      any_resource=EventAnyResourceFilter(id=[f"burrow.archive.{archive}"]))
    events = wait_for("the run's last event (it did not reach the API before the console script exited)",
                      lambda: all_events(flt), timeout=120)
    assert len(events) == 1, events
