"""``burrow rehearse``: prove that a backup restores (restore into a scratch target, compare, clean up)."""

from __future__ import annotations

import argparse
from typing import Any

from burrow.errors import EXIT_OK
from cli.common import add_read_keys, keyring, read_refs, report_json


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    r = sub.add_parser(
        "rehearse",
        help="restore an archive into an empty scratch target, compare every key, time it, clean up, "
        "and record the result next to the archive",
    )
    r.add_argument("store", help="the store (directory, URL or saved store block)")
    r.add_argument("--source", required=True, help="the source name recorded in the archives")
    r.add_argument(
        "--scratch", required=True,
        help="an empty scratch target: a ZooKeeper chroot (zk://h:p/burrow-rehearsal), an etcd or Consul "
        "prefix, a whole scratch cluster, or a saved source block's name",
    )
    r.add_argument("--archive", help="rehearse this archive URL instead of the newest trusted one of --source")
    r.add_argument("--at", metavar="TIME|latest",
                   help="rehearse a point in time: the archive plus the change chain up to TIME (ISO 8601) or its end")
    add_read_keys(r)
    r.add_argument(
        "--allow-unencrypted", action="store_true",
        help="rehearse an unencrypted archive even though read keys are configured",
    )
    return {"rehearse": cmd_rehearse}


def cmd_rehearse(args: argparse.Namespace) -> int:
    from blocks.resolve import archive_from_ref, secure_source_ref, store_from_ref

    refs = read_refs(args)
    keyring(refs)  # a missing or malformed key file is a usage error before a flow starts
    store_from_ref(args.store)
    if args.archive:
        archive_from_ref(args.archive)
    if args.at not in (None, "latest"):
        from burrow.segments import parse_point

        parse_point(args.at)
    scratch = secure_source_ref(args.scratch)
    from flows.rehearse import rehearse

    summary = rehearse(
        store=args.store, source=args.source, scratch=scratch, archive=args.archive,
        allow_unencrypted=args.allow_unencrypted, at=args.at, **refs,
    )
    if report_json(summary, EXIT_OK):  # --json (once rehearse is one of the CLI's flow commands)
        return EXIT_OK
    cleanup = (f", scratch cleaned up ({summary.get('cleanup_deleted', 0)} keys deleted)"
               if not summary.get("cleanup_left") else
               f", {summary['cleanup_left']} keys LEFT in the scratch target (changed meanwhile)")
    auth = "authenticated" if summary.get("marker_authenticated") else "UNAUTHENTICATED (no key opens the archive)"
    print(
        f"rehearsed {summary['archive']}: {summary.get('archive_keys')} keys restored into {summary['scratch']} "
        f"and compared, restore took {summary.get('restore_s', 0):.1f}s{cleanup}"
    )
    print(f"marker: {summary.get('marker')} ({auth})")
    return EXIT_OK
