"""The restore plan into an empty target, and the whole-CLI restore around it (issue 20, item 6).

    .venv/bin/python bench/bench_plan.py [--n 100000] [--runs 5] [--before COMMIT]

Starts two local ZooKeeper servers and a Prefect server, seeds N znodes under /bench in
ZooKeeper A (bench_zookeeper.seed: 1,000 x 100 with 100-byte values, 101,001 znodes), backs
them up once with ``burrow backup --no-encryption`` into a local store, then times:

* plan:  ``plan_restore`` alone (a child process each run) into a chroot of B that does not
         exist yet; its lookups are counted (the session's ``lookup`` wrapped). With
         ``--before COMMIT``, tasks/plan.py of that commit is timed the same way, interleaved;
* cli:   the whole ``burrow restore ARCHIVE --into zk://B/<fresh chroot> --json`` command
         (a subprocess: start-up, Prefect flow, download, validate, plan, replay), wall time;
* fresh: the same command into the root of a ZooKeeper server started for that run (a cold JVM);
         each CLI row also counts work the machine's load does not change much: the command's CPU
         seconds and the ZooKeeper server's (/proc). With ``--cli-before COMMIT`` the whole CLI of
         that commit (git archive) is timed the same way, interleaved with this tree's;
* burry: with ``--burry BIN`` (a burry binary: GOPATH build of github.com/mhausenblas/burry.sh with
         its vendored dependencies, Go 1.19), ``burry -o backup -t local`` of server A once, then
         ``burry -o restore -t local`` into a fresh server, timed the same way, beside Burrow's.

Medians are printed with the machine's load average (the machine may be shared).
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
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench_zookeeper import seed, znode_count  # noqa: E402  (bench/ is the script's directory)
from childproc import cli_env, run_child  # noqa: E402

from burrow import proc  # noqa: E402  (the checkout's own, from REPO)

BURROW = str(REPO / ".venv" / "bin" / "burrow")


def phase_plan(hosts: str, archive: Path, workdir: Path, chroot: str, module: str | None) -> dict:
    """plan_restore alone into ``chroot`` (``module``: a file holding another tasks/plan.py)."""
    import importlib.util

    from blocks.zookeeper import ZooKeeperCluster, ZooKeeperSession

    if module:
        spec = importlib.util.spec_from_file_location("plan_before", module)
        assert spec is not None and spec.loader is not None
        plan_mod = importlib.util.module_from_spec(spec)
        sys.modules["plan_before"] = plan_mod  # (dataclasses look their module up)
        spec.loader.exec_module(plan_mod)
    else:
        import tasks.plan as plan_mod
    asked = [0, 0]
    original = ZooKeeperSession.lookup

    def lookup(self: ZooKeeperSession, keys: list[bytes]) -> list[bytes | None]:
        asked[0] += 1
        asked[1] += len(keys)
        return original(self, keys)

    ZooKeeperSession.lookup = lookup  # type: ignore[method-assign]
    target = ZooKeeperCluster(hosts=[hosts], chroot=chroot)
    t0 = time.monotonic()
    p = plan_mod.plan_restore(archive, target, workdir)
    seconds = time.monotonic() - t0
    return {"seconds": seconds, "to_create": p.to_create, "identical": p.identical, "conflicts": p.conflicts,
            "lookup_calls": asked[0], "lookup_keys": asked[1]}


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (/proc/PID/stat): the work a
    ZooKeeper server did for a restore, which the machine's load does not change much."""
    return proc.cpu_seconds(pid) or 0.0


