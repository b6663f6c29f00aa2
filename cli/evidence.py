"""``burrow evidence``: the evidence report of a period (the evidence flow), and
``burrow evidence verify STORE``: check the chain of reports kept in a store (docs/EVIDENCE.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from burrow.errors import EXIT_EVIDENCE, EXIT_OK, EvidenceChainBroken, UsageError
from cli.common import OUTPUT, add_read_keys, emit_json, keyring, read_refs, report_json


def register(sub: Any) -> dict[str, Any]:
    """Add this module's subcommands to ``sub``; return their handlers by name."""
    e = sub.add_parser(
        "evidence", help="the evidence report of a period (backups, RPO, archives, rehearsals, recoveries, controls); "
        "`evidence verify STORE` checks the chain of reports kept in a store",
    )
    e.add_argument("action", nargs="*", metavar="verify STORE",
                   help="`verify STORE`: check the store's chain of reports instead (removed, edited, foreign)")
    e.add_argument("--since", default=None, metavar="WHEN",
                   help="the period's start: a duration back from --until (30d, 12h) or a UTC time; default 30d")
    e.add_argument("--until", metavar="WHEN", help="the period's end, a UTC time (2026-12-01); default now")
    e.add_argument("--month", metavar="YYYY-MM", help="a calendar month (UTC), or `previous`, instead of --since/--until")
    e.add_argument("--source", action="append", default=[], metavar="NAME", help="only this source (repeatable)")
    e.add_argument("--store", metavar="STORE", help="read this archive store, and chain the report into it")
    e.add_argument("--controls", metavar="PATH", help="another targets and controls file than burrow/controls.toml")
    e.add_argument("--json", action="store_true", help="print the report (or the chain check) as one JSON object")
    e.add_argument("--html", metavar="PATH", help="also write the self-contained HTML report to PATH")
    add_read_keys(e)
    e.set_defaults(precheck=precheck)
    return {"evidence": cmd_evidence}


def _verify_store(args: argparse.Namespace) -> str | None:
    if not args.action:
        return None
    if args.action[0] != "verify" or len(args.action) != 2:
        raise UsageError("burrow evidence takes no argument, or `verify STORE`")
    return str(args.action[1])


def precheck(args: argparse.Namespace) -> None:
    """Usage errors before the orchestrator is asked for."""
    store = _verify_store(args)
    if store is not None:
        args.runs_no_flow = True  # the chain is in the store: no orchestrator needed (its history may be gone)
        for flag in ("since", "until", "month", "html", "controls"):
            if getattr(args, flag):
                raise UsageError(f"evidence verify takes no --{flag}")
        if args.source or args.store:
            raise UsageError("evidence verify takes the store as its argument, and no --source or --store")
        return
    if args.month and (args.since or args.until):
        raise UsageError("give --month, or --since/--until, not both")
    from burrow.evidence import load_controls, parse_period

    parse_period(args.since or "30d", args.until, args.month)
    load_controls(args.controls)
    if args.html:
        parent = Path(args.html).expanduser().resolve().parent
        if not parent.is_dir():
            raise UsageError(f"--html: the directory {parent} does not exist")


def cmd_evidence(args: argparse.Namespace) -> int:
    store = _verify_store(args)
    refs = read_refs(args)
    if store is not None:
        return cmd_verify(store, keyring(refs))
    if args.store:
        from blocks.resolve import store_from_ref

        store_from_ref(args.store).check()
        if not keyring(refs).can_reader_sign():
            raise UsageError("writing evidence to a store needs the read key (--key-file, --identity, --passphrase-env, "
                             "--key-env or --key-block): its chain records are MACed with it")
    from burrow import evidence as ev
    from flows.evidence import evidence

    rep = evidence(since=args.since or "30d", until=args.until, month=args.month, sources=args.source or None,
                   store=args.store, controls=args.controls, **refs)
    if args.html:
        Path(args.html).expanduser().write_text(ev.render_html(rep), encoding="utf-8")
        print(f"burrow: wrote the HTML report to {args.html}", file=sys.stderr)
    if report_json(rep, EXIT_OK):
        return EXIT_OK
    print(ev.headline(rep))
    for c in rep["controls"]:
        failing = f"  (failing: {', '.join(c['failing_sources'])})" if c["failing_sources"] else ""
        print(f"{c['status']:<5} {c['id']}{failing}")
    for s in rep["sources"]:
        b, r = s["backups"], s["rpo"]
        achieved = f"{r['achieved_s']:.0f} s" if r["achieved_s"] is not None else "none"
        print(f"{s['name']}: {b['completed']}/{b['scheduled']} scheduled backups completed, {b['missed']} missed, "
              f"{b['failed']} failed, {b['crashed']} crashed; RPO {achieved} (target {r['target_s']:.0f} s); "
              f"{len(s['archives'])} archives, {len(s['rehearsals'])} rehearsals, {len(s['recoveries'])} recoveries")
    if rep.get("chain"):
        print(f"chained into {rep['store']} as report {rep['chain']['seq']}: {rep['chain']['record']}")
    return EXIT_OK


def cmd_verify(store_ref: str, keys: Any) -> int:
    """Walk the store's evidence chain; exit 6 on a removed, edited or foreign report."""
    from blocks.resolve import store_from_ref
    from tasks.evidence import check_store_chain

    st = store_from_ref(store_ref)
    check = check_store_chain(st, keys)
    result = check.to_dict()
    code = EXIT_OK if check.ok else EXIT_EVIDENCE
    if OUTPUT.json:
        emit_json({**result, "store": st.describe(), "command": "evidence", "exit_code": code})
        if not check.ok:
            print(f"burrow: error: {check.findings[0].message}", file=sys.stderr)
        return code
    newest = result["newest"]
    for f in check.findings:
        print(f"{f.kind:<8} {f.message}")
    if newest:
        print(f"{result['reports']} reports in the chain; the newest is report {newest['seq']} ({newest['record']}, "
              f"sha256 {newest['sha256']})")
    else:
        print(f"no evidence report in {st.describe()}")
    if not check.ok:
        raise EvidenceChainBroken(f"the evidence chain of {st.describe()} is broken: {len(check.findings)} finding(s); "
                                  f"the first: {check.findings[0].message}")
    return EXIT_OK
