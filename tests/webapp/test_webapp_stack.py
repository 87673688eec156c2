"""The web app as real processes: ``pneumoscope serve`` starts it beside the predictor and transformer;
a real X-ray goes through all three; the predictor dies and the study waits as ``pending`` until the
stack brings it back; an app restarted with pending studies scores them; an oversized upload is refused
while it streams in."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time

import httpx
import pytest

from webapp_fixtures import api_token, full_res_xrays, pneumoscope, predictor_pid, start_web, wait_for_status

pytestmark = pytest.mark.integration


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
    os.kill(predictor_pid(web_stack), signal.SIGKILL)  # the stack restarts it, like a kubelet
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
    pending = re.search(r'pneumoscope_web_uploads_total\{outcome="pending"\} (\S+)', metrics)
    assert pending and float(pending.group(1)) >= 1, metrics
    assert "pneumoscope_web_pending_studies 0.0" in metrics


def test_pending_studies_are_scored_after_the_app_restarts(web_stack, tmp_path, postgres):
    env = {"PNEUMOSCOPE_HOME": str(tmp_path), "PNEUMOSCOPE_DATABASE_URL": postgres.create_database("restart"),
           "PNEUMOSCOPE_SECRET_KEY": "restart-test", "PNEUMOSCOPE_RETRY_INITIAL_S": "0.5",
           "PNEUMOSCOPE_WORKER_POLL_S": "0.25"}
    token = api_token(env, password="a-long-test-password")
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


def run_cli(capsys, monkeypatch, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    """``pneumoscope ARGV`` in this process (as fast as a function call); (exit code, stdout, stderr)."""
    from model.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(result: tuple[int, str, str]) -> str:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("pneumoscope: error: "), err
    return lines[0]


def test_users_and_tokens_from_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PNEUMOSCOPE_HOME", str(tmp_path))
    monkeypatch.delenv("PNEUMOSCOPE_DATABASE_URL", raising=False)

    def cli(*argv, stdin=""):
        return run_cli(capsys, monkeypatch, *argv, stdin=stdin)

    code, out, _ = cli("users", "add", "demo", "--generate-password", "--if-missing")
    password = re.search(r"with password: (\S+)", out).group(1)
    assert code == 0 and len(password) >= 16
    code, out, _ = cli("users", "add", "demo", "--generate-password", "--if-missing")
    assert code == 0 and "exists already" in out and password not in out
    assert "already exists" in one_error(cli("users", "add", "demo", stdin="another-password\n"))
    assert "too short" in one_error(cli("users", "add", "shorty", stdin="short\n"))
    assert "invalid user name" in one_error(cli("users", "add", "../x", stdin="long-enough-pw\n"))
    assert "no password on stdin" in one_error(cli("users", "add", "quiet", "--password-stdin"))
    assert "no user named 'ghost'" in one_error(cli("users", "token", "ghost"))
    token = cli("users", "token", "demo", "--label", "script")[1].strip()
    assert token.startswith("pns_")
    listed = cli("users", "tokens", "demo")[1]
    assert "active" in listed and "script" in listed
    token_id = listed.split()[0]
    assert cli("users", "revoke-token", token_id)[1].strip() == f"revoked token {token_id}"
    assert "revoked" in cli("users", "tokens", "demo")[1]
    assert "no such token" in one_error(cli("users", "revoke-token", "pns_unknown"))
    assert "give one TOKEN_OR_ID, or --all NAME" in one_error(cli("users", "revoke-token"))
    cli("users", "token", "demo")
    assert cli("users", "revoke-token", "--all", "demo")[1].strip() == "revoked 1 token of demo"
    code, out, _ = cli("users", "set-password", "demo", "--password-stdin", stdin="a-new-password!\n")
    assert code == 0 and "changed" in out
    assert "demo\tuser" in cli("users", "list")[1]
    # the installed console script, once, as an operator runs it
    upgraded = pneumoscope("db", "upgrade", env={"PNEUMOSCOPE_HOME": str(tmp_path)})
    from webapp.db import head_revision

    assert upgraded.returncode == 0 and upgraded.stdout.strip() == f"database at revision {head_revision()}"


def test_the_cli_reports_config_errors_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PNEUMOSCOPE_HOME", str(tmp_path))
    unreachable = "postgresql://nobody@127.0.0.1:1/none"
    for argv in (("web", "--port", "21999", "--database-url", unreachable), ("db", "upgrade", "--database-url",
                                                                              unreachable)):
        assert "cannot reach the database" in one_error(run_cli(capsys, monkeypatch, *argv))
    (tmp_path / "a-file").write_text("not a folder")
    assert "cannot open the image store" in one_error(run_cli(
        capsys, monkeypatch, "web", "--image-store", str(tmp_path / "a-file" / "studies"), "--port", "21999"))
    code, out, _ = run_cli(capsys, monkeypatch, "studies", "export", str(tmp_path / "out"))
    assert code == 0 and json.loads(out)["exported"] == 0
