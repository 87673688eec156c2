"""``pneumoscope rollout`` against a Kubernetes API (kmock + KServe's controller, tests/kserve_mock.py)
driven by the real ``kubernetes`` client, and a real MLflow registry (SQLite).

The InferenceService is the chart's own (helm template, pinned with registryUri). Each test gets its own
namespace and registered model, so the tests do not share state. Commands run in-process through
``model.cli.main`` (the same entry point as the ``pneumoscope`` script), so their exit codes and the one
line they print are checked as a user sees them.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil

import pytest

from model.bundle import write_bundle
from model.cli import main
from model.preprocessing import PreprocessConfig
from kserve_mock import GROUP, PLURAL, VERSION, KubeApi

_COUNTER = itertools.count(1)


@pytest.fixture(scope="module")
def kube():
    api = KubeApi()
    yield api
    api.close()


@pytest.fixture(scope="module")
def chart_isvc():
    from deploy.manifests import helm_template

    objects = helm_template(set_values={"inference": {"model": {"storageUri": "", "registryUri": "models:/MODEL/1"}}})
    return next(o for o in objects if o["kind"] == "InferenceService")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _bundle(root, n: int):
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(f"graph of version {n}".encode() * 100)
    write_bundle(root, {"model_name": "pneumonia", "arch": "resnet50", "threshold": 0.5, "temperature": 1.0,
                        "preprocess": PreprocessConfig(image_size=128).to_dict(), "metrics": {}})
    return root


@pytest.fixture
def env(kube, chart_isvc, tracking_uri, tmp_path, monkeypatch):
    """A namespace with the chart's InferenceService on version 1, and a model with versions 1-5 in MLflow:
    1 champion, 2 and 3 passed their gate, 4 failed it, 5's artifact was altered after registration."""
    from kubernetes import client, config

    from model.bundle import Bundle
    from model.registry import connect

    n = next(_COUNTER)
    name, namespace = f"pneumonia-{n}", f"ns-{n}"
    mlflow = connect(tracking_uri)
    mlflow.create_registered_model(name)
    for version in range(1, 6):
        bundle = _bundle(tmp_path / f"v{version}", version)
        tags = {"bundle_sha256": Bundle.load(bundle).sha256,
                "evaluation_gate": "failed: holdout AUC 0.61 < 0.80" if version == 4 else "passed"}
        mlflow.create_model_version(name, source=str(bundle), tags=tags)
    mlflow.set_registered_model_alias(name, "champion", "1")
    (tmp_path / "v5" / "model.onnx").write_bytes(b"tampered")
    isvc = json.loads(json.dumps(chart_isvc).replace("models:/MODEL/", f"models:/{name}/"))
    isvc["metadata"]["namespace"] = namespace
    kubeconfig = kube.kubeconfig(tmp_path / "kubeconfig")
    api = client.CustomObjectsApi(config.new_client_from_config(config_file=kubeconfig))
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, isvc)
    kube.set(ready_after_s=0.2, fail_revisions=False, forbidden=set())
    for key, value in {"KUBECONFIG": kubeconfig, "MLFLOW_TRACKING_URI": tracking_uri, "PNEUMOSCOPE_MODEL_NAME": name,
                       "PNEUMOSCOPE_NAMESPACE": namespace, "PNEUMOSCOPE_POLL_S": "0.05",
                       "PNEUMOSCOPE_PROMETHEUS_URL": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(key, value)

    class Env:
        def isvc(self):
            return kube.obj(namespace, "pneumonia")

        def champion(self):
            return str(mlflow.get_model_version_by_alias(name, "champion").version)

        def tags(self, version):
            return mlflow.get_model_version(name, str(version)).tags

    wait_ready(kube, namespace)
    e = Env()
    e.name, e.namespace, e.mlflow = name, namespace, mlflow
    yield e
    shutil.rmtree(tmp_path, ignore_errors=True)


def wait_ready(kube, namespace):
    import time

    from rollout.inferenceservice import rollout_progress

    for _ in range(200):
        if rollout_progress(kube.obj(namespace, "pneumonia"), None)[0]:
            return
        time.sleep(0.05)
    raise AssertionError("the mock never made the first revision ready")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["rollout", *argv])
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("pneumoscope: error:")]
    assert len(lines) == 1, err
    return lines[0]


def pinned(isvc, component) -> list[str]:
    """The model arguments of a component's containers (the predictor's; the transformer holds no model) and
    its version label."""
    spec = isvc["spec"][component]
    args = [a for c in spec["containers"] for a in c.get("args", []) if a.startswith(("--model_uri=", "--sha256="))]
    return args + [spec["labels"]["pneumoscope.io/model-version"]]


def expected_pin(env, component, version) -> list[str]:
    if component == "transformer":
        return [str(version)]
    return [f"--model_uri=models:/{env.name}/{version}", f"--sha256={env.tags(version)['bundle_sha256']}", str(version)]


