"""etcd v3 backup and restore throughput and peak memory (a benchmark, not a test).

    .venv/bin/python bench/bench_etcd.py [--n 200000] [--also-n 1000000] [--value-size 100]

Starts two local etcd servers (burrow.testing.servers), seeds N keys ``/bench/pNNNNN/cNNN``
(100 per "directory") with fixed-size values through etcd's own gRPC API, then measures,
each phase in its own child process so that its peak RSS is its own (os.wait4 rusage):

* backup:  extract_records + compress_spool (paginated point-in-time read, spool, zstd) -> keys/s
* etcdctl: ``ETCDCTL_API=3 etcdctl get --prefix /bench`` to /dev/null on the same data, and
           the ratio of our backup time to it
* restore: plan_restore + replay_plan into the second, empty server -> keys/s

``--also-n M`` then grows the source to M keys and measures backup (and etcdctl) again, to
show that a backup's peak RSS stays flat as the data grows.

Targets on the 2-core reference machine: backup >= 80,000 keys/s, restore >= 15,000 keys/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from childproc import run_child  # noqa: E402  (bench/ is the script's directory)

BACKUP_TARGET = 80_000
RESTORE_TARGET = 15_000


def _kv(endpoint: str):  # noqa: ANN202 - (channel, KV stub)
    import grpc
    from aetcd import rpc

    channel = grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", 256 << 20)])
    return channel, rpc.KVStub(channel)


def seed(endpoint: str, start: int, stop: int, value_size: int) -> float:
    """Put keys start..stop-1 (128 per txn, 16 txns in flight); return seconds."""
    from aetcd import rpc

    value = (b"0123456789abcdef" * (value_size // 16 + 1))[:value_size]
    channel, kv = _kv(endpoint)
    t0 = time.monotonic()
    pending = []
    for s in range(start, stop, 128):
        ops = [
            rpc.RequestOp(request_put=rpc.PutRequest(key=b"/bench/p%05d/c%03d" % (i // 100, i % 100), value=value))
            for i in range(s, min(stop, s + 128))
        ]
        pending.append(kv.Txn.future(rpc.TxnRequest(success=ops)))
        if len(pending) >= 16:
            pending.pop(0).result()
    for p in pending:
        p.result()
    channel.close()
    return time.monotonic() - t0


def count(endpoint: str) -> int:
    from aetcd import rpc

    channel, kv = _kv(endpoint)
    n = kv.Range(rpc.RangeRequest(key=b"/bench/", range_end=b"/bench0", count_only=True)).count
    channel.close()
    return n


def time_etcdctl(endpoint: str) -> float:
    env = {**os.environ, "ETCDCTL_API": "3"}
    t0 = time.monotonic()
    with open(os.devnull, "wb") as null:
        subprocess.run(["etcdctl", f"--endpoints=http://{endpoint}", "get", "--prefix", "/bench"],
                       stdout=null, check=True, env=env)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- phases (child processes)


def phase_backup(endpoint: str, workdir: Path) -> dict:
    from blocks.etcd import EtcdCluster
    from tasks.compress import compress_spool
    from tasks.extract import extract_records

    source = EtcdCluster(endpoints=[endpoint])
    t0 = time.monotonic()
    ex = extract_records(source, "/bench", workdir)
    t1 = time.monotonic()
    out = workdir / "bench.burrow"
    out.unlink(missing_ok=True)
    comp = compress_spool(ex, out, source_name="bench", level=3)
    t2 = time.monotonic()
    os.unlink(ex.spool)
    return {
        "keys": ex.keys, "extract_s": t1 - t0, "compress_s": t2 - t1, "seconds": t2 - t0,
        "archive_bytes": comp.size, "raw_bytes": ex.raw_bytes, "pages": ex.stats["info"].get("pages"),
    }


def phase_restore(endpoint: str, workdir: Path) -> dict:
    from blocks.etcd import EtcdCluster
    from tasks.plan import plan_restore
    from tasks.replay import replay_plan

    target = EtcdCluster(endpoints=[endpoint])
    t0 = time.monotonic()
    plan = plan_restore(workdir / "bench.burrow", target, workdir)
    t1 = time.monotonic()
    done = replay_plan(plan, target)
    t2 = time.monotonic()
    return {
        "keys": plan.to_create + plan.identical + plan.conflicts, "created": done.created,
        "plan_s": t1 - t0, "replay_s": t2 - t1, "seconds": t2 - t0,
    }


PHASES = {"backup": phase_backup, "restore": phase_restore}


def run_phase(name: str, endpoint: str, workdir: Path) -> tuple[dict, float]:
    """Run one phase in a child process; return its JSON result and its peak RSS in MiB."""
    result, rss, _cpu = run_child(__file__, name, ["--endpoint", endpoint, "--workdir", str(workdir)])
    return result, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="keys to seed (default 200000)")
    ap.add_argument("--also-n", type=int, default=0, help="then grow to this many keys and back up again")
    ap.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    ap.add_argument("--workdir", help="keep servers' data and archives here (default: a temp dir, removed)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:  # child process
        result = PHASES[args.phase](args.endpoint, Path(args.workdir))
        Path(args.result).write_text(json.dumps(result))
        return 0

    from burrow.testing.servers import start_etcd

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="burrow-bench-etcd-"))
    workdir.mkdir(parents=True, exist_ok=True)
    servers = []
    try:
        a = start_etcd(workdir / "etcd-a")
        servers.append(a)
        b = start_etcd(workdir / "etcd-b")
        servers.append(b)
        ea, eb = f"{a.host}:{a.port}", f"{b.host}:{b.port}"
        run = workdir / "run"
        run.mkdir(exist_ok=True)
        print(f"etcd A {ea}, B {eb}; seeding {args.n} keys ({args.value_size}-byte values)...", flush=True)
        s = seed(ea, 0, args.n, args.value_size)
        print(f"seeded {args.n} keys in {s:.1f}s ({args.n / s:,.0f}/s)", flush=True)

        rows = []
        bk, bk_rss = run_phase("backup", ea, run)
        assert bk["keys"] == args.n, bk
        ctl = time_etcdctl(ea)
        rows.append((f"backup {args.n}", bk["keys"], bk["seconds"], bk_rss, BACKUP_TARGET,
                     f"read {bk['extract_s']:.2f}s in {bk['pages']} pages, zstd {bk['compress_s']:.2f}s, "
                     f"{bk['raw_bytes'] / 1e6:.1f} MB -> {bk['archive_bytes'] / 1e6:.1f} MB; "
                     f"etcdctl get --prefix {ctl:.2f}s (ours/etcdctl {bk['seconds'] / ctl:.2f}x)"))
        rs, rs_rss = run_phase("restore", eb, run)
        on_b = count(eb)
        assert rs["created"] == args.n == on_b, (rs, on_b)
        rows.append((f"restore {args.n}", rs["created"], rs["seconds"], rs_rss, RESTORE_TARGET,
                     f"plan {rs['plan_s']:.2f}s, replay {rs['replay_s']:.2f}s (guarded txns of 128)"))
        if args.also_n > args.n:
            print(f"growing the source to {args.also_n} keys...", flush=True)
            s = seed(ea, args.n, args.also_n, args.value_size)
            print(f"seeded {args.also_n - args.n} more keys in {s:.1f}s", flush=True)
            bk2, bk2_rss = run_phase("backup", ea, run)
            assert bk2["keys"] == args.also_n, bk2
            ctl2 = time_etcdctl(ea)
            rows.append((f"backup {args.also_n}", bk2["keys"], bk2["seconds"], bk2_rss, BACKUP_TARGET,
                         f"read {bk2['extract_s']:.2f}s in {bk2['pages']} pages, zstd {bk2['compress_s']:.2f}s; "
                         f"etcdctl get --prefix {ctl2:.2f}s (ours/etcdctl {bk2['seconds'] / ctl2:.2f}x)"))

        print()
        print(f"{'phase':<18}{'keys':>9}{'seconds':>9}{'keys/s':>10}{'target':>9}{'peak RSS':>11}  notes")
        for name, n, secs, rss, target, notes in rows:
            rate = n / secs if secs else 0
            ok = "ok" if rate >= target else "BELOW"
            print(f"{name:<18}{n:>9}{secs:>9.2f}{rate:>10,.0f}{target:>7,}{ok:>3}{rss:>8.0f} MiB  {notes}")
        print(f"(load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
        return 0
    finally:
        for srv in reversed(servers):
            srv.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
