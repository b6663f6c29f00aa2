"""``burrow worker start``: Prefect's process worker on the ``burrow`` pool, stopped cleanly.

Why a wrapper. ``prefect worker start --type process`` turns SIGTERM into a SIGINT to itself
(``setup_signal_handlers_worker``) and stops asking for work; a second SIGTERM becomes SIGKILL of
the worker alone. Neither reaches the flow runs: the runner starts each in a session and
process group of its own (``start_new_session``), so a run outlives its worker as an orphan.
What a user sees depends on where the worker is when the signal lands: the issue measured 50 s
and then needed SIGKILL (the worker's shutdown waiting on work in its task group); in this
repository's test the worker exits at once and leaves its run's process going on with nobody to
report it: the run stays Running, for good when the run is stuck (a hung upload). Either way no
setting of Prefect 3.8 makes the worker end the runs it holds when it stops.

``burrow worker start`` runs the same Prefect worker as a child process and owns its stop. On
SIGTERM or SIGINT it

1. sends SIGTERM to the process group of every flow run the worker started (found under this
   process's tree by the run id Prefect gives each one, ``PREFECT__FLOW_RUN_ID``; this process is
   the worker's *child subreaper*, so a run whose worker has already exited is still found). That
   is what Prefect itself does to cancel a run: the engine raises ``TerminationSignal`` in the
   flow, the run's ``finally``/``except BaseException`` clean-ups run (an S3 upload is aborted,
   nothing is published, the failover journal stays for the next run to finish), and the
   engine reports the run Crashed (the worker, still there, answers the engine's control channel
   and sees its process end); a run the worker starts meanwhile gets the same;
2. once the runs have ended, or after ``--grace`` seconds (default 5), stops the worker (SIGINT:
   Prefect's own graceful stop) and gives it ``WORKER_GRACE_S``;
3. SIGKILLs whatever is left, runs and worker;
4. reads each of those runs back from the API and proposes Crashed (forced) for any that is
   still not final, so no run is left Running for a process that is gone.

The whole stop takes at most ``--grace`` + ``WORKER_GRACE_S`` + ``API_BUDGET_S`` (9 s by default)
and a moment to reap: an init system's or a container runtime's default 10 s before SIGKILL is
enough.

The Prefect settings (``PREFECT_API_URL``, the auth string or key) are read at start, while the
worker runs, so the stop itself never waits for Prefect's import.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from burrow.errors import EXIT_FAILURE, EXIT_OK
from burrow.proc import all_stat_fields, stat_fields

#: Seconds the flow runs get to end on their own after SIGTERM before they are killed.
GRACE_S = 5.0
#: Seconds the worker gets to end after its runs (Prefect's worker stops at once on SIGINT).
WORKER_GRACE_S = 1.5
#: Seconds the stop's API calls may take in all (the stop must fit an init system's 10 s);
#: a run not reached by then is left to the engine's own Crashed report.
API_BUDGET_S = 2.0
#: ``BURROW_ORCHESTRATOR_TIMEOUT`` for the worker's runs (unless set): how long a run waits for the
#: API's /health before it takes saved blocks from the local copy instead.
RUN_PROBE_TIMEOUT_S = 30
_CRASHED_MESSAGE = "the worker was stopped (SIGTERM) while this run was in progress"


def register(sub: Any) -> dict[str, Any]:
    """Add ``burrow worker`` to ``sub``; return its handler by name."""
    w = sub.add_parser(
        "worker", help="run a Prefect process worker that stops cleanly on SIGTERM",
        description="Run Prefect's process worker (prefect worker start --type process) on a pool. On SIGTERM or "
        "Ctrl-C the runs it holds are ended too (reported Crashed; no run is left Running) and the worker exits "
        "within --grace seconds plus a few (Prefect's own worker leaves them running without it).",
    )
    w.add_argument("action", choices=("start",), help="start the worker (runs until stopped)")
    w.add_argument("--pool", default="burrow", help="the work pool (default: burrow)")
    w.add_argument("--name", help="the worker's name (default: Prefect's)")
    w.add_argument("--limit", type=int, help="at most this many flow runs at once")
    w.add_argument("--grace", type=float, default=GRACE_S,
                   help=f"seconds the runs get to end after SIGTERM before they are killed (default {GRACE_S:g})")
    return {"worker": cmd_worker}


def _prefect_command() -> list[str]:
    exe = Path(sys.executable).parent / "prefect"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "prefect"]


def _api() -> tuple[str, dict[str, str]]:
    """The API URL and the headers a request needs (Prefect's settings: environment or profile)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL

    headers = {"Content-Type": "application/json"}
    key, auth = PREFECT_API_KEY.value(), PREFECT_API_AUTH_STRING.value()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    elif auth:
        import base64

        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    return (PREFECT_API_URL.value() or "").rstrip("/"), headers


# ------------------------------------------------------------------------ the process tree


def _children() -> dict[int, list[int]]:
    """Every process's children, by parent pid (from /proc)."""
    kids: dict[int, list[int]] = {}
    for pid, fields in all_stat_fields():
        kids.setdefault(int(fields[1]), []).append(pid)  # field 4, ppid
    return kids


def _flow_run_id(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"PREFECT__FLOW_RUN_ID="):
            return item.split(b"=", 1)[1].decode() or None
    return None


def flow_run_processes(root: int) -> dict[int, str]:
    """The flow-run processes under ``root`` (the worker): pid -> flow run id. The outermost
    process carrying a run id stands for the run (its process group is the run's)."""
    kids = _children()
    found: dict[int, str] = {}
    stack = list(kids.get(root, []))
    while stack:
        pid = stack.pop()
        run_id = _flow_run_id(pid)
        if run_id:
            found[pid] = run_id
        else:
            stack.extend(kids.get(pid, []))
    return found


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """``sig`` to ``pid``'s process group when it leads one (a flow run's), else to ``pid``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != b"Z"  # a zombie has ended


# ------------------------------------------------------------------------ the stop


def _finish_runs(run_ids: set[str], api: tuple[str, dict[str, str]]) -> list[str]:
    """Propose Crashed (forced) for each run that is still not final; return those marked."""
    url, headers = api
    deadline = time.monotonic() + API_BUDGET_S
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    final = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
    marked: list[str] = []

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(url + path, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the stop's time for API calls is used up")
        with opener.open(req, timeout=left) as resp:
            return json.loads(resp.read() or b"null")

    for run_id in sorted(run_ids):
        try:
            run = call("GET", f"/flow_runs/{run_id}")
            state = (run.get("state") or {}).get("type")
            if state in final:
                continue
            call("POST", f"/flow_runs/{run_id}/set_state", {
                "state": {"type": "CRASHED", "name": "Crashed", "message": _CRASHED_MESSAGE}, "force": True,
            })
            marked.append(run_id)
        except Exception as exc:  # noqa: BLE001 - one line, then the next run: the stop must end
            print(f"burrow worker: could not check flow run {run_id} ({type(exc).__name__})", file=sys.stderr)
    return marked


def _set_child_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``):
    a flow run whose worker exited is re-parented here instead of to init, so the stop still
    finds it. Where that is not possible the stop finds only the runs under a live worker."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _reap_orphans(keep: int) -> None:
    """Collect the exit status of orphaned descendants that ended here (not ``keep``, whose
    status the caller's Popen collects)."""
    for pid in _children().get(os.getpid(), []):
        if pid != keep and not _alive(pid):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


def stop_worker(proc: subprocess.Popen, grace: float, api: tuple[str, dict[str, str]] | None) -> set[str]:
    """Stop the worker ``proc`` and every flow run under this process (see the module's
    docstring); return the ids of the runs it held."""
    runs: dict[int, str] = {}

    def look() -> None:
        for pid, run_id in flow_run_processes(os.getpid()).items():
            if pid not in runs:
                runs[pid] = run_id
                _signal_group(pid, signal.SIGTERM)

    # the runs first, while their worker is still there: the engine reports its own Crashed state
    # and its runner (in the worker) answers the engine's control channel and sees it exit
    look()
    deadline = time.monotonic() + max(grace, 0.0)
    while time.monotonic() < deadline:
        look()  # a run the worker started meanwhile
        if not any(_alive(p) for p in runs):
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)  # then the worker: Prefect's graceful stop
    deadline = time.monotonic() + WORKER_GRACE_S
    while proc.poll() is None and time.monotonic() < deadline:
        look()
        time.sleep(0.1)
    for pid in runs:
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    _reap_orphans(proc.pid)
    ids = set(runs.values())
    if ids and api and api[0]:
        marked = _finish_runs(ids, api)
        if marked:
            print(f"burrow worker: marked {len(marked)} flow run(s) Crashed that had not ended", file=sys.stderr)
    return ids


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment ``burrow worker start`` gives Prefect's worker, and so its flow runs."""
    env = dict(environ)
    # A run on a worker was handed to it by the API: a slow /health answer there is load, not a
    # dead orchestrator. The 2 s probe that decides whether saved blocks come from the local copy
    # (blocks/localcopy.py) failed fleet backups on a busy server ("the saved source block cannot
    # be read: the Prefect API is unreachable (no answer within 2 s)"); the worker's runs wait longer.
    env.setdefault("BURROW_ORCHESTRATOR_TIMEOUT", str(RUN_PROBE_TIMEOUT_S))
    # A Burrow pool starts its runs with `python -m prefect.engine` (flows.common.FLOW_RUN_COMMAND):
    # `python` is the interpreter Burrow runs in, wherever it is installed on this host.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [env.get("PATH")])])
    return env


def cmd_worker(args: argparse.Namespace) -> int:
    """``burrow worker start``."""
    argv = [*_prefect_command(), "worker", "start", "--pool", args.pool, "--type", "process"]
    env = worker_environment(os.environ)
    if args.name:
        argv += ["--name", args.name]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _set_child_subreaper()
    # its own session: a terminal's Ctrl-C reaches the worker only through this process's stop
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    api: tuple[str, dict[str, str]] | None = None
    try:
        api = _api()
    except Exception as exc:  # noqa: BLE001 - without it the stop still ends every process
        print(f"burrow worker: Prefect's API settings could not be read ({type(exc).__name__}); "
              "a stop will not mark runs", file=sys.stderr)
    while proc.poll() is None and not stop.wait(0.5):
        _reap_orphans(proc.pid)
    if not stop.is_set():
        return EXIT_OK if proc.returncode == 0 else EXIT_FAILURE
    name = signal.Signals(received[0]).name if received else "a signal"
    print(f"burrow worker: {name} received: stopping the worker and the runs it holds", file=sys.stderr)
    ids = stop_worker(proc, args.grace, api)
    print(f"burrow worker: stopped ({len(ids)} run(s) ended)", file=sys.stderr)
    return EXIT_OK
