"""The backup-fleet flow: back up many clusters at once, spread over every worker of the pool.

The fleet does not back anything up itself. It starts one run of every backup *deployment*
it is given (or finds by tag) with ``run_deployment``, and waits for them:

* each backup becomes a flow run of its own on the ``burrow`` work pool, so whichever worker
  has room takes it: several workers on several machines share the fleet, and Prefect's
  workers are the distributed engine (Burrow writes none);
* each run keeps what a scheduled backup has: its retries, its per-cluster lock (a cluster
  already being backed up or restored makes it wait, on any worker), its run history,
  artifact and ``burrow.backup.*`` event; a worker lost mid-fleet loses only its own runs;
* the parameters (source, store, key block) stay in the backup deployments: the fleet carries
  deployment names and tags, never a cluster address or a secret.

Running the backups as subflows or tasks inside the fleet's own process would put every
cluster's backup on one machine, which is exactly what the fleet exists to avoid.
"""

from __future__ import annotations

import time
from typing import Any

from burrow import naming, report
from burrow.errors import PermanentError, UsageError
from burrow.runlog import logger
from flows.common import burrow_flow, recorded_run

#: Final states of a child run that count as success.
_OK = {"COMPLETED"}


class FleetError(PermanentError):
    """Some of the fleet's backups did not complete (each failed run says why in its own logs)."""


def _run_name() -> str:
    return f"backup-fleet-{naming.stamp()}"


def _backup_deployments(tags: list[str]) -> list[str]:
    """``backup/<name>`` of every deployment of the backup flow carrying all of ``tags``
    and not paused."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterTags,
        FlowFilter,
        FlowFilterName,
    )

    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["backup"])),
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=list(tags))) if tags else None,
        )
    return sorted(f"backup/{d.name}" for d in found if not d.paused)


def _wait(run_ids: list[Any], timeout_s: float, poll_s: float) -> dict[Any, Any]:
    """Poll the children until every one is final (or the timeout passes); return them by id."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
            by_id = {r.id: r for r in runs}
            if all(r.state is not None and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return by_id
            time.sleep(poll_s)


#: Children started at once. Each start is a few API calls; one after another they took 20 s
#: each on a loaded 2-core machine (a 200-cluster fleet: over an hour before the last started,
#: while the workers sat idle).
START_CONCURRENCY = 8


def _start_all(names: list[str]) -> dict[str, Any]:
    """Start one run of each deployment as a subflow run of this one, ``START_CONCURRENCY`` at a
    time; return the child runs by deployment name, in ``names``' order. Each start runs in a
    copy of this run's context, which is how Prefect links the child to this run."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    from prefect.deployments import run_deployment

    with ThreadPoolExecutor(max_workers=START_CONCURRENCY, thread_name_prefix="fleet-start") as pool:
        futures = [pool.submit(contextvars.copy_context().run, run_deployment, name, timeout=0, as_subflow=True)
                   for name in names]
        return {name: f.result() for name, f in zip(names, futures, strict=True)}


@burrow_flow(name="backup-fleet", flow_run_name=_run_name, persist_result=False)
def backup_fleet(
    deployments: list[str] | None = None,
    tags: list[str] | None = None,
    wait: bool = True,
    timeout_s: float = 6 * 3600,
    poll_s: float = 5.0,
) -> dict[str, Any]:
    """Start one run of each backup deployment and (unless ``wait`` is False) wait for all.

    ``deployments`` names them (``backup/backup-dc-us`` or just ``backup-dc-us``); without it,
    every unpaused deployment of the backup flow carrying all of ``tags`` (default
    ``["burrow", "backup"]``) is run. The fleet run fails, naming the runs, when any backup
    ends in a state other than Completed (or is still running after ``timeout_s``).
    Returns the summary: per deployment, the child run's name and final state.
    """
    log = logger()
    summary: dict[str, Any] = {"status": "failed", "source": "fleet"}
    rows: list[str] = []

    def _publish() -> None:
        outcome = f"backup fleet: {report.done_word(summary)}"
        if summary.get("status") == "ok":
            outcome += f", {summary.get('completed', 0):,} of {report.count(summary.get('deployments'), 'backup')} completed"
        elif summary.get("status") == "started":
            outcome = f"backup fleet: {report.count(summary.get('deployments'), 'backup')} started"
        report.publish(
            "backup-fleet", outcome, {k: v for k, v in summary.items() if k not in ("runs", "status", "error")},
            tables={"runs": ("backup fleet: each backup run and its final state", [
                {"deployment": n, "run": str(r.get("run") or "-"), "state": str(r.get("state"))}
                for n, r in (summary.get("runs") or {}).items()])},
            lists={"Backups": rows} if summary.get("status") == "started" else None,
        )

    with recorded_run("fleet", summary, _publish, event=False):
        names = [d if "/" in d else f"backup/{d}" for d in (deployments or [])]
        if not names:
            names = _backup_deployments(tags if tags is not None else ["burrow", "backup"])
        if not names:
            raise UsageError("the fleet found no backup deployment to run (check the tags, or name them)")
        started: dict[str, Any] = {}
        for name, child in _start_all(names).items():
            started[name] = child.id
            log.info("fleet: started %s as run %s", name, child.name)
        summary.update(deployments=len(names))
        if not wait:
            rows[:] = [f"{n}: started" for n in names]
            summary.update(status="started")
            return summary
        runs = _wait(list(started.values()), timeout_s, poll_s)
        failed = []
        out = {}
        for name, run_id in started.items():
            run = runs.get(run_id)
            state = run.state.type.value if run and run.state else "UNKNOWN"
            out[name] = {"run": run.name if run else None, "state": state}
            rows.append(f"{name}: {out[name]['run']} {state}")
            if state not in _OK:
                failed.append(name)
        summary.update(runs=out, completed=len(names) - len(failed), failed=len(failed))
        if failed:
            raise FleetError(f"{len(failed)} of {len(names)} backups did not complete: {', '.join(failed)}")
        summary["status"] = "ok"
        return summary
