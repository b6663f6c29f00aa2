"""An interrupted failover (issue 17, item 6): Ctrl-C (SIGINT) or SIGTERM once the archive is
chosen leaves on stdout the "failover from URL" line the runbook tells the on-call to copy, exits
130, and keeps the choice in the journal, so the re-run finishes with the same archive.

The real ``burrow`` command runs as a subprocess on a tree of 12,000 ZooKeeper nodes; the signal
is sent once the target's node count (read with kazoo) shows the replay writing, never after a
fixed sleep."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BURROW, REPO, interruptible
from zkutil import count, kazoo, snapshot, unique_root

from blocks.keys import archive_keys
from blocks.local import LocalStore
from burrow.keys import keygen
from burrow.testing.servers import free_port
from flows.backup import backup
from tasks.journal import unfinished_failover

DEAD = f"zk://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def big_archive(zk_a, wide_zk_tree, tmp_path_factory) -> tuple[Path, Path, str, dict[str, bytes]]:
    """(store, key file, archive URL, the tree) of the session's 12,000-node ZooKeeper tree."""
    tmp = tmp_path_factory.mktemp("interrupt")
    store, key = tmp / "store", tmp / "k.key"
    store.mkdir()
    keygen(key, x25519=False)
    root, tree = wide_zk_tree
    made = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-int", root=root, key_file=str(key))
    return store, key, made["url"], tree


def _interrupted_failover(sig: int, big_archive, zk_b) -> tuple[int, str, str, str]:  # noqa: ANN001
    """Run the failover, send ``sig`` once the replay has written part of the tree; returns
    (exit code, stdout, stderr, target URL)."""
    store, key, _url, tree = big_archive
    top = unique_root()
    root = min(tree)  # the archived root: the shortest path
    target = f"zk://{zk_b.url}{top}"
    proc = subprocess.Popen(
        [BURROW, "failover", "dc-int", "--from", str(store), "--into", target, "--key-file", str(key),
         "--primary", DEAD],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=os.environ.copy(),
        preexec_fn=interruptible,
    )
    try:
        deadline = time.monotonic() + 240
        with kazoo(zk_b.url) as c:
            while proc.poll() is None and time.monotonic() < deadline:
                if c.exists(f"{top}{root}") is not None:  # the replay is writing (the root comes first)
                    break
                time.sleep(0.01)
            assert proc.poll() is None, "the failover ended before the replay was seen writing"
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=120)
            written = count(c, f"{top}{root}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert written < len(tree) or "post-verify" not in out, ("the run finished despite the signal", err[-3000:])
    return proc.returncode, out, err, target


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_failover_prints_its_archive_line_and_exits_130(sig, big_archive, zk_b):
    store, key, url, tree = big_archive
    code, out, err, target = _interrupted_failover(sig, big_archive, zk_b)
    assert code == 130, (code, out, err[-3000:])
    lines = out.splitlines()
    assert any(ln.startswith(f"failover from {url} (created ") for ln in lines), out
    assert "burrow: interrupted" in err and f"re-run the failover to finish it with {url}" in err, err[-2000:]
    assert "Traceback" not in err

    # the journal keeps the choice: a plain re-run resumes with that archive and finishes the tree
    keys = archive_keys([str(key)], None, None, None, None)
    record = unfinished_failover(LocalStore(path=str(store)), "dc-int", target, keys)
    assert record is not None and record["url"] == url, record
    if sig == signal.SIGINT:
        again = subprocess.run(
            [BURROW, "failover", "dc-int", "--from", str(store), "--into", target, "--key-file", str(key),
             "--primary", DEAD], capture_output=True, text=True, cwd=str(REPO), env=os.environ.copy(), timeout=240)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resuming the failover begun at" in again.stdout and f"failover from {url}" in again.stdout
        with kazoo(zk_b.url + target.split(zk_b.url, 1)[1]) as c:
            assert snapshot(c, min(tree)) == tree
