"""The ``burrow`` command. backup, restore, verify, failover and prune run the Prefect flows
(so they land in run history); list, status, inspect, dump, keygen and server work directly,
without loading Prefect's engine.

What a person sees (stderr): Burrow's own stage lines, progress bars on a terminal, warnings
and, on failure, one ``burrow: error: ...`` line. Prefect's engine lines and tracebacks show
only with ``-v``; they always reach the flow run's logs on the server. stdout carries results
only (``--json``: one JSON object).

Which Prefect API a flow command uses (the configured one, Burrow's local server, or the
local server when the configured one is dead) is decided by ``cli.server`` before
Prefect is imported.

Exit codes: 0 success, 1 failure, 2 usage error, 3 restore finished but skipped conflicts (undo:
kept keys changed since),
4 ``verify --against``: drift found, 5 ``status --max-age``: a source's newest archive is too old,
6 ``evidence verify``: the evidence chain is broken,
130 interrupted (Ctrl-C, or SIGTERM during a failover).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from burrow.errors import EXIT_FAILURE, EXIT_INTERRUPTED, BurrowError
from cli import (
    backup,
    blocks,
    capture,
    catalog,
    dump,
    evidence,
    failover,
    keygen,
    prune,
    rehearse,
    restore,
    server,
    undo,
    verify,
    worker,
)
from cli.common import OUTPUT, Parser, emit_json

MODULES = (backup, restore, failover, prune, verify, catalog, keygen, dump, server, rehearse, blocks, undo, capture, worker,
           evidence)

#: Commands that run a Prefect flow (and so need a Prefect API).
FLOW_COMMANDS = ("backup", "restore", "verify", "failover", "prune", "rehearse", "undo", "capture", "evidence")
#: Flow commands whose dry run lists paths (--list; undo: the keys it kept).
LISTING_COMMANDS = ("restore", "failover", "prune", "undo")
#: Commands that show progress bars on a terminal.
PROGRESS_COMMANDS = ("backup", "restore", "verify", "failover", "rehearse")

_VERBOSE_HELP = "also show Prefect's engine lines and tracebacks on the terminal (they always reach the run's logs)"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """The ``burrow`` parser, and every subcommand's handler by name."""
    p = Parser(prog="burrow", description="Backup, verify and safe restore for ZooKeeper, etcd v3 and Consul KV.")
    p.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    commands: dict[str, Any] = {}
    for module in MODULES:
        commands.update(module.register(sub))
    for name, sp in sub.choices.items():  # flags every command (or every flow command) shares
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
        if name in FLOW_COMMANDS and "--json" not in sp._option_string_actions:
            sp.add_argument("--json", action="store_true",
                            help="print the run summary as one JSON object on stdout (and nothing else there)")
        if name in LISTING_COMMANDS:
            sp.add_argument("--list", dest="list_paths", action="store_true",
                            help="list every path after the summary (restore, failover: each planned create, "
                            "real or dry run; prune: each kept archive)")
            sp.add_argument("--list-file", metavar="PATH",
                            help="write that list to PATH instead (one line each)")
    return p, commands


class _Silent(logging.Filter):
    """Drops every record from Prefect's console handler (not from its API handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


_PRODUCT_DIRS = tuple(
    str(Path(__file__).resolve().parents[1] / d) + os.sep for d in ("burrow", "blocks", "tasks", "flows", "cli")
)


class _StageLines(logging.Handler):
    """Burrow's own log lines on stderr, plain: ``extract: walking ...``, and warnings as
    ``burrow: warning: ...``. Only records logged by Burrow's code (not Prefect's engine, not
    client libraries), INFO and WARNING: an error becomes the one ``burrow: error:`` line.
    Written to whatever ``sys.stderr`` is at the time, so a progress bar stays intact."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or not (record.pathname or "").startswith(_PRODUCT_DIRS):
            return
        try:
            msg = record.getMessage()
            line = f"burrow: warning: {msg}" if record.levelno >= logging.WARNING else msg
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - a console line must never fail a run
            self.handleError(record)


