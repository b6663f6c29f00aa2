"""What the capture tests of the three services share: ``burrow capture`` as a subprocess, the
sealed segments read directly (not through Burrow's chain code), waits on progress, a steady,
pausable writer whose changes each service's test defines, the one writer run each service's
module builds (issue 19's "Correctness": 60 s at 100 changes/s, a pause every 10 s recorded with
an independent client, the capture SIGKILLed at a random point), and the broken-chain attacks
all three services share (the segment format is service-agnostic; the chains are real)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import BurrowProcess, run_burrow, start_burrow

from burrow.archive import ArchiveReader
from burrow.keys import keygen

#: Hang guard of one wait on progress (a busy machine is slow, never this slow).
HANG_GUARD = 300.0
#: The writer's schedule (issue 19): this many seconds of writing, a pause every EVERY seconds.
SECONDS, EVERY, RATE = 60.0, 10.0, 100.0
PAUSES = int(SECONDS // EVERY)
#: The least share of RATE a busy machine must still reach for the run to mean anything.
MIN_SHARE = 0.25
#: The attacks on a chain a restore must detect before it writes anything.
ATTACKS = ["tampered", "reordered", "missing", "foreign"]


@pytest.fixture(name="key")
def capture_key(tmp_path: Path) -> Path:
    """A symmetric key for the capture's segments and the full backups."""
    path = tmp_path / "capture.key"
    keygen(path, x25519=False)
    return path


def make_key(directory: Path) -> Path:
    """A symmetric key in ``directory`` (for a module-scoped run)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "capture.key"
    keygen(path, x25519=False)
    return path


def seeded(what: str) -> tuple[random.Random, int]:
    """A random generator for ``what``, its seed printed (and taken from BURROW_CAPTURE_SEED
    when set), so a failure reproduces."""
    seed = int(os.environ.get("BURROW_CAPTURE_SEED") or random.SystemRandom().randrange(2**31))
    print(f"{what}: seed {seed} (BURROW_CAPTURE_SEED={seed} reproduces the run)")
    return random.Random(seed), seed


def now_iso() -> str:
    """Now, ISO 8601 UTC with microseconds, as ``--at`` takes it."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def to_us(iso: str) -> int:
    """An ISO 8601 time (a manifest's or :func:`now_iso`'s) as microseconds since the epoch."""
    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1_000_000)


