"""``burrow worker start`` stops cleanly: SIGTERM ends the worker within 10 s (an init system's
or a container runtime's patience before SIGKILL), the runs it held end Crashed or Cancelled
(never left Running), and a backup interrupted mid-upload leaves no visible archive and no
open multipart upload on the S3 server (moto).

The backup is caught mid-upload deterministically: the S3 store's endpoint is a small proxy in
front of moto that forwards everything but holds every UploadPart request until the test lets
it go, so the run is inside its multipart upload (created, a part in flight) when the worker
is stopped. Prefect's own ``prefect worker start`` would wait here until the part went through
and the backup ended (the hang the issue measured at 50 s).
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import BURROW, REPO, SESSION_DIR
from kvutil import consul_client, unique
from pydantic import SecretStr
from test_orchestrator import _client, logs_of, runs_by_id, wait_final, wait_for
from test_stores import KEY, SECRET, new_bucket, raw_client
from zkutil import count, kazoo, snapshot, unique_root

from blocks.consul import ConsulCluster
from blocks.keys import EncryptionKeys
from blocks.s3 import S3Store
from burrow.keys import X25519Identity
from burrow.testing.servers import free_port
from cli.worker import flow_run_processes

#: The stated requirement: a stopped worker is gone within this many seconds.
STOP_WITHIN_S = 10


class HoldingProxy:
    """Forwards HTTP requests to ``upstream`` (moto), except that every request for a multipart
    upload's part (``?partNumber=``) is held until :meth:`release` (then its connection is closed
    without an answer). ``held`` counts the parts it is holding."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.released = threading.Event()
        self.held = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                if "partNumber=" in self.path:
                    proxy.held += 1
                    proxy.released.wait()
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815 - http.server's names

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()


def _tree(pid: int) -> list[str]:
    """pid, process group and command line of ``pid`` and its descendants (for failure messages)."""
    from cli.worker import _children

    kids, out, stack = _children(), [], [pid]
    while stack:
        p = stack.pop()
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:120]
            out.append(f"{p} pgid={os.getpgid(p)} {cmd}")
        except OSError:
            continue
        stack.extend(kids.get(p, []))
    return out


def create_pool(pool: str) -> None:
    """A process work pool, created through the API (a ``prefect work-pool create`` process would
    cost a Python start and Prefect's import; the worker fills in the process type's default job
    template, as it does for a pool the CLI created)."""
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.common import process_pool_template

    with _client() as c:
        c.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=process_pool_template()))


