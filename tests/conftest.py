"""The test harness: real servers as local processes, one Prefect server per session.

Environment is set before anything imports Prefect, so in-process flow runs and CLI
subprocesses all talk to the session's own Prefect server, under a private PREFECT_HOME.
A server that cannot start fails the tests that need it: nothing here skips.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
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


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> CliResult:
    """Run ``burrow ARGS``: the console script's entry point in a process of its own, forked from
    the CLI fork server when its environment allows (tests/clifork.py), else the real console
    script as a subprocess."""
    full_env = os.environ.copy()
    full_env.update(env or {})
    forked = _ZYGOTE.run(list(args), full_env, str(REPO), timeout) if _ZYGOTE is not None else None
    if forked is not None:
        return CliResult(subprocess.CompletedProcess([BURROW, *args], *forked))
    proc = subprocess.run(
        [BURROW, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=str(REPO)
    )
    return CliResult(proc)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _ZYGOTE is not None:
        _ZYGOTE.stop()


@pytest.fixture
def cli():  # noqa: ANN201
    return run_cli
