"""The web app as real processes: ``pneumoscope serve`` starts it beside the predictor and transformer;
a real X-ray goes through all three; the predictor dies and the study waits as ``pending`` until the
stack brings it back; an app restarted with pending studies scores them; an oversized upload is refused
while it streams in."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest

from webapp_fixtures import full_res_xrays, pneumoscope, start_web, wait_for_status

pytestmark = pytest.mark.integration


def api_token(env: dict, user: str = "doctor") -> str:
    issued = pneumoscope("users", "token", user, "--label", "stack tests", env=env)
    assert issued.returncode == 0, issued.stderr
    return issued.stdout.strip()


def client(url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=60)


def upload(api: httpx.Client, path) -> httpx.Response:
    return api.post("/api/studies", files={"file": (path.name, path.read_bytes(), "image/jpeg")})


def test_serve_runs_the_web_app_on_port_plus_two(web_stack):
    info = web_stack.info
    assert int(info["web"].rsplit(":", 1)[1]) == int(info["rest"].rsplit(":", 1)[1]) + 2
    assert set(info["pids"]) == {"predictor", "transformer", "web"}
    assert httpx.get(f"{info['web']}/readyz").json()["status"] == "ready"
    assert httpx.get(f"{info['web']}/", follow_redirects=False).status_code == 303  # sign-in first


def test_a_real_xray_is_scored_and_a_study_waits_while_the_predictor_is_down(web_stack):
    api = client(web_stack.web, api_token(web_stack.env))
    first, second = full_res_xrays(2, offset=10)
    done = upload(api, first)
    assert done.status_code == 201, done.text
    assert done.json()["result"]["model_version"] == "local"
    os.kill(web_stack.info["pids"]["predictor"], signal.SIGKILL)  # the stack restarts it, like a kubelet
    time.sleep(0.3)
    waiting = upload(api, second)
    assert waiting.status_code == 202, waiting.text
    study = waiting.json()
    assert study["status"] == "pending" and study["result"] is None and study["next_attempt_at"]
    page = api.get(study["links"]["page"])
    assert "Waiting for the analysis service" in page.text  # a page for signed-in users: the token works too
    scored = wait_for_status(api.get, study["id"], "done", timeout=180)
    assert scored["attempts"] >= 2 and 0 <= scored["result"]["probability"] <= 1
    assert api.get(f"/api/studies/{study['id']}/heatmap").content.startswith(b"\x89PNG")
    metrics = httpx.get(f"{web_stack.web}/metrics").text
    assert 'pneumoscope_web_uploads_total{outcome="pending"} 1.0' in metrics
    assert "pneumoscope_web_pending_studies 0.0" in metrics


def test_pending_studies_are_scored_after_the_app_restarts(web_stack, tmp_path, postgres):
    env = {"PNEUMOSCOPE_HOME": str(tmp_path), "PNEUMOSCOPE_DATABASE_URL": postgres.create_database("restart"),
           "PNEUMOSCOPE_SECRET_KEY": "restart-test", "PNEUMOSCOPE_RETRY_INITIAL_S": "0.5",
           "PNEUMOSCOPE_WORKER_POLL_S": "0.25"}
    assert pneumoscope("users", "add", "doctor", "--password-stdin", env=env,
                       stdin="a-long-test-password\n").returncode == 0
    token = api_token(env)
    from webapp_fixtures import free_port

    down = start_web({**env, "PNEUMOSCOPE_INFERENCE_URL": f"http://127.0.0.1:{free_port()}"}, tmp_path / "a.log")
    try:
        response = upload(client(down.url, token), full_res_xrays(1, offset=12)[0])
        assert response.status_code == 202 and response.json()["status"] == "pending"
        study = response.json()["id"]
    finally:
        down.stop()
    up = start_web({**env, "PNEUMOSCOPE_INFERENCE_URL": web_stack.rest}, tmp_path / "b.log")
    try:
        scored = wait_for_status(client(up.url, token).get, study, "done", timeout=120)
        assert scored["result"]["model_name"] == "pneumonia"
    finally:
        up.stop()


def test_an_oversized_upload_is_refused_while_it_streams(web_stack):
    api = client(web_stack.web, api_token(web_stack.env))
    before = api.get("/api/studies").json()["total"]
    sent = {"bytes": 0}
    chunk, total = b"\xff" * (1024 * 1024), 512 * 1024 * 1024  # 512 MiB offered, 32 MiB allowed

    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n' \
              b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff"
        while sent["bytes"] < total:
            sent["bytes"] += len(chunk)
            yield chunk
        yield b"\r\n--b--\r\n"

    try:  # chunked: no Content-Length to refuse it by, so the app must count while it reads
        response = api.post("/api/studies", content=body(),
                            headers={"content-type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413 and "larger than the limit" in response.json()["error"]
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # the app answered 413 and closed the connection while the client was still writing
    assert sent["bytes"] < total / 4, f"the app read {sent['bytes']} bytes before refusing"
    metrics = httpx.get(f"{web_stack.web}/metrics").text
    assert 'pneumoscope_web_uploads_total{outcome="too_large"}' in metrics
    assert api.get("/api/studies").json()["total"] == before and httpx.get(f"{web_stack.web}/healthz").is_success


def one_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("pneumoscope: error: "), result.stderr
    return lines[0]


def test_users_and_tokens_from_the_command_line(tmp_path):
    env = {"PNEUMOSCOPE_HOME": str(tmp_path)}
    made = pneumoscope("users", "add", "demo", "--generate-password", "--if-missing", env=env)
    password = re.search(r"with password: (\S+)", made.stdout).group(1)
    assert made.returncode == 0 and len(password) >= 16
    again = pneumoscope("users", "add", "demo", "--generate-password", "--if-missing", env=env)
    assert again.returncode == 0 and "exists already" in again.stdout and password not in again.stdout
    assert "already exists" in one_error(pneumoscope("users", "add", "demo", env=env, stdin="another-password\n"))
    assert "too short" in one_error(pneumoscope("users", "add", "shorty", env=env, stdin="short\n"))
    assert "invalid user name" in one_error(pneumoscope("users", "add", "../x", env=env, stdin="long-enough-pw\n"))
    assert "no user named 'ghost'" in one_error(pneumoscope("users", "token", "ghost", env=env))
    token = pneumoscope("users", "token", "demo", "--label", "script", env=env).stdout.strip()
    assert token.startswith("pns_")
    listed = pneumoscope("users", "tokens", "demo", env=env).stdout
    assert "active" in listed and "script" in listed
    token_id = listed.split()[0]
    assert pneumoscope("users", "revoke-token", token_id, env=env).stdout.strip() == f"revoked token {token_id}"
    assert "revoked" in pneumoscope("users", "tokens", "demo", env=env).stdout
    assert "no such token" in one_error(pneumoscope("users", "revoke-token", "pns_unknown", env=env))
    changed = pneumoscope("users", "set-password", "demo", "--password-stdin", env=env, stdin="a-new-password!\n")
    assert changed.returncode == 0 and "changed" in changed.stdout
    assert "demo\tuser" in pneumoscope("users", "list", env=env).stdout
    assert pneumoscope("db", "upgrade", env=env).stdout.strip() == "database at revision 0001"


def test_the_cli_reports_config_errors_in_one_line(tmp_path):
    env = {"PNEUMOSCOPE_HOME": str(tmp_path)}
    bad_db = pneumoscope("web", "--port", "21999", "--database-url", "postgresql://nobody@127.0.0.1:1/none", env=env)
    lines = [line for line in bad_db.stderr.splitlines() if line.startswith("pneumoscope: error:")]
    assert bad_db.returncode == 2 and len(lines) == 1 and "cannot reach the database" in lines[0], bad_db.stderr
    assert "cannot reach the database" in one_error(pneumoscope("db", "upgrade", "--database-url",
                                                                "postgresql://nobody@127.0.0.1:1/none", env=env))
    assert json.loads(pneumoscope("studies", "export", str(tmp_path / "out"), env=env).stdout)["exported"] == 0