def _prefect_terminal_handlers() -> list[logging.Handler]:
    """Every handler of Prefect's logging configuration that writes to the terminal: its console
    handler (on the root logger, uvicorn's and fastapi's) and the stream handler of
    ``prefect._internal`` (which does not propagate). Not the API handlers: the run's logs."""
    from prefect.logging.handlers import PrefectConsoleHandler

    terminal: tuple[type, ...] = (PrefectConsoleHandler,)
    with contextlib.suppress(ImportError):
        from prefect.logging.handlers import _SafeStreamHandler

        terminal += (_SafeStreamHandler,)
    loggers = [logging.getLogger()] + [
        lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)
    ]
    found: list[logging.Handler] = []
    for lg in loggers:
        found += [h for h in lg.handlers if isinstance(h, terminal) and h not in found]
    return found


def _silence_prefect() -> Callable[[], None]:
    """Drop every record on Prefect's terminal handlers (their level to above CRITICAL too, so
    a handler Prefect adds a filter to still stays quiet); returns the undo."""
    silent = _Silent()
    handlers = [(h, h.level) for h in _prefect_terminal_handlers()]
    for handler, _ in handlers:
        handler.addFilter(silent)
        handler.setLevel(logging.CRITICAL + 1)

    def undo() -> None:
        for handler, level in handlers:
            handler.removeFilter(silent)
            handler.setLevel(level)

    return undo


def _console(verbose: bool) -> Callable[[], None]:
    """Set up the terminal for a flow command: quiet unless ``verbose``. Returns the undo (a
    test calling ``main`` in-process gets its logging back as it was)."""
    import prefect.main  # noqa: F401 - configures Prefect's logging (handlers on the root logger)

    global _verbose
    _verbose = verbose
    root = logging.getLogger()
    if verbose:
        return lambda: None
    lines = _StageLines()
    unsilence = _silence_prefect()
    root.addHandler(lines)

    def undo() -> None:
        unsilence()
        root.removeHandler(lines)

    return undo