def cli_restore(url: str, into: str, env: dict[str, str], tree: Path | None = None,
                server_pid: int | None = None) -> tuple[float, dict, dict]:
    """``burrow restore URL --into INTO --json`` as a subprocess (from ``tree``, a checkout of
    another commit, when given): its wall time, its summary, and the work counted: the
    command's CPU seconds (os.wait4) and the ZooKeeper server's (``server_pid``)."""
    argv = [BURROW] if tree is None else [sys.executable, "-c",
                                          f"import sys; sys.path.insert(0, {str(tree)!r}); from cli import run; run()"]
    before = server_cpu(server_pid) if server_pid else 0.0
    t0 = time.monotonic()
    proc = subprocess.Popen([*argv, "restore", url, "--into", into, "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(tree or REPO))
    out, err = proc.communicate(timeout=600)
    seconds = time.monotonic() - t0
    # (communicate reaped it: its rusage is in RUSAGE_CHILDREN's growth, read per call)
    if proc.returncode != 0:
        raise SystemExit(f"restore failed ({proc.returncode}): {err[-2000:]}")
    work = {"server_cpu": (server_cpu(server_pid) - before) if server_pid else None}
    return seconds, json.loads(out), work


def children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--fanout", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each measurement (default 5)")
    ap.add_argument("--fresh-runs", type=int, default=3, help="runs into a fresh server (default 3)")
    ap.add_argument("--before", help="also time tasks/plan.py of this commit (plan only)")
    ap.add_argument("--burry", help="a burry binary: also time its restore into a fresh server")
    ap.add_argument("--burry-runs", type=int, default=1)
    ap.add_argument("--cli-before", metavar="COMMIT",
                    help="also time the whole CLI of this commit (git archive), interleaved with this tree's")
    ap.add_argument("--workdir")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--archive", help=argparse.SUPPRESS)
    ap.add_argument("--chroot", help=argparse.SUPPRESS)
    ap.add_argument("--module", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:  # child process
        result = phase_plan(args.source, Path(args.archive), Path(args.workdir), args.chroot, args.module or None)
        Path(args.result).write_text(json.dumps(result))
        return 0

    from burrow.testing.servers import start_prefect, start_zookeeper

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="burrow-bench-plan-"))
    workdir.mkdir(parents=True, exist_ok=True)
    servers = []
    loads = [os.getloadavg()]
    try:
        a = start_zookeeper(workdir / "zk-a")
        servers.append(a)
        b = start_zookeeper(workdir / "zk-b")
        servers.append(b)
        prefect = start_prefect(workdir / "prefect")
        servers.append(prefect)
        env = cli_env(workdir, prefect.url)
        seed_s = seed(a.url, args.n, args.fanout, 100)
        seeded = args.n // args.fanout * (args.fanout + 1) + 1
        print(f"seeded {seeded} znodes in {seed_s:.1f}s", flush=True)
        store = workdir / "store"
        store.mkdir()
        proc = subprocess.run([BURROW, "backup", f"zk://{a.url}", "--root", "/bench", "--to", str(store),
                               "--name", "bench", "--no-encryption", "--json"],
                              env=env, capture_output=True, text=True, timeout=600, check=True)
        url = json.loads(proc.stdout)["url"]
        archive = next(store.rglob("*.burrow"))
        print(f"archive {url}", flush=True)

        before_mod = None
        if args.before:
            before_mod = workdir / "plan_before.py"
            before_mod.write_text(subprocess.run(["git", "-C", str(REPO), "show", f"{args.before}:tasks/plan.py"],
                                                 capture_output=True, text=True, check=True).stdout)

        def plan_once(module: Path | None) -> dict:
            chroot = "/plan-" + uuid.uuid4().hex[:8]  # never created: a plan writes nothing
            run = workdir / ("plan-" + uuid.uuid4().hex[:8])
            run.mkdir()
            res, rss, _ = run_child(__file__, "plan", ["--source", b.url, "--archive", str(archive),
                                                       "--workdir", str(run), "--chroot", chroot,
                                                       "--module", str(module or "")], None)
            shutil.rmtree(run, ignore_errors=True)
            if res["to_create"] != seeded:
                raise SystemExit(f"plan found {res['to_create']} to create, expected {seeded}")
            res["rss"] = rss
            return res

        plans: dict[str, list[dict]] = {"after": [], "before": []}
        plan_once(None)  # warm-up (page cache, JIT of the server)
        for _ in range(args.runs):
            plans["after"].append(plan_once(None))
            if before_mod is not None:
                plans["before"].append(plan_once(before_mod))
        loads.append(os.getloadavg())

        before_tree = None
        if args.cli_before:  # the whole CLI of another commit, timed interleaved with this one's
            before_tree = workdir / "before-tree"
            before_tree.mkdir()
            archive_tar = subprocess.run(["git", "-C", str(REPO), "archive", args.cli_before], capture_output=True,
                                         check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before_tree)], input=archive_tar, check=True)
        trees: list[tuple[str, Path | None]] = [("after", None)] + ([("before", before_tree)] if before_tree else [])

        def timed(into: str, tree: Path | None, server_pid: int) -> dict:
            c0 = children_cpu()
            secs, summary, work = cli_restore(url, into, env, tree, server_pid)
            if summary.get("created") != seeded:
                raise SystemExit(f"restore created {summary.get('created')}, expected {seeded}")
            return {"seconds": secs, "cli_cpu": children_cpu() - c0, **work}

        cli_restore(url, f"zk://{b.url}/warmup", env)  # warm-up: the server's JIT
        cli: dict[str, list[dict]] = {name: [] for name, _ in trees}
        for i in range(args.runs):
            for name, tree in trees:
                base = znode_count(b.url)
                row = timed(f"zk://{b.url}/cli-{name}-{i}", tree, b.pid)
                created = znode_count(b.url) - base - 1  # the chroot itself
                if created != seeded:
                    raise SystemExit(f"the server counts {created} new znodes, expected {seeded}")
                cli[name].append(row)
                print(f"cli restore ({name}) {i + 1}: {row['seconds']:.2f}s, CLI CPU {row['cli_cpu']:.2f}s, "
                      f"server CPU {row['server_cpu']:.2f}s", flush=True)
        loads.append(os.getloadavg())

        fresh: dict[str, list[dict]] = {name: [] for name, _ in trees}
        for i in range(args.fresh_runs):
            for name, tree in trees:
                z = start_zookeeper(workdir / f"zk-fresh-{name}-{i}")
                try:
                    row = timed(f"zk://{z.url}", tree, z.pid)
                finally:
                    z.stop()
                fresh[name].append(row)
                print(f"cli restore ({name}) into a fresh server {i + 1}: {row['seconds']:.2f}s, "
                      f"CLI CPU {row['cli_cpu']:.2f}s, server CPU {row['server_cpu']:.2f}s", flush=True)
        loads.append(os.getloadavg())

        burry: list[float] = []
        if args.burry:
            bdir = workdir / "burry"
            bdir.mkdir()
            t0 = time.monotonic()
            out = subprocess.run([args.burry, "-o", "backup", "-e", a.url, "-t", "local", "--timeout=30"],
                                 cwd=bdir, capture_output=True, text=True, timeout=3600)
            snap = next(bdir.glob("*.zip")).stem
            print(f"burry backup: {time.monotonic() - t0:.2f}s (snapshot {snap}, rc {out.returncode})", flush=True)
            for i in range(args.burry_runs):
                z = start_zookeeper(workdir / f"zk-burry-{i}")
                try:
                    base = znode_count(z.url)
                    c0, s0 = children_cpu(), server_cpu(z.pid)
                    t0 = time.monotonic()
                    out = subprocess.run([args.burry, "-o", "restore", "-e", z.url, "-t", "local", "-s", snap,
                                          "--timeout=30"], cwd=bdir, capture_output=True, text=True, timeout=3600)
                    secs = time.monotonic() - t0
                    work = f"burry CPU {children_cpu() - c0:.2f}s, server CPU {server_cpu(z.pid) - s0:.2f}s"
                    created = znode_count(z.url) - base
                finally:
                    z.stop()
                if created < seeded:
                    raise SystemExit(f"burry restored {created} znodes (rc {out.returncode}): {out.stderr[-1500:]}")
                burry.append(secs)
                print(f"burry restore into a fresh server {i + 1}: {secs:.2f}s ({created} znodes; {work})", flush=True)
            loads.append(os.getloadavg())

        print()
        for name, rows in plans.items():
            if rows:
                secs = [r["seconds"] for r in rows]
                print(f"plan ({name}): median {statistics.median(secs):.2f}s of {', '.join(f'{s:.2f}' for s in secs)}; "
                      f"lookup calls {rows[-1]['lookup_calls']}, keys looked up {rows[-1]['lookup_keys']}; "
                      f"peak RSS {max(r['rss'] for r in rows):.0f} MiB")

        def med(rows: list[dict], what: str) -> str:
            return (f"median {statistics.median(r[what] for r in rows):.2f}s of "
                    + ", ".join(f"{r[what]:.2f}" for r in rows))

        for name, rows in cli.items():
            print(f"whole-CLI restore ({name}) into a fresh chroot: {med(rows, 'seconds')}; CLI CPU "
                  f"{med(rows, 'cli_cpu')}; server CPU {med(rows, 'server_cpu')}")
        for name, rows in fresh.items():
            if rows:
                print(f"whole-CLI restore ({name}) into a fresh server: {med(rows, 'seconds')}; CLI CPU "
                      f"{med(rows, 'cli_cpu')}; server CPU {med(rows, 'server_cpu')}")
        if burry:
            print(f"burry restore into a fresh server: median {statistics.median(burry):.2f}s of "
                  f"{', '.join(f'{s:.2f}' for s in burry)}")
            if fresh["after"]:
                for name, rows in fresh.items():
                    ratio = statistics.median(burry) / statistics.median(r["seconds"] for r in rows)
                    print(f"ratio burry / Burrow ({name}, fresh server medians): {ratio:.1f}x")
        print(f"{seeded} znodes; {os.cpu_count()} CPUs; load average (1/5/15 min) at start, after plans, "
              f"after CLI, after fresh{', after burry' if burry else ''}: " + "; ".join(f"{x:.2f} {y:.2f} {z:.2f}" for x, y, z in loads))
        return 0
    finally:
        for s in reversed(servers):
            s.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
