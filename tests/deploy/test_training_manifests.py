"""manifests/training: the Kubeflow Trainer v2 TrainJob + TrainingRuntime, validated against the CRDs' own
OpenAPI schemas (../shared/schemas) with unknown fields rejected, as `kubectl apply --validate=strict` would."""

from __future__ import annotations

import copy
import json
import shlex
import subprocess

import jsonschema
import pytest
import yaml

from components.image import DEFAULT_IMAGE
from conftest import REPO, SHARED_DATA

MANIFESTS = REPO / "manifests" / "training"
SCHEMAS = SHARED_DATA.parent / "schemas"
CRDS = {"TrainJob": "kubeflow-trainjob-v1alpha1.schema.json",
        "TrainingRuntime": "kubeflow-trainingruntime-v1alpha1.schema.json"}


def strict(schema):
    """Every object schema that lists its properties and says nothing about others refuses others."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    path = SCHEMAS / CRDS[kind]
    if not path.is_file():
        pytest.skip(f"the Kubeflow Trainer schema {path} is missing (the shared schemas folder); this test needs it")
    schema = strict(json.loads(path.read_text()))
    # apiVersion/kind/metadata are checked by the API server itself, not by the CRD's schema.
    schema["properties"].update(apiVersion={"const": "trainer.kubeflow.org/v1alpha1"}, kind={"const": kind},
                                metadata={"type": "object"})
    return jsonschema.Draft202012Validator(schema)


def errors(document: dict) -> list[str]:
    validator = crd_validator(document["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.fixture(scope="module")
def documents() -> dict[str, dict]:
    """What `kubectl kustomize manifests/training` renders, by kind."""
    rendered = subprocess.run(["kubectl", "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=60,
                              check=True).stdout
    return {d["kind"]: d for d in yaml.safe_load_all(rendered)}


def test_kustomization_renders_the_runtime_the_job_and_the_volume(documents):
    assert set(documents) == {"TrainJob", "TrainingRuntime", "PersistentVolumeClaim"}


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_trainer_resources_match_the_crd_schema(documents, kind):
    assert errors(documents[kind]) == []


def test_the_volume_is_a_valid_kubernetes_object(documents):
    import kubernetes_validate

    kubernetes_validate.validate(documents["PersistentVolumeClaim"], "1.30", strict=True)


@pytest.mark.parametrize("kind, path, typo", [
    ("TrainJob", ("spec", "trainer"), "numNode"),
    ("TrainJob", ("spec",), "runtimeReff"),
    ("TrainingRuntime", ("spec", "mlPolicy", "torch"), "numProcPerNode"),  # not in this Trainer version's API
    ("TrainingRuntime", ("spec", "template", "spec", "replicatedJobs", 0, "template", "spec", "template", "spec",
                         "containers", 0), "imagePullPolicyy"),
])
def test_a_typo_fails_validation(documents, kind, path, typo):
    document = copy.deepcopy(documents[kind])
    target = document
    for key in path:
        target = target[key]
    target[typo] = 1
    assert any(typo in e for e in errors(document)), f"{typo} at {path} was accepted"


def test_the_job_runs_the_pipeline_image_under_torchrun_on_every_gpu(documents):
    runtime, job = documents["TrainingRuntime"], documents["TrainJob"]
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": runtime["metadata"]["name"]}
    assert "torch" in runtime["spec"]["mlPolicy"]
    node = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    # Kubeflow Trainer finds the trainer by these names and injects PET_* (torchrun's settings) into it.
    assert node["name"] == "node"
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    container = node["template"]["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "node" and container["image"] == DEFAULT_IMAGE
    script = container["command"][-1]
    assert "torchrun -m model.cli train" in script and "pneumoscope data prepare" in script
    words = shlex.split(script.replace("\\\n", " "))
    train = words[words.index("train"):]
    assert train[train.index("--out") + 1].startswith("/runs/"), "checkpoints must land on the shared volume"
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] >= 2, "a multi-node example"
    for side in ("requests", "limits"):
        assert int(trainer["resourcesPerNode"][side]["nvidia.com/gpu"]) == trainer["numProcPerNode"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/runs", "/cache", "/dev/shm"} <= mounts
    assert documents["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
