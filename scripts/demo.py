"""Burrow demo: DC-US's ZooKeeper backed up (encrypted) into object storage in DC-EU, verified,
and rebuilt in DC-EU from there.

Everything is real: two ZooKeeper servers, an S3 server playing "object storage in DC-EU"
(moto's server over HTTP, since no MinIO installs here: the same commands work against MinIO or
AWS), a Prefect API server (so every run lands in run history), and the ``burrow`` command.
Work files go to ./demo-work (removed on the next run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kazoo.client import KazooClient  # noqa: E402
from kazoo.security import make_digest_acl  # noqa: E402

from burrow.naming import split_userinfo  # noqa: E402
from burrow.testing.servers import start_moto, start_prefect, start_zookeeper  # noqa: E402

WORK = REPO / "demo-work"
BURROW = str(Path(sys.executable).parent / "burrow")


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def shown(arg: str) -> str:
    """An argument as the transcript shows it: a URL's password masked (zk://ops:***@host:port)."""
    userinfo, bare = split_userinfo(arg)
    if userinfo is None:
        return arg
    scheme, _, rest = bare.partition("://")
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{rest}"


def burrow(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    print("$ burrow " + " ".join(shown(a) for a in args), flush=True)
    proc = subprocess.run([BURROW, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    # stderr holds Burrow's own stage lines (Prefect's engine lines appear only with -v)
    for line in proc.stderr.splitlines():
        print("  " + line)
    out = proc.stdout.rstrip().splitlines()
    if len(out) > 24:  # long listings (a dry run's plan): show the head and the totals
        out = out[:16] + [f"... ({len(out) - 20} more lines)"] + out[-4:]
    if out:
        print("\n".join(out))
    print(f"(exit code {proc.returncode})", flush=True)
    if check and proc.returncode not in (0,):
        raise SystemExit(f"demo failed: burrow {args[0]} exited {proc.returncode}")
    return proc


def seed(hosts: str) -> int:
    c = KazooClient(hosts=hosts)
    c.start(timeout=15)
    try:
        c.create("/app", b"payments platform", makepath=True)
        c.create("/app/config/database", b"jdbc:postgresql://db.us.internal:5432/payments", makepath=True)
        c.create("/app/config/feature-flags", b'{"new-checkout": true, "dark-mode": false}')
        c.create("/app/config/empty", b"")
        c.create("/app/certs/ca.der", bytes(range(256)) * 4, makepath=True)
        c.create("/app/services/api/leader", b"api-1", makepath=True)
        for i in range(3):
            c.create("/app/queue/job-", f"job {i}".encode(), sequence=True, makepath=True)
        for i in range(200):
            c.create(f"/app/shards/shard-{i:03d}", f"owner=node-{i % 7}".encode(), makepath=True)
        c.create("/app/services/api/members/api-1", b"10.0.0.1:8080", ephemeral=True, makepath=True)
        c.add_auth("digest", "ops:demo-password")
        c.create("/app/secure", b"only ops may read", acl=[make_digest_acl("ops", "demo-password", all=True)])
        return len(c.get_children("/app/shards"))
    finally:
        c.stop()
        c.close()


def count_nodes(hosts: str, root: str) -> dict[str, bytes]:
    c = KazooClient(hosts=hosts, auth_data=[("digest", "ops:demo-password")])
    c.start(timeout=15)
    out: dict[str, bytes] = {}
    try:
        def walk(p: str) -> None:
            data, stat = c.get(p)
            if not stat.ephemeralOwner:
                out[p] = data
                for ch in c.get_children(p):
                    walk(p + "/" + ch)
        walk(root)
    finally:
        c.stop()
        c.close()
    return out


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    banner("Starting servers: Prefect API, ZooKeeper dc-us, ZooKeeper dc-eu, S3 object storage in dc-eu")
    prefect = start_prefect(WORK / "prefect")
    us = start_zookeeper(WORK / "zk-us")
    eu = start_zookeeper(WORK / "zk-eu")
    s3 = start_moto(WORK / "s3-eu")
    os.environ.update(
        PREFECT_API_URL=prefect.url + "/api",
        PREFECT_HOME=str(WORK / "prefect" / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    print(f"Prefect API {prefect.url}/api, dc-us zk://{us.url}, dc-eu zk://{eu.url}, dc-eu S3 {s3.url}")
    try:
        banner("Seeding dc-us with a sample tree")
        seed(us.url)
        banner("Object storage in dc-eu: a bucket, and the S3 credentials in a Prefect block (never in a URL)")
        import boto3
        from botocore.config import Config
        from prefect_aws import MinIOCredentials
        from prefect_aws.client_parameters import AwsClientParameters
        from pydantic import SecretStr

        boto3.client("s3", endpoint_url=s3.url, aws_access_key_id="demo", aws_secret_access_key="demo-secret",
                     region_name="us-east-1", config=Config(request_checksum_calculation="when_required")
                     ).create_bucket(Bucket="burrow-dc-eu")
        MinIOCredentials(minio_root_user="demo", minio_root_password=SecretStr("demo-secret"),
                         aws_client_parameters=AwsClientParameters(endpoint_url=s3.url)).save("s3-dc-eu", overwrite=True)
        store = "s3://burrow-dc-eu/zookeeper?credentials=s3-dc-eu&addressing=path&checksum=when_required"
        print(f"store: {store}")
        banner("Creating a backup key (0600; only the fingerprint is printed)")
        key = WORK / "keys" / "backup.key"
        key.parent.mkdir()
        burrow("keygen", "--out", str(key))

        banner("Backing up dc-us (the digest credentials come from the URL and never reach logs)")
        out = burrow(
            "backup", f"zk://ops:demo-password@{us.url}", "--to", store, "--name", "dc-us",
            "--key-file", str(key),
        )
        url = out.stdout.strip().splitlines()[-1]

        banner("The catalog (manifests read by range, authenticated with the key) and freshness per source")
        burrow("list", store, "--key-file", str(key))
        burrow("status", store, "--key-file", str(key), "--max-age", "1h")
        burrow("inspect", url, "--key-file", str(key))

        banner("Verifying the stored archive end to end")
        burrow("verify", url, "--key-file", str(key))

        banner("Rehearsal: prove the backup restores (into a scratch chroot of dc-eu, compared key by key, "
               "then cleaned up; the result is recorded beside the archive)")
        burrow("rehearse", store, "--source", "dc-us", "--scratch", f"zk://ops:demo-password@{eu.url}/burrow-rehearsal",
               "--key-file", str(key))
        burrow("list", store, "--key-file", str(key))

        src = count_nodes(us.url, "/app")
        banner("DC-US is down (its ZooKeeper is stopped). What would a failover into dc-eu do? (dry run)")
        us.stop()
        failover = ["failover", "dc-us", "--from", store, "--into", f"zk://ops:demo-password@{eu.url}",
                    "--primary", f"zk://{us.url}", "--max-age", "1h", "--key-file", str(key)]
        burrow(*failover, "--dry-run")

        banner("Failing over: target checked, primary probed (down), archive chosen (rehearsed), restored "
               "create-only, every key re-read (post-verify); RPO and RTO reported")
        burrow(*failover)

        banner("dc-eu now (live tree, values shown safely)")
        burrow("dump", f"zk://ops:demo-password@{eu.url}", "--subtree", "/app/config")
        dst = count_nodes(eu.url, "/app")
        same = src == dst
        print(f"dc-us had {len(src)} persistent nodes under /app, dc-eu has {len(dst)}; identical: {same}")

        banner("Safety: someone changed a node in dc-eu; restoring again never overwrites it")
        c = KazooClient(hosts=eu.url)
        c.start()
        changed = b'{"new-checkout": false}'
        c.set("/app/config/feature-flags", changed)
        c.stop()
        c.close()
        burrow("restore", url, "--into", f"zk://ops:demo-password@{eu.url}", "--key-file", str(key), check=False)
        after = count_nodes(eu.url, "/app")["/app/config/feature-flags"]
        print(f"/app/config/feature-flags in dc-eu still holds the changed value: {after == changed}")

        banner("Drift: what changed in dc-eu since the backup (paths only, never values; exit 4)")
        drift = burrow("verify", url, "--against", f"zk://ops:demo-password@{eu.url}", "--key-file", str(key),
                       check=False)
        print(f"exit code {drift.returncode} (4: drift found)")

        banner("Run history")
        print("Every backup, verify, rehearsal, failover and restore above is a Prefect flow run with a summary "
              "artifact and burrow.* events.")
        print(
            f"Browse them:  PREFECT_HOME={WORK / 'prefect' / 'prefect-home'} "
            f"{Path(sys.executable).parent / 'prefect'} server start   (then open http://127.0.0.1:4200)"
        )
        if not same or after != changed or drift.returncode != 4:
            return 1
        return 0
    finally:
        for s in (us, eu, s3, prefect):
            s.stop()


if __name__ == "__main__":
    raise SystemExit(main())
