"""Consul KV backup and restore throughput and peak memory (a benchmark, not a test).

    .venv/bin/python bench/bench_consul.py [--n 100000] [--value-size 100]

Starts two local Consul agents (burrow.testing.servers, dev mode), seeds N keys
``bench/pNNNN/cNNN`` (100 per "folder") with fixed-size values through Consul's own
/v1/txn, then measures, each phase in its own child process so that its peak RSS is its
own (os.wait4 rusage):

* backup:  extract_records + compress_spool (one consistent recursive read, spool, zstd) -> keys/s
* export:  ``consul kv export bench/`` to /dev/null on the same data, and the ratio of our
           backup time to it
* restore: plan_restore + replay_plan into the second, empty agent (cas-0 txns of 64) -> keys/s

``--agent dev`` uses the test harness's agents (``consul agent -dev``: in-memory, and it indents
every JSON answer); ``--agent server`` starts single-node server agents with a data directory,
as in production (``-server -bootstrap-expect=1``); ``--agent both`` (the default) runs both.

Targets on the 2-core reference machine: backup >= 80,000 keys/s, restore >= 15,000 keys/s.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from childproc import run_child  # noqa: E402  (bench/ is the script's directory)

BACKUP_TARGET = 80_000
RESTORE_TARGET = 15_000


def seed(url: str, n: int, value_size: int) -> float:
    """Set n keys, 64 per /v1/txn, 8 in flight; return seconds."""
    import httpx

    value = base64.b64encode((b"0123456789abcdef" * (value_size // 16 + 1))[:value_size]).decode()
    client = httpx.Client(base_url=url, timeout=60, trust_env=False)

    def put(start: int) -> None:
        ops = [{"KV": {"Verb": "set", "Key": f"bench/p{i // 100:04d}/c{i % 100:03d}", "Value": value}}
               for i in range(start, min(n, start + 64))]
        client.put("/v1/txn", json=ops).raise_for_status()

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(0, n, 64)))
    client.close()
    return time.monotonic() - t0


class ServerAgent:
    """A single-node Consul server agent (not -dev): data on disk, compact JSON answers."""

    def __init__(self, workdir: Path) -> None:
        from burrow.testing.servers import HOST, consul_binary, free_port

        workdir.mkdir(parents=True, exist_ok=True)
        self.host, self.port = HOST, free_port()
        ports = {"http": self.port, "server": free_port(), "serf_lan": free_port(), "serf_wan": free_port(),
                 "dns": -1, "grpc": -1, "https": -1}
        config = {
            "node_name": f"bench-{self.port}", "bind_addr": HOST, "client_addr": HOST, "advertise_addr": HOST,
            "data_dir": str(workdir / "data"), "server": True, "bootstrap_expect": 1,
            "disable_update_check": True, "log_level": "WARN", "ports": ports,
        }
        (workdir / "consul.json").write_text(json.dumps(config))
        self.log = open(workdir / "consul.log", "wb")
        self.proc = subprocess.Popen([consul_binary(), "agent", "-config-file", str(workdir / "consul.json")],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://{self.host}:{self.port}"
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + "/v1/status/leader", timeout=2, trust_env=False)
                if r.status_code == 200 and r.text.strip() not in ("", '""'):
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        self.stop()
        raise SystemExit(f"the Consul server agent did not become ready; see {workdir / 'consul.log'}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.log.close()


def count(url: str) -> int:
    import httpx

    r = httpx.get(url + "/v1/kv/bench/", params={"keys": ""}, timeout=60, trust_env=False)
    return len(r.json()) if r.status_code == 200 else 0


def time_export(url: str) -> float:
    from burrow.testing.servers import consul_binary

    env = {**os.environ, "CONSUL_HTTP_ADDR": url.split("://", 1)[1]}
    t0 = time.monotonic()
    with open(os.devnull, "wb") as null:
        subprocess.run([consul_binary(), "kv", "export", "bench/"], stdout=null, check=True, env=env)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- phases (child processes)


def phase_backup(address: str, workdir: Path) -> dict:
    from blocks.consul import ConsulCluster
    from tasks.compress import compress_spool
    from tasks.extract import extract_records

    source = ConsulCluster(address=address)
    t0 = time.monotonic()
    ex = extract_records(source, "bench", workdir)
    t1 = time.monotonic()
    comp = compress_spool(ex, workdir / "bench.burrow", source_name="bench", level=3)
    t2 = time.monotonic()
    os.unlink(ex.spool)
    return {
        "keys": ex.keys, "extract_s": t1 - t0, "compress_s": t2 - t1, "seconds": t2 - t0,
        "archive_bytes": comp.size, "raw_bytes": ex.raw_bytes,
    }


def phase_restore(address: str, workdir: Path) -> dict:
    from blocks.consul import ConsulCluster
    from tasks.plan import plan_restore
    from tasks.replay import replay_plan

    target = ConsulCluster(address=address)
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


def run_phase(name: str, address: str, workdir: Path) -> tuple[dict, float]:
    """Run one phase in a child process; return its JSON result and its peak RSS in MiB."""
    result, rss, _cpu = run_child(__file__, name, ["--address", address, "--workdir", str(workdir)])
    return result, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="keys to seed (default 100000)")
    ap.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    ap.add_argument("--agent", choices=["dev", "server", "both"], default="both",
                    help="dev agents (the test harness's), single-node server agents, or both (default)")
    ap.add_argument("--workdir", help="keep servers' data and archives here (default: a temp dir, removed)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:  # child process
        result = PHASES[args.phase](args.address, Path(args.workdir))
        Path(args.result).write_text(json.dumps(result))
        return 0

    from burrow.testing.servers import start_consul

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="burrow-bench-consul-"))
    workdir.mkdir(parents=True, exist_ok=True)
    servers: list = []
    rows = []
    try:
        for agent in (["dev", "server"] if args.agent == "both" else [args.agent]):
            if agent == "dev":
                a, b = start_consul(workdir / "dev-a"), start_consul(workdir / "dev-b")
            else:
                a, b = ServerAgent(workdir / "server-a"), ServerAgent(workdir / "server-b")
            servers += [a, b]
            run = workdir / f"run-{agent}"
            run.mkdir(exist_ok=True)
            print(f"[{agent}] Consul A {a.url}, B {b.url}; seeding {args.n} keys ({args.value_size}-byte values)...",
                  flush=True)
            s = seed(a.url, args.n, args.value_size)
            print(f"[{agent}] seeded {args.n} keys in {s:.1f}s ({args.n / s:,.0f}/s)", flush=True)

            bk, bk_rss = run_phase("backup", f"{a.host}:{a.port}", run)
            assert bk["keys"] == args.n, bk
            export = time_export(a.url)
            rs, rs_rss = run_phase("restore", f"{b.host}:{b.port}", run)
            on_b = count(b.url)
            assert rs["created"] == args.n == on_b, (rs, on_b)
            rows += [
                (f"{agent}: backup {args.n}", bk["keys"], bk["seconds"], bk_rss, BACKUP_TARGET,
                 f"read {bk['extract_s']:.2f}s, zstd {bk['compress_s']:.2f}s, "
                 f"{bk['raw_bytes'] / 1e6:.1f} MB -> {bk['archive_bytes'] / 1e6:.1f} MB; "
                 f"consul kv export {export:.2f}s (ours/export {bk['seconds'] / export:.2f}x)"),
                (f"{agent}: restore {args.n}", rs["created"], rs["seconds"], rs_rss, RESTORE_TARGET,
                 f"plan {rs['plan_s']:.2f}s, replay {rs['replay_s']:.2f}s (cas-0 txns of 64)"),
            ]
        print()
        print(f"{'phase':<26}{'keys':>9}{'seconds':>9}{'keys/s':>10}{'target':>9}{'peak RSS':>11}  notes")
        for name, n, secs, rss, target, notes in rows:
            rate = n / secs if secs else 0
            ok = "ok" if rate >= target else "BELOW"
            print(f"{name:<26}{n:>9}{secs:>9.2f}{rate:>10,.0f}{target:>7,}{ok:>3}{rss:>8.0f} MiB  {notes}")
        print(f"(load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
        return 0
    finally:
        for srv in reversed(servers):
            srv.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
