"""Burrow's local Prefect server is private to the user who runs Burrow (issue 16).

A Prefect server without an auth string serves saved blocks, secrets included, to any process
on the machine. Checked here against a real local server, started by the real console script
under a Burrow home that an older Burrow left world-readable:

* the server runs with a credential generated once into a 0600 file under ``$BURROW_HOME``;
  the home and ``prefect/`` become 0700, the database and the log 0600;
* any other local process, plain HTTP without the credential (or with a wrong one), gets 401,
  ``include_secrets`` or not; only the health probe answers;
* Burrow's own commands still run on it (and their runs are in its history), also when
  ``PREFECT_API_URL`` names the local server itself;
* ``burrow server status`` says how to log in to the UI and where the credential is, without
  printing it unless asked;
* a server an older Burrow started without a credential is restarted with one, and one whose
  credential file was replaced is restarted with the new credential.
"""

from __future__ import annotations

import base64
import json
import re
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import run_cli
from zkutil import kazoo, unique_root

from burrow.testing.servers import free_port

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _call(port: int, path: str, body: dict | None = None, credential: str | None = None) -> tuple[int, bytes]:
    """``(status, body)`` of one plain HTTP request to the local server, as any local process
    could make it (``credential``: basic auth, as Prefect's client sends it)."""
    headers = {"Content-Type": "application/json"}
    if credential is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(credential.encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api{path}", data=data, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with _HTTP.open(req, timeout=15) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    """A Burrow home as an older Burrow left it (0755, a world-readable database file and log),
    and the local server started there by ``burrow server start``; stopped at the end."""
    home = tmp_path_factory.mktemp("private-home")
    home.chmod(0o755)
    (home / "prefect").mkdir(mode=0o755)
    (home / "prefect").chmod(0o755)
    (home / "prefect" / "server.log").write_text("an older Burrow's log\n")
    (home / "prefect" / "server.log").chmod(0o644)
    port = free_port()
    env = {"BURROW_HOME": str(home), "BURROW_SERVER_PORT": str(port), "PREFECT_API_URL": "",
           "PREFECT_HOME": str(home / "client-prefect-home")}
    started = run_cli("server", "start", env=env, timeout=240)
    assert started.code == 0, started
    yield env, port, home
    stopped = run_cli("server", "stop", env=env, timeout=60)
    assert stopped.code == 0, stopped


def _credential(home: Path) -> str:
    return (home / "server-credential").read_text().strip()


def refused(stderr: str) -> bool:
    """The CLI's stderr says the server refused it (a 401 status: not the digits inside a
    checksum the summary prints) or shows a traceback."""
    return bool(re.search(r"(?<![0-9a-f])401(?![0-9a-f])", stderr)) or "Unauthorized" in stderr or "Traceback" in stderr


def test_the_home_and_the_credential_are_private(private):
    env, port, home = private
    cred = home / "server-credential"
    assert _mode(cred) == 0o600, oct(_mode(cred))
    user, _, password = _credential(home).partition(":")
    assert user == "admin" and len(password) >= 40, "a generated credential: admin and 32 random bytes"
    assert _mode(home) == 0o700 and _mode(home / "prefect") == 0o700
    for name in ("prefect.db", "server.log"):
        assert _mode(home / "prefect" / name) == 0o600, (name, oct(_mode(home / "prefect" / name)))
    # generated once: a second start (already running) and a stop/start keep it
    before = _credential(home)
    assert run_cli("server", "start", env=env, timeout=240).code == 0
    assert _credential(home) == before


def test_any_other_local_process_gets_401(private):
    _, port, home = private
    secrets_query = {"include_secrets": True}
    assert _call(port, "/block_documents/filter", secrets_query)[0] == 401
    assert _call(port, "/flow_runs/filter", {})[0] == 401
    assert _call(port, "/block_documents/filter", secrets_query, credential="admin:guessed")[0] == 401
    assert _call(port, "/health")[0] == 200  # the probe Burrow (and a load balancer) uses needs none
    status, body = _call(port, "/block_documents/filter", secrets_query, credential=_credential(home))
    assert status == 200 and isinstance(json.loads(body), list), (status, body[:300])


def test_a_burrow_command_runs_on_the_private_server_and_lands_in_its_history(private, zk_a, tmp_path):
    env, port, home = private
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/k", b"v", makepath=True)
    slug = root.strip("/").replace("/", "-")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    r = run_cli("backup", f"zk://{zk_a.url}{root}", "--to", str(tmp_path / "a"), "--no-encryption", env=env,
                timeout=240)
    assert r.code == 0, r
    assert not refused(r.err), r
    # PREFECT_API_URL naming the local server itself (copied from `burrow server status`) works too
    r2 = run_cli("backup", f"zk://{zk_a.url}{root}", "--to", str(tmp_path / "b"), "--no-encryption",
                 env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, timeout=240)
    assert r2.code == 0, r2
    status, body = _call(port, "/flow_runs/filter", {"flow_runs": {"name": {"like_": slug}}},
                         credential=_credential(home))
    runs = [run for run in json.loads(body) if run["name"].startswith("backup-")]
    assert status == 200 and len(runs) == 2 and all(run["state_type"] == "COMPLETED" for run in runs), runs


def test_status_says_how_to_log_in_without_printing_the_credential(private):
    env, port, home = private
    secret = _credential(home).partition(":")[2]
    status = run_cli("server", "status", env=env)
    assert status.code == 0, status
    assert f"http://127.0.0.1:{port}" in status.out, status
    assert str(home / "server-credential") in status.out and "admin:" in status.out, status
    assert secret not in status.out + status.err, "the credential is printed only on request"
    info = json.loads(run_cli("server", "status", "--json", env=env).out)
    assert info["credential_file"] == str(home / "server-credential") and info["private"] is True, info
    assert secret not in json.dumps(info) and "credential" not in info
    shown = run_cli("server", "status", "--show-credential", env=env)
    assert shown.code == 0 and f"login: {_credential(home)}" in shown.out, shown


def test_a_server_started_without_a_credential_is_restarted_private(private):
    """A server an older Burrow started (its server.json has no ``private``) is replaced."""
    env, port, home = private
    state_file = home / "prefect" / "server.json"
    state = json.loads(state_file.read_text())
    del state["private"]  # as an older Burrow wrote it
    state_file.write_text(json.dumps(state))
    assert "WITHOUT a credential" in run_cli("server", "status", env=env).out
    again = run_cli("server", "start", env=env, timeout=240)
    assert again.code == 0 and "started the local Prefect server" in again.out, again
    restarted = json.loads(state_file.read_text())
    assert restarted["pid"] != state["pid"] and restarted["private"] is True, restarted
    assert _call(port, "/block_documents/filter", {"include_secrets": True})[0] == 401


def test_a_replaced_credential_restarts_the_server_with_it(private):
    """The credential file replaced (a leak rotated by hand: delete it) while the server runs:
    the next start restarts the server with the new credential, and the old one is refused."""
    env, port, home = private
    old = _credential(home)
    pid = json.loads((home / "prefect" / "server.json").read_text())["pid"]
    (home / "server-credential").unlink()
    again = run_cli("server", "start", env=env, timeout=240)
    assert again.code == 0 and "started the local Prefect server" in again.out, again
    new = _credential(home)
    assert new != old and json.loads((home / "prefect" / "server.json").read_text())["pid"] != pid
    assert _call(port, "/flow_runs/filter", {}, credential=old)[0] == 401
    assert _call(port, "/flow_runs/filter", {}, credential=new)[0] == 200
