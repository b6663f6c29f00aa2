"""deployments/ applies cleanly to a real Prefect server: block types, work pool, deployments
(with schedules and no secrets in parameters) and automations wired to a notification block."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_setup_registers_pool_deployments_and_automations():
    from prefect.blocks.notifications import SlackWebhook
    from prefect.client.orchestration import get_client

    SlackWebhook(url="http://127.0.0.1:9/hook").save("burrow-oncall-test", overwrite=True)
    proc = subprocess.run(
        [sys.executable, "deployments/setup.py", "--notify-block", "slack-webhook/burrow-oncall-test"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    async def read():
        async with get_client() as client:
            pools = await client.read_work_pools()
            deployments = await client.read_deployments()
            automations = await client.read_automations()
            block_types = await client.read_block_types()
            return pools, deployments, automations, block_types

    pools, deployments, automations, block_types = asyncio.run(read())
    assert "burrow" in {p.name for p in pools}
    by_name = {d.name: d for d in deployments}
    assert {"backup-dc-us", "backup-dc-eu", "verify", "restore"} <= set(by_name)
    backup = by_name["backup-dc-us"]
    assert backup.work_pool_name == "burrow"
    assert backup.schedules and backup.schedules[0].schedule.cron == "7 * * * *"
    assert backup.parameters["source"] == "dc-us"
    assert backup.parameters["key_block"] == "burrow-backup-keys"
    assert by_name["restore"].parameters == {"dry_run": True, "key_block": "burrow-restore-keys"}
    for d in by_name.values():
        text = repr(d.parameters).lower()
        assert "password" not in text and "token" not in text and "secret" not in text
    names = {a.name for a in automations}
    assert {"burrow-backup-failed", "burrow-backup-missing"} <= names
    assert {
        "burrow-zookeeper-cluster", "burrow-etcd-cluster", "burrow-consul-cluster", "burrow-local-store",
        "burrow-s3-store", "burrow-encryption-keys", "burrow-retention-policy",
    } <= {b.slug for b in block_types}
