"""Integration: the whole pipeline on kfp.local (smoke profile, a subset of the real X-rays) against a
fresh SQLite MLflow store, twice; then the registry is read back with MlflowClient."""

from __future__ import annotations

import json

import pytest

from conftest import PIPELINE_SMOKE as SMOKE
from model.cli import main
from tests.pipelines.test_pipeline_fixtures import shared_xrays

pytestmark = pytest.mark.integration


def run_pipeline(capsys, *extra: str) -> dict:
    code = main(["pipeline", "run", "--local", "--data", str(shared_xrays()), *SMOKE, *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, "stdout holds only the result; the steps' logs go to stderr"
    assert "training ResNet-50" in captured.err and "Got executor_input" not in captured.err, \
        "stderr holds each step's own log, without kfp.local's echo of the step's inputs"
    return json.loads(lines[0])


def step_outputs(pipeline_root, run_name: str, step: str) -> dict:
    return json.loads((pipeline_root / run_name / step / "executor_output.json").read_text())


def test_two_local_runs_register_versions_with_metrics_params_tags_and_aliases(pipeline_first_run, monkeypatch,
                                                                                capsys):
    from mlflow import MlflowClient

    home, uri = pipeline_first_run["home"], pipeline_first_run["tracking_uri"]
    monkeypatch.setenv("PNEUMOSCOPE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    first = pipeline_first_run["result"]  # the first run, shared with the end-to-end serving test
    assert first["model_uri"] == "models:/pneumonia/1" and first["version"] == "1"
    assert set(first["aliases"]) == {"challenger", "champion"}
    assert first["pipeline_root"] == str(home / "pipeline_root")

    client = MlflowClient(uri, uri)
    version = client.get_model_version("pneumonia", "1")
    assert set(version.aliases) == {"challenger", "champion"}
    run = client.get_run(version.run_id)
    for metric in ("val_auc", "val_sensitivity", "val_specificity", "val_ece", "holdout_auc", "threshold",
                   "temperature", "train_loss"):
        assert metric in run.data.metrics, metric
    params = run.data.params
    assert params["profile"] == "smoke" and params["image_size"] == "64" and params["limit_per_class"] == "40"
    assert params["data_uri"] == str(shared_xrays().resolve()) and params["int8"] == "False"  # ../shared may be a link
    tags = run.data.tags
    assert len(tags["pneumoscope.manifest_sha256"]) == 64
    assert tags["pneumoscope.git_commit"] not in ("", "unknown")
    # kfp.local resolves dsl.PIPELINE_JOB_ID_PLACEHOLDER to a random 8-digit id (a UUID on a cluster)
    assert tags["pneumoscope.pipeline_run_id"] == first["pipeline_run_id"] and first["pipeline_run_id"].isdigit()
    assert params["kfp_run_name"] == first["pipeline_run_name"]
    # the data-quality gate's counts and thumbnails reach the run
    assert int(params["quality_text_overlay"]) >= 0 and float(params["quality_sharpness_cutoff"]) > 0
    assert params["num_gpus"] == "1"
    thumbnails = [a.path for a in client.list_artifacts(run.info.run_id, "data_quality")]
    assert thumbnails and all(p.endswith(".png") for p in thumbnails)

    # what the KFP UI shows: metrics, ROC + confusion matrix, the HTML report
    evaluate = step_outputs(home / "pipeline_root", first["pipeline_run_name"], "evaluate")["artifacts"]
    classification = evaluate["classification"]["artifacts"][0]["metadata"]
    assert classification["confidenceMetrics"] and classification["confusionMatrix"]["annotationSpecs"] == [
        {"displayName": "NORMAL"}, {"displayName": "PNEUMONIA"}]
    assert "val_auc" in evaluate["metrics"]["artifacts"][0]["metadata"]
    report = home / "pipeline_root" / first["pipeline_run_name"] / "evaluate" / "report"
    # every plot the evaluation draws (ROC, confusion matrix, calibration, risk-coverage), inlined once each
    from components.runtime import PLOTS

    page = report.read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS) == page.count("<figcaption>")
    assert all(f"<figcaption>{title}</figcaption>" in page for _, title in PLOTS)
    assert not list((home / "pipeline_root").rglob("last.pt")), "the resume state is not kept as an artifact"

    second = run_pipeline(capsys, "--mlflow-uri", uri, "--seed", "7")
    assert second["version"] == "2" and "challenger" in second["aliases"]
    assert second["pipeline_run_id"] != first["pipeline_run_id"]
    v2 = client.get_model_version("pneumonia", "2")
    assert "challenger" in v2.aliases and "challenger" not in client.get_model_version("pneumonia", "1").aliases
    assert v2.tags["promotion"] == second["promotion"]["reason"]
    assert "champion v1" in v2.tags["promotion"]  # the paired bootstrap test against the champion ran
    champion = client.get_model_version_by_alias("pneumonia", "champion").version
    assert str(champion) == ("2" if second["promotion"]["promote"] else "1")