#: ``-v`` of the flow command this process ran: the console script's exit keeps Prefect quiet
#: while it drains Prefect's queues unless it was given.
_verbose = False


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _api_failure(exc: BaseException, during_run: bool = True) -> str | None:
    """The named cause when ``exc`` (or what caused it) is the Prefect API failing, else None.
    ``during_run``: the command runs a flow (list, status and inspect run none: for them the API
    is only where saved blocks live, and an outage is "unreachable", not a run that failed)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        kind = f"{type(e).__module__}.{type(e).__name__}"
        if kind.startswith("httpx.") or kind.startswith("httpcore.") or "prefect" in kind and "Http" in kind:
            url = os.environ.get("PREFECT_API_URL", "?")
            from burrow.naming import redact_url

            reason = {
                "ConnectError": "connection failed", "ConnectTimeout": "no answer (connect timed out)",
                "ReadTimeout": "no answer (read timed out)", "RemoteProtocolError": "the connection broke",
            }.get(type(e).__name__, type(e).__name__)
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status:
                reason = f"it answered HTTP {status}"
            if not during_run:
                state = reason if status else f"is unreachable ({reason})"
                return (f"the Prefect API at {redact_url(url)} {state}; it holds the saved blocks this command "
                        "names (`burrow blocks import` brings a local copy of them)")
            return f"the Prefect API at {redact_url(url)} failed during the run: {reason}"
        e = e.__cause__ or e.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``burrow`` console script."""
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    _quiet_prefect()
    verbose = bool(getattr(args, "verbose", False))
    as_json = bool(getattr(args, "json", False)) and args.command in FLOW_COMMANDS
    OUTPUT.reset(command=args.command, json=as_json, list_paths=bool(getattr(args, "list_paths", False)),
                 list_file=getattr(args, "list_file", None), stdout=sys.stdout)
    code = EXIT_FAILURE
    undo: Callable[[], None] = lambda: None  # noqa: E731
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            precheck = getattr(args, "precheck", None)  # usage errors, before the orchestrator or a cluster
            if precheck is not None:
                precheck(args)
            if args.command in FLOW_COMMANDS and not getattr(args, "runs_no_flow", False):
                # before Prefect is imported: it reads PREFECT_API_URL once
                orchestrator = server.choose_orchestrator(args.command)
                if orchestrator.fallback_from:  # saved blocks live on the dead API: resolve them from the copy
                    from blocks.localcopy import api_unreachable

                    api_unreachable(orchestrator.fallback_from, orchestrator.cause or "unreachable")
                undo = _console(verbose)  # imports Prefect while a local server starts
                from flows.common import install_prompt_heartbeats

                install_prompt_heartbeats()  # this process only: a worker's flow runs keep Prefect's
                orchestrator.wait()
                if args.command in PROGRESS_COMMANDS and sys.stderr.isatty():
                    from burrow import progress

                    progress.install_terminal_reporter()
            code = commands[args.command](args)
            if as_json and not OUTPUT.emitted:
                emit_json({"command": args.command, "status": "ok" if code == 0 else "finished", "exit_code": code})
    except BurrowError as exc:
        print(f"burrow: error: {exc}", file=sys.stderr)
        code = exc.exit_code
        if as_json:
            emit_json({"command": args.command, "status": "failed", "error": str(exc), "exit_code": code})
    except KeyboardInterrupt:
        print("burrow: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line, no traceback, never a value
        if verbose:
            traceback.print_exc()
        message = _api_failure(exc, args.command in FLOW_COMMANDS) or f"unexpected {type(exc).__name__}"
        print(f"burrow: error: {message}", file=sys.stderr)
        code = EXIT_FAILURE
        if as_json:
            emit_json({"command": args.command, "status": "failed", "error": message, "exit_code": code})
    finally:
        undo()
        if "burrow.progress" in sys.modules:
            sys.modules["burrow.progress"].uninstall()
    sys.stdout.flush()
    return code


def run() -> None:
    """The console script: :func:`main`, then a prompt exit."""
    _exit(main())


#: Seconds the exit waits for Prefect's queues (events, logs) to reach the API; a dead API
#: must not hold the terminal forever (the run's state is already recorded by then).
DRAIN_TIMEOUT = 30.0


def drain_prefect(timeout: float = DRAIN_TIMEOUT) -> None:
    """Send what Prefect still queues for the API (the events worker: the run's events; the API
    log worker: its logs) and wait for it, with Prefect's terminal handlers silent unless ``-v``
    was given: draining under load logs ``EventsWorker - Still processing items: N items
    remaining...``, which must not follow the command's one error line.

    Prefect drains these in *threading's* exit hooks (``threading._register_atexit``), which the
    interpreter runs before ``atexit``'s and :func:`_exit` would skip; here they are drained
    explicitly, every queue service at once (``drain_all`` of their common base class, whose
    registry holds them all), until no new one appears (draining the events may log). Nothing
    to do when Prefect was never imported."""
    services = sys.modules.get("prefect._internal.concurrency.services")
    if services is None:
        return
    import time

    base = getattr(services, "_QueueServiceBase", None) or services.QueueService
    if not _verbose:
        _silence_prefect()  # for the rest of the process: the exit handlers may drain again
    deadline = time.monotonic() + timeout
    with contextlib.suppress(Exception):  # the exit goes on: Prefect's own exit hooks try again
        while base._instances and time.monotonic() < deadline:
            base.drain_all(timeout=max(0.0, deadline - time.monotonic()), at_exit=True)


def _exit(code: int) -> None:
    """End the process the way the interpreter would, minus its teardown of every module
    (0.3 s after a flow command, with Prefect's thousands of objects loaded): drain Prefect's
    queues to the API (:func:`drain_prefect`), run threading's exit hooks and wait for non-daemon
    threads (``threading._shutdown``, as the interpreter does), run the ``atexit`` handlers
    (logging flushes), flush stdout and stderr, and leave."""
    import atexit
    import threading

    try:
        drain_prefect()
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        else:  # pragma: no cover - every CPython has it
            for thread in threading.enumerate():
                if thread is not threading.current_thread() and not thread.daemon:
                    thread.join()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


if __name__ == "__main__":
    run()
