"""What the capture tests of the three services share: ``burrow capture`` as a subprocess, the
sealed segments read directly (not through Burrow's chain code), waits on progress, and a
steady, pausable writer whose changes each service's test defines."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import BURROW, REPO, interruptible

from burrow.archive import ArchiveReader
from burrow.keys import keygen

#: Hang guard of one wait on progress (a busy machine is slow, never this slow).
HANG_GUARD = 300.0


@pytest.fixture(name="key")
def capture_key(tmp_path: Path) -> Path:
    """A symmetric key for the capture's segments and the full backups."""
    path = tmp_path / "capture.key"
    keygen(path, x25519=False)
    return path


def segments(store: Path, source: str) -> list[dict[str, Any]]:
    """The manifests of the source's sealed segments, in name order."""
    out = []
    for p in sorted((store / source / "changes").glob("*.burrow")) if (store / source / "changes").is_dir() else []:
        with open(p, "rb") as f:
            out.append({**ArchiveReader(f).manifest, "_path": p})
    return out


def covered(store: Path, source: str, position: int) -> bool:
    """A sealed (not catching-up) segment reaches ``position`` (revision, zxid or index)."""
    return any(m["last_position"] >= position and not m.get("catching_up") for m in segments(store, source))


def wait_for(what: str, check: Callable[[], Any], proc: subprocess.Popen | None = None) -> Any:
    """Wait until ``check()`` is truthy; fail after HANG_GUARD seconds, or when ``proc`` died."""
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"capture exited ({proc.returncode}) while waiting for {what}: {err[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no progress: {what}")


class Capture:
    """``burrow capture`` as a real subprocess."""

    def __init__(self, url: str, store: Path, name: str, key: Path, seal: str = "1s", duration: str = "30m") -> None:
        self.proc = subprocess.Popen(
            [BURROW, "capture", url, "--to", str(store), "--name", name, "--key-file", str(key),
             "--seal-every", seal, "--for", duration],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO), preexec_fn=interruptible,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=60)

    def wait(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=HANG_GUARD)
        return self.proc.returncode, out, err


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BURROW, *args], capture_output=True, text=True, cwd=str(REPO), timeout=HANG_GUARD)


def restore(store: Path, name: str, key: Path, into: str, *point: str) -> subprocess.CompletedProcess:
    return cli("restore", str(store), "--source", name, *point, "--into", into, "--key-file", str(key))


def backup(url: str, store: Path, name: str, key: Path) -> None:
    r = cli("backup", url, "--to", str(store), "--name", name, "--key-file", str(key))
    assert r.returncode == 0, r.stderr[-3000:]


class SteadyWriter:
    """About ``rate`` changes a second on a thread of its own, pausable: a subclass's
    ``change(n)`` makes the n-th change (a create, an update or a delete)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.run, self.idle, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.run.set()
        self.changes = 0
        self.rng = random.Random(19)
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def change(self, n: int) -> None:
        raise NotImplementedError

    def before(self) -> None:
        """Anything to do on the writer's thread before its first change."""

    def _loop(self) -> None:
        self.before()
        n = 0
        while not self.stop.is_set():
            if not self.run.is_set():
                self.idle.set()
                self.run.wait(0.1)
                continue
            self.idle.clear()
            started = time.monotonic()
            self.change(n)
            n += 1
            self.changes += 1
            time.sleep(max(0.0, 1.0 / self.rate - (time.monotonic() - started)))
        self.idle.set()

    def pause(self) -> None:
        self.run.clear()
        wait_for("the writer to pause", self.idle.is_set)

    def resume(self) -> None:
        self.run.set()
