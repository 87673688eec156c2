"""The `pneumoscope` CLI end to end on a small real subset: prepare, train (+ resume), evaluate; and
that bad input ends in one clear line with a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.evaluation import EvalSettings, evaluate_checkpoint
from conftest import make_kaggle_subset

ENV = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env=env or ENV)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (("data", "prepare", "--data", "/definitely/missing"), "data folder not found"),
    (("train", "--cache", "/x", "--out", "/y", "--profile", "huge"), "invalid choice: 'huge'"),
    (("train", "--cache", "/definitely/missing", "--out", "/tmp/x", "--profile", "smoke"), "cache folder not found"),
    (("evaluate", "models:/pneumonia/1", "/tmp", "--mlflow-uri", "http://127.0.0.1:9"), "does not answer"),
    (("evaluate", "models:/pneumonia/1", "/tmp", "--mlflow-uri", "ftp://nowhere"), "unsupported MLflow tracking URI"),
    (("evaluate", "/definitely/missing", "/tmp"), "model not found"),
])
def test_bad_input_is_one_clear_line(args, expected, tmp_path):
    line = one_error_line(run_cli(*args, cwd=tmp_path))
    assert expected in line


def test_empty_class_is_one_clear_line(tmp_path):
    (tmp_path / "data" / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "data" / "train" / "PNEUMONIA").mkdir(parents=True)
    line = one_error_line(run_cli("data", "prepare", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "c")))
    assert "class folder is empty" in line


def test_help_everywhere():
    for args in ((), ("data", "prepare"), ("train",), ("evaluate",)):
        result = run_cli(*args, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout


@pytest.mark.integration
def test_prepare_train_resume_evaluate(tmp_path, shared_224):
    data = make_kaggle_subset(tmp_path / "data", per_class=40, splits=("train",))
    make_kaggle_subset(tmp_path / "data", per_class=10, splits=("test",), offset=200)
    prep = run_cli("data", "prepare", "--data", str(data), "--out", str(tmp_path / "cache"), "--profile", "smoke",
                   "--val-fraction", "0.25", "--holdout-fraction", "0")
    assert prep.returncode == 0, prep.stderr
    summary = json.loads(prep.stdout)
    assert summary["splits"]["test"] == {"NORMAL": 10, "PNEUMONIA": 10}

    first = run_cli("train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "ckpt"), "--profile", "smoke")
    assert first.returncode == 0, first.stderr
    assert "random initialisation" in first.stderr  # no ImageNet weights here, and it says so
    second = run_cli("train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "ckpt"), "--profile", "smoke",
                     "--epochs", "2")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "at epoch 2" in second.stderr
    history = json.loads((tmp_path / "ckpt" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]

    evaluate_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", tmp_path / "cache", tmp_path / "eval",
                        EvalSettings(n_bootstrap=50, int8=False))
    bundle = tmp_path / "eval" / "bundle"
    result = run_cli("evaluate", str(bundle), str(data), "--split", "test", "--json", "--bootstrap", "50")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert {"auc", "accuracy", "sensitivity", "specificity", "ece", "threshold", "n"} <= set(metrics)
    assert metrics["n"] == 20
    stored = json.loads((bundle / "pneumoscope.json").read_text())
    assert metrics["threshold"] == stored["threshold"]  # the threshold chosen on val, never on test
    # the engine accuracy gate travels with the model, hashed, and the fp32 graph passes it
    from model.bundle import OUTPUT_NAMES, Bundle, make_session
    from model.engine_gate import GateSet, check

    assert stored["engine_gate"]["n"] > 0 and "gate.npz" in stored["files"]
    gate = GateSet.load(Bundle.load(bundle))
    x = gate.tensors(Bundle.load(bundle).preprocess)
    # logit, cam and the OOD detector's features: the gate compares the detector's scores too
    gated = check(gate, *make_session(bundle / "model.onnx").run(list(OUTPUT_NAMES), {"image": x}))
    assert gated.passed, gated.reason
    assert gated.max_ood_score_diff >= 0  # the bundle's detector was scored (nan without one)
