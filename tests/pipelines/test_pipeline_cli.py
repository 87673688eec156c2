"""`pneumoscope pipeline run/submit`: bad input ends in ONE line and exit 2 before anything slow starts;
`submit` against a fake of the KFP v2beta1 REST API.

A real Kubeflow Pipelines server cannot run here (it needs a Kubernetes cluster with Argo, MySQL and
object storage), so `submit` is checked against a small in-process fake of the endpoints kfp.Client
calls (healthz, experiments, runs) that records what the client sends.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from model.cli import main
from tests.pipelines.test_pipeline_fixtures import free_port, one_error_line, pneumoscope


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PNEUMOSCOPE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PNEUMOSCOPE_DATA", raising=False)
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    return home


@pytest.fixture
def kaggle_layout(tmp_path) -> Path:
    """A folder with the Kaggle layout (names only: the checks before a run do not decode images)."""
    root = tmp_path / "chest_xray"
    for cls, name in (("NORMAL", "IM-0001-0001.jpeg"), ("PNEUMONIA", "person1_bacteria_1.jpeg")):
        (root / "train" / cls).mkdir(parents=True)
        (root / "train" / cls / name).write_bytes(b"\xff\xd8")
    return root


def fails_with(capsys, argv: list[str]) -> str:
    """Run the CLI in this process; it must exit 2 with exactly one line on stderr (returned)."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == ""
    return one_error_line(captured.err)


