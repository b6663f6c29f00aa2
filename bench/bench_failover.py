"""Failover RTO for a ZooKeeper tree from an encrypted archive in S3 (a benchmark, not a test).

    .venv/bin/python bench/bench_failover.py [--n 100000] [--fanout 100] [--value-size 100] [--no-rehearsal]

Starts two local ZooKeeper servers, moto's S3 server and a Prefect API server
(burrow.testing.servers), seeds N znodes under /bench in the first ("DC-US"), backs it up with
the backup flow into S3, encrypted with a symmetric key, and stops it: the primary is down.
Then it runs the failover flow (in a child process, so its peak RSS is its own) from S3 into
the second, empty server ("DC-EU"), with ``--primary`` naming the stopped server, and prints:

* the end-to-end time of the failover flow call (the target: under 20 s for 100,000 znodes, not
  counting Prefect server start-up, which happens before the clock starts), the RTO the flow
  reports (``rto_s``) and each step's time (``steps_s``): target check, catalog, primary probe,
  download + validate, plan, replay, post-verify;
* the RPO the flow reports (the archive's age at failover);
* the rehearsal time for the same archive (the rehearse flow into an empty chroot of the second
  server), unless ``--no-rehearsal``.

What the target holds afterwards is counted independently (4lw ``mntr`` znode count).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_zookeeper import seed, znode_count  # noqa: E402  (bench/ is the script's directory)
from childproc import run_child  # noqa: E402

TARGET_S = 20.0
S3_KEY, S3_SECRET = "bench-key", "bench-secret"


def phase_failover(store: str, target: str, primary: str, key: str) -> dict:
    from flows.failover import failover

    t0 = time.monotonic()
    summary = failover(source="bench-us", store=store, into=target, primary=primary, key_files=[key])
    wall = time.monotonic() - t0
    keep = ("rto_s", "rpo_s", "steps_s", "created", "intermediate_created", "identical", "conflicts",
            "postverify_checked", "postverify_matching", "archive")
    return {"wall_s": wall, **{k: summary.get(k) for k in keep}}


def phase_rehearsal(store: str, scratch: str, key: str) -> dict:
    from flows.rehearse import rehearse

    t0 = time.monotonic()
    summary = rehearse(store=store, source="bench-us", scratch=scratch, key_files=[key])
    return {"wall_s": time.monotonic() - t0, "status": summary.get("status"),
            "restore_s": summary.get("restore_s"), "keys": summary.get("keys") or summary.get("archive_keys")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--fanout", type=int, default=100)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--no-rehearsal", action="store_true")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--primary", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:
        if args.phase == "failover":
            result = phase_failover(args.store, args.target, args.primary, args.key)
        else:
            result = phase_rehearsal(args.store, args.target, args.key)
        Path(args.result).write_text(json.dumps(result))
        return 0

    from burrow.testing.servers import start_moto, start_prefect, start_zookeeper

    workdir = Path(tempfile.mkdtemp(prefix="burrow-bench-failover-"))
    servers = []
    try:
        prefect = start_prefect(workdir / "prefect")
        servers.append(prefect)
        env = {
            "PREFECT_API_URL": prefect.url + "/api", "PREFECT_HOME": str(workdir / "prefect" / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "BURROW_STAGING_DIR": str(workdir / "staging"),
        }
        os.environ.update(env)
        us = start_zookeeper(workdir / "zk-us")
        servers.append(us)
        eu = start_zookeeper(workdir / "zk-eu")
        servers.append(eu)
        s3 = start_moto(workdir / "s3")
        servers.append(s3)
        print(f"seeding {args.n} znodes ({args.n // args.fanout} x {args.fanout}, {args.value_size}-byte values)...")
        print(f"  seeded in {seed(us.url, args.n, args.fanout, args.value_size):.1f}s")

        import boto3
        from botocore.config import Config

        boto3.client("s3", endpoint_url=s3.url, config=Config(s3={"addressing_style": "path"})).create_bucket(
            Bucket="bench-dc-eu")
        store = f"s3://bench-dc-eu/zookeeper?endpoint={s3.url}&addressing=path"
        from burrow.keys import keygen
        from flows.backup import backup

        key = workdir / "bench.key"
        keygen(key, x25519=False)
        t0 = time.monotonic()
        made = backup(source=f"zk://{us.url}", store=store, name="bench-us", root="/bench", key_file=str(key))
        print(f"backup (encrypted, into S3): {time.monotonic() - t0:.1f}s, {made.get('keys')} keys, {made['url']}")
        primary = f"zk://{us.url}"
        us.stop()  # DC-US is down
        servers.remove(us)
        before = znode_count(eu.url)

        result, rss, cpu = run_child(__file__, "failover", [
            "--store", store, "--target", f"zk://{eu.url}", "--primary", primary, "--key", str(key)])
        created = znode_count(eu.url) - before
        print()
        print(f"failover of {args.n} znodes from an encrypted archive in S3 into an empty ZooKeeper:")
        print(f"  end to end (flow call):  {result['wall_s']:.2f}s   (target < {TARGET_S:.0f}s: "
              f"{'met' if result['wall_s'] < TARGET_S else 'MISSED'})")
        print(f"  RTO reported (rto_s):    {result['rto_s']:.2f}s")
        print(f"  RPO reported (rpo_s):    {result['rpo_s']:.1f}s (the archive's age at failover)")
        for step, secs in (result.get("steps_s") or {}).items():
            print(f"    {step:<20} {secs:7.2f}s")
        print(f"  created {result['created']} (+{result['intermediate_created']} intermediate), identical "
              f"{result['identical']}, conflicts {result['conflicts']}; post-verify {result['postverify_matching']}"
              f"/{result['postverify_checked']} match")
        print(f"  znodes added to the target (mntr): {created}; peak RSS {rss:.0f} MiB, CPU {cpu:.1f}s")

        if not args.no_rehearsal:
            reh, rss, cpu = run_child(__file__, "rehearsal", [
                "--store", store, "--target", f"zk://{eu.url}/bench-rehearsal", "--key", str(key)])
            print()
            print(f"rehearsal of the same archive (into an empty chroot of the second server): {reh['wall_s']:.2f}s "
                  f"end to end, status {reh['status']}, restore {reh.get('restore_s')}s; peak RSS {rss:.0f} MiB")
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
