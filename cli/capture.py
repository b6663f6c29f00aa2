"""``burrow capture``: follow a cluster's changes into change segments (restore to a point in
time), for hosts without workers."""

from __future__ import annotations

import argparse
from typing import Any

from burrow.errors import EXIT_OK, UsageError
from burrow.proc import check_niceness
from cli.common import add_write_keys, print_summary, report_json, write_refs


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    c = sub.add_parser("capture", help="follow a cluster's changes into change segments (restore --at TIME)")
    c.add_argument("source", help="etcd://h:p[/prefix] or a saved source block's name (its full backups' source)")
    c.add_argument("--to", dest="store", required=True, help="the store of the source's full archives")
    c.add_argument("--name", help="source name, as its backups record it")
    c.add_argument("--for", dest="duration", metavar="DURATION",
                   help="follow for this long (90s, 30m, 1h); default: until interrupted")
    c.add_argument("--seal-every", default="10s", metavar="DURATION",
                   help="seal a segment this often (default 10s), or at 8 MiB of changes")
    c.add_argument("--include-leased", action="store_true",
                   help="etcd: capture leased keys with their TTL, as backup --include-leased keeps them "
                        "(default: a leased key is left out, as a backup skips it)")
    c.add_argument("--nice", type=int, default=10, metavar="N",
                   help="run at CPU niceness N, 0 to 19 (default 10): on a host shared with the source's "
                        "server, its requests come first; 0 leaves the priority as it is")
    add_write_keys(c)
    return {"capture": cmd_capture}


def cmd_capture(args: argparse.Namespace) -> int:
    from blocks.resolve import secure_source_ref, store_from_ref
    from burrow.naming import check_source_name, parse_duration

    ref = secure_source_ref(args.source)
    if args.name is not None:
        check_source_name(args.name)
    duration = parse_duration(args.duration, "--for").total_seconds() if args.duration else None
    seal_every = parse_duration(args.seal_every, "--seal-every").total_seconds()
    if seal_every <= 0 or (duration is not None and duration <= 0):
        raise UsageError("--for and --seal-every must be longer than zero")
    check_niceness(args.nice, "--nice")
    if args.include_leased:
        from blocks.resolve import source_from_ref

        if source_from_ref(ref).service != "etcd":
            raise UsageError("--include-leased applies to etcd sources only")
    store_from_ref(args.store).check(writable=True)

    keys = write_refs(args)  # backup's write keys, checked before a flow starts
    from flows.capture import capture

    summary = capture(
        source=ref, store=args.store, name=args.name, seal_every_s=seal_every, duration_s=duration, **keys,
        include_leased=args.include_leased, nice=args.nice,
    )
    if report_json(summary, EXIT_OK):
        return EXIT_OK
    print_summary(summary, skip=("status",))
    print(f"captured {summary.get('changes', 0)} changes in {summary.get('segments', 0)} segments, "
          f"up to position {summary.get('last_position')}")
    return EXIT_OK
