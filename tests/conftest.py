"""The test harness: real servers as local processes, one Prefect server per session.

Environment is set before anything imports Prefect, so in-process flow runs and CLI
subprocesses all talk to the session's own Prefect server, under a private PREFECT_HOME.
A server that cannot start fails the tests that need it: nothing here skips.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SESSION_DIR = Path(tempfile.mkdtemp(prefix="burrow-tests-"))
sys.path.insert(0, str(REPO))

import clifork  # noqa: E402 - tests/ is on sys.path (the rootdir conftest's directory)

from burrow.testing.servers import (  # noqa: E402
    LocalServer,
    free_port,
    start_consul,
    start_etcd,
    start_moto,
    start_postgres,
    start_zookeeper,
    wait_progress,
)

PREFECT_PORT = free_port()
os.environ["PREFECT_HOME"] = str(SESSION_DIR / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{PREFECT_PORT}/api"
# a CLI test must never start (or kill) a local server under the real ~/.burrow: a loaded machine can
# make the session server slow enough to answer that a flow command launches one speculatively
os.environ.setdefault("BURROW_HOME", str(SESSION_DIR / "burrow-home"))
os.environ["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "0.3"
os.environ["PREFECT_SERVER_LOGGING_LEVEL"] = "WARNING"
# the server's scheduler looks for deployments to schedule every 2 s (default 60 s)
os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "2"
os.environ.setdefault("BURROW_STAGING_DIR", str(SESSION_DIR / "staging"))

BURROW = str(Path(sys.executable).parent / "burrow")


#: The session Prefect server's log: a test may read it (the fleet test looks for database errors).
PREFECT_SERVER_LOG = SESSION_DIR / "prefect-server.log"


#: The test files that take longest (``pytest --durations``: each file's setup, calls and teardown,
#: 1 to 3 minutes each on a quiet 2-core machine), handed out first (scripts/test.sh runs xdist with
#: ``--dist loadfile --no-loadscope-reorder``), so the workers end together: xdist's default order
#: (most tests first) sent the few-test files that take minutes (the fleet, the worker stops) last,
#: one worker busy with them while the others had finished (a file goes to one worker whole). The
#: rest follow in collection order. A file that grows to minutes belongs here.
#:
#: Two kinds alternate. The point-in-time files mostly wait (60 s writers at 100 changes a second,
#: captures sealing every few seconds): three of them at once, as when they came first, left the
#: machine a third idle for five minutes (bench/RESULTS.md). Each is followed in the list by files
#: that keep the CPU busy (the fleet, the evidence history, the adversary), so that at any time
#: about one worker of three waits (a worker takes the next file in the list once its current one
#: has two tests or fewer left to run: xdist's LoadScopeScheduling).
LONGEST_FIRST = (
    "test_capture_etcd.py",  # waits
    "test_fleet.py",
    "test_evidence_history.py",
    "test_capture_consul.py",  # waits
    "test_adversary.py",
    "test_orchestrator.py",
    "test_capture_zookeeper.py",  # waits
    "test_offline_blocks.py",
    "test_rerun_acls.py",
    "test_window_views.py",  # waits
    "test_housekeeping.py",
    "test_automation_fires.py",
    "test_capture_engine.py",  # waits
    "test_worker_stop.py",
    "test_interrupt.py",
    "test_chain_index.py",  # waits
    "test_failover_drill.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the files as :data:`LONGEST_FIRST` says (a file's tests keep their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))


#: Each test file's wall time (setup, calls, teardown) and the xdist worker that ran it, summed from
#: the reports the controller receives: where the suite's time goes, file by file.
_FILE_SECONDS: dict[str, float] = {}
_FILE_WORKER: dict[str, str] = {}
#: When each file started and ended, in seconds since the session started (what overlapped what).
_FILE_SPAN: dict[str, tuple[float, float]] = {}
_SESSION_START = time.monotonic()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    name = report.nodeid.split("::", 1)[0]
    _FILE_SECONDS[name] = _FILE_SECONDS.get(name, 0.0) + report.duration
    now = time.monotonic() - _SESSION_START
    start, _ = _FILE_SPAN.get(name, (now - report.duration, 0.0))
    _FILE_SPAN[name] = (start, now)
    node = getattr(report, "node", None)
    if node is not None:
        _FILE_WORKER[name] = node.gateway.id


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The 15 slowest files (seconds, xdist worker, from-to since the session started) and, per
    xdist worker, its files' total (the suite's critical path)."""
    if not _FILE_SECONDS:
        return
    terminalreporter.section("slowest files")
    for name, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:15]:
        start, end = _FILE_SPAN.get(name, (0.0, 0.0))
        terminalreporter.write_line(f"{seconds:8.1f}s  {_FILE_WORKER.get(name, '-'):4}  {start:6.0f}-{end:<6.0f} {name}")
    per_worker: dict[str, float] = {}
    for name, seconds in _FILE_SECONDS.items():
        worker = _FILE_WORKER.get(name, "-")
        per_worker[worker] = per_worker.get(worker, 0.0) + seconds
    terminalreporter.write_line("per worker: " + ", ".join(
        f"{worker} {seconds:.0f}s" for worker, seconds in sorted(per_worker.items())))


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalServer]:
    """The session's PostgreSQL server (a process of its own, private port and data directory):
    the Prefect server's database, as Prefect recommends for a production orchestrator."""
    server = start_postgres(SESSION_DIR / "postgres")
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def prefect_server(postgres: LocalServer) -> Iterator[str]:
    """One real Prefect API server for the whole session (a cold start takes ~10 s), on
    PostgreSQL. Only the server is given the database URL: a local ``burrow server`` a test starts
    keeps its own SQLite database."""
    log = open(PREFECT_SERVER_LOG, "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
         "--port", str(PREFECT_PORT)],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": postgres.database_url,
             # a fleet's burst of runs needs more than the default 5 (+10) connections
             "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
             "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "20"},
        start_new_session=True,  # a process group of its own: its CPU time is its start's progress
    )
    url = os.environ["PREFECT_API_URL"]

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError("exited with code " + str(proc.returncode))
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:  # (120 s without progress: a loaded machine took more than 120 s in all to start it)
        wait_progress(healthy, proc.pid, 120, "the Prefect server")
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        tail = PREFECT_SERVER_LOG.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the Prefect server did not start ({exc}):\n{tail}") from None
    yield url
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(autouse=True)
def _registered_blocks_stay_in_their_test() -> Iterator[None]:
    """``blocks.resolve.register`` keeps a configured block for the process, keyed by its
    credential-free URL: a block a test registers (say, with digest credentials for zk_b) must
    not answer for the plain ``zk://host`` URL in later tests."""
    from blocks import resolve

    saved = dict(resolve._registered)
    yield
    resolve._registered.clear()
    resolve._registered.update(saved)


