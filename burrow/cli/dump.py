"""``burrow dump``: print a live tree."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from burrow.errors import (
    EXIT_OK,
)


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    d = sub.add_parser("dump", help="print a live tree on screen, values shown safely")
    d.add_argument("source")
    d.add_argument("--subtree", default="/", help="start here (default: /)")
    d.add_argument("--no-values", action="store_true", help="print paths and sizes only")
    return {"dump": cmd_dump}


def cmd_dump(args: argparse.Namespace) -> int:
    from blocks.resolve import source_from_ref
    from blocks.source import WalkStats
    from burrow.preview import preview

    source = source_from_ref(args.source)
    session = source.connect()
    stats = WalkStats()
    n = 0
    try:
        for rec in session.walk(args.subtree.encode("utf-8"), stats):
            n += 1
            line = f"{rec.display_key()}  [{len(rec.value)} B]"
            if not args.no_values:
                line += f"  {preview(rec.value)}"
            print(line)
    finally:
        session.close()
    print(f"# {n} keys; {stats.skipped_ephemeral} ephemeral/leased not shown", file=sys.stderr)
    return EXIT_OK
