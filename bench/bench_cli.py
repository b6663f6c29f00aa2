"""The CLI's start-up cost, side by side with ``python -c "import prefect"`` (a benchmark, not a test).

    .venv/bin/python bench/bench_cli.py [--reps 5] [--cold-reps 1] [--big 100000] [--pyc | --no-pyc]

Starts two local ZooKeeper servers (burrow.testing.servers) and seeds a tiny tree (50 znodes),
then times, as a new user meets them, each command a fresh process (wall time, median of
``--reps`` runs interleaved so that load from other jobs hits them alike):

* ``python -c "import prefect"``: the yardstick;
* ``burrow --help``, ``burrow list STORE`` (no flow: target < 1 s);
* ``burrow backup`` of the tiny tree with Burrow's local Prefect server warm (target <= 1.5x
  the import), and cold (a fresh $BURROW_HOME: the command starts the server, which creates
  its database);
* ``burrow failover --dry-run`` with the local server warm, and the same with a dead
  ``PREFECT_API_URL`` (refusing connections; never answering): what the dead orchestrator
  adds (target < 5 s), first with the local server already running, then with it NOT running
  (the 3 a.m. case: the user always had a live PREFECT_API_URL), so that the command must
  start it: with an existing database (stopped with ``burrow server stop`` before each run)
  and on first use (a fresh $BURROW_HOME each run);
* the same failover with a live ``PREFECT_API_URL`` (the warm server) and Burrow's local
  server not running: the healthy path, which must not start the local server.

``--big N`` then seeds N znodes (N/100 parents of 100 children, as bench_zookeeper.py) and times
``burrow backup`` and ``burrow restore`` of that tree through the CLI against the same flows
called inside one process (flow call only, imports excluded), and prints their ratio.

``--pyc`` lets Python cache bytecode (in a private PYTHONPYCACHEPREFIX under the work dir, so
the venv is not touched, warmed before the first timed run) as it does on a normal install;
``--no-pyc`` makes every import compile from source (an empty private PYTHONPYCACHEPREFIX and
PYTHONDONTWRITEBYTECODE=1: the venv's own bytecode, if any, is ignored); by default the
environment's setting is kept (a venv installed with ``uv sync --compile-bytecode`` has bytecode
even with PYTHONDONTWRITEBYTECODE=1).
Every server and directory is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from burrow.testing.servers import free_port, silent_listener, start_zookeeper  # noqa: E402

PY = sys.executable
BURROW = str(Path(PY).parent / "burrow")


def timed(argv: list[str], env: dict[str, str], check: bool = True) -> float:
    """Wall seconds of one command, run as a fresh process."""
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=str(REPO))
    seconds = time.monotonic() - t0
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def burrow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([BURROW, *args], env=env, capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        raise SystemExit(f"burrow {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def seed_tiny(hosts: str, n: int = 50) -> None:
    from kazoo.client import KazooClient

    c = KazooClient(hosts=hosts, timeout=30)
    c.start(timeout=30)
    try:
        for i in range(n):
            c.create(f"/tiny/k{i:03d}", b"value-%d" % i, makepath=True)
    finally:
        c.stop()
        c.close()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


IN_PROCESS = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
from flows.backup import backup
from flows.restore import restore
from flows.common import install_prompt_heartbeats
install_prompt_heartbeats()  # as the CLI does: the same heartbeat on both sides of the comparison
t0 = time.monotonic()
b = backup(source={src!r}, store={store!r}, root="/bench", name="big-inproc", encryption=False)
t1 = time.monotonic()
r = restore(archive=b["url"], into={dst!r}, maps=["/bench={target}"])
t2 = time.monotonic()
print(json.dumps({{"keys": b["keys"], "backup_s": t1 - t0, "restore_s": t2 - t1, "created": r["created"]}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="runs per warm measurement (default 5)")
    ap.add_argument("--cold-reps", type=int, default=1, help="cold backups, each with a fresh server (default 1)")
    ap.add_argument("--big", type=int, default=0, help="also back up and restore this many znodes via the CLI")
    pyc = ap.add_mutually_exclusive_group()
    pyc.add_argument("--pyc", action="store_true", help="cache bytecode (private PYTHONPYCACHEPREFIX)")
    pyc.add_argument("--no-pyc", action="store_true", help="compile every import from source")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="burrow-bench-cli-"))
    servers = []
    homes: list[dict[str, str]] = []
    results: dict[str, object] = {"reps": args.reps, "pyc": args.pyc, "no_pyc": args.no_pyc}
    try:
        src = start_zookeeper(work / "zk-src")
        dst = start_zookeeper(work / "zk-dst")
        servers += [src, dst]
        seed_tiny(src.url)
        base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        base.update({"PREFECT_API_URL": "", "PREFECT_HOME": str(work / "client-prefect-home"),
                     "BURROW_STAGING_DIR": str(work / "staging"), "DO_NOT_TRACK": "1"})
        if args.pyc:
            base.pop("PYTHONDONTWRITEBYTECODE", None)
            base["PYTHONPYCACHEPREFIX"] = str(work / "pyc")
            timed([BURROW, "backup", "--help"], base)
            warm_up = {**base, "BURROW_HOME": str(work / "home-warm-up"), "BURROW_SERVER_PORT": str(free_port())}
            burrow("server", "start", env=warm_up)  # the server's modules too
            burrow("server", "stop", env=warm_up)
        elif args.no_pyc:
            base["PYTHONDONTWRITEBYTECODE"] = "1"
            base["PYTHONPYCACHEPREFIX"] = str(work / "no-pyc")  # stays empty: nothing is found there

        def home(name: str) -> dict[str, str]:
            env = {**base, "BURROW_HOME": str(work / name), "BURROW_SERVER_PORT": str(free_port())}
            homes.append(env)
            return env

        store = work / "store"
        store.mkdir()
        backup_args = ["backup", f"zk://{src.url}/tiny", "--to", str(store), "--name", "bench-tiny",
                       "--no-encryption"]

        # cold: every run meets no server (a fresh home: the server creates its database)
        cold = []
        for i in range(args.cold_reps):
            env = home(f"home-cold-{i}")
            cold.append(timed([BURROW, *backup_args], env))
            burrow("server", "stop", env=env)
        # warm: the local server of one home, started by a first (untimed) command
        warm_env = home("home-warm")
        burrow(*backup_args, env=warm_env)
        samples: dict[str, list[float]] = {k: [] for k in ("import", "help", "list", "backup")}
        for _ in range(args.reps):  # interleaved: load from other jobs hits every command alike
            samples["import"].append(timed([PY, "-c", "import prefect"], base))
            samples["help"].append(timed([BURROW, "--help"], warm_env))
            samples["list"].append(timed([BURROW, "list", str(store)], warm_env))
            samples["backup"].append(timed([BURROW, *backup_args], warm_env))

        # failover --dry-run: local server warm, then with a dead PREFECT_API_URL
        hang = silent_listener()
        fo = ["failover", "bench-tiny", "--from", str(store), "--into", f"zk://{dst.url}/failover", "--dry-run",
              "--force"]
        silent_url = f"http://127.0.0.1:{hang.getsockname()[1]}/api"
        # a home whose database exists (one untimed start) but whose server is stopped
        stopped_env = home("home-stopped")
        burrow("server", "start", env=stopped_env)
        burrow("server", "stop", env=stopped_env)
        warm_api = json.loads(burrow("server", "status", "--json", env=warm_env).stdout)["api_url"]
        # the local server is private: another client of it needs its credential
        warm_auth = (Path(warm_env["BURROW_HOME"]) / "server-credential").read_text().strip()
        fail: dict[str, list[float]] = {k: [] for k in (
            "warm", "refused", "silent", "stopped_refused", "stopped_silent", "first_refused", "first_silent",
            "healthy_remote")}
        for i in range(args.reps):  # interleaved, as above
            fail["warm"].append(timed([BURROW, *fo], warm_env))
            fail["refused"].append(timed([BURROW, *fo], {**warm_env,
                                          "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}))
            fail["silent"].append(timed([BURROW, *fo], {**warm_env, "PREFECT_API_URL": silent_url}))
            for kind in ("refused", "silent"):
                dead = silent_url if kind == "silent" else f"http://127.0.0.1:{free_port()}/api"
                # the local server is not running: it was stopped (its database exists) ...
                fail[f"stopped_{kind}"].append(timed([BURROW, *fo], {**stopped_env, "PREFECT_API_URL": dead}))
                burrow("server", "stop", env=stopped_env)
                # ... or this is Burrow's first use (no home yet: the server creates its database)
                first_env = home(f"home-first-{kind}-{i}")
                fail[f"first_{kind}"].append(timed([BURROW, *fo], {**first_env, "PREFECT_API_URL": dead}))
                burrow("server", "stop", env=first_env)
            # a live PREFECT_API_URL and no local server: it must stay that way
            fail["healthy_remote"].append(timed([BURROW, *fo], {**stopped_env, "PREFECT_API_URL": warm_api,
                                                                  "PREFECT_API_AUTH_STRING": warm_auth}))
            status = json.loads(burrow("server", "status", "--json", env=stopped_env).stdout)
            if status["running"]:
                raise SystemExit("a failover with a live PREFECT_API_URL left Burrow's local server running")
        hang.close()

        imp = median(samples["import"])
        rows = [
            ("python -c 'import prefect'", imp, "yardstick"),
            ("burrow --help", median(samples["help"]), "target < 1 s"),
            ("burrow list STORE", median(samples["list"]), "target < 1 s"),
            ("burrow backup (tiny, warm server)", median(samples["backup"]), "target <= 1.5x import"),
            ("burrow backup (tiny, cold: no server yet)", median(cold), "starts the local server"),
            ("burrow failover --dry-run (warm)", median(fail["warm"]), ""),
            ("  ... PREFECT_API_URL refusing", median(fail["refused"]),
             f"adds {median(fail['refused']) - median(fail['warm']):+.2f} s (target < 5 s)"),
            ("  ... PREFECT_API_URL never answering", median(fail["silent"]),
             f"adds {median(fail['silent']) - median(fail['warm']):+.2f} s (target < 5 s)"),
        ]
        warm_fo = median(fail["warm"])
        for key, label in (("stopped_refused", "refusing, local server stopped"),
                           ("stopped_silent", "never answering, local server stopped"),
                           ("first_refused", "refusing, first use (fresh home)"),
                           ("first_silent", "never answering, first use (fresh home)")):
            rows.append((f"  ... {label}", median(fail[key]),
                         f"adds {median(fail[key]) - warm_fo:+.2f} s (target < 5 s)"))
        rows.append(("  ... live PREFECT_API_URL, no local server", median(fail["healthy_remote"]),
                     f"{median(fail['healthy_remote']) - warm_fo:+.2f} s vs warm; no local server started"))
        mode = ("private cache (--pyc)" if args.pyc else "none, every import compiled (--no-pyc)" if args.no_pyc
                else "as installed" + (" (PYTHONDONTWRITEBYTECODE=1)" if os.environ.get("PYTHONDONTWRITEBYTECODE")
                                       else ""))
        print(f"\nCLI start-up, median of {args.reps} (cold: {args.cold_reps}); bytecode: {mode}")
        print(f"{'command':50} {'seconds':>8} {'x import':>9}  note")
        for name, s, note in rows:
            print(f"{name:50} {s:8.2f} {s / imp:9.2f}  {note}")
        results["samples"] = samples
        results["cold"] = cold
        results["failover"] = fail

        if args.big:
            from bench_zookeeper import seed

            seeded = seed(src.url, args.big, 100, 100)
            big_store = work / "big-store"
            big_store.mkdir()
            state = json.loads(burrow("server", "status", "--json", env=warm_env).stdout)
            inproc_env = {**warm_env, "PREFECT_API_URL": state["api_url"], "PREFECT_API_AUTH_STRING": warm_auth}

            def in_process(target: str) -> dict:
                code = IN_PROCESS.format(repo=str(REPO), src=f"zk://{src.url}", store=str(big_store),
                                         dst=f"zk://{dst.url}", target=target)
                proc = subprocess.run([PY, "-c", code], env=inproc_env, capture_output=True, text=True,
                                      cwd=str(REPO))
                if proc.returncode != 0:
                    raise SystemExit(f"in-process flows failed:\n{proc.stderr[-3000:]}")
                return json.loads(proc.stdout.strip().splitlines()[-1])

            # in-process, CLI, in-process again: ZooKeeper warms up over the first run, so the
            # CLI is compared with the mean of the runs around it
            before = in_process("/bench-inproc-1")
            t0 = time.monotonic()
            b = burrow("backup", f"zk://{src.url}", "--root", "/bench", "--to", str(big_store), "--name", "big-cli",
                       "--no-encryption", env=warm_env)
            t1 = time.monotonic()
            url = b.stdout.strip().splitlines()[-1]
            burrow("restore", url, "--into", f"zk://{dst.url}", "--map", "/bench=/bench-cli", env=warm_env)
            t2 = time.monotonic()
            after = in_process("/bench-inproc-2")
            inproc = {k: (before[k] + after[k]) / 2 for k in ("backup_s", "restore_s")}
            inproc["keys"] = before["keys"]
            cli_b, cli_r = t1 - t0, t2 - t1
            print(f"\n{inproc['keys']:,} znodes (seeded in {seeded:.1f} s): CLI (whole process) vs the flow "
                  "called inside one process (mean of a run before and one after)")
            print(f"{'':10} {'CLI s':>8} {'in-process s':>13} {'ratio':>7}")
            print(f"{'backup':10} {cli_b:8.2f} {inproc['backup_s']:13.2f} {cli_b / inproc['backup_s']:7.2f}")
            print(f"{'restore':10} {cli_r:8.2f} {inproc['restore_s']:13.2f} {cli_r / inproc['restore_s']:7.2f}")
            results["big"] = {"cli_backup_s": cli_b, "cli_restore_s": cli_r, "before": before, "after": after}
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        for env in homes:
            subprocess.run([BURROW, "server", "stop"], env=env, capture_output=True, cwd=str(REPO))
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
