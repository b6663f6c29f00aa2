"""``burrow backup``: one command backs up a cluster into a store."""

from __future__ import annotations

import argparse
from typing import Any

from burrow.errors import (
    EXIT_OK,
    UsageError,
)
from cli.common import (
    add_write_keys,
    print_summary,
    report_json,
    write_refs,
)


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    b = sub.add_parser("backup", help="back up a cluster into a store; prints the archive URL last")
    b.add_argument(
        "source",
        help="zk://h:p[,h:p][/chroot], etcd://h:p[,h:p][/prefix], consul://h:p[/prefix], or a saved source block's name",
    )
    b.add_argument("--to", dest="store", required=True, help="a directory, a file:// URL or a saved store block")
    b.add_argument("--name", help="source name recorded in the manifest and catalog")
    b.add_argument("--root", default="/", help="back up only below this path (default: /)")
    b.add_argument("--level", type=int, default=3, help="zstd compression level, 1-22 (default 3)")
    b.add_argument(
        "--include-leased", action="store_true",
        help="etcd: keep leased keys with their remaining TTL (default: skip and count them)",
    )
    add_write_keys(b)
    return {"backup": cmd_backup}


def cmd_backup(args: argparse.Namespace) -> int:
    from blocks.resolve import secure_source_ref, store_from_ref
    from burrow.naming import check_source_name

    ref = secure_source_ref(args.source)
    if args.include_leased:
        from blocks.resolve import source_from_ref

        if source_from_ref(ref).service != "etcd":
            raise UsageError("--include-leased applies to etcd sources only")
    if args.name is not None:
        check_source_name(args.name)
    if not 1 <= args.level <= 22:
        raise UsageError("--level must be between 1 and 22")
    store_from_ref(args.store).check(writable=True)
    keys = write_refs(args)  # usage errors (no key, a missing key file, two modes) before a flow starts
    from flows.backup import backup

    summary = backup(
        source=ref, store=args.store, name=args.name, root=args.root, compression_level=args.level, **keys,
        include_leased=args.include_leased,
    )
    if report_json(summary, EXIT_OK):
        return EXIT_OK
    print_summary(summary, skip=("url", "status"))
    print(summary["url"])
    return EXIT_OK
