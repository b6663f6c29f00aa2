"""Expected failures print one line on the terminal, with no traceback: a wrong key, a corrupt
archive, an unreachable server. The traceback stays in the flow run's logs on the server, and
shows on the terminal with --verbose."""

from __future__ import annotations

import asyncio

import pytest
from conftest import run_cli
from zkutil import kazoo, unique_root

from burrow.keys import keygen
from burrow.testing.servers import free_port


@pytest.fixture(scope="module")
def archive(zk_a, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-errors")
    keygen(d / "right.key", x25519=False)
    keygen(d / "wrong.key", x25519=False)
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/a", b"value", makepath=True)
    store = d / "store"
    store.mkdir()
    r = run_cli("backup", f"zk://{zk_a.url}{root}", "--to", str(store), "--key-file", str(d / "right.key"))
    assert r.code == 0, r
    return d, r.last_line


def _corrupt_copy(d, url: str):
    from urllib.parse import unquote

    src = unquote(url.removeprefix("file://"))
    data = bytearray(open(src, "rb").read())
    data[len(data) // 2] ^= 0x40
    bad = d / "store" / "corrupt" / "x.burrow"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(bytes(data))
    return bad


def _one_line(r) -> None:
    assert "Traceback" not in r.err and "Traceback" not in r.out, r
    errors = [ln for ln in r.err.splitlines()
              if "| ERROR" in ln or "| CRITICAL" in ln or ln.startswith("burrow: error") or "Exception" in ln]
    assert errors == [r.error_line] and r.error_line.startswith("burrow: error: "), errors


def test_expected_failures_print_one_line(archive):
    d, url = archive
    from concurrent.futures import ThreadPoolExecutor

    calls = [
        ("verify", url, "--key-file", str(d / "wrong.key")),
        ("verify", str(_corrupt_copy(d, url)), "--key-file", str(d / "right.key")),
        ("backup", f"zk://127.0.0.1:{free_port()}?timeout=2", "--to", str(d / "store"), "--no-encryption"),
    ]
    with ThreadPoolExecutor(3) as pool:  # independent commands: side by side to keep the suite fast
        wrong_key, corrupt, unreachable = pool.map(lambda args: run_cli(*args), calls)
    for r in (wrong_key, corrupt, unreachable):
        assert r.code == 1, r
        _one_line(r)
    assert "key" in wrong_key.error_line and "ZooKeeper" in unreachable.error_line


def test_verbose_shows_the_traceback_and_the_server_keeps_it(archive):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId

    d, url = archive
    r = run_cli("verify", url, "--key-file", str(d / "wrong.key"), "--verbose")
    assert r.code == 1 and "Traceback" in r.err, r

    async def logs() -> list[str]:
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="verify-")))
            found = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[x.id for x in runs])))
            return [entry.message for entry in found]

    assert any("Traceback" in m and "KeyMismatch" in m for m in asyncio.run(logs()))
