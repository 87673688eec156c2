"""The compiled pipeline: golden file, GPU/shm/resources, caching, retries, no run-time installs, image option."""

from __future__ import annotations

import json

import pytest
import yaml

from components.image import DEFAULT_IMAGE
from model.cli import main
from pipelines.pneumonia_training import DEFAULT_YAML, build_pipeline, compile_pipeline
from tests.pipelines.test_pipeline_fixtures import one_error_line, pneumoscope

STEPS = ("preprocess", "train", "evaluate", "register")


def load(path):
    pipeline_spec, platform_spec = yaml.safe_load_all(path.read_text())
    return pipeline_spec, platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "pipeline.yaml")
    return path, *load(path)


def test_the_checked_in_yaml_is_what_the_code_compiles_to(compiled):
    path, _, _ = compiled
    assert path.read_text() == DEFAULT_YAML.read_text(), (
        "pipelines/pneumonia_training.yaml is stale: run `pneumoscope pipeline compile` and commit it")


def test_compilation_is_deterministic(compiled, tmp_path):
    again = compile_pipeline(tmp_path / "again.yaml")
    assert again.read_bytes() == compiled[0].read_bytes()


def test_train_requests_num_gpus_shared_memory_and_resources(compiled):
    _, spec, platform = compiled
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    # The GPU limit is the pipeline parameter num_gpus (default 1), and the same value reaches the step,
    # which starts that many torchrun processes.
    assert resources["accelerator"]["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--num_gpus']}}"
    assert spec["root"]["inputDefinitions"]["parameters"]["num_gpus"]["defaultValue"] == 1
    train_inputs = spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert train_inputs["num_gpus"] == {"componentInputParameter": "num_gpus"}
    assert "nproc=num_gpus" in " ".join(spec["deploymentSpec"]["executors"]["exec-train"]["container"]["command"])
    assert resources["resourceCpuRequest"] and resources["resourceCpuLimit"]
    assert resources["resourceMemoryRequest"] and resources["resourceMemoryLimit"]
    shm = platform["exec-train"]["emptyDirMounts"]
    assert shm == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "16Gi"}]
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert gpu_toleration in platform["exec-train"]["tolerations"]


def test_every_step_has_requests_and_limits_and_only_train_a_gpu(compiled):
    _, spec, _ = compiled
    for step in STEPS:
        resources = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["resources"]
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert resources.get(key), f"{step} has no {key}"
        assert ("accelerator" in resources) == (step == "train"), step


def test_no_step_installs_anything_at_run_time(compiled):
    _, spec, _ = compiled
    for name, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        command = " ".join(container["command"] + container["args"])
        assert "pip install" not in command and "pip3 install" not in command, name
        assert container["image"] == DEFAULT_IMAGE, name
        assert "kfp.dsl.executor_main" in command, name


def test_caching_never_reuses_data_or_registrations_and_retries_are_set(compiled):
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    caching = {step: tasks[step]["cachingOptions"].get("enableCache", False) for step in STEPS}
    assert caching == {"preprocess": False, "train": True, "evaluate": True, "register": False}
    retries = {step: tasks[step].get("retryPolicy", {}).get("maxRetryCount", 0) for step in STEPS}
    # register is retried too: it is idempotent per pipeline run (tests/model/test_registration_retry.py)
    assert retries == {"preprocess": 2, "train": 1, "evaluate": 1, "register": 4}


def test_register_gets_the_kfp_run_id_and_name(compiled):
    _, spec, _ = compiled
    params = spec["root"]["dag"]["tasks"]["register"]["inputs"]["parameters"]
    assert params["pipeline_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert params["pipeline_run_name"]["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}"


def test_pipeline_parameters_and_outputs(compiled):
    _, spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("data_uri", "profile", "epochs", "learning_rate", "image_size", "mlflow_uri", "model_name", "seed",
                 "limit_per_class", "promotion", "n_bootstrap", "int8", "num_gpus", "exclude_blurred", "mask_text"):
        assert name in params, name
    assert "defaultValue" not in params["data_uri"]  # required
    assert params["image_size"]["defaultValue"] == 0
    assert set(spec["root"]["outputDefinitions"]["parameters"]) == {"model_uri", "version", "registration"}


def test_the_image_is_a_compile_option(tmp_path):
    image = "registry.example.com:5000/team/pneumoscope-pipeline:1.2.3"
    spec, _ = load(compile_pipeline(tmp_path / "custom.yaml", image))
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {image}
    assert build_pipeline(image) is not None


def test_no_retries_for_local_runs():
    spec = build_pipeline(retries=False).pipeline_spec
    assert not any(task.HasField("retry_policy") for task in spec.root.dag.tasks.values())


def test_compile_command_writes_the_yaml_for_an_image(tmp_path):
    out = tmp_path / "p.yaml"
    result = pneumoscope("pipeline", "compile", "--output", str(out), "--image", "example.org/p:2")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"output": str(out), "image": "example.org/p:2"}
    spec, _ = load(out)
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {"example.org/p:2"}


def test_compile_command_refuses_a_bad_image_in_one_line(tmp_path, capsys):
    assert main(["pipeline", "compile", "--output", str(tmp_path / "p.yaml"), "--image", "Not An Image"]) == 2
    assert "not a container image reference" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "p.yaml").exists()
