"""ZooKeeper backup and restore throughput and peak memory (a benchmark, not a test).

    .venv/bin/python bench/bench_zookeeper.py [--n 100000] [--fanout 100] [--value-size 100]

Starts two local ZooKeeper servers (burrow.testing.servers), seeds N znodes in a
(N / fanout) x fanout tree under /bench with fixed-size values, then measures, each phase
in its own child process so that its peak RSS is its own (os.wait4 rusage):

* backup:  extract_records + compress_spool (walk the live tree, sealed spool, zstd) -> znodes/s,
           in a staging directory whose disk use is measured after each stage (peak scratch disk)
* restore: plan_restore + replay_plan into the second, empty server          -> znodes/s

With ``--flows`` it also starts a Prefect server and times the full ``backup`` and
``restore`` flows (download, validate, verify and Prefect bookkeeping included); the flow
restore goes to a fresh path (--map) in the second server, so it creates every node again.

Targets on the 2-core reference machine: backup >= 15,000 znodes/s, restore >= 30,000 znodes/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from childproc import run_child  # noqa: E402  (bench/ is the script's directory)

from burrow import proc  # noqa: E402  (the checkout's own, from REPO)

BACKUP_TARGET = 15_000
RESTORE_TARGET = 30_000


# --------------------------------------------------------------------------- seeding


def seed(hosts: str, n: int, fanout: int, value_size: int) -> float:
    """Create /bench with n // fanout parents of ``fanout`` children each; return seconds."""
    from kazoo.client import KazooClient

    parents = max(1, n // fanout)
    value = (b"0123456789abcdef" * (value_size // 16 + 1))[:value_size]
    c = KazooClient(hosts=hosts, timeout=30)
    c.start(timeout=30)
    started = time.monotonic()
    try:
        c.create("/bench", b"bench-root")
        batches: list[list[tuple[str, bytes]]] = []
        for start in range(0, parents, 500):
            batches.append([(f"/bench/p{i:05d}", value) for i in range(start, min(parents, start + 500))])
        _commit_all(c, batches)
        batches = []
        cur: list[tuple[str, bytes]] = []
        for i in range(parents):
            for j in range(fanout):
                cur.append((f"/bench/p{i:05d}/c{j:04d}", value))
                if len(cur) >= 1000:
                    batches.append(cur)
                    cur = []
        if cur:
            batches.append(cur)
        _commit_all(c, batches)
    finally:
        c.stop()
        c.close()
    return time.monotonic() - started


def _commit_all(c, batches: list[list[tuple[str, bytes]]], window: int = 32) -> None:
    pending = []
    for batch in batches:
        t = c.transaction()
        for path, data in batch:
            t.create(path, data)
        pending.append(t.commit_async())
        if len(pending) >= window:
            _check(pending.pop(0).get())
    for p in pending:
        _check(p.get())


def _check(results: list) -> None:
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise RuntimeError(f"seeding failed: {errors[0]!r}")


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds a process (the ZooKeeper JVM) has used so far."""
    return proc.cpu_seconds(pid) or 0.0


def znode_count(hosts: str) -> int:
    """The server's znode count (4lw ``mntr``), independently of Burrow's code."""
    host, port = hosts.split(",")[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"mntr")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith("zk_znode_count"):
            return int(line.split()[1])
    raise RuntimeError("mntr did not report zk_znode_count")


# --------------------------------------------------------------------------- phases (child processes)


def disk_use(d: Path) -> int:
    """Bytes of disk the files below ``d`` take (allocated blocks)."""
    return sum(p.stat().st_blocks * 512 for p in d.rglob("*") if p.is_file())


def phase_backup(hosts: str, workdir: Path) -> dict:
    from blocks.zookeeper import ZooKeeperCluster
    from burrow.staging import discard_spool, staging_dir
    from tasks.compress import compress_spool
    from tasks.extract import extract_records

    source = ZooKeeperCluster(hosts=[hosts])
    with staging_dir(parent=str(workdir)) as work:  # as the backup flow does
        t0 = time.monotonic()
        ex = extract_records(source, "/bench", work)
        t1 = time.monotonic()
        after_extract = disk_use(work)
        comp = compress_spool(ex, work / "bench.burrow", source_name="bench", level=3)
        t2 = time.monotonic()
        after_compress = disk_use(work)
        spool_bytes = Path(ex.spool).stat().st_size
        discard_spool(ex.spool)
        os.replace(comp.path, workdir / "bench.burrow")
    return {
        "keys": ex.keys, "extract_s": t1 - t0, "compress_s": t2 - t1, "seconds": t2 - t0,
        "archive_bytes": comp.size, "raw_bytes": ex.raw_bytes, "content_bytes": ex.content_bytes,
        "spool_bytes": spool_bytes, "scratch_peak": max(after_extract, after_compress),
    }


def phase_restore(hosts: str, workdir: Path, chroot: str | None = None) -> dict:
    from blocks.zookeeper import ZooKeeperCluster
    from tasks.plan import plan_restore
    from tasks.replay import replay_plan

    target = ZooKeeperCluster(hosts=[hosts], chroot=chroot or None)
    t0 = time.monotonic()
    plan = plan_restore(workdir / "bench.burrow", target, workdir)
    t1 = time.monotonic()
    done = replay_plan(plan, target)
    t2 = time.monotonic()
    return {
        "keys": plan.to_create + plan.identical + plan.conflicts, "created": done.created,
        "identical": plan.identical + done.identical, "conflicts": plan.conflicts + done.conflicts,
        "plan_s": t1 - t0, "replay_s": t2 - t1, "seconds": t2 - t0,
    }


def phase_flows(source_hosts: str, target_hosts: str, workdir: Path) -> dict:
    from flows.backup import backup
    from flows.restore import restore

    store = workdir / "store"
    store.mkdir(exist_ok=True)
    t0 = time.monotonic()
    b = backup(source=f"zk://{source_hosts}", store=str(store), root="/bench", name="bench", encryption=False)
    t1 = time.monotonic()
    r = restore(archive=b["url"], into=f"zk://{target_hosts}", maps=["/bench=/bench-flow"])
    t2 = time.monotonic()
    return {"keys": b["keys"], "backup_s": t1 - t0, "restore_s": t2 - t1, "created": r["created"]}


def run_phase(name: str, *args: str, env: dict[str, str] | None = None) -> tuple[dict, float, float]:
    """Run one phase in a child process; return its JSON result, its peak RSS in MiB and
    its CPU seconds."""
    return run_child(__file__, name, list(args), env)


# --------------------------------------------------------------------------- main


def _row(name: str, n: int, seconds: float, rss: float, target: int, notes: str) -> tuple:
    return (name, n, seconds, rss, target, notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="znodes to seed (default 100000)")
    ap.add_argument("--fanout", type=int, default=100, help="children per parent (default 100)")
    ap.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed passes of each phase first, so the ZooKeeper JVMs are warm (default 1)")
    ap.add_argument("--flows", action="store_true", help="also time the full Prefect flows (starts a Prefect server)")
    ap.add_argument("--workdir", help="keep servers' data and archives here (default: a temp dir, removed)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--chroot", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:  # child process
        workdir = Path(args.workdir)
        if args.phase == "flows":
            result = phase_flows(args.source, args.target, workdir)
        elif args.phase == "restore":
            result = phase_restore(args.source, workdir, args.chroot)
        else:
            result = phase_backup(args.source, workdir)
        Path(args.result).write_text(json.dumps(result))
        return 0

    from burrow.testing.servers import start_prefect, start_zookeeper

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="burrow-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    servers = []
    try:
        a = start_zookeeper(workdir / "zk-a")
        servers.append(a)
        b = start_zookeeper(workdir / "zk-b")
        servers.append(b)
        print(f"ZooKeeper A {a.url}, B {b.url}; seeding {args.n} znodes "
              f"({args.n // args.fanout} x {args.fanout}, {args.value_size}-byte values)...", flush=True)
        seed_s = seed(a.url, args.n, args.fanout, args.value_size)
        seeded = args.n // args.fanout * (args.fanout + 1) + 1  # parents, children and /bench
        print(f"seeded {seeded} znodes in {seed_s:.1f}s ({seeded / seed_s:,.0f}/s)", flush=True)
        run = workdir / "run"
        run.mkdir(exist_ok=True)
        rows = []

        # backup: the warm-up passes first (the first one is reported as "cold server")
        for i in range(args.warmup + 1):
            (run / "bench.burrow").unlink(missing_ok=True)
            zk_cpu = cpu_seconds(a.pid)
            bk, bk_rss, bk_cpu = run_phase("backup", "--source", a.url, "--workdir", str(run))
            bk_zk = cpu_seconds(a.pid) - zk_cpu
            if bk["keys"] != seeded:
                raise SystemExit(f"backup saw {bk['keys']} znodes, expected {seeded}")
            label = "backup" + (", cold server" if i == 0 and args.warmup else "")
            if i == 0 or i == args.warmup:
                rows.append(_row(
                    label, bk["keys"], bk["seconds"], bk_rss, BACKUP_TARGET,
                    f"walk {bk['extract_s']:.2f}s, zstd {bk['compress_s']:.2f}s, "
                    f"{bk['raw_bytes'] / 1e6:.1f} MB raw -> {bk['archive_bytes'] / 1e6:.2f} MB; "
                    f"scratch disk peak {bk['scratch_peak'] / 1e6:.1f} MB (sealed spool "
                    f"{bk['spool_bytes'] / 1e6:.1f} MB + archive); "
                    f"CPU: burrow {bk_cpu:.1f}s (with imports), ZooKeeper {bk_zk:.1f}s",
                ))
            print(f"backup pass {i + 1}: {bk['keys'] / bk['seconds']:,.0f} znodes/s", flush=True)

        # restore: warm-up passes go below a chroot of B; the timed one into B's empty root
        for i in range(args.warmup + 1):
            chroot = f"/warmup-{i}" if i < args.warmup else ""
            base = znode_count(b.url)
            zk_cpu = cpu_seconds(b.pid)
            rs, rs_rss, rs_cpu = run_phase("restore", "--source", b.url, "--workdir", str(run), "--chroot", chroot)
            rs_zk = cpu_seconds(b.pid) - zk_cpu
            created = znode_count(b.url) - base - (1 if chroot else 0)
            if rs["created"] != seeded or created != seeded:
                raise SystemExit(f"restore created {rs['created']} (server counts {created}), expected {seeded}")
            label = "restore" + (", cold server" if i == 0 and args.warmup else "")
            if i == 0 or i == args.warmup:
                rows.append(_row(
                    label, rs["created"], rs["seconds"], rs_rss, RESTORE_TARGET,
                    f"plan {rs['plan_s']:.2f}s, replay {rs['replay_s']:.2f}s; "
                    f"CPU: burrow {rs_cpu:.1f}s (with imports), ZooKeeper {rs_zk:.1f}s",
                ))
            print(f"restore pass {i + 1}: {rs['created'] / rs['seconds']:,.0f} znodes/s", flush=True)

        if args.flows:
            prefect = start_prefect(workdir / "prefect")
            servers.append(prefect)
            env = {"PREFECT_API_URL": prefect.url + "/api", "PREFECT_HOME": str(workdir / "prefect" / "prefect-home"),
                   "BURROW_STAGING_DIR": str(run / "staging")}
            fl, fl_rss, _ = run_phase("flows", "--source", a.url, "--target", b.url, "--workdir", str(run), env=env)
            rows.append(_row("backup flow (full)", fl["keys"], fl["backup_s"], fl_rss, BACKUP_TARGET,
                             "extract, compress, upload, verify, artifact"))
            rows.append(_row("restore flow (full)", fl["created"], fl["restore_s"], fl_rss, RESTORE_TARGET,
                             "download, validate, plan, replay, artifact"))

        load = os.getloadavg()
        print()
        print(f"{'phase':<24}{'znodes':>9}{'seconds':>9}{'znodes/s':>10}{'target':>10}{'peak RSS':>11}  notes")
        for name, n, secs, rss, target, notes in rows:
            rate = n / secs if secs else 0
            ok = "ok" if rate >= target else "BELOW"
            print(f"{name:<24}{n:>9}{secs:>9.2f}{rate:>10,.0f}{target:>7,} {ok:<5}{rss:>6.0f} MiB  {notes}")
        if args.flows:
            print("(flow rows: one child process ran both flows, so they share one peak RSS)")
        print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        return 0
    finally:
        for s in reversed(servers):
            s.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