def test_canary_patches_both_components_and_waits_for_kserve_to_report_the_split(env, capsys):
    code, out, err = run(capsys, "canary", "--version", "2", "--percent", "10")
    assert code == 0, err
    assert "canary of version 2 at 10 % is serving (stable: version 1)" in out
    assert "waiting:" in err  # progress while KServe moved the revision through not-ready to ready
    isvc = env.isvc()
    for component in ("predictor", "transformer"):
        assert isvc["spec"][component]["canaryTrafficPercent"] == 10
        assert pinned(isvc, component) == expected_pin(env, component, 2)
        traffic = {t["tag"]: t for t in isvc["status"]["components"][component]["traffic"]}
        assert traffic["latest"]["percent"] == 10 and traffic["prev"]["percent"] == 90
        assert traffic["prev"]["revisionName"] == isvc["status"]["components"][component]["latestRolledoutRevision"]
    assert {c["type"]: c["status"] for c in isvc["status"]["conditions"]} == {
        "IngressReady": "True", "PredictorReady": "True", "TransformerReady": "True", "Ready": "True"}
    annotations = isvc["metadata"]["annotations"]
    assert annotations["pneumoscope.io/stable-version"] == "1" and annotations["pneumoscope.io/canary-version"] == "2"
    assert "pneumoscope.io/rollout-pending" not in annotations
    assert env.champion() == "1"  # champion stays on the stable version during a canary
    tag = json.loads(env.tags(2)["rollout_history"])
    assert tag[-1]["action"] == "canary" and tag[-1]["outcome"] == "serving" and tag[-1]["user"] == "alice@test"

    # the same command again is a no-op; another canary, or one at a bad percentage, is refused
    assert run(capsys, "canary", "--version", "2", "--percent", "10")[0] == 0
    code, _, err = run(capsys, "canary", "--version", "3", "--percent", "20")
    assert code != 0 and "already running at 10 %" in one_error_line(err)
    assert env.isvc()["spec"]["predictor"]["canaryTrafficPercent"] == 10


def test_promote_moves_traffic_then_the_champion_alias(env, capsys):
    assert run(capsys, "canary", "--version", "2", "--percent", "25")[0] == 0
    code, out, err = run(capsys, "promote")
    assert code == 0, err
    assert "version 2 is promoted" in out
    isvc = env.isvc()
    for component in ("predictor", "transformer"):
        assert "canaryTrafficPercent" not in isvc["spec"][component]
        status = isvc["status"]["components"][component]
        assert status["traffic"] == [{"tag": "latest", "revisionName": status["latestCreatedRevision"], "percent": 100,
                                      "latestRevision": True}]
        assert status["latestRolledoutRevision"] == status["latestCreatedRevision"]
        assert status["previousRolledoutRevision"].endswith("00001")
    assert isvc["metadata"]["annotations"]["pneumoscope.io/stable-version"] == "2"
    assert env.champion() == "2"
    code, _, err = run(capsys, "promote")
    assert code != 0 and "no canary is running" in one_error_line(err)


def test_rollback_restores_the_stable_version_and_never_moves_the_champion(env, capsys):
    assert run(capsys, "canary", "--version", "3", "--percent", "50")[0] == 0
    code, out, err = run(capsys, "rollback")
    assert code == 0, err
    assert "version 1 serves 100 %" in out and "champion unchanged: 1" in out
    isvc = env.isvc()
    for component in ("predictor", "transformer"):
        assert "canaryTrafficPercent" not in isvc["spec"][component]
        assert pinned(isvc, component) == expected_pin(env, component, 1)
        assert [t["percent"] for t in isvc["status"]["components"][component]["traffic"]] == [100]
    assert "pneumoscope.io/canary-version" not in isvc["metadata"]["annotations"]
    assert env.champion() == "1"
    assert json.loads(env.tags(3)["rollout_history"])[-1]["outcome"] == "rolled back"
    code, _, err = run(capsys, "rollback")
    assert code != 0 and "nothing to roll back" in one_error_line(err)

    code, out, _ = run(capsys, "history")
    lines = out.splitlines()
    assert len(lines) == 2
    assert "alice@test  canary at 50 %  1 -> 3  serving" in lines[0]
    assert "alice@test  rollback  1 -> 3  rolled back" in lines[1]


@pytest.mark.parametrize("argv, message", [
    (["--version", "9", "--percent", "10"], "version 9 of model"),
    (["--version", "5", "--percent", "10"], "version 5 does not verify"),
    (["--version", "4", "--percent", "10"], "did not pass evaluation: its evaluation gate says 'failed"),
    (["--version", "1", "--percent", "10"], "already the stable version"),
    (["--version", "2", "--percent", "0"], "between 1 and 99, not 0"),
    (["--version", "2", "--percent", "100"], "between 1 and 99, not 100"),
])
def test_unsafe_canaries_are_refused_with_one_line_and_nothing_changes(env, capsys, argv, message):
    before = env.isvc()
    code, out, err = run(capsys, "canary", *argv)
    assert code != 0 and out == ""
    assert message in one_error_line(err)
    assert env.isvc() == before and env.champion() == "1"


