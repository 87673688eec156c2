"""Monitoring shipped in helm/ and manifests/: the alerts' promtool unit tests, the rules and monitors as the
chart renders them (validated against the prometheus-operator CRD schemas with unknown fields rejected), and
the Grafana dashboard. The real-Prometheus checks of every expression are in test_rollout_local.py."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.manifests import helm_template
from test_manifests import crd_errors

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "helm" / "pneumoscope" / "files" / "prometheus-rules.yaml"
DASHBOARD = REPO / "helm" / "pneumoscope" / "files" / "grafana-dashboard.json"
ALERTS = {"PneumoscopeHighErrorRatio", "PneumoscopeHighLatencyP99", "PneumoscopePredictorDown",
          "PneumoscopeRejectionSpike", "PneumoscopePredictionMixDrift", "PneumoscopeCanaryWorseThanStable"}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make test` installs Debian's prometheus (make deps-monitoring)"
    return path


@pytest.fixture(scope="module")
def monitoring_objects() -> dict:
    objects = helm_template(set_values={"monitoring": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}})
    return {(o["kind"], o["metadata"]["name"]): o for o in objects if o["apiVersion"].startswith("monitoring.")
            or o["metadata"]["name"].endswith("grafana-dashboard")}


def test_every_alert_has_a_promtool_test_that_fires_and_one_that_stays_quiet():
    tests = yaml.safe_load((REPO / "tests" / "deploy" / "monitoring" / "prometheus-rules.test.yaml").read_text())["tests"]
    firing, quiet = set(), set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    rules = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert rules == ALERTS
    assert firing == quiet == ALERTS


def test_promtool_unit_tests_of_the_alerts_pass():
    result = subprocess.run([promtool(), "test", "rules", "prometheus-rules.test.yaml"], capture_output=True,
                            text=True, timeout=120, cwd=REPO / "tests" / "deploy" / "monitoring")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_chart_ships_exactly_the_tested_rules_and_promtool_accepts_them(monitoring_objects, tmp_path):
    rule = monitoring_objects[("PrometheusRule", "pneumoscope")]
    assert rule["spec"] == yaml.safe_load(RULES.read_text())  # one source: the file promtool tests
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run([promtool(), "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_monitors_cover_transformer_predictor_and_web_and_validate_strictly(monitoring_objects):
    kinds = set(monitoring_objects)
    assert {("PodMonitor", "pneumoscope-transformer"), ("PodMonitor", "pneumoscope-predictor"),
            ("ServiceMonitor", "pneumoscope-web"), ("PrometheusRule", "pneumoscope")} <= kinds
    for (kind, name), obj in monitoring_objects.items():
        if kind != "ConfigMap":
            assert crd_errors(obj) == [], (kind, name)
            assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for component in ("transformer", "predictor"):
        monitor = monitoring_objects[("PodMonitor", f"pneumoscope-{component}")]["spec"]
        assert monitor["selector"]["matchLabels"]["component"] == component
        targets = {r["targetLabel"] for r in monitor["podMetricsEndpoints"][0]["relabelings"]}
        assert {"component", "model_version"} <= targets


@pytest.mark.parametrize("kind, path, typo", [
    ("PodMonitor", ("spec",), ("podMetricsEndpoints", "podMetricEndpoints")),
    ("ServiceMonitor", ("spec", "endpoints", 0), ("interval", "intervall")),
    ("PrometheusRule", ("spec", "groups", 0, "rules", 0), ("for", "four")),
])
def test_a_typo_in_a_monitoring_object_fails_its_schema(monitoring_objects, kind, path, typo):
    obj = copy.deepcopy(next(o for (k, _), o in monitoring_objects.items() if k == kind))
    node = obj
    for key in path:
        node = node[key]
    node[typo[1]] = node.pop(typo[0])
    assert crd_errors(obj), f"{kind}: {typo[1]} was accepted"


def test_the_dashboard_ships_as_a_sidecar_configmap_with_the_required_panels(monitoring_objects):
    config_map = monitoring_objects[("ConfigMap", "pneumoscope-grafana-dashboard")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["pneumoscope-serving.json"])
    assert dashboard == json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Latency by stage (p99)", "Throughput", "Errors and rejections", "Predictions by class",
            "Probability histogram", "Model version and traffic split"} <= titles
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
