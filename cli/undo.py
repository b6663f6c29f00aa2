"""``burrow undo``: delete exactly the keys a restore or failover created, each only if unchanged
since; and the ``to undo:`` line those two commands end with."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from typing import Any

from burrow.errors import EXIT_CONFLICTS, EXIT_OK
from cli.common import (
    OUTPUT,
    add_read_keys,
    keyring,
    read_refs,
    report_json,
    write_list,
)


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    u = sub.add_parser(
        "undo",
        help="delete exactly the keys a restore or failover created, deepest first, each only if unchanged since",
    )
    u.add_argument("run", help="the run's name (as its `to undo:` line gave it) or its flow run id")
    u.add_argument("--from", dest="store", required=True,
                   help="the store the run sealed its list of created keys in (as its `to undo:` line gave it)")
    u.add_argument("--into", help="the target cluster, by URL with credentials or saved source block name, when the "
                   "URL the run recorded (without credentials) cannot connect; it must be the same cluster")
    u.add_argument("--dry-run", action="store_true", help="delete nothing; say what would be deleted and kept")
    add_read_keys(u)
    return {"undo": cmd_undo}


def cmd_undo(args: argparse.Namespace) -> int:
    from blocks.resolve import secure_source_ref, store_from_ref

    refs = read_refs(args)
    keyring(refs)  # a missing or malformed key file is a usage error before a flow starts
    store_from_ref(args.store).check()
    into = secure_source_ref(args.into, role="target") if args.into else None
    from flows.undo import undo

    summary = undo(run=args.run, store=args.store, into=into, dry_run=args.dry_run, **refs)
    return report_undo(summary, args.dry_run)


def report_undo(summary: dict[str, Any], dry_run: bool) -> int:
    """The undo's counts on stdout (the kept keys' paths with ``--list`` or ``--list-file``);
    exit 3 when a real undo kept any key, else 0 (a dry run deletes nothing: it exits 0)."""
    code = EXIT_CONFLICTS if summary.get("kept") and not dry_run else EXIT_OK
    kept = [f"kept     {p}" for p in summary.get("kept_paths") or []]
    if report_json({k: v for k, v in summary.items() if k != "kept_paths" or OUTPUT.list_paths}, code):
        return code
    run = f"{summary.get('undone_kind')} {summary.get('undone_run')} ({summary.get('undone_run_id')})"
    if dry_run:
        print(f"dry run: nothing was deleted from {summary['target']}")
        print(f"undo of {run}: would_delete={summary['deleted']} would_keep={summary['kept']} "
              f"listed={summary['listed']}")
    else:
        print(f"undo of {run}: deleted={summary['deleted']} kept={summary['kept']} listed={summary['listed']}")
    for w in summary.get("warnings") or []:
        print(f"burrow: warning: {w}", file=sys.stderr)
    if summary.get("kept"):
        print(f"burrow: {summary['kept']} keys changed since the run created them (or gained children) and "
              f"{'would be' if dry_run else 'were'} kept as they are", file=sys.stderr)
    write_list(kept, "kept")
    return code


# ---------------------------------------------------------------------------- the `to undo:` line


def undo_line(run: str, store: str) -> str:
    """``to undo: burrow undo RUN --from STORE``, quoted for a shell (an S3 store URL holds ``&``)."""
    return f"to undo: burrow undo {shlex.quote(run)} --from {shlex.quote(store)}"


def with_undo_line(handler: Callable[[argparse.Namespace], int],
                   store_of: Callable[[argparse.Namespace, dict[str, Any]], str]) -> Callable[[argparse.Namespace], int]:
    """``handler`` (restore's, failover's), ending with one stderr line ``to undo: burrow undo RUN
    --from STORE`` when its run sealed a list of created keys (tasks/undo.py), however the command
    ends: success, conflicts, a failure or an interrupt after the first create. ``store_of``
    names the store as the user gave it, without credentials."""

    def run(args: argparse.Namespace) -> int:
        from tasks.undo import sealed_lists

        before = len(sealed_lists())
        try:
            return handler(args)
        finally:
            sealed = sealed_lists()[before:]
            if sealed:
                sys.stdout.flush()
                print(undo_line(sealed[-1]["undo_run"], store_of(args, sealed[-1])), file=sys.stderr)

    run.__name__ = getattr(handler, "__name__", "run")
    run.__doc__ = handler.__doc__
    return run