def test_a_version_that_failed_its_gate_goes_out_with_force(env, capsys):
    code, out, err = run(capsys, "canary", "--version", "4", "--percent", "5", "--force")
    assert code == 0, err
    assert env.isvc()["metadata"]["annotations"]["pneumoscope.io/canary-version"] == "4"


def test_a_context_without_patch_rights_gets_one_line_and_nothing_half_done(env, kube, capsys):
    kube.set(forbidden={"patch"})
    before = env.isvc()
    code, _, err = run(capsys, "canary", "--version", "2", "--percent", "10")
    line = one_error_line(err)
    assert code != 0 and "forbidden: alice@test may not patch inferenceservices" in line and "ci-reader" in line
    assert env.isvc() == before
    assert env.champion() == "1" and "rollout_history" not in env.tags(2)


def test_an_alias_failure_after_the_patch_says_the_state_and_a_rerun_finishes(env, capsys, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    assert run(capsys, "canary", "--version", "2", "--percent", "10")[0] == 0
    real = MlflowClient.set_registered_model_alias

    def unavailable(self, *args, **kwargs):
        raise MlflowException("API request to the tracking server failed: 503 Service Unavailable")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", unavailable)
    code, out, err = run(capsys, "promote")
    line = one_error_line(err)
    assert code != 0
    assert "version 2 serves 100 % in the cluster" in line and "champion was NOT moved to 2 (still 1)" in line
    assert "run `pneumoscope rollout promote` again" in line
    isvc = env.isvc()
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"] and env.champion() == "1"
    assert json.loads(isvc["metadata"]["annotations"]["pneumoscope.io/rollout-pending"])["action"] == "promote"
    code, _, _ = run(capsys, "status", "--json")
    assert code == 0

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    code, out, err = run(capsys, "promote")
    assert code == 0, err
    assert "finished earlier step: promote of version 2: promoted" in err
    assert env.champion() == "2"
    assert "pneumoscope.io/rollout-pending" not in env.isvc()["metadata"]["annotations"]


def test_a_revision_that_never_gets_ready_times_out_with_the_state_and_a_rerun_finishes(env, kube, capsys):
    kube.set(fail_revisions=True)
    code, _, err = run(capsys, "canary", "--version", "2", "--percent", "10", "--timeout", "1")
    line = one_error_line(err)
    assert code != 0 and "applied in the cluster but not ready" in line and "RevisionFailed" not in line
    assert "container exited with code 1" in line
    kube.set(fail_revisions=False)
    from kubernetes import client, config

    api = client.CustomObjectsApi(config.new_client_from_config(config_file=os.environ["KUBECONFIG"]))
    api.patch_namespaced_custom_object(GROUP, VERSION, env.namespace, PLURAL, "pneumonia",
                                       {"spec": {"predictor": {"minReplicas": 2}}})
    code, out, err = run(capsys, "canary", "--version", "2", "--percent", "10")
    assert code == 0, err
    assert "finished earlier step: canary of version 2: serving" in err


def test_status_shows_versions_traffic_and_says_when_prometheus_is_unreachable(env, capsys):
    assert run(capsys, "canary", "--version", "2", "--percent", "10")[0] == 0
    code, out, err = run(capsys, "status")
    assert code == 0, err
    assert "stable version 1, canary version 2 at 10 %; MLflow champion: 1; Ready: True" in out
    assert "pneumonia-predictor-00002 10% (latest)" in out and "pneumonia-predictor-00001 90%" in out
    assert "live health: cannot reach Prometheus at http://127.0.0.1:9" in out


def test_an_unreachable_cluster_is_one_line_naming_the_url(env, capsys, tmp_path, monkeypatch):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "dead").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}], "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "dead"))
    code, _, err = run(capsys, "status")
    line = one_error_line(err)
    assert code != 0 and f"cannot reach the Kubernetes API at http://127.0.0.1:{port}" in line


def test_an_unreachable_prometheus_is_one_line_naming_the_url_and_promote_if_healthy_changes_nothing(env, capsys):
    assert run(capsys, "canary", "--version", "2", "--percent", "10")[0] == 0
    before = env.isvc()
    for argv in (["analyze"], ["promote", "--if-healthy"]):
        code, out, err = run(capsys, *argv)
        line = one_error_line(err)
        assert code != 0 and "cannot reach Prometheus at http://127.0.0.1:9" in line, argv
    assert env.isvc() == before and env.champion() == "1"