def _session_server(name: str, start: Callable[[Path], LocalServer]) -> Any:
    """A session-scoped fixture ``name`` running one real server (it fails, never skips)."""

    @pytest.fixture(scope="session", name=name)
    def server_fixture() -> Iterator[LocalServer]:
        server = start(SESSION_DIR / name.replace("_", "-"))
        yield server
        server.stop()

    return server_fixture


#: The suite's ZooKeepers are lean (C1 only, one GC thread, no fsync per commit: start_zookeeper):
#: the suite is CPU-bound on two cores (bench/RESULTS.md, "where the suite's CPU goes").
lean_zookeeper = functools.partial(start_zookeeper, lean=True)
zk_a = _session_server("zk_a", lean_zookeeper)
zk_b = _session_server("zk_b", lean_zookeeper)
etcd_a = _session_server("etcd_a", start_etcd)
etcd_b = _session_server("etcd_b", start_etcd)
consul_a = _session_server("consul_a", start_consul)
consul_b = _session_server("consul_b", start_consul)
moto = _session_server("moto", start_moto)


@pytest.fixture(scope="session")
def wide_zk_tree(zk_a: LocalServer) -> tuple[str, dict[str, bytes]]:
    """(root, tree) of a 12,000-node ZooKeeper tree on zk_a (tests/zkutil.py ``seed_wide_tree``),
    seeded once for the session: the interrupted-failover tests (test_interrupt, test_worker_stop)
    each back it up their own way and only ever read it. A test must never write below it."""
    from zkutil import kazoo, seed_wide_tree, unique_root

    with kazoo(zk_a.url) as c:
        root = unique_root()
        return root, seed_wide_tree(c, root)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    d = tmp_path / "store"
    d.mkdir()
    return d


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    @property
    def last_line(self) -> str:
        lines = self.out.strip().splitlines()
        return lines[-1] if lines else ""

    @property
    def error_line(self) -> str:
        lines = [ln for ln in self.err.strip().splitlines() if ln.startswith("burrow: error:")]
        return lines[-1] if lines else ""

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[-2000:]!r}, err={self.err[-3000:]!r})"


