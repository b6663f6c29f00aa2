"""A fleet through the orchestrator: how the cost grows with the number of clusters and workers
(a benchmark, not a test).

    .venv/bin/python bench/bench_fleet.py [--clusters 50,100,200] [--workers 1,2,3] [--limit 4]

Starts ZooKeeper, etcd, Consul, PostgreSQL and a Prefect server on PostgreSQL
(burrow.testing.servers), then for each (clusters, workers) pair: seeds that many small clusters
(a third on each service, 3 keys each), deploys them as tests/test_fleet.py does
(burrow.testing.fleet: one backup deployment per cluster, a backup-fleet deployment, a pool of
their own), starts the workers (``burrow worker start --limit``), runs the fleet and reports:

* wall time of the fleet run (its start to its end, as the server recorded them);
* Prefect's overhead per backup run: the run's wall time (start to end) minus the time its
  task runs took (the backup's own work: check, extract, compress and upload, verify), median
  and 95th percentile; and the start lateness (start minus scheduled start), median and p95;
* server CPU seconds over the fleet run (the Prefect server's process tree, and PostgreSQL's);
* the peak RSS of a worker process (Prefect's worker, ``VmHWM``) and of a backup run's process
  (the largest seen while sampling);
* the workers' CPU seconds (each ``burrow worker`` process tree, the runs' processes included)
  and the whole machine's busy CPU seconds (``/proc/stat``) over the fleet run, each per backup run.

``--launch burrow,prefect`` runs each pair twice: with the pool's template as Burrow makes it (its
runs start ``python -m prefect.engine``, flows.common.FLOW_RUN_COMMAND) and with Prefect's own
(each run through a workspace supervisor first), alternating, in the same run.

The Prefect server and PostgreSQL keep running across pairs (their databases grow; each pair has
its own pool, blocks and deployments). Prints one JSON line per pair and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from burrow import proc  # noqa: E402  (the checkout's own, from REPO)


def _ticks(pids: list[int]) -> float:
    """CPU seconds (user + system) of ``pids`` and all their descendants, from /proc."""
    from cli.worker import _children

    kids, total, stack = _children(), 0.0, list(pids)
    seen = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += proc.cpu_seconds(pid, reaped_children=True) or 0.0
        stack.extend(kids.get(pid, []))
    return total


def _hwm_kib(pid: int) -> int:
    return proc.peak_rss_kib(pid)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _busy_seconds() -> float:
    """The machine's busy CPU seconds so far (all CPUs: /proc/stat less idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def run_pair(n: int, workers: int, limit: int, servers: dict[str, Any], work: Path,
             launch: str = "burrow") -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment
    from prefect.workers.process import ProcessWorker

    from burrow.testing.fleet import deploy_fleet, seed_fleet, start_workers, stop_workers
    from cli.worker import flow_run_processes

    tag, clusters = seed_fleet(n, servers["zk"].url, servers["etcd"].url, servers["consul"].url)
    store = work / tag
    store.mkdir()
    fleet = deploy_fleet(tag, clusters, store)
    if launch == "prefect":  # Prefect's own template: no command, each run through its supervisor
        with get_client(sync_client=True) as client:
            client.update_work_pool(fleet.pool, WorkPoolUpdate(
                base_job_template=ProcessWorker.get_default_base_job_template()))
    procs = start_workers(fleet, workers, limit, work)
    peak_run_kib, peak_worker_kib = [0], [0]
    stop_sampling = threading.Event()

    def sample() -> None:  # the workers' and their runs' peak RSS
        while not stop_sampling.wait(0.5):
            for p in procs:
                for child in _direct_children(p.pid):
                    peak_worker_kib[0] = max(peak_worker_kib[0], _hwm_kib(child))
                for pid in flow_run_processes(p.pid):
                    peak_run_kib[0] = max(peak_run_kib[0], _hwm_kib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu_server0, cpu_pg0 = _ticks([servers["prefect"].pid]), _ticks([servers["postgres"].pid])
    load0 = os.getloadavg()
    cpu_workers0, busy0 = _ticks([p.pid for p in procs]), _busy_seconds()
    try:
        run = run_deployment(fleet.fleet_deployment, parameters={"deployments": fleet.names(), "poll_s": 2.0},
                             timeout=None)
    finally:
        cpu_workers = _ticks([p.pid for p in procs]) - cpu_workers0
        busy = _busy_seconds() - busy0
        cpu_server = _ticks([servers["prefect"].pid]) - cpu_server0
        cpu_pg = _ticks([servers["postgres"].pid]) - cpu_pg0
        stop_sampling.set()
        sampler.join()
        stop_workers(procs)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run.id)
        kids, offset = [], 0
        while True:
            page = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])), limit=200, offset=offset)
            kids += page
            offset += len(page)
            if len(page) < 200:
                break
        overhead, lateness = [], []
        for kid in kids:
            if not (kid.start_time and kid.end_time):
                continue
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[kid.id])))
            work_s = sum((t.end_time - t.start_time).total_seconds() for t in tasks if t.start_time and t.end_time)
            overhead.append((kid.end_time - kid.start_time).total_seconds() - work_s)
            if kid.expected_start_time:
                lateness.append((kid.start_time - kid.expected_start_time).total_seconds())
    states: dict[str, int] = {}
    for kid in kids:
        states[kid.state.type.value] = states.get(kid.state.type.value, 0) + 1
    return {
        "clusters": n, "workers": workers, "limit": limit, "launch": launch, "state": run.state.type.value,
        "runs": states,
        "workers_cpu_per_run_s": round(cpu_workers / max(1, len(kids)), 2),
        "busy_cpu_per_run_s": round(busy / max(1, len(kids)), 2),
        "wall_s": round((run.end_time - run.start_time).total_seconds(), 1),
        "overhead_median_s": round(statistics.median(overhead), 2) if overhead else None,
        "overhead_p95_s": round(_pct(overhead, 0.95), 2),
        "lateness_median_s": round(statistics.median(lateness), 2) if lateness else None,
        "lateness_p95_s": round(_pct(lateness, 0.95), 2),
        "server_cpu_s": round(cpu_server, 1), "postgres_cpu_s": round(cpu_pg, 1),
        "worker_peak_rss_mib": round(peak_worker_kib[0] / 1024), "run_peak_rss_mib": round(peak_run_kib[0] / 1024),
        "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def _direct_children(pid: int) -> list[int]:
    from cli.worker import _children

    return _children().get(pid, [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clusters", default="50,100,200")
    p.add_argument("--workers", default="1,2,3")
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--launch", default="burrow", help="burrow, prefect or both (burrow,prefect): the pool's "
                   "template as Burrow makes it, or Prefect's own")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    from burrow.testing.servers import (
        start_consul,
        start_etcd,
        start_postgres,
        start_prefect,
        start_zookeeper,
    )

    servers: dict[str, Any] = {
        "zk": start_zookeeper(work / "zk"), "etcd": start_etcd(work / "etcd"), "consul": start_consul(work / "consul"),
        "postgres": start_postgres(work / "postgres"),
    }
    servers["prefect"] = start_prefect(work / "prefect", database_url=servers["postgres"].database_url, env={
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20", "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "20",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"})
    os.environ["PREFECT_API_URL"] = servers["prefect"].url + "/api"
    os.environ["PREFECT_HOME"] = str(work / "client-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["BURROW_HOME"] = str(work / "burrow-home")
    rows = []
    try:
        for n in [int(x) for x in args.clusters.split(",")]:
            for w in [int(x) for x in args.workers.split(",")]:
                for launch in args.launch.split(","):
                    row = run_pair(n, w, args.limit, servers, work, launch)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        log = servers["prefect"].log_path.read_text(errors="replace") if servers["prefect"].log_path else ""
        print(f"server log: {log.count('database is locked')} 'database is locked', "
              f"{sum(1 for ln in log.splitlines() if 'lease' in ln.lower() and 'error' in ln.lower())} lease errors")
    finally:
        for s in reversed(list(servers.values())):
            s.stop()
    print("\n| clusters | workers | launch | wall | overhead/run median (p95) | lateness median (p95) | server CPU | "
          "PostgreSQL CPU | workers' CPU/run | machine CPU/run | worker peak RSS | run peak RSS | load before → after |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['clusters']} | {r['workers']} | {r['launch']} | {r['wall_s']} s | {r['overhead_median_s']} s "
              f"({r['overhead_p95_s']} s) | {r['lateness_median_s']} s ({r['lateness_p95_s']} s) | "
              f"{r['server_cpu_s']} s | {r['postgres_cpu_s']} s | {r['workers_cpu_per_run_s']} s | "
              f"{r['busy_cpu_per_run_s']} s | {r['worker_peak_rss_mib']} MiB | "
              f"{r['run_peak_rss_mib']} MiB | {r['load_before'][0]} → {r['load_after'][0]} |")


if __name__ == "__main__":
    main()
