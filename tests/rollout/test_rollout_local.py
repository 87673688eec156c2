"""The local canary end to end, on real processes: two registered versions that differ in image size
(128 vs 224 px) and threshold serve side by side behind a real nginx (Debian) splitting traffic by weight;
a real Prometheus (Debian) scrapes both sides.

One module fixture starts everything once (stacks and Prometheus cost tens of seconds on 2 cores); the tests
run in file order, each leaving the canary in the state the next one expects:

1. every answer through the split (REST and gRPC) names one version and equals that version served alone;
2. every dashboard panel's PromQL and every alert expression runs against the live data;
3. with the canary made slower by a test-only setting (PNEUMOSCOPE_TEST_DELAY_MS), `rollout analyze` says
   WORSE with the numbers, `promote --if-healthy` refuses, and the canary-worse alert fires;
4. rollback and promote reconfigure nginx under load without a dropped request;
5. stopping the predictor makes the predictor-down alert go pending, then firing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from model.cli import main
from prometheus_server import PrometheusServer
from serving_fixtures import XRAY_224, XRAY_FULL, register, require_data, shared_bundle, xray_files



DELAY_MS = 400  # the canary's added latency (test-only setting)


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    from mlflow import MlflowClient

    from rollout.local_canary import LocalCanary
    from serving.settings import ServingSettings
    from serving.stack import free_port, port_free

    require_data()
    root = tmp_path_factory.mktemp("local-canary")
    small, _ = shared_bundle(128, seed=0)
    large, _ = shared_bundle(224, seed=1, int8=False)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    assert register(small, tracking_uri) == "1" and register(large, tracking_uri, alias="challenger") == "2"
    client = MlflowClient(tracking_uri, tracking_uri)
    from model.bundle import Bundle

    for version, bundle in (("1", small), ("2", large)):  # what registration tags (model.registry)
        client.set_model_version_tag("pneumonia", version, "evaluation_gate", "passed")
        client.set_model_version_tag("pneumonia", version, "reference_distribution",
                                     json.dumps(Bundle.load(bundle).meta["reference"]))
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "PNEUMOSCOPE_HOME": str(root / "home"), "PNEUMOSCOPE_POLL_S": "0.1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    while True:
        port = free_port()
        if port_free(port + 1):
            break
    # everything admitted up to 16: these tests are about the traffic split, not admission
    settings = ServingSettings(threads=1, max_inflight=16, latency_budget_ms=600_000, mlflow_tracking_uri=tracking_uri)
    local = LocalCanary(root / "home", port, serving_settings=settings, log_dir=root,
                        env_for_version=lambda v: {"PNEUMOSCOPE_TEST_DELAY_MS": str(DELAY_MS)} if v == "2" else {})
    prometheus = None
    try:
        local.start("models:/pneumonia@champion")
        prometheus = PrometheusServer(local.state.targets, for_s=2, workdir=root / "prometheus")
        yield {"local": local, "url": f"http://127.0.0.1:{port}", "grpc": f"127.0.0.1:{port + 1}",
               "prometheus": prometheus, "mlflow": client, "bundles": {"1": small, "2": large}, "root": root}
    finally:
        if prometheus is not None:
            prometheus.stop()
        local.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def uploads() -> list[bytes]:
    return ([f.read_bytes() for f in xray_files(per_class=4, root=XRAY_224, offset=40)]
            + [f.read_bytes() for f in xray_files(per_class=1, root=XRAY_FULL, offset=10)])


def rollout(capsys, *argv) -> tuple[int, str, str]:
    code = main(["rollout", *argv, "--local"])
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def ask(url: str, image: bytes) -> tuple[int, dict]:
    body = {"instances": [{"image": {"b64": base64.b64encode(image).decode()}}]}
    response = httpx.post(f"{url}/v1/models/pneumonia:predict", json=body, timeout=120)
    return response.status_code, (response.json()["predictions"][0] if response.status_code == 200 else {})


class Load:
    """Clients sending requests through nginx until stopped; every status code is kept."""

    def __init__(self, url: str, images: list[bytes], clients: int = 2):
        self.url, self.images, self.codes, self.versions = url, images, [], []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            try:
                code, answer = ask(self.url, self.images[n % len(self.images)])
            except httpx.HTTPError as exc:
                code, answer = type(exc).__name__, {}
            self.codes.append(code)
            self.versions.append(answer.get("model_version"))
            n += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self.threads:
            t.join(180)


@pytest.mark.integration
def test_every_answer_through_the_split_is_one_versions_answer(canary, uploads, capsys):
    code, out, err = rollout(capsys, "canary", "--version", "2", "--percent", "50")
    assert code == 0, err
    assert "canary of version 2 at 50 % is serving (stable: version 1)" in out
    sides = canary["local"].info()["sides"]
    assert {s: v["version"] for s, v in sides.items()} == {"stable": "1", "canary": "2"}
    alone = {v["version"]: [ask(v["rest"], image)[1] for image in uploads] for v in sides.values()}
    assert alone["1"][0]["threshold"] != alone["2"][0]["threshold"]
    seen = {"1": 0, "2": 0}
    for _ in range(3):
        for i, image in enumerate(uploads):
            status, answer = ask(canary["url"], image)
            assert status == 200
            version = answer["model_version"]
            seen[version] += 1
            assert answer == alone[version][i], (i, answer, alone[version][i])
    assert min(seen.values()) >= 3, seen  # a real split: both versions answered through nginx

    # gRPC through nginx's h2c port, in a fresh process (tritonclient's protobufs clash with kserve's)
    image = xray_files(per_class=1, root=XRAY_224, offset=40)[0]
    grpc_versions = set()
    for _ in range(12):
        result = subprocess.run([sys.executable, "-m", "model.cli", "predict", str(image), "--url", canary["grpc"],
                                 "--protocol", "grpc", "--json"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        expected = alone[answer["model_version"]][0]
        # that version's predictor on the same image, alone in its request both times: the same engine call,
        # deterministic, so identical (the float32 values travel unchanged over REST and gRPC)
        assert answer["probability"] == expected["probability"]
        assert answer["threshold"] == expected["threshold"]
        assert answer["label"] == expected["label"]
        grpc_versions.add(answer["model_version"])
    assert grpc_versions == {"1", "2"}


def _substitute(expr: str) -> str:
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace('"$namespace"', '".*"'))


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b([a-z_:][a-z0-9_:]*)\s*(?:\{|\[)", expr))
    return names - {"by", "on", "without", "ignoring", "group_left", "group_right"}


@pytest.mark.integration
def test_every_dashboard_query_and_alert_expression_runs_on_the_live_stack(canary, uploads):
    import yaml

    from prometheus_server import RULES

    prometheus = canary["prometheus"]
    with Load(canary["url"], uploads) as load:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(load.codes) < 60:
            time.sleep(1)
        for _ in range(4):  # refused uploads (both sides, most likely): the rejection panel has data
            body = {"instances": [{"image": {"b64": base64.b64encode(b"this is not an X-ray").decode()}}]}
            bad = httpx.post(f"{canary['url']}/v1/models/pneumonia:predict", json=body, timeout=30)
            assert 400 <= bad.status_code < 500, bad.text
    time.sleep(3)  # two more scrapes
    assert set(load.codes) == {200}
    dashboard = json.loads((RULES.parent / "grafana-dashboard.json").read_text())
    # the predictor-call failure panel is empty while no call fails: a valid empty result
    may_be_empty = {"pneumoscope_predictor_errors_total"}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = _substitute(target["expr"])
            result = prometheus.query(expr)
            if not _metric_names(expr) & may_be_empty:
                assert result, (f"panel {panel['title']!r}: no data for {expr}; targets: {prometheus.query('up')}; "
                                f"series: {[prometheus.query(f'count({n})') for n in _metric_names(expr)]}")
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        prometheus.query(rule["expr"])  # valid PromQL that Prometheus evaluates on these series
        for name in _metric_names(rule["expr"]):  # and every series it reads exists (no typo, no missing metric)
            assert prometheus.query(f"count({name})"), f"{rule['alert']}: no series {name}"
    firing = {a["labels"]["alertname"] for a in prometheus.alerts()}
    assert not firing & {"PneumoscopeHighErrorRatio", "PneumoscopePredictorDown", "PneumoscopeRejectionSpike"}


@pytest.mark.integration
def test_a_slower_canary_is_judged_worse_and_not_promoted(canary, uploads, capsys):
    prometheus = canary["prometheus"]
    # The delay really reaches the canary's predictor (the 224 px canary is also slower by its size alone, which
    # on a fast CPU is far less than the delay: the verdict must come from the delay, not from the machine).
    canary_side = canary["local"].info()["sides"]["canary"]["rest"]
    started = time.perf_counter()
    assert ask(canary_side, uploads[0])[0] == 200
    assert time.perf_counter() - started >= DELAY_MS / 1000
    with Load(canary["url"], uploads):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the canary-worse alert: pending, then firing
            states = {a["state"] for a in prometheus.alerts()
                      if a["labels"]["alertname"] == "PneumoscopeCanaryWorseThanStable"
                      and a["labels"].get("model_version") == "2"}
            if "firing" in states:
                break
            time.sleep(1)
    assert "firing" in states
    env = {"PNEUMOSCOPE_PROMETHEUS_URL": prometheus.url, "PNEUMOSCOPE_MIN_REQUESTS": "10"}
    os.environ.update(env)
    try:
        code, out, err = rollout(capsys, "analyze", "--window", "2m")
        assert code == 3, (out, err)
        assert "verdict: WORSE" in out
        p99_line = next(line for line in out.splitlines() if "p99 latency" in line)
        assert p99_line.startswith("  FAIL"), out
        canary_p99 = float(re.search(r"canary ([0-9.]+) s", p99_line)[1])
        # Prometheus interpolates the p99 inside the histogram bucket that holds it (0.25-0.5 s for a 400 ms
        # delay), so the estimate can sit below the delay itself, but not below that bucket's lower bound
        assert canary_p99 > 0.25
        code, out, err = rollout(capsys, "status")
        assert code == 0, err
        assert "local canary" in out and "stable version 1, canary version 2 at 50 %" in out
        assert re.search(r"live canary \(version 2, 5m\): [1-9][0-9]* requests", out), out
        code, out, err = rollout(capsys, "promote", "--if-healthy")
        assert code != 0 and "not promoting version 2: the canary is worse" in err.splitlines()[-1]
        assert canary["mlflow"].get_model_version_by_alias("pneumonia", "champion").version in ("1", 1)
        assert set(canary["local"].info()["sides"]) == {"stable", "canary"}
    finally:
        for k in env:
            os.environ.pop(k, None)


@pytest.mark.integration
def test_rollback_and_promote_reconfigure_nginx_under_load_without_dropping_a_request(canary, uploads, capsys):
    with Load(canary["url"], uploads, clients=3) as load:
        time.sleep(2)
        code, out, err = rollout(capsys, "rollback")
        assert code == 0, err
        time.sleep(2)
        code, out, err = rollout(capsys, "canary", "--version", "2", "--percent", "30")
        assert code == 0, err
        time.sleep(2)
        code, out, err = rollout(capsys, "promote")
        assert code == 0, err
        before_end = len(load.versions)
        time.sleep(2)
    assert load.codes and set(load.codes) == {200}, {c for c in load.codes if c != 200}
    assert len(load.codes) > 20
    assert set(load.versions[before_end + 6:]) == {"2"}  # after promote only version 2 answers
    assert str(canary["mlflow"].get_model_version_by_alias("pneumonia", "champion").version) == "2"
    assert {s: v["version"] for s, v in canary["local"].info()["sides"].items()} == {"stable": "2"}
    code, out, _ = rollout(capsys, "history")
    actions = [line.split()[2] for line in out.splitlines()]
    assert actions == ["canary", "rollback", "canary", "promote"]


@pytest.mark.integration
def test_a_stopped_predictor_makes_the_predictor_down_alert_pending_then_firing(canary):
    prometheus = canary["prometheus"]
    stack = canary["local"].stacks["2"]
    pid = stack.children["predictor"].process.pid
    os.kill(pid, signal.SIGSTOP)  # stopped, not dead: the stack's supervisor does not restart it
    try:
        states = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "firing" not in states:
            for alert in prometheus.alerts():
                if alert["labels"]["alertname"] == "PneumoscopePredictorDown" and \
                        alert["labels"].get("model_version") == "2":
                    if not states or states[-1] != alert["state"]:
                        states.append(alert["state"])
            time.sleep(0.2)
        assert states[:2] == ["pending", "firing"], states
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("argv, message", [
    (["--canary", "models:/pneumonia@challenger"], "--canary must be models:/NAME/VERSION"),
    (["--canary", "models:/pneumonia/2", "--canary-percent", "100"], "between 1 and 99, not 100"),
])
def test_serve_refuses_a_bad_canary_with_one_line(argv, message, capsys):
    code = main(["serve", "--model", "models:/pneumonia/1", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0]


def test_local_commands_without_a_running_canary_say_how_to_start_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PNEUMOSCOPE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code, _, err = rollout(capsys, "status")
    assert code != 0 and len(err.splitlines()) == 1
    assert "no local canary is running" in err and "--traffic-split" in err


def test_only_a_live_process_that_wrote_the_state_owns_it():
    """The local canary's state document names the process that runs it; what a failed or killed canary left
    behind names nobody (pid 0 would be the caller's own process group for os.kill)."""
    from rollout.local import owner, process_start_time

    me, started = os.getpid(), process_start_time(os.getpid())
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    for left_behind in (None, {}, {"status": {}}, {"status": None}, {"status": {"pid": None}}, {"status": {"pid": 0}},
                        {"status": {"pid": -1}}, {"status": {"pid": True}}, {"status": {"pid": "12"}},
                        {"status": {"pid": gone.pid}}, {"status": {"pid": me, "pid_started": started + 1}}):
        assert owner(left_behind) is None, left_behind
    assert owner({"status": {"pid": me, "pid_started": started}}) == me
    assert owner({"status": {"pid": me}}) == me  # a state file written before the start time was recorded


def test_a_canary_that_failed_to_start_leaves_nothing_that_breaks_the_next_one(tmp_path, capsys, monkeypatch):
    """A canary that never started (e.g. nginx missing) left ``{"status": {}}``: every later command must treat
    it as no canary, not crash (it was KeyError 'pid')."""
    monkeypatch.setenv("PNEUMOSCOPE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    state = tmp_path / "rollout" / "local.json"
    state.parent.mkdir()
    state.write_text('{"status": {}}')
    code, _, err = rollout(capsys, "status")
    assert code != 0 and len(err.splitlines()) == 1 and "no local canary is running" in err
    # serve gets past the state file to its next check: this registry has no such model (one line, no traceback)
    code = main(["serve", "--model", "models:/pneumonia/1", "--traffic-split", "--port", str(_free_pair())])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err and "models:/pneumonia/1 does not exist" in err.splitlines()[-1], err


def test_a_canary_that_stops_without_having_started_leaves_the_state_alone(tmp_path):
    """``serve --traffic-split`` refused (another canary runs, a bad version) still stops its LocalCanary: that
    must neither write a state file nor mark the canary that does run as stopped."""
    from rollout.local import owner, process_start_time
    from rollout.local_canary import LocalCanary

    LocalCanary(tmp_path / "fresh", _free_pair()).stop()
    assert not (tmp_path / "fresh" / "rollout" / "local.json").exists()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = tmp_path / "busy" / "rollout" / "local.json"
        state.parent.mkdir(parents=True)
        doc = {"status": {"pid": other.pid, "pid_started": process_start_time(other.pid)}}
        state.write_text(json.dumps(doc))
        LocalCanary(tmp_path / "busy", _free_pair()).stop()
        assert json.loads(state.read_text()) == doc and owner(doc) == other.pid
    finally:
        other.kill()
        other.wait()


def _free_pair() -> int:
    from serving.stack import free_port, port_free

    while True:
        port = free_port()
        if port_free(port + 1):
            return port


NGINX_OWNER = """
import sys, time
from pathlib import Path
from rollout.local_canary import Nginx

nginx = Nginx(Path(sys.argv[1]), int(sys.argv[2]))
nginx.configure({"stable": (int(sys.argv[2]) + 2, int(sys.argv[2]) + 3)}, None)
print(nginx.process.pid, flush=True)
time.sleep(600)
"""


def test_nginx_does_not_outlive_a_killed_canary(tmp_path):
    """SIGKILL on the canary's process: its nginx goes too, or it would hold the ports of the next canary."""
    from rollout.local import _alive
    from rollout.local_canary import nginx_binary

    nginx_binary()
    port = _free_pair()
    owner_process = subprocess.Popen([sys.executable, "-c", NGINX_OWNER, str(tmp_path / "nginx"), str(port)],
                                     stdout=subprocess.PIPE, text=True)
    try:
        nginx_pid = int(owner_process.stdout.readline())
        assert _alive(nginx_pid)
    finally:
        owner_process.kill()
        owner_process.wait()
    deadline = time.monotonic() + 30
    while _alive(nginx_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(nginx_pid):
        os.kill(nginx_pid, signal.SIGKILL)
        pytest.fail("nginx outlived the process that started it")


@pytest.mark.integration
def test_serve_canary_of_a_version_that_failed_its_gate_needs_force_and_runs_with_the_default_home(tmp_path):
    """As a user runs it: no PNEUMOSCOPE_HOME (the default, relative ``.pneumoscope``, which nginx once read
    against its own prefix), and a canary version whose evaluation gate failed: refused, before anything
    starts, with the flag to use; with ``--force`` it serves."""
    require_data()
    small, _ = shared_bundle(128, seed=0)
    work = tmp_path / "work"
    work.mkdir()
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert register(small, tracking_uri) == "1" and register(small, tracking_uri, alias=None) == "2"
    from mlflow import MlflowClient

    MlflowClient(tracking_uri, tracking_uri).set_model_version_tag("pneumonia", "2", "evaluation_gate", "failed")
    env = {k: v for k, v in os.environ.items() if k != "PNEUMOSCOPE_HOME"}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PNEUMOSCOPE_THREADS="1")
    argv = [sys.executable, "-m", "model.cli", "serve", "--model", "models:/pneumonia/1", "--canary",
            "models:/pneumonia/2", "--port", str(_free_pair())]
    refused = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "use --force" in refused.stderr.strip().splitlines()[-1], refused.stderr
    assert not (work / ".pneumoscope" / "rollout" / "local.json").exists()  # refused before anything started
    serving = subprocess.Popen([*argv, "--force"], cwd=work, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        line = serving.stdout.readline()
        assert line.startswith("READY "), f"no READY line (exit {serving.poll()})"
        sides = json.loads(line.removeprefix("READY "))["sides"]
        assert {side: v["version"] for side, v in sides.items()} == {"stable": "1", "canary": "2"}
        state = json.loads((work / ".pneumoscope" / "rollout" / "local.json").read_text())
        assert state["status"]["pid"] == serving.pid
    finally:
        serving.terminate()
        assert serving.wait(120) == 0
