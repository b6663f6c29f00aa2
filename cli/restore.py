"""``burrow restore``: create the archived keys that are missing in a cluster."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from burrow.errors import (
    UsageError,
)
from cli.common import (
    add_read_keys,
    keyring,
    latest_row,
    list_parameters,
    read_refs,
    report_restore,
)
from cli.undo import with_undo_line


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    r = sub.add_parser("restore", help="create the archived keys that are missing in a cluster")
    r.add_argument("archive", help="the archive URL that backup printed (with --latest: the store)")
    r.add_argument("--latest", action="store_true",
                   help="restore the newest good archive of --source from the store given as ARCHIVE")
    r.add_argument("--source", help="with --latest or --at: the source name recorded in the archives")
    r.add_argument("--at", metavar="TIME|latest",
                   help="restore --source as it was at TIME (ISO 8601, UTC without a zone) or at the end of its "
                   "change chain (latest): the newest full archive before it plus the captured changes up to it; "
                   "ARCHIVE is the store")
    r.add_argument("--at-revision", type=int, metavar="R",
                   help="etcd only: restore --source as it was at revision R (ARCHIVE is the store); a ZooKeeper or "
                   "Consul source is refused (usage error)")
    r.add_argument("--into", required=True, help="target cluster URL or saved source block name")
    r.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    r.add_argument("--subtree", help="restore only this path and below")
    r.add_argument("--map", action="append", default=[], metavar="OLD=NEW", help="restore OLD and below under NEW")
    add_read_keys(r)
    r.add_argument(
        "--allow-unencrypted", action="store_true",
        help="read an unencrypted archive even though read keys are configured (by default it is refused: "
        "anyone who can write to the store could have planted it)",
    )
    return {"restore": with_undo_line(cmd_restore, lambda _, sealed: sealed["undo_store"])}  # ends: `to undo: ...`


def cmd_restore(args: argparse.Namespace) -> int:
    from blocks.resolve import archive_from_ref, secure_source_ref
    from burrow.paths import KeyMapper

    KeyMapper(args.subtree, args.map)  # usage errors before a flow starts
    listing = list_parameters()
    refs = read_refs(args)
    keys = keyring(refs)  # a missing or malformed key file is a usage error before a flow starts
    if args.at is not None or args.at_revision is not None:
        return _restore_point(args, refs, listing)
    if args.latest:
        if not args.source:
            raise UsageError("--latest needs --source NAME (the source name recorded in the archives)")
        row = latest_row(args.archive, args.source, keys, args.allow_unencrypted)
        args.archive, expect = row["url"], row.get("manifest_sha256")
        print(f"restoring the newest good archive of {args.source}: {args.archive}", file=sys.stderr)
    elif args.source:
        raise UsageError("--source goes with --latest")
    else:
        expect = None
    archive_from_ref(args.archive)
    ref = secure_source_ref(args.into)
    from flows.restore import restore

    summary = restore(
        archive=args.archive, into=ref, dry_run=args.dry_run, subtree=args.subtree, maps=args.map or None,
        allow_unencrypted=args.allow_unencrypted, expect_manifest_sha256=expect, **refs, **listing,
    )
    return report_restore(summary, args.dry_run)


def _restore_point(args: argparse.Namespace, refs: dict[str, Any], listing: dict[str, Any]) -> int:
    """``--at`` / ``--at-revision``: usage checks, then the restore flow with the point."""
    from blocks.resolve import secure_source_ref, store_from_ref
    from burrow.segments import parse_point

    if args.latest or (args.at is not None and args.at_revision is not None):
        raise UsageError("give one of --latest, --at and --at-revision")
    if not args.source:
        raise UsageError("--at and --at-revision need --source NAME (the source name recorded in the archives)")
    if args.at not in (None, "latest"):
        parse_point(args.at)
    if args.at_revision is not None and args.at_revision < 1:
        raise UsageError("--at-revision takes a revision of 1 or more")
    store_from_ref(args.archive)
    ref = secure_source_ref(args.into)
    from flows.restore import restore

    summary = restore(
        archive=args.archive, into=ref, dry_run=args.dry_run, subtree=args.subtree, maps=args.map or None,
        allow_unencrypted=args.allow_unencrypted, at=args.at, at_revision=args.at_revision, source=args.source,
        **refs, **listing,
    )
    return report_restore(summary, args.dry_run)