def test_missing_data_folder_is_one_line_from_the_console_script(tmp_path, home):
    result = pneumoscope("pipeline", "run", "--local", "--data", str(tmp_path / "nowhere"), "--profile", "smoke",
                         "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 2
    assert one_error_line(result.stderr) == f"pneumoscope: error: data folder not found: {tmp_path / 'nowhere'}"
    assert not (home / "pipeline_root").exists(), "kfp.local must not start"


def test_data_without_class_folders_is_one_line(tmp_path, home, capsys):
    (tmp_path / "empty").mkdir()
    line = fails_with(capsys, ["pipeline", "run", "--local", "--data", str(tmp_path / "empty"), "--profile", "smoke"])
    assert "class folder missing" in line


def test_unknown_profile_is_one_line(kaggle_layout, home, capsys):
    line = fails_with(capsys, ["pipeline", "run", "--local", "--data", str(kaggle_layout), "--profile", "huge"])
    assert line == "pneumoscope: error: unknown profile 'huge'; choose one of smoke, demo, cpu, gpu"


@pytest.mark.parametrize("uri, message", [
    ("mongodb://localhost/mlflow", "unsupported MLflow tracking URI"),
    ("http://127.0.0.1:{port}", "does not answer"),
])
def test_bad_mlflow_uri_is_one_line_before_the_run(kaggle_layout, home, capsys, uri, message):
    started = time.monotonic()
    line = fails_with(capsys, ["pipeline", "run", "--local", "--data", str(kaggle_layout), "--profile", "smoke",
                               "--mlflow-uri", uri.format(port=free_port())])
    assert message in line
    assert time.monotonic() - started < 30
    assert not (home / "pipeline_root").exists(), "kfp.local must not start"


@pytest.mark.parametrize("argv, message", [
    (["--profile", "smoke"], "needs --local"),
    (["--local", "--profile", "smoke", "--epochs", "0"], "--epochs must be >= 1"),
    (["--local", "--profile", "smoke", "--promotion", "sometimes"], "unknown promotion policy 'sometimes'"),
])
def test_other_bad_run_input_is_one_line(kaggle_layout, home, capsys, argv, message):
    line = fails_with(capsys, ["pipeline", "run", "--data", str(kaggle_layout), *argv])
    assert message in line


# ----------------------------------------------------------------------------------------------
# submit

class FakeKfp(ThreadingHTTPServer):
    """The part of the KFP v2beta1 REST API that kfp.Client.create_run_from_pipeline_package uses."""

    def __init__(self, port: int):
        self.requests: list[tuple[str, str, dict | None]] = []
        self.experiments: list[dict] = []
        super().__init__(("127.0.0.1", port), FakeKfpHandler)


class FakeKfpHandler(BaseHTTPRequestHandler):
    server: FakeKfp

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlparse(self.path)
        self.server.requests.append(("GET", url.path, None))
        if url.path == "/apis/v2beta1/healthz":
            return self._reply({"multi_user": False})
        if url.path == "/apis/v2beta1/experiments":
            predicate = json.loads(parse_qs(url.query)["filter"][0])["predicates"][0]
            wanted = predicate.get("stringValue", predicate.get("string_value"))
            found = [e for e in self.server.experiments if e["display_name"] == wanted]
            return self._reply({"experiments": found, "total_size": len(found)} if found else {})
        self._reply({"error": f"no route {url.path}"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.server.requests.append(("POST", self.path, body))
        if self.path == "/apis/v2beta1/experiments":
            experiment = dict(body, experiment_id=str(uuid.uuid4()))
            self.server.experiments.append(experiment)
            return self._reply(experiment)
        if self.path == "/apis/v2beta1/runs":
            return self._reply(dict(body, run_id="run-0001", state="PENDING"))
        self._reply({"error": f"no route {self.path}"}, 404)


@pytest.fixture
def fake_kfp():
    server = FakeKfp(free_port())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_submit_uploads_the_compiled_pipeline_and_creates_a_run(fake_kfp, home, capsys):
    host = f"http://127.0.0.1:{fake_kfp.server_port}"
    code = main(["pipeline", "submit", "--host", host, "--experiment", "pneumo-ci", "--image", "example.org/pneumo:3",
                 "--data", "s3://xrays/chest_xray", "--mlflow-uri", "http://mlflow.mlflow:5000", "--profile", "gpu",
                 "--epochs", "5", "--run-name", "ci run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = json.loads(captured.out)
    assert printed["run_id"] == "run-0001" and printed["url"] == f"{host}/#/runs/details/run-0001"

    posts = {path: body for method, path, body in fake_kfp.requests if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "pneumo-ci"
    run = posts["/apis/v2beta1/runs"]
    assert run["display_name"] == "ci run"
    assert run["experiment_id"] == fake_kfp.experiments[0]["experiment_id"]
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    assert spec["pipelineInfo"]["name"] == "pneumonia-training"
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {"example.org/pneumo:3"}
    assert spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"][
        "resourceType"] == "nvidia.com/gpu"
    train_platform = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert train_platform["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    params = run["runtime_config"]["parameters"]
    assert params["data_uri"] == "s3://xrays/chest_xray" and params["mlflow_uri"] == "http://mlflow.mlflow:5000"
    assert params["profile"] == "gpu" and params["epochs"] == 5 and params["image_size"] == 224


def test_submit_to_an_unreachable_host_is_one_line_and_quick(home, capsys):
    started = time.monotonic()
    line = fails_with(capsys, ["pipeline", "submit", "--host", f"http://127.0.0.1:{free_port()}",
                               "--data", "s3://xrays/chest_xray", "--mlflow-uri", "http://mlflow:5000"])
    assert "does not answer" in line
    assert time.monotonic() - started < 15


def test_submit_to_something_that_is_not_kfp_is_one_line(fake_kfp, home, capsys):
    line = fails_with(capsys, ["pipeline", "submit", "--host", f"http://127.0.0.1:{fake_kfp.server_port}/not-kfp",
                               "--data", "s3://xrays/chest_xray", "--mlflow-uri", "http://mlflow:5000"])
    assert "HTTP 404" in line


@pytest.mark.parametrize("argv, message", [
    (["--host", "http://kfp:8080", "--mlflow-uri", "http://mlflow:5000"], "--data is required"),
    (["--host", "http://kfp:8080", "--data", "s3://b/p", "--mlflow-uri", "sqlite:///mlflow.db"],
     "cannot be reached from the cluster"),
    (["--data", "s3://b/p", "--mlflow-uri", "http://mlflow:5000"], "--host is required"),
    (["--host", "http://kfp:8080", "--data", "s3://b/p", "--mlflow-uri", "http://mlflow:5000", "--profile", "xl"],
     "unknown profile 'xl'"),
    (["--host", "http://kfp:8080", "--data", "s3://b/p", "--mlflow-uri", "http://mlflow:5000", "--image", "a b"],
     "not a container image reference"),
])
def test_bad_submit_input_is_one_line(home, capsys, argv, message):
    assert message in fails_with(capsys, ["pipeline", "submit", *argv])


def test_help_everywhere(capsys):
    for argv in (["pipeline"], ["pipeline", "compile"], ["pipeline", "run"], ["pipeline", "submit"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0
        assert "usage: pneumoscope pipeline" in capsys.readouterr().out
