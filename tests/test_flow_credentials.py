"""Credentials never enter a flow: a URL with a password is refused by every flow, whether it
comes from a Python call or a deployment run, and never reaches the run history (parameters,
run name, logs, artifacts) or any error text, whatever characters the password holds."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from conftest import REPO, run_cli
from prefect.exceptions import PrefectHTTPStatusError

from blocks.resolve import source_from_ref
from burrow.errors import UsageError
from burrow.naming import has_userinfo, redact_url, split_userinfo

#: passwords a URL parser gets wrong: '@', '/' and ':' unescaped
PASSWORDS = ["CANARYpw-plain", "CANARY@pw@at", "CANARY/pw/slash", "CANARY:pw:colon", "CAN@RY/pw:all"]
FRAGMENTS = ["CANARY", "CAN@RY", "pw@at", "pw/slash", "pw:colon", "pw:all"]


def clean(text: str) -> bool:
    return not any(f in text for f in FRAGMENTS)


@pytest.mark.parametrize("password", PASSWORDS)
def test_userinfo_is_found_whatever_the_password_holds(password):
    for url in (f"zk://backup:{password}@127.0.0.1:2181/chroot", f"etcd://root:{password}@h1:2379,h2:2379",
                f"consul://{password}@127.0.0.1:8500/app"):
        info, rest = split_userinfo(url)
        assert info is not None and password in info, url
        assert clean(rest) and clean(redact_url(url)), url
        assert has_userinfo(url)
    # no false alarm on a '@' that is part of a path
    assert not has_userinfo("zk://127.0.0.1:2181/app@v2") and not has_userinfo("file:///a@b/x.burrow")
    assert not has_userinfo("dc-us") and not has_userinfo("/backups/x@y")


@pytest.mark.parametrize("password", PASSWORDS)
def test_parse_errors_never_echo_userinfo(password):
    for url in (f"zk://backup:{password}@", f"zk://backup:{password}@not a host", f"etcd://u:{password}@h:1",
                f"etcd://u:{password}@", f"consul://{password}@h:1"):
        with pytest.raises(UsageError) as exc:
            source_from_ref(url)
        assert clean(str(exc.value)), (url, str(exc.value))


def _run_history(flow_name: str) -> tuple[list, list, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
            arts = await client.read_artifacts()
            return runs, logs, arts

    return asyncio.run(read())


def test_every_flow_refuses_credentials_and_keeps_them_out_of_history(zk_a, tmp_path):
    from flows.backup import backup
    from flows.failover import failover
    from flows.prune import prune
    from flows.restore import restore
    from flows.verify import verify

    secret_url = f"zk://backup:CAN@RY/pw:all@{zk_a.url}/x"
    store = str(tmp_path)
    calls = [
        (backup, {"source": secret_url, "store": store, "encryption": False}),
        (backup, {"source": "dc-us", "store": "file://u:CANARYpw-plain@host/x"}),
        (restore, {"archive": str(tmp_path / "a.burrow"), "into": secret_url}),
        (verify, {"archive": "file://CANARY:pw:colon@h/x.burrow"}),
        (failover, {"source": "dc-us", "store": store, "into": secret_url}),
        (prune, {"store": "file://u:CANARY@pw@at@localhost:1/x"}),
    ]
    for fn, params in calls:
        with pytest.raises(UsageError) as exc:
            fn(**params)
        msg = str(exc.value)
        assert clean(msg) and "block" in msg and "environment" in msg, msg
    for name in ("backup", "restore", "verify", "failover", "prune"):
        runs, logs, arts = _run_history(name)
        for r in runs:
            assert clean(repr(r.parameters)) and clean(r.name) and clean(str(r.state.message if r.state else "")), r
        for entry in logs:
            assert clean(entry.message), entry.message
        for a in arts:
            assert clean(str(a.data)) and clean(str(a.description or "")), a.key


def test_a_deployment_run_with_credentials_is_refused_before_it_is_stored(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.backup import backup

    async def scenario():
        async with get_client() as client:
            flow_id = await client.create_flow(backup)
            dep_id = await client.create_deployment(
                flow_id=flow_id, name=f"creds-{uuid.uuid4().hex[:6]}", entrypoint="flows/backup.py:backup",
                path=str(REPO), parameters={"store": str(tmp_path)}, enforce_parameter_schema=True,
                parameter_openapi_schema=backup.parameters.model_dump(),
            )
            with pytest.raises(PrefectHTTPStatusError):
                await client.create_flow_run_from_deployment(
                    dep_id, parameters={"source": "zk://backup:CANARY/pw/slash@127.0.0.1:2181", "store": str(tmp_path)}
                )
            ok = await client.create_flow_run_from_deployment(dep_id, parameters={"source": "dc-us"})
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id]))
            )
            return ok, runs

    ok, runs = asyncio.run(scenario())
    assert [r.id for r in runs] == [ok.id]
    assert clean(repr(runs[0].parameters))


def test_cli_never_echoes_a_mistyped_passphrase_env(zk_a, tmp_path):
    for mistake in ("CANARY correct horse battery", "CANARYSecretLooksLikeAName"):
        r = run_cli("backup", f"zk://{zk_a.url}", "--to", str(tmp_path), "--passphrase-env", mistake)
        assert r.code == 2, r
        assert clean(r.out + r.err), r
        assert "--passphrase-env" in r.error_line
    r = run_cli("verify", str(tmp_path / "x.burrow"), "--key-env", "CANARY key text")
    assert r.code == 2 and clean(r.out + r.err), r


@pytest.mark.parametrize("password", ["CANARY/pw/slash", "CAN@RY/pw:all"])
def test_cli_errors_never_echo_a_password(password, tmp_path):
    r = run_cli("backup", f"zk://backup:{password}@", "--to", str(tmp_path), "--no-encryption")
    assert r.code == 2 and clean(r.out + r.err), r
    r = run_cli("backup", f"etcd://root:{password}@127.0.0.1:2379", "--to", str(tmp_path), "--no-encryption")
    assert r.code == 2 and clean(r.out + r.err), r


@pytest.mark.parametrize("ref", ["zk:/127.0.0.1:2181", "etcd//127.0.0.1:2379", "consul:127.0.0.1:8500",
                                 "zk:/backup:CANARY/pw@127.0.0.1:2181"])
def test_an_almost_url_is_a_usage_error_naming_the_form(ref, tmp_path):
    r = run_cli("backup", ref, "--to", str(tmp_path), "--no-encryption")
    assert r.code == 2, r
    assert "://host:port" in r.error_line and "saved" not in r.error_line, r.error_line
    assert clean(r.out + r.err)


def test_a_usage_error_suggests_the_closest_command_or_flag(tmp_path):
    r = run_cli("restor", "x")
    assert r.code == 2 and "did you mean 'restore'?" in r.error_line, r
    r = run_cli("backup", "zk://127.0.0.1:1", "--to", str(tmp_path), "--no-encrypt")
    assert r.code == 2 and "did you mean --no-encryption?" in r.error_line, r  # never an abbreviation
