"""``burrow verify``: re-read an archive and check it; ``--against SOURCE`` also diffs it with
the live cluster (drift, exit 4)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from burrow.errors import (
    EXIT_DRIFT,
    EXIT_OK,
    DriftFound,
    UsageError,
)
from cli.common import (
    add_read_keys,
    keyring,
    read_refs,
    report_json,
)


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    v = sub.add_parser("verify", help="re-read an archive and check manifest, checksums and counts")
    v.add_argument("archive")
    v.add_argument(
        "--structure-only", action="store_true",
        help="check framing, sizes and the body SHA-256 without a key (nothing decrypted or authenticated)",
    )
    add_read_keys(v)
    v.add_argument(
        "--allow-unencrypted", action="store_true",
        help="read an unencrypted archive even though read keys are configured (by default it is refused: "
        "anyone who can write to the store could have planted it)",
    )
    v.add_argument(
        "--against", metavar="SOURCE",
        help="also diff the archive with this live cluster (URL or saved source block): lists keys added, "
        "removed and changed by path, never by value; exit 4 when any differ",
    )
    v.add_argument("--root", help="with --against: compare below this path (default: the archive's own root)")
    return {"verify": cmd_verify}


def cmd_verify(args: argparse.Namespace) -> int:
    from blocks.resolve import archive_from_ref, secure_source_ref

    archive_from_ref(args.archive)
    refs = read_refs(args)
    if not args.structure_only:
        keyring(refs)
    against = None
    if args.against is not None:
        if args.structure_only:
            raise UsageError("--against compares keys and values, so it cannot be --structure-only")
        against = secure_source_ref(args.against)
    elif args.root is not None:
        raise UsageError("--root goes with --against")
    from flows.verify import verify

    summary = verify(
        archive=args.archive, structure_only=args.structure_only, allow_unencrypted=args.allow_unencrypted,
        against=against, root=args.root, **refs,
    )
    if against is not None:
        return report_drift(summary)
    if report_json(summary, EXIT_OK):
        return EXIT_OK
    if args.structure_only:
        print(
            f"ok (structure only: nothing decrypted, manifest not authenticated): {summary['url']}: "
            f"body sha256 and sizes match"
        )
        return EXIT_OK
    enc = f", decrypted with {summary['decrypted_with']}" if summary.get("decrypted_with") else ""
    print(f"ok: {summary['url']}: {summary['keys']} keys, content sha256 {summary['content_sha256']}{enc}")
    return EXIT_OK


def report_drift(summary: dict[str, Any]) -> int:
    """Print the drift of ``verify --against`` by path (never a value); raise DriftFound (exit 4)
    when any key differs. With ``--json``: the summary (paths included) as one JSON object."""
    counts = f"{summary.get('added', 0)} added, {summary.get('removed', 0)} removed, {summary.get('changed', 0)} changed"
    drifted = DriftFound(f"{summary.get('target')} has drifted from {summary.get('url')}: {counts}")
    if report_json(summary, EXIT_DRIFT if summary.get("drift") else EXIT_OK):
        if summary.get("drift"):
            print(f"burrow: error: {drifted}", file=sys.stderr)
            return EXIT_DRIFT
        return EXIT_OK
    for kind in ("added", "removed", "changed"):
        paths = summary.get(f"{kind}_paths") or []
        for p in paths:
            print(f"{kind:<8} {p}")
        if summary.get(kind, 0) > len(paths):
            print(f"{kind:<8} ... ({summary[kind] - len(paths)} more)")
    if summary.get("drift"):
        raise drifted
    print(f"no drift: {summary['target']} matches {summary['url']} ({summary.get('unchanged', 0)} keys)")
    return EXIT_OK
