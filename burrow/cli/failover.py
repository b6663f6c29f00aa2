"""``burrow failover``: rebuild a cluster from a source's newest good archive."""

from __future__ import annotations

import argparse
from typing import Any

from burrow.cli.common import (
    add_read_keys,
    keyring,
    read_refs,
    report_restore,
)
from burrow.errors import (
    UsageError,
)


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    f = sub.add_parser("failover", help="rebuild a cluster from the newest archive of a source that verifies")
    f.add_argument("source", help="the source name recorded in the archives (backup --name)")
    f.add_argument("--from", dest="store", required=True, help="the store holding the source's archives")
    f.add_argument("--into", required=True, help="target cluster URL or saved source block name")
    f.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    f.add_argument("--subtree", help="restore only this path and below")
    f.add_argument("--map", action="append", default=[], metavar="OLD=NEW", help="restore OLD and below under NEW")
    f.add_argument("--candidates", type=int, default=5, help="how many of the newest archives to try (default 5)")
    add_read_keys(f)
    f.add_argument(
        "--allow-unencrypted", action="store_true",
        help="read an unencrypted archive even though read keys are configured (by default it is refused: "
        "anyone who can write to the store could have planted it)",
    )
    return {"failover": cmd_failover}


def cmd_failover(args: argparse.Namespace) -> int:
    from blocks.resolve import secure_source_ref, store_from_ref
    from burrow.paths import KeyMapper

    KeyMapper(args.subtree, args.map)
    if args.candidates < 1:
        raise UsageError("--candidates must be at least 1")
    store_from_ref(args.store).check()
    ref = secure_source_ref(args.into)
    refs = read_refs(args)
    keyring(refs)
    from flows.failover import failover

    summary = failover(
        source=args.source, store=args.store, into=ref, dry_run=args.dry_run, subtree=args.subtree,
        maps=args.map or None, max_candidates=args.candidates, allow_unencrypted=args.allow_unencrypted, **refs,
    )
    print(f"failover from {summary['archive']} (created {summary['archive_created']})")
    return report_restore(summary, args.dry_run)
