"""A fork server for the suite's ``burrow`` runs: each run is still a process of its own, forked
from one that has already imported the CLI, Prefect and the flows.

The suite runs the CLI about 300 times, and each real ``burrow`` process spends a second of CPU
importing Prefect before it does anything (bench/RESULTS.md, "where the suite's CPU goes"): on two
cores the suite is CPU-bound, so those imports alone cost minutes. Here one process per xdist
worker (the *zygote*) imports everything once; a run forks it, and the fork points its stdout and
stderr at the test's pipes, takes the test's environment and ``cwd`` and calls the console
script's entry point (``cli.run``): same argv parsing, same exit path (``_exit``: Prefect's queues
drained, ``os._exit``), real exit codes and output, one process per run.

What a fork cannot reproduce, a real ``burrow`` process does (:func:`usable` decides):

* Prefect reads its settings (``PREFECT_*``) when it is imported, so a run whose environment
  differs from the zygote's in any ``PREFECT_*`` variable (or in ``HOME``, ``TMPDIR`` or a
  ``PYTHON*`` variable) runs as a real process;
* a flow command whose ``cli.server.choose_orchestrator`` picks another API than the one the
  zygote's Prefect was imported with (the configured one did not answer in time, so it fell back
  to Burrow's local server) ends with :data:`RETRY` before its first flow, and runs again as a
  real process;
* tests of start-up itself (which modules a command imports, signals, a terminal) start the
  console script themselves (``BURROW``).
"""

from __future__ import annotations

import array
import contextlib
import gc
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

#: The exit code of a forked run that must run again as a real process (see the module doc).
RETRY = 197

#: Environment variables read when Prefect (or the interpreter) starts: a run whose value differs
#: from the zygote's cannot be a fork of it.
_IMPORT_TIME = ("PREFECT_", "PYTHON")
_IMPORT_TIME_EXACT = ("HOME", "TMPDIR")


def _import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_IMPORT_TIME) or k in _IMPORT_TIME_EXACT}


# ------------------------------------------------------------------------------ the zygote


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request: a JSON line, with the run's stdout and stderr descriptors attached."""
    fds = array.array("i")
    data = b""
    while not data.endswith(b"\n"):
        msg, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(2 * fds.itemsize))
        if not msg:
            raise EOFError("the client went away")
        data += msg
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return json.loads(data), list(fds)


