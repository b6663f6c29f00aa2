"""Apply Burrow's Prefect configuration to the server at PREFECT_API_URL. Safe to re-run:
every step creates what is missing and updates what is there, never duplicates.

1. register Burrow's block types (so they can be created in the UI),
2. create the ``burrow`` process work pool if it is missing,
3. create the global concurrency limit ``burrow-source-<name>`` (limit 1) of every cluster:
   the ``definitions.clusters`` of prefect.yaml, every backup deployment's source, and each
   ``--cluster``; backups and restores hold it (strictly, under a deployment), so one cluster
   never runs two of them at once across all workers,
4. deploy the deployments of deployments/prefect.yaml (all, or those named by ``--only``),
5. create or update the automations of deployments/automations.yaml, by name, wired to a
   notification block, and arm the pages of every backup deployment's source (the
   ``burrow.alerts.armed`` event, see :func:`arm`).

Usage: python deployments/setup.py [--notify-block SLUG/NAME] [--cluster NAME ...]
                                   [--only DEPLOYMENT ...] [--skip-deploy] [--prefect-file PATH]
                                   [--backup-missing-hours HOURS]
Then start workers (on as many machines as you like):  burrow worker start --pool burrow
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "burrow"


def run(*args: str) -> subprocess.CompletedProcess:
    """Run one ``prefect`` CLI command in the repository; stop with its output on failure."""
    print("$ prefect " + " ".join(args), flush=True)
    env = {**os.environ, "BURROW_CHECKOUT": os.environ.get("BURROW_CHECKOUT", str(REPO))}
    proc = subprocess.run([PREFECT, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"prefect {args[0]} {args[1] if len(args) > 1 else ''} failed ({proc.returncode})")
    return proc


def register_block_types() -> None:
    """Register every Burrow block type with the server, in this process (one ``prefect block
    register`` per module would start a new interpreter each time). Burrow's block classes are
    plain pydantic models; what Prefect registers is each one's Prefect twin (blocks/base.py)."""
    from blocks.registry import register_twins

    for twin in register_twins():
        twin.register_type_and_schema()
        print(f"registered block type {twin.get_block_type_slug()} ({twin.__module__})", flush=True)


def backup_sources_of(spec: dict[str, Any]) -> list[str]:
    """The source name of every backup deployment (its ``name`` parameter, else its ``source``):
    the name its runs' events carry (``burrow.source.<name>``)."""
    names = []
    for d in spec.get("deployments") or []:
        if str(d.get("entrypoint", "")).startswith("flows/backup.py:"):
            params = d.get("parameters") or {}
            if params.get("name") or params.get("source"):
                names.append(str(params.get("name") or params["source"]))
    return sorted(dict.fromkeys(names))


def clusters_of(spec: dict[str, Any], extra: list[str]) -> list[str]:
    """Every cluster that needs a per-cluster limit: ``definitions.clusters``, the source of
    every backup deployment (:func:`backup_sources_of`), and ``extra``."""
    names = list((spec.get("definitions") or {}).get("clusters") or []) + backup_sources_of(spec) + extra
    return sorted(dict.fromkeys(n for n in names if n))


#: The automation that pages when a source's backups stop (its window: ``backup_missing_within``).
BACKUP_MISSING = "burrow-backup-missing"
#: The automation that pages once per outage when a source's backups fail.
BACKUP_FAILED = "burrow-backup-failed"
#: The automation that pages when a capture records a gap in a source's chain, or fails.
CAPTURE_GAP_OR_FAILED = "burrow-capture-gap-or-failed"
#: The automation that pages when a source's capture stops sealing (its window: ``capture_silent_within``).
CAPTURE_SILENT = "burrow-capture-silent"
#: The event that arms a source's failure page (see :func:`arm`).
ARMED = "burrow.alerts.armed"


def automations_of(path: Path, notify_block_id: str, backup_missing_within: float | None = None,
                   capture_silent_within: float | None = None) -> list[Any]:
    """The automations of ``path``, with ``${NOTIFY_BLOCK_ID}`` filled in, as Prefect models.
    ``backup_missing_within`` (seconds, at least 10) replaces the window of
    ``burrow-backup-missing``: how long after a source's last completed backup it pages;
    ``capture_silent_within`` that of ``burrow-capture-silent``: how long after a source's last
    sealed change segment."""
    from prefect.events.schemas.automations import AutomationCore

    text = path.read_text().replace("${NOTIFY_BLOCK_ID}", notify_block_id)
    specs = yaml.safe_load(text)["automations"]
    windows = {BACKUP_MISSING: backup_missing_within, CAPTURE_SILENT: capture_silent_within}
    for spec in specs:
        if windows.get(spec["name"]) is not None:
            spec["trigger"]["within"] = windows[spec["name"]]
    return [AutomationCore.model_validate(a) for a in specs]