def start_worker(pool: str, name: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    log = open(SESSION_DIR / f"{name}.log", "wb")
    return subprocess.Popen([BURROW, "worker", "start", "--pool", pool, "--name", name, "--limit", "2"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def setup(consul_a, moto) -> Any:
    """A Consul prefix with a few keys, an S3 store behind the holding proxy, a private pool with
    a backup deployment of that prefix into that store."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect_aws import MinIOCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from flows.common import source_limit_name

    tag = "st" + uuid.uuid4().hex[:6]
    prefix = unique("stop")
    kv = consul_client(consul_a.url).kv
    for i in range(5):
        kv.put(f"{prefix}/k{i}", f"value-{i}".encode())
    bucket = new_bucket(moto)
    proxy = HoldingProxy(moto.url)
    creds = MinIOCredentials(minio_root_user=KEY, minio_root_password=SecretStr(SECRET),
                             aws_client_parameters=AwsClientParameters(endpoint_url=proxy.url))
    S3Store(bucket=bucket, credentials=creds, addressing_style="path",
            checksum="when_required").save(f"{tag}-s3", overwrite=True)
    ConsulCluster(address=f"127.0.0.1:{consul_a.port}", prefix=prefix).save(f"{tag}-src", overwrite=True)
    identity = X25519Identity.generate()
    EncryptionKeys(recipients=[identity.recipient.to_text()]).save(f"{tag}-keys", overwrite=True)
    pool = f"stop-{tag}"
    create_pool(pool)
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    with _client() as c:
        c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=source_limit_name(f"{tag}-src"), limit=1))
        deployment = c.create_deployment(
            flow_id=c.create_flow_from_name("backup"), name=f"backup-{tag}", entrypoint="flows/backup.py:backup",
            work_pool_name=pool, pull_steps=pull,
            parameters={"source": f"{tag}-src", "name": f"{tag}-src", "store": f"{tag}-s3", "key_block": f"{tag}-keys"},
        )
    try:
        yield {"tag": tag, "pool": pool, "bucket": bucket, "proxy": proxy, "deployment": deployment}
    finally:
        proxy.close()


@pytest.mark.timeout(1800)  # a hang guard; the 10 s below is the requirement
def test_sigterm_ends_the_worker_within_10_s_and_the_backup_it_held_leaves_nothing(setup, moto):
    from prefect.deployments import run_deployment

    proxy, bucket = setup["proxy"], setup["bucket"]
    worker = start_worker(setup["pool"], f"{setup['pool']}-w")
    try:
        run_id = run_deployment(setup["deployment"], timeout=0).id
        wait_for("the backup to send its first part", lambda: proxy.held >= 1 or worker.poll() is not None,
                 timeout=300)
        assert worker.poll() is None, "the worker exited on its own"
        assert raw_client(moto).list_multipart_uploads(Bucket=bucket).get("Uploads"), "no upload in progress"
        held = flow_run_processes(worker.pid)
        assert set(held.values()) == {str(run_id)}, held
        tree = _tree(next(iter(held)))
        assert runs_by_id([run_id])[run_id].state.type.value == "RUNNING"

        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit within {STOP_WITHIN_S} s of SIGTERM")
        took = time.monotonic() - started
        assert code == 0, code
    finally:
        if worker.poll() is None:
            worker.kill()
        proxy.release()
    # its flow-run process is gone too (not an orphan that goes on uploading)
    for pid in held:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"
    run = wait_final([run_id])[run_id]
    assert run.state.type.value in ("CRASHED", "CANCELLED"), (run.state, took, logs_of(run_id)[-5:])
    # no archive visible, no multipart upload left open
    s3 = raw_client(moto)
    objects = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not [k for k in objects if k.endswith(".burrow")], objects
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == [], "\n".join([*tree, *logs_of(run_id)[-8:]])


@pytest.fixture(scope="module")
def failover_setup(zk_a, zk_b, wide_zk_tree, tmp_path_factory) -> Any:
    """The session's 12,000-node ZooKeeper tree backed up into a local store (encrypted to an
    identity the failover deployment's key block holds), an empty DR chroot, a dead primary, and
    a failover deployment on a private pool."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from blocks.local import LocalStore
    from blocks.zookeeper import ZooKeeperCluster
    from flows.backup import backup
    from flows.common import source_limit_name

    tag = "fo" + uuid.uuid4().hex[:6]
    store = tmp_path_factory.mktemp("stop-failover") / "store"
    store.mkdir()
    identity = X25519Identity.generate()
    root, tree = wide_zk_tree
    made = backup(source=f"zk://{zk_a.url}", store=str(store), name=f"{tag}-src", root=root,
                  recipients=[identity.recipient.to_text()])
    top = unique_root()
    LocalStore(path=str(store)).save(f"{tag}-store", overwrite=True)
    EncryptionKeys(identities=[SecretStr(identity.to_text())]).save(f"{tag}-keys", overwrite=True)
    ZooKeeperCluster(hosts=[zk_b.url], chroot=top).save(f"{tag}-dr", overwrite=True)
    ZooKeeperCluster(hosts=[f"127.0.0.1:{free_port()}"], connect_timeout=2.0).save(f"{tag}-dead", overwrite=True)
    pool = f"stop-{tag}"
    create_pool(pool)
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    with _client() as c:
        for name in (f"{tag}-src", f"{tag}-dr"):
            c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=source_limit_name(name), limit=1))
        deployment = c.create_deployment(
            flow_id=c.create_flow_from_name("failover"), name=f"failover-{tag}",
            entrypoint="flows/failover.py:failover", work_pool_name=pool, pull_steps=pull,
            parameters={"source": f"{tag}-src", "store": f"{tag}-store", "key_block": f"{tag}-keys",
                        "into": f"{tag}-dr", "primary": f"{tag}-dead"},
        )
    return {"pool": pool, "deployment": deployment, "tree": tree, "root": root, "top": top, "url": made["url"],
            "store": store}


@pytest.mark.timeout(1800)  # a hang guard; the 10 s below is the requirement
def test_a_failover_interrupted_by_a_worker_stop_is_finished_by_the_next_run(failover_setup, zk_b):
    """SIGTERM to the worker once the failover has recorded its choice (the journal, written just
    before its first write; the replay of 12,000 nodes takes about a second, so the stop lands
    in it or just after): the worker is gone within 10 s, the run ends Crashed (or Cancelled)
    without finishing; the next run of the deployment resumes with the journal's archive and
    the target ends up with the whole tree."""
    from prefect.deployments import run_deployment

    s = failover_setup
    written_root = s["top"] + s["root"]
    worker = start_worker(s["pool"], f"{s['pool']}-w1")
    try:
        run_id = run_deployment(s["deployment"], timeout=0).id
        with kazoo(zk_b.url) as c:
            # stopped once it has recorded its choice in the journal, just before its first write
            journal = s["store"] / "_failover"
            wait_for("the failover to record its choice",
                     lambda: (journal.is_dir() and any(p.is_file() for p in journal.rglob("*")))
                     or worker.poll() is not None, timeout=300, every=0.02)
            assert worker.poll() is None and not runs_by_id([run_id])[run_id].state.is_final(), (
                "the failover ended before the worker was stopped", logs_of(run_id)[-5:])
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=STOP_WITHIN_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker did not exit within {STOP_WITHIN_S} s of SIGTERM")
            # the next run's worker starts now: its start (a Python and Prefect's import) overlaps
            # the checks of the stopped run below; it has nothing to take until the next run exists
            worker = start_worker(s["pool"], f"{s['pool']}-w2")
            written = count(c, written_root)
    except BaseException:
        worker.kill()
        raise
    try:
        run = wait_final([run_id])[run_id]
        assert run.state.type.value in ("CRASHED", "CANCELLED"), (run.state, logs_of(run_id)[-5:])
        assert written <= len(s["tree"])  # anything from nothing to all of it, and never closed
        assert not any("post-verify" in m and "ok" in m for m in logs_of(run_id)), "the interrupted run finished"

        # the next run finishes it, with the archive the journal recorded
        again = run_deployment(s["deployment"], timeout=0).id
        done = wait_final([again])[again]
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
    logs = "\n".join(logs_of(again))
    assert done.state.type.value == "COMPLETED", (done.state, logs[-3000:])
    assert "resuming the failover begun at" in logs, logs[-3000:]
    with kazoo(zk_b.url) as c:
        got = snapshot(c, written_root)
    assert got == {s["top"] + path: value for path, value in s["tree"].items()}
