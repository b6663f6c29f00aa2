"""The ``burrow`` command. backup, restore and verify run the Prefect flows (so they land
in run history); list, inspect and dump work directly.

Exit codes: 0 success, 1 failure, 2 usage error, 3 restore finished but skipped conflicts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any

from burrow.cli import backup, catalog, dump, failover, keygen, prune, restore, verify
from burrow.cli.common import Parser
from burrow.errors import EXIT_FAILURE, BurrowError

MODULES = (backup, restore, failover, prune, verify, catalog, keygen, dump)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """The ``burrow`` parser, and every subcommand's handler by name."""
    p = Parser(prog="burrow", description="Backup, verify and safe restore for ZooKeeper, etcd v3 and Consul KV.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Prefect's engine errors and tracebacks on the terminal")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    commands: dict[str, Any] = {}
    for module in MODULES:
        commands.update(module.register(sub))
    for sp in sub.choices.values():  # -v works after the command too
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also show Prefect's engine errors and tracebacks on the terminal")
    return p, commands


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


FLOW_COMMANDS = ("backup", "restore", "verify", "failover", "prune")


class _NoTracebacksOnConsole(logging.Filter):
    """On the terminal, an expected failure is one ``burrow: error:`` line: this drops the
    engine's error records and every traceback from the console handler only. The flow run's
    logs on the server (Prefect's API handler) still receive all of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text:
            return False
        return not (record.name.startswith("prefect") and record.levelno >= logging.ERROR)


def _quiet_console() -> None:
    """Attach :class:`_NoTracebacksOnConsole` to Prefect's console handler (set up on import)."""
    import prefect.main  # noqa: F401 - configures Prefect's logging (handlers on the root logger)
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _NoTracebacksOnConsole) for f in handler.filters
        ):
            handler.addFilter(_NoTracebacksOnConsole())



def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``burrow`` console script."""
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    _quiet_prefect()
    if args.command in FLOW_COMMANDS and not args.verbose:
        _quiet_console()
    if sys.stderr.isatty() and args.command in ("backup", "restore", "verify", "failover"):
        from burrow import progress

        progress.install_terminal_reporter()
    try:
        code = commands[args.command](args)
    except BurrowError as exc:
        print(f"burrow: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("burrow: interrupted", file=sys.stderr)
        code = EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - one line, no traceback, never a value
        if args.verbose:
            traceback.print_exc()
        print(f"burrow: error: unexpected {type(exc).__name__}", file=sys.stderr)
        code = EXIT_FAILURE
    sys.stdout.flush()
    return code


def run() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    run()