async def arm(sources: list[str]) -> None:
    """Arm the pages of each of ``sources``: emit ``burrow.alerts.armed`` about
    ``burrow.source.<name>``, which both per-source automations take as a completed backup would
    (``after``). ``burrow-backup-failed`` pages for the first failure after a completed backup or
    an arming: without it, a source that has never completed a backup would not page at all.
    ``burrow-backup-missing`` opens a window for a source that has none: one never backed up, or
    one whose window went when this run updated the automation (Prefect gives an updated trigger
    a new id and drops its open windows). Re-arming a source in an outage lets it page once more."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    from flows.common import source_resource

    async with get_events_client() as events:
        for source in sources:
            await events.emit(Event(event=ARMED, resource=source_resource(source),
                                    payload={"by": "deployments/setup.py"}))
            print(f"armed the failure page of {source}", flush=True)


async def apply(clusters: list[str], automations: list[Any], armed: list[str] | None = None) -> None:
    """Create the work pool, the per-cluster limits and the automations, or update them; then
    arm the failure page of each source of ``armed`` (see :func:`arm`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    sys.path.insert(0, str(REPO))
    from flows.common import pool_run_command, process_pool_template, source_limit_name

    async with get_client() as client:
        try:
            pool = await client.read_work_pool(POOL)
            if pool.type == "process" and not pool_run_command(pool.base_job_template):
                # a pool made before the template named the runs' command (an operator's own
                # command is left as it is)
                await client.update_work_pool(POOL, WorkPoolUpdate(base_job_template=process_pool_template()))
                print(f"work pool {POOL}: its runs now start the engine directly", flush=True)
            else:
                print(f"work pool {POOL} is there", flush=True)
        except ObjectNotFound:
            try:
                await client.create_work_pool(WorkPoolCreate(name=POOL, type="process",
                                                             base_job_template=process_pool_template()))
                print(f"created the process work pool {POOL}", flush=True)
            except ObjectAlreadyExists:  # another setup run got there first
                pass
        for cluster in clusters:
            name = source_limit_name(cluster)
            await client.upsert_global_concurrency_limit_by_name(name, 1)
            print(f"global concurrency limit {name} (limit 1)", flush=True)
        for automation in automations:
            existing = await client.read_automations_by_name(automation.name)
            if existing:
                keep, *extra = existing
                await client.update_automation(keep.id, automation)
                for dup in extra:  # left by an older setup that created rather than updated
                    await client.delete_automation(dup.id)
                print(f"updated automation {automation.name}" + (f" (removed {len(extra)} duplicates)" if extra else ""),
                      flush=True)
            else:
                await client.create_automation(automation)
                print(f"created automation {automation.name}", flush=True)
    if armed:
        await arm(armed)


def notify_block_id(name: str) -> str:
    """The id of the saved notification block ``slug/name``."""
    from prefect.blocks.core import Block

    block = Block.load(name)
    return str(block._block_document_id)


def main(argv: list[str] | None = None) -> int:
    """Apply everything; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--notify-block", help="saved notification block (slug/name) for the automations")
    p.add_argument("--cluster", action="append", default=[], metavar="NAME",
                   help="one more cluster (block name or source name) to create a per-cluster limit for")
    p.add_argument("--only", action="append", default=[], metavar="DEPLOYMENT",
                   help="deploy only this deployment of prefect.yaml (repeatable)")
    p.add_argument("--backup-missing-hours", type=float, default=None, metavar="HOURS",
                   help="page when a source has had no completed backup for this long "
                        "(default: the 26 hours of automations.yaml)")
    p.add_argument("--skip-deploy", action="store_true", help="register blocks, pool, limits and automations only")
    p.add_argument("--prefect-file", default=str(HERE / "prefect.yaml"), help="the deployments file")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))

    prefect_file = Path(args.prefect_file).resolve()
    spec = yaml.safe_load(prefect_file.read_text())
    wanted = [d for d in spec.get("deployments") or [] if not args.only or d["name"] in args.only]
    unknown = set(args.only) - {d["name"] for d in wanted}
    if unknown:
        raise SystemExit(f"--only: no deployment named {', '.join(sorted(unknown))} in {prefect_file}")
    missing = sorted({d["entrypoint"] for d in wanted if not (REPO / d["entrypoint"].split(":", 1)[0]).is_file()})
    if missing and not args.skip_deploy:
        raise SystemExit(f"these entry points do not exist in {REPO}: {', '.join(missing)} "
                         "(deploy the others with --only NAME)")

    register_block_types()
    automations = []
    if args.notify_block:
        within = args.backup_missing_hours * 3600 if args.backup_missing_hours is not None else None
        automations = automations_of(HERE / "automations.yaml", notify_block_id(args.notify_block), within)
    else:
        print("automations skipped: pass --notify-block SLUG/NAME to wire them to a notification block")
    armed = backup_sources_of(spec) if {a.name for a in automations} & {BACKUP_FAILED, BACKUP_MISSING} else []
    asyncio.run(apply(clusters_of(spec, args.cluster), automations, armed))
    if not args.skip_deploy:
        names = [x for d in wanted for x in ("--name", d["name"])] if args.only else ["--all"]
        run("deploy", *names, "--prefect-file", str(prefect_file))
        print(f"deployed {len(wanted)} deployment(s) to the {POOL} work pool", flush=True)
    print(f"done: start workers with  BURROW_CHECKOUT={REPO} burrow worker start --pool {POOL}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
