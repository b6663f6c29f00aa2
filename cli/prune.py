"""``burrow prune``: GFS retention."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from burrow.errors import (
    EXIT_OK,
    UsageError,
)
from cli.common import (
    add_read_keys,
    keyring,
    read_refs,
    report_json,
    write_list,
)


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    pr = sub.add_parser("prune", help="delete archives beyond a GFS retention policy (newest per source always kept)")
    pr.add_argument("store")
    pr.add_argument("--keep-last", "--keep", dest="keep_last", type=int, metavar="N",
                    help="keep the newest N archives per source (the default policy is --keep-last 24)")
    for period in ("hourly", "daily", "weekly", "monthly", "yearly"):
        pr.add_argument(f"--keep-{period}", type=int, metavar="N",
                        help=f"keep the newest archive of each of the last N {period} periods that hold one")
    pr.add_argument("--keep-within", metavar="DURATION", help="keep every archive made within DURATION of the newest")
    pr.add_argument("--keep-changes-within", metavar="DURATION", default="7d",
                    help="keep change segments (restore --at) this long, while a kept archive needs them (default 7d)")
    pr.add_argument("--policy-block", metavar="NAME", help="a saved RetentionPolicy block instead of --keep-* rules")
    pr.add_argument("--max-age-days", type=float, help="only delete archives older than this many days")
    pr.add_argument("--source", help="only this source")
    pr.add_argument("--dry-run", action="store_true",
                    help="list what would be deleted, and which rule keeps every other archive; delete nothing")
    add_read_keys(pr)
    return {"prune": cmd_prune}


def cmd_prune(args: argparse.Namespace) -> int:
    from blocks.resolve import store_from_ref
    from burrow.naming import parse_duration

    if args.keep_last is not None and args.keep_last < 1:
        raise UsageError("--keep-last must be at least 1: the newest archive of a source is never pruned")
    if args.keep_within:
        parse_duration(args.keep_within, "--keep-within")
    parse_duration(args.keep_changes_within, "--keep-changes-within")
    store_from_ref(args.store).check()
    refs = read_refs(args)
    keyring(refs)
    from flows.prune import prune

    summary = prune(
        store=args.store, keep_last=args.keep_last, keep_hourly=args.keep_hourly, keep_daily=args.keep_daily,
        keep_weekly=args.keep_weekly, keep_monthly=args.keep_monthly, keep_yearly=args.keep_yearly,
        keep_within=args.keep_within, keep_changes_within=args.keep_changes_within, policy_block=args.policy_block, max_age_days=args.max_age_days,
        source=args.source, dry_run=args.dry_run, **refs,
    )
    if report_json(summary, EXIT_OK):
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    # The summary first; then what was (or would be) deleted; the kept archives on request.
    print(f"{verb} {summary['deleted']} of {summary['archives']} archives; kept {summary['kept']}; "
          f"left alone {summary['left_alone']} (policy: {summary['policy']})")
    for url, why in summary["deleted_because"].items():
        print(f"{verb} {url}  ({why})")
    for url, why in (summary.get("not_reauthenticated") or {}).items():
        print(f"kept {url}  (not authenticated for this run, so never deleted: {why})")
    # change segments: a count per reason (a week of them is tens of thousands; the artifact lists each)
    reasons: dict[str, int] = {}
    for why in (summary.get("changes_deleted_because") or {}).values():
        reasons[why] = reasons.get(why, 0) + 1
    for why, n in reasons.items():
        print(f"{verb} {n} change segment{'s' if n != 1 else ''}  ({why})")
    for url, why in (summary.get("changes_left_alone") or {}).items():
        print(f"left alone {url}  ({why})")
    if summary["deleted"] and not summary.get("authenticated"):
        print("burrow: no read key: the deleted archives' manifests were re-read and checked against their names, "
              "but nothing authenticates an unencrypted archive", file=sys.stderr)
    if args.dry_run:
        write_list([f"keep {url}  ({'; '.join(rules)})" for url, rules in summary["kept_because"].items()], "keep")
    return EXIT_OK