def show_ms(iso: str) -> str:
    """An ISO time as Burrow shows it to a person (to the millisecond, ``...Z``)."""
    when = datetime.fromtimestamp(to_us(iso) / 1_000_000, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_manifests: dict[tuple[str, int, int, int], dict[str, Any]] = {}


def segments(store: Path, source: str) -> list[dict[str, Any]]:
    """The manifests of the source's sealed segments, in name order (a segment is written once,
    by a rename, so each is read once: waits poll this often)."""
    d = store / source / "changes"
    out = []
    for p in sorted(d.glob("*.burrow")) if d.is_dir() else []:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        ident = (str(p), st.st_ino, st.st_size, st.st_mtime_ns)
        if ident not in _manifests:
            with open(p, "rb") as f:
                _manifests[ident] = ArchiveReader(f).manifest
        out.append({**_manifests[ident], "_path": p})
    return out


def resyncs(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The segments that start a resync (its first part: a resync may be sealed in parts)."""
    return [m for m in manifests if m.get("resync") and not m.get("resync_part")]


def covered(store: Path, source: str, position: int) -> bool:
    """A sealed (not catching-up) segment reaches ``position`` (revision, zxid or index)."""
    return any(m["last_position"] >= position and not m.get("catching_up") for m in segments(store, source))


def sealed_past(store: Path, source: str, at: str) -> bool:
    """A sealed, not catching-up segment ends after the instant ``at``: the window reaches it."""
    t = to_us(at)
    return any(to_us(m["last_time"]) > t and not m.get("catching_up") and not m.get("gap")
               for m in segments(store, source))


def chain_of(store: Path, source: str, base: str) -> list[dict[str, Any]]:
    """The segments chained to the full archive ``base`` (its object name), by position."""
    return sorted((m for m in segments(store, source) if m["base"]["name"] == base), key=lambda m: m["first_position"])


def full_archives(store: Path, source: str) -> list[str]:
    """The object names of the source's full archives, oldest first (names carry the time)."""
    return sorted(f"{source}/{p.name}" for p in (store / source).glob("*.burrow"))


def wait_for(what: str, check: Callable[[], Any], proc: BurrowProcess | None = None) -> Any:
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
    """``burrow capture`` as a process of its own (forked from the suite's CLI fork server where
    it can be)."""

    def __init__(self, url: str, store: Path, name: str, key: Path, seal: str = "1s", duration: str = "30m") -> None:
        self.proc = start_burrow("capture", url, "--to", str(store), "--name", name, "--key-file", str(key),
                                 "--seal-every", seal, "--for", duration)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=60)

    def stop(self) -> None:
        """Ctrl-C: the capture seals what it saw and ends, its lock released at once."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=HANG_GUARD)

    def wait(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=HANG_GUARD)
        return self.proc.returncode, out, err


def cli(*args: str) -> subprocess.CompletedProcess:
    """``burrow ARGS`` to its end (forked from the suite's CLI fork server where it can be)."""
    return run_burrow(*args, timeout=HANG_GUARD)


def restore(store: Path, name: str, key: Path, into: str, *point: str) -> subprocess.CompletedProcess:
    return cli("restore", str(store), "--source", name, *point, "--into", into, "--key-file", str(key))


def backup(url: str, store: Path, name: str, key: Path) -> None:
    r = cli("backup", url, "--to", str(store), "--name", name, "--key-file", str(key))
    assert r.returncode == 0, r.stderr[-3000:]


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("burrow: error:")]


class SteadyWriter:
    """About ``rate`` changes a second on a thread of its own, pausable: a subclass's
    ``change(n)`` makes the n-th change (a create, an update or a delete). ``active``: the
    seconds it has been writing (pauses left out), the clock of its schedule."""

    def __init__(self, rate: float, rng: random.Random | None = None) -> None:
        self.rate = rate
        self.run, self.idle, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.run.set()
        self.changes = 0
        self.active = 0.0
        self.error: BaseException | None = None
        self.rng = rng or random.Random(19)
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def change(self, n: int) -> None:
        raise NotImplementedError

    def before(self) -> None:
        """Anything to do on the writer's thread before its first change."""

    def _loop(self) -> None:
        try:
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
                self.active += time.monotonic() - started
        except BaseException as exc:  # noqa: BLE001 - reported by the test's next wait on the writer
            self.error = exc
        finally:
            self.idle.set()

    def _alive(self) -> bool:
        if self.error is not None:
            raise AssertionError(f"the writer failed: {type(self.error).__name__}: {self.error}") from self.error
        return True

    def pause(self) -> None:
        self.run.clear()
        wait_for("the writer to pause", lambda: self._alive() and self.idle.is_set())

    def resume(self) -> None:
        self.run.set()

    def until(self, seconds: float) -> None:
        """Wait until the writer has written for ``seconds`` (its schedule, not a wait on the
        system: its clock only runs while it writes)."""
        wait_for(f"the writer to reach {seconds:.1f} s of writing", lambda: self._alive() and self.active >= seconds)

    def finish(self) -> None:
        self.stop.set()
        self.run.set()
        self.thread.join(timeout=HANG_GUARD)
        self._alive()


@dataclass
class Instant:
    """A pause of the writer: the instant (ISO 8601 UTC), the source's state then as an
    independent client read it, and the source's position (revision, zxid or index)."""

    at: str
    state: dict[Any, Any]
    position: int


@dataclass
class Run:
    """What one service's writer run leaves for its tests to read."""

    store: Path
    name: str
    key: Path
    seed: int
    base: str  # the full archive the run's chain starts from
    instants: list[Instant] = field(default_factory=list)
    changes: int = 0
    seconds: float = 0.0
    killed_at: str = ""  # when the capture was SIGKILLed (ISO)
    restarted_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # what a failing test's traceback shows of it: no recorded states
        return f"<the writer run of {self.name}, seed {self.seed}>"

    @property
    def rate(self) -> float:
        return self.changes / self.seconds if self.seconds else 0.0


class Following:
    """The capture of one source, SIGKILLed and started again as a schedule says."""

    def __init__(self, url: str, store: Path, name: str, key: Path) -> None:
        self.url, self.store, self.name, self.key = url, store, name, key
        self.cap = Capture(url, store, name, key)

    def restart(self) -> None:
        self.cap.kill()
        self.cap = Capture(self.url, self.store, self.name, self.key)

    def wait(self, what: str, check: Callable[[], Any]) -> Any:
        return wait_for(what, check, self.cap.proc)


def random_point(rng: random.Random, other_than: float | None = None) -> float:
    """A random point of the writer's schedule (seconds of writing), not within a second of a
    pause, and in another stretch between two pauses than ``other_than``."""
    while True:
        t = rng.uniform(1.0, SECONDS - 1.0)
        if abs(t / EVERY - round(t / EVERY)) * EVERY < 1.0:
            continue
        if other_than is not None and int(t // EVERY) == int(other_than // EVERY):
            continue
        return t


def writer_run(
    run: Run, follow: Following, writer: SteadyWriter, *, read_state: Callable[[], dict[Any, Any]],
    position: Callable[[], int], rng: random.Random, events: list[tuple[float, Callable[[], None]]] | None = None,
    kill_at: float | None = None,
) -> None:
    """Drive ``writer`` for SECONDS of writing with a pause every EVERY seconds, and SIGKILL the
    capture at a random point (``kill_at``, else drawn from ``rng``) between two pauses, starting it again at once. At each
    pause the source's state (``read_state``, an independent client) and position are recorded,
    and the instant is taken once a sealed segment reaches that position: every change before
    it was seen by then, and none after it is made before the writer resumes. ``events``: more
    (writer seconds, action) of the service's own (the ZooKeeper server bounce)."""
    kill_at = random_point(rng) if kill_at is None else kill_at
    print(f"{run.name}: the capture is SIGKILLed after {kill_at:.2f} s of writing")
    run.extra["kill_at_s"] = kill_at

    def in_window() -> None:
        # the last instant must lie inside the window: a segment sealed after it (else a kill
        # right after it would leave it in the stretch the capture was down, which no time restores)
        if run.instants:
            last = run.instants[-1].at
            follow.wait(f"a segment sealed after {last}", lambda: sealed_past(run.store, run.name, last))

    def kill() -> None:
        in_window()
        follow.cap.kill()
        run.killed_at = now_iso()
        run.extra["position_at_kill"] = at_kill = position()
        # the writer goes on while no capture runs (a busy machine may not have made a change
        # by the time the next capture would start): the resumed chain must reach past them
        wait_for("a change while the capture is down", lambda: position() > at_kill)
        follow.cap = Capture(follow.url, follow.store, follow.name, follow.key)
        run.restarted_at = now_iso()
        run.extra["position_at_restart"] = position()

    def pause(final: bool) -> Callable[[], None]:
        def act() -> None:
            writer.pause()
            state, pos = read_state(), position()
            follow.wait(f"a sealed segment up to position {pos}", lambda: covered(run.store, run.name, pos))
            run.instants.append(Instant(now_iso(), state, pos))
            if not final:
                writer.resume()
        return act

    plan = [(EVERY * (i + 1), pause(i == PAUSES - 1)) for i in range(PAUSES)]
    plan.append((kill_at, kill))
    plan += [(t, lambda act=act: (in_window(), act())) for t, act in events or []]
    # the writer starts once the capture follows the source (it has caught up, after its first
    # resync for ZooKeeper and Consul): a kill early in the run, on a busy machine, must not come
    # before the first capture has sealed anything
    follow.wait("the capture to catch up", lambda: any(
        not m.get("catching_up") and not m.get("gap") for m in segments(run.store, run.name)))
    writer.thread.start()
    for t, act in sorted(plan, key=lambda p: p[0]):
        writer.until(t)
        act()
    writer.finish()
    run.changes, run.seconds = writer.changes, writer.active
    print(f"{run.name}: {run.changes} changes in {run.seconds:.1f} s of writing ({run.rate:.0f}/s, target {RATE:.0f}/s)")


def check_rate(run: Run) -> None:
    """The run made enough changes to mean something (a busy machine may not reach RATE)."""
    print(f"{run.name}: {run.changes} changes, {run.rate:.0f}/s (seed {run.seed})")
    assert run.changes >= MIN_SHARE * RATE * SECONDS, (
        f"the writer made only {run.changes} changes ({run.rate:.0f}/s against {RATE:.0f}/s)")


def check_writer_run(run: Run) -> None:
    """The run made enough changes (:func:`check_rate`), and its chain holds puts and deletes."""
    check_rate(run)
    manifests = chain_of(run.store, run.name, run.base)
    assert any(m["changes"].get("del") for m in manifests) and any(m["changes"].get("put") for m in manifests)


# ----------------------------------------------------------------------------- broken chains


def needed_for(run: Run, instant: Instant) -> list[dict[str, Any]]:
    """The segments of the run's chain a restore to ``instant`` reads: from the last resync at or
    before it (Consul, ZooKeeper) or the chain's start (etcd) to the one it falls in."""
    t = to_us(instant.at)
    chain = [m for m in chain_of(run.store, run.name, run.base) if not m.get("gap")]
    upto = [m for m in chain if to_us(m["first_time"]) <= t]
    starts = [i for i, m in enumerate(upto) if m.get("resync") and not m.get("resync_part")]
    return upto[starts[-1]:] if starts else upto


def break_chain(run: Run, attack: str, foreign: Path, workdir: Path) -> tuple[Path, Instant, list[str]]:
    """A copy of the run's store with its chain broken by ``attack`` (a tampered, reordered,
    missing or foreign segment, ``foreign`` being a segment of another chain of the same source,
    moved in under the victim's name) in the stretch a restore to one of the run's instants
    reads. Returns the copy, that instant, and the names the refusal may give."""
    instant = max(run.instants, key=lambda i: len(needed_for(run, i)))
    needed = needed_for(run, instant)
    assert len(needed) >= 3, f"too short a chain to break before {instant.at}: {len(needed)} segments"
    i = len(needed) // 2
    victim, other = needed[i]["_path"].name, needed[i + 1]["_path"].name
    copy = workdir / f"store-{attack}"
    shutil.copytree(run.store, copy)
    changes = copy / run.name / "changes"
    v, o = changes / victim, changes / other
    if attack == "tampered":  # one bit of the body (its records), the manifest left as it was
        data = bytearray(v.read_bytes())
        data[len(data) // 3] ^= 0x40
        v.write_bytes(bytes(data))
    elif attack == "reordered":
        tmp = v.with_name("swap")
        os.rename(v, tmp)
        os.rename(o, v)
        os.rename(tmp, o)
    elif attack == "missing":
        v.unlink()
    else:
        shutil.copy(foreign, v)
    return copy, instant, [victim, other]


def assert_refused_before_any_write(r: subprocess.CompletedProcess, attack: str, names: list[str],
                                    target_state: Callable[[], dict[Any, Any]]) -> None:
    """The restore of a broken chain exits 1 (README: a corrupt archive) with one error line that
    names what is wrong, and the target is still empty."""
    assert r.returncode == 1, f"{attack}: exit {r.returncode}: {r.stdout[-1000:]} {r.stderr[-3000:]}"
    errors = error_lines(r)
    assert len(errors) == 1, r.stderr[-3000:]
    named = ["missing from the store"] if attack == "missing" else names
    assert any(n in errors[0] for n in named), f"{attack}: the refusal does not name it: {errors[0]}"
    assert target_state() == {}, f"{attack}: a refused restore wrote keys"
