"""MLflow away at the end of training, on a real MLflow tracking server (started with setsid, killed by process
group), with the register step of the pipeline (components.steps.register, the function kfp.local runs) on a
tiny trained and evaluated model:

- the server is down: the step fails, and the model, its metrics and report are kept under
  PNEUMOSCOPE_HOME/registrations/RUN; `pneumoscope register --retry RUN` says it stays kept while the server is
  down, and registers it (once) when it is back;
- the server's artifact store (S3: moto_server behind a fault-injecting proxy) goes away halfway through the
  upload: the step fails after the server's retries; the retry registers one version and deletes the
  half-logged run with its objects, so nothing partial stays in S3.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from fault_proxy import FaultProxy
from mlflow_server import MlflowServer
from webapp_fixtures import make_bucket, pneumoscope

pytestmark = pytest.mark.integration

RUN = "pneumonia-training-20261202-101500"
#: The MLflow client's own HTTP retries, shortened (the defaults wait minutes before giving up).
FAST_CLIENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def register_step(tiny_model, tracking_uri: str, where: Path):
    """The register component's function, on the tiny model's artifacts, as kfp.local would call it (the train
    step's output folder, made under ``where``, holds the history and the resolved training settings beside the
    checkpoint)."""
    import shutil
    import tempfile

    from components import steps

    trained = Path(tempfile.mkdtemp(prefix="trained-", dir=where))
    shutil.copy(tiny_model.train_dir / "history.json", trained / "history.json")
    (trained / "params.json").write_text(json.dumps({"profile": "smoke", "epochs": 1, "image_size": 32}))
    dataset = SimpleNamespace(path=str(tiny_model.cache), metadata={"limit_per_class": 0})
    checkpoint = SimpleNamespace(path=str(trained), metadata={})
    model = SimpleNamespace(path=str(tiny_model.eval_dir), metadata={})
    return steps.register(dataset, checkpoint, model, mlflow_uri=tracking_uri, model_name="pneumonia",
                          promotion="auto", n_bootstrap=100, pipeline_run_id=RUN, pipeline_run_name="retry test")


@pytest.fixture
def home(tmp_path, monkeypatch):
    for key, value in {"PNEUMOSCOPE_HOME": str(tmp_path / "home"), **FAST_CLIENT}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def versions(tracking_uri: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri, tracking_uri).search_model_versions("name = 'pneumonia'")


def test_mlflow_down_at_the_end_of_training_keeps_the_run_and_register_retry_finishes_it(tiny_model, home, tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), tmp_path / "mlflow.log")
    server.start()
    server.kill()  # down when the register step reaches it (and its workers with it: killed by process group)
    with pytest.raises(Exception, match="does not answer"):
        register_step(tiny_model, server.url, tmp_path)
    kept = home / "registrations" / RUN
    assert {p.name for p in kept.iterdir()} >= {"bundle", "report.json", "history.json", "params.json", "plots",
                                                "val_images.npy", "registration.json"}
    assert (json.dumps(json.loads((kept / "report.json").read_text()), sort_keys=True)
            == json.dumps(tiny_model.report, sort_keys=True))  # as text: the report holds NaN (no CI on one class)
    from model.bundle import Bundle

    assert Bundle.load(kept / "bundle").sha256 == Bundle.load(tiny_model.bundle).sha256
    env = {"PNEUMOSCOPE_HOME": str(home), **FAST_CLIENT}
    listed = pneumoscope("register", "--list", env=env)
    assert listed.returncode == 0 and json.loads(listed.stdout)["run"] == RUN

    still_down = pneumoscope("register", "--retry", RUN, env=env)
    assert still_down.returncode == 2, still_down.stderr
    line = still_down.stderr.strip().splitlines()[-1]
    assert "does not answer" in line and "stays kept" in line and kept.is_dir()

    server.start()  # back, same store
    try:
        done = pneumoscope("register", "--retry", RUN, env=env)
        assert done.returncode == 0, done.stderr
        registration = json.loads(done.stdout)
        assert registration["version"] == "1" and "champion" in registration["aliases"]
        assert not kept.exists()
        from mlflow import MlflowClient

        client = MlflowClient(server.url, server.url)
        version = client.get_model_version("pneumonia", "1")
        assert version.tags["bundle_sha256"] == Bundle.load(tiny_model.bundle).sha256
        assert version.tags["registration_id"] == RUN
        run = client.get_run(registration["run_id"])
        assert run.data.metrics["holdout_auc"] == pytest.approx(tiny_model.report["splits"]["holdout"]["auc"])
        assert run.data.metrics["threshold"] == pytest.approx(tiny_model.report["threshold"])
        assert run.data.tags["pneumoscope.pipeline_run_id"] == RUN
        assert "report.json" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation")}
        again = pneumoscope("register", "--retry", RUN, env=env)
        assert again.returncode == 2 and "no kept registration" in again.stderr
        # the pipeline's own retry of the same run (its step again) finishes nothing twice
        assert register_step(tiny_model, server.url, tmp_path)[1] == "1"
        assert len(versions(server.url)) == 1
    finally:
        server.stop()


def test_s3_gone_halfway_through_the_artifact_upload_leaves_no_partial_objects_after_the_retry(
        tiny_model, home, tmp_path, moto_endpoint, monkeypatch):
    import boto3
    import mlflow

    make_bucket(moto_endpoint, "mlflow-artifacts")
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")

    def objects() -> set[str]:
        return {o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])}

    with FaultProxy(int(moto_endpoint.rsplit(":", 1)[1])) as proxy:
        server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", "s3://mlflow-artifacts/mlflow",
                              tmp_path / "mlflow.log",
                              env={"MLFLOW_S3_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": "testing",
                                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                                   "AWS_MAX_ATTEMPTS": "3", "AWS_RETRY_MODE": "standard"})
        server.start()
        try:
            log_model = mlflow.pyfunc.log_model

            def s3_goes_away_then_log_model(*args, **kwargs):  # the plots and the report are in S3 by now
                proxy.set("refuse")
                return log_model(*args, **kwargs)

            monkeypatch.setattr(mlflow.pyfunc, "log_model", s3_goes_away_then_log_model)
            before = proxy.connections
            with pytest.raises(Exception):
                register_step(tiny_model, server.url, tmp_path)
            assert proxy.connections - before >= 3, "the server retried the upload"
            partial = objects()
            assert partial, "the first artifacts reached S3 before it went away"
            assert (home / "registrations" / RUN / "registration.json").is_file()
            assert not versions(server.url)
            monkeypatch.setattr(mlflow.pyfunc, "log_model", log_model)
            proxy.set("pass")
            from model.kept_registration import retry

            registration = retry(home, RUN)
            assert registration.version == "1" and len(versions(server.url)) == 1
            left = objects()
            assert not (left & partial), f"partial objects left: {sorted(left & partial)[:5]}"
            from mlflow import MlflowClient

            client = MlflowClient(server.url, server.url)
            runs = client.search_runs([client.get_experiment_by_name("pneumoscope").experiment_id],
                                      run_view_type=3)  # ALL: the deleted ones too
            deleted = [r for r in runs if r.info.lifecycle_stage == "deleted"]
            assert len(deleted) == 1 and deleted[0].info.run_id != registration.run_id
            assert any(registration.run_id in key for key in left)
        finally:
            server.stop()
    assert os.environ.get("PNEUMOSCOPE_HOME") == str(home)