def interruptible() -> None:
    """``preexec_fn`` for a subprocess a test will SIGINT: a process started by a shell in the
    background (as CI may run the suite) inherits SIGINT *ignored*, and Python then installs no
    KeyboardInterrupt handler: Ctrl-C must reach the child as it reaches a user's command."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


#: The CLI fork server (tests/clifork.py): a ``burrow`` run is a process of its own, forked from one
#: that imported Prefect once, instead of a second of CPU importing it again: about 300 runs on a
#: CPU-bound two-core machine. BURROW_TEST_FORK=0 runs every one as a real console script.
_ZYGOTE = clifork.Zygote(SESSION_DIR / "clifork", REPO) if os.environ.get("BURROW_TEST_FORK", "1") != "0" else None


def run_burrow(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``burrow ARGS`` to its end, as ``subprocess.run(..., capture_output=True, text=True)``
    does: the console script's entry point in a process of its own, forked from the CLI fork server
    when its environment allows (tests/clifork.py), else the real console script as a subprocess.
    ``env`` adds to the test process's environment."""
    full_env = os.environ.copy()
    full_env.update(env or {})
    forked = _ZYGOTE.run(list(args), full_env, str(REPO), timeout) if _ZYGOTE is not None else None
    if forked is not None:
        return subprocess.CompletedProcess([BURROW, *args], *forked)
    return subprocess.run(
        [BURROW, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=str(REPO)
    )


class BurrowProcess:
    """``burrow ARGS`` started and left running, driven as a ``subprocess.Popen(..., text=True)``
    is: ``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``kill``, ``communicate``.
    Forked from the CLI fork server when its environment allows (a fork that ends with
    ``clifork.RETRY`` is started again as the real console script), else the real console
    script. ``stdout`` and ``stderr`` are ``subprocess.PIPE`` or open files. SIGINT reaches it as
    Ctrl-C reaches a user's command (``interruptible``)."""

    def __init__(self, args: list[str], stdout: Any, stderr: Any, env: dict[str, str]) -> None:
        self._args, self._env = args, env
        # the run's own descriptors: pipes we read, or copies of the files' (a retry writes there too)
        self._fds = [os.dup(t.fileno()) if t is not subprocess.PIPE else -1 for t in (stdout, stderr)]
        self._proc: Any = None
        self._readers: list[threading.Thread] | None = None
        self._got: dict[Any, list[str]] = {}
        self.stdout: Any = None
        self.stderr: Any = None
        forked = None
        if _ZYGOTE is not None:
            ends = [os.pipe() if fd == -1 else (None, fd) for fd in self._fds]
            try:
                forked = _ZYGOTE.spawn(list(args), env, str(REPO), ends[0][1], ends[1][1])
            finally:
                for (r, w), fd in zip(ends, self._fds, strict=True):
                    if fd == -1:
                        os.close(w)
                        if forked is None:
                            os.close(r)
            if forked is not None:
                self._proc = forked
                self.stdout, self.stderr = (open(r, errors="replace") if r is not None else None  # noqa: SIM115
                                            for r, _ in ends)
        if self._proc is None:
            self._real()

    def _real(self) -> None:
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        outs = [subprocess.PIPE if fd == -1 else fd for fd in self._fds]
        self._proc = subprocess.Popen([BURROW, *self._args], stdout=outs[0], stderr=outs[1], text=True,
                                      env=self._env, cwd=str(REPO), preexec_fn=interruptible)
        self.stdout, self.stderr = self._proc.stdout, self._proc.stderr

    def _retried(self) -> None:
        """A fork whose orchestrator choice differed from the zygote's ended with RETRY before
        its first flow: run it as the real console script."""
        if isinstance(self._proc, clifork.ForkedRun) and self._proc.returncode == clifork.RETRY:
            self._real()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def poll(self) -> int | None:
        self._proc.poll()
        self._retried()
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._proc.wait(timeout)
        self._retried()
        return self._proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def send_signal(self, sig: int) -> None:
        self._proc.send_signal(sig)

    def kill(self) -> None:
        self._proc.kill()

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Its output to the end, as ``Popen.communicate`` gives it (``None`` for a file, and for
        what an earlier call already returned)."""
        if isinstance(self._proc, subprocess.Popen):
            return self._proc.communicate(timeout=timeout)
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        if self._readers is None:  # one reader a pipe, kept across a call that timed out
            self._got = {f: [] for f in (self.stdout, self.stderr) if f is not None}
            self._readers = [threading.Thread(target=lambda f=f: self._got[f].append(f.read()), daemon=True)
                             for f in self._got]
            for t in self._readers:
                t.start()
        for t in self._readers:
            t.join(left())
            if t.is_alive():
                raise subprocess.TimeoutExpired([BURROW, *self._args], timeout or 0)
        self.wait(left())
        if isinstance(self._proc, subprocess.Popen):  # it was retried as a real process
            return self._proc.communicate(timeout=left())
        out, err = (("".join(self._got[f]) if f in self._got else None) for f in (self.stdout, self.stderr))
        for f in self._got:
            f.close()
        self._got = {}
        return out, err

    def __del__(self) -> None:
        for fd in self._fds:
            if fd != -1:
                with contextlib.suppress(OSError):
                    os.close(fd)


def start_burrow(*args: str, stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE,
                 env: dict[str, str] | None = None) -> BurrowProcess:
    """``burrow ARGS`` started (see :class:`BurrowProcess`); ``env`` adds to the test process's
    environment."""
    return BurrowProcess(list(args), stdout, stderr, {**os.environ, **(env or {})})


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> CliResult:
    """``run_burrow``'s result as a :class:`CliResult`."""
    return CliResult(run_burrow(*args, env=env, timeout=timeout))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _ZYGOTE is not None:
        _ZYGOTE.stop()


@pytest.fixture
def cli():  # noqa: ANN201
    return run_cli
