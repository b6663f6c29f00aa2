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
    """Walk the tree and print it sorted, depth-first (a node, then its subtree; siblings by
    name), so two dumps of the same tree are identical and two trees can be diffed. The walk
    delivers nodes in any order: the lines go through a bounded external sort (sealed runs
    on scratch disk beyond 32 MiB), so a tree of millions of nodes does not fill memory."""
    import orjson

    from blocks.resolve import source_from_ref
    from blocks.source import WalkStats
    from burrow.extsort import ExternalSorter, tree_sort_key
    from burrow.preview import preview
    from burrow.staging import staging_dir

    source = source_from_ref(args.source)
    stats = WalkStats()
    n = 0
    with staging_dir() as work:
        sorter = ExternalSorter(work, what="dump sort run")
        try:
            session = source.connect()
            try:
                for rec in session.walk(args.subtree.encode("utf-8"), stats):
                    n += 1
                    line = f"{rec.display_key()}  [{len(rec.value)} B]"
                    if not args.no_values:
                        line += f"  {preview(rec.value)}"
                    sorter.add(tree_sort_key(rec.key) + orjson.dumps(line) + b"\n")
            finally:
                session.close()
            out = sys.stdout
            for sorted_line in sorter:
                out.write(orjson.loads(sorted_line[sorted_line.index(b"\x00") + 1:]) + "\n")
        finally:
            sorter.close()
    print(f"# {n} keys; {stats.skipped_ephemeral} ephemeral/leased not shown", file=sys.stderr)
    return EXIT_OK