def _run_cli(request: dict, out: int, err: int) -> None:
    """In the forked run: become the ``burrow`` process the request describes, then run it."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in (null, out, err):
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["burrow", *request["argv"]]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    import cli
    import cli.server

    expected = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    choose = cli.server.choose_orchestrator

    def choose_here(command: str) -> object:
        chosen = choose(command)
        if chosen.local or chosen.api_url.rstrip("/") != expected:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(RETRY)  # this process's Prefect was imported with the other API
        return chosen

    cli.server.choose_orchestrator = choose_here
    try:
        cli.run()  # ends the process (os._exit)
    except SystemExit as exc:  # a usage error: argparse exits; the interpreter's exit, as cli._exit does it
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        cli._exit(code)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, exit 1
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _handle(conn: socket.socket) -> None:
    """In a child of the zygote: fork the run, tell the client its pid, wait for it, send its
    status."""
    request, fds = _recv_request(conn)
    if len(fds) != 2:
        raise RuntimeError("a request carries stdout and stderr")
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_cli(request, *fds)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    conn.sendall(json.dumps({"status": status}).encode() + b"\n")


def serve(path: str) -> None:
    """The zygote: import everything a run needs, then fork a handler per connection, until the
    test process closes our stdin (it ended)."""
    import threading

    import prefect.artifacts  # noqa: F401 - what every flow run imports next (its engines)
    import prefect.concurrency.sync  # noqa: F401
    import prefect.engine  # noqa: F401
    import prefect.flow_engine  # noqa: F401
    import prefect.main  # noqa: F401
    import prefect.task_engine  # noqa: F401
    import prefect.utilities.visualization  # noqa: F401
    from anyio._backends import _asyncio  # noqa: F401

    import burrow.preview  # noqa: F401
    import cli  # noqa: F401 - every command's module
    import cli.server  # noqa: F401
    import flows.backup  # noqa: F401 - and with them Prefect, its logging and the product
    import flows.capture  # noqa: F401
    import flows.evidence  # noqa: F401
    import flows.failover  # noqa: F401
    import flows.prune  # noqa: F401
    import flows.rehearse  # noqa: F401
    import flows.restore  # noqa: F401
    import flows.undo  # noqa: F401
    import flows.verify  # noqa: F401

    if threading.active_count() != 1:  # a fork copies only the forking thread
        raise RuntimeError(f"the zygote has threads after its imports: {threading.enumerate()}")
    "x".encode("idna")  # noqa: B018 - the codec an HTTP client's first request loads
    gc.collect()
    gc.freeze()  # a run's collections leave the imported objects' pages shared with this process
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is sys.stdin:
                if not os.read(0, 4096):
                    return
                continue
            conn, _ = listener.accept()
            if os.fork() == 0:
                listener.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # this handler waits for its run
                code = 0
                try:
                    _handle(conn)
                except BaseException:  # noqa: BLE001 - the client sees the connection close
                    code = 1
                os._exit(code)
            conn.close()


# ------------------------------------------------------------------------------ the client


class ForkedRun:
    """A forked run left running, driven as a ``subprocess.Popen`` is (``pid``, ``returncode``,
    ``poll``, ``wait``, ``send_signal``, ``kill``). The run is the zygote's grandchild, not the
    test process's child: its pid and its exit status come over the zygote's connection."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._control = b""
        self.pid: int | None = None
        self.returncode: int | None = None
        while self.pid is None:
            self._read(None)

    def _read(self, timeout: float | None) -> None:
        """Take what the connection holds, waiting up to ``timeout`` seconds for it."""
        if self.returncode is not None:
            return
        ready, _, _ = select.select([self._conn], [], [], timeout)
        if not ready:
            return
        data = self._conn.recv(4096)
        if not data:
            self._conn.close()
            raise RuntimeError("the CLI fork server lost a run of burrow")
        self._control += data
        while b"\n" in self._control:
            line, self._control = self._control.split(b"\n", 1)
            message = json.loads(line)
            self.pid = message.get("pid", self.pid)
            if "status" in message:
                self.returncode = os.waitstatus_to_exitcode(message["status"])
                self._conn.close()

    def poll(self) -> int | None:
        self._read(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(["burrow"], timeout or 0)
            self._read(left)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None and self.pid is not None:  # not once its status came: the pid is free
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The test process's end: starts the zygote on first use, forks runs from it."""

    def __init__(self, directory: Path, repo: Path) -> None:
        self._dir = directory
        self._repo = repo
        self._proc: subprocess.Popen | None = None
        self._env: dict[str, str] = {}
        self._path = str(directory / "clifork.sock")
        self._lock = threading.Lock()  # tests run the CLI from several threads at once

    def _start(self) -> None:
        """Start the zygote (again, if the last one ended: a test may kill a process group)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        self._env = os.environ.copy()
        self._env.pop("PYTEST_CURRENT_TEST", None)
        log = open(self._dir / "clifork.log", "ab")  # noqa: SIM115 - the zygote's own output
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), self._path], cwd=str(self._repo), env=self._env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        log.close()  # the zygote has it
        line = self._proc.stdout.readline() if self._proc.stdout else b""
        if line.strip() != b"ready":
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError("the CLI fork server did not start: "
                               + (self._dir / "clifork.log").read_text(errors="replace")[-3000:])

    def _ready(self, env: dict[str, str]) -> bool:
        """Start the zygote if it is not running; whether a run with ``env`` can be its fork."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
        return _import_time_env(env) == _import_time_env(self._env)

    def _send(self, args: list[str], env: dict[str, str], cwd: str, out_w: int, err_w: int) -> socket.socket:
        """Ask the zygote for a run writing to ``out_w`` and ``err_w``: the connection its pid and
        status come back on."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self._path)
            request = json.dumps({"argv": args, "env": env, "cwd": cwd}).encode() + b"\n"
            conn.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [out_w, err_w]))])
        except BaseException:
            conn.close()
            raise
        return conn

    def spawn(self, args: list[str], env: dict[str, str], cwd: str, out_w: int, err_w: int) -> ForkedRun | None:
        """``burrow ARGS`` forked and left running, its stdout and stderr on ``out_w`` and
        ``err_w`` (the caller's descriptors, left open), or None when its ``env`` differs from the
        zygote's in what is read at import. The caller runs it again as a real process when it
        ends with :data:`RETRY`."""
        if not self._ready(env):
            return None
        return ForkedRun(self._send(args, env, cwd, out_w, err_w))

    def run(self, args: list[str], env: dict[str, str], cwd: str, timeout: float) -> tuple[int, str, str] | None:
        """(exit code, stdout, stderr) of ``burrow ARGS`` forked, or None when it must run as a real
        process instead: its ``env`` differs from the zygote's in what is read at import, or the
        forked run ended with :data:`RETRY` (see the module doc). Raises
        ``subprocess.TimeoutExpired`` as ``subprocess.run`` does, after killing the run."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            run = self.spawn(args, env, cwd, out_w, err_w)
        finally:
            os.close(out_w)
            os.close(err_w)
        chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
        deadline = time.monotonic() + timeout
        timed_out = False
        try:
            if run is None:
                return None
            reading = [out_r, err_r]
            while reading:  # to both ends of file: the run's output, all of it
                left = deadline - time.monotonic()
                if left <= 0 and not timed_out:
                    timed_out = True
                    run.kill()
                ready, _, _ = select.select(reading, [], [], 1.0 if timed_out else left)
                for fd in ready:
                    data = os.read(fd, 65536)
                    if data:
                        chunks[fd].append(data)
                    else:
                        reading.remove(fd)
            if not timed_out:
                try:
                    run.wait(max(deadline - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    run.kill()
            if timed_out:  # its status, once killed, closes the connection
                with contextlib.suppress(subprocess.TimeoutExpired, RuntimeError):
                    run.wait(10)
        finally:
            os.close(out_r)
            os.close(err_r)
        out = b"".join(chunks[out_r]).decode(errors="replace")
        err = b"".join(chunks[err_r]).decode(errors="replace")
        if timed_out:
            raise subprocess.TimeoutExpired(["burrow", *args], timeout, output=out, stderr=err)
        return None if run.returncode == RETRY else (run.returncode, out, err)

    def stop(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(Exception):
                if self._proc.stdin:
                    self._proc.stdin.close()
                self._proc.wait(10)
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc = None


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    serve(sys.argv[1])
