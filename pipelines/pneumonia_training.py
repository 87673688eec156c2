"""The ``pneumonia-training`` pipeline: [lung_segmentation] -> preprocess -> train (``num_gpus`` GPUs) -> evaluate
-> register. The lung_segmentation step is optional: it trains the lung U-Net only when ``lung_masks_uri`` is
set, and preprocess (``lung_crop``) and evaluate (the bundle, the CAM lung share) use its model when it did.

``build_pipeline(image)`` returns the pipeline for one container image; ``compile_pipeline`` writes
the YAML that is checked in as ``pipelines/pneumonia_training.yaml`` (default image).

Caching. ``preprocess`` never reuses a cached result: its input is a URI whose content can change
(new images under the same s3:// prefix) while the URI stays the same, so a cache hit would silently
train on stale data. ``train`` and ``evaluate`` may cache: they are pure functions of their inputs,
and KFP keys their cache on the identity of the upstream artifacts, so a hit only ever reuses work
done on the very same dataset artifact. ``register`` never caches: it writes to the registry.

Retries. ``preprocess`` reads object storage (transient errors); ``train``/``evaluate`` may lose
their node (spot GPUs, evictions); ``register`` meets an MLflow server (or its S3) that restarts. The
registration is idempotent per pipeline run (``registration_id``: a retry after a partial attempt finishes
the version that attempt registered, or deletes its half-logged run and starts over), so it is retried
with a back-off long enough for a server restart; the model it registers waits in the pipeline root.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as types.
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes

from components.factory import build_components
from components.image import DEFAULT_IMAGE

PIPELINE_NAME = "pneumonia-training"
DEFAULT_YAML = Path(__file__).with_name("pneumonia_training.yaml")

#: Optional Secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) for s3:// data and the
#: MLflow artifact store; pods start without it (IRSA/workload identity, or public data).
S3_SECRET = "pneumoscope-s3"
S3_SECRET_KEYS = {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}

# (cpu request, cpu limit, memory request, memory limit) per step.
RESOURCES = {
    "lung_segmentation": ("4", "8", "8Gi", "16Gi"),
    "preprocess": ("4", "8", "8Gi", "16Gi"),
    "train": ("8", "16", "24Gi", "48Gi"),
    "evaluate": ("4", "8", "8Gi", "16Gi"),
    "register": ("1", "2", "2Gi", "4Gi"),
}
PREPROCESS_WORKERS = "8"  # decode processes = the CPU limit (os.cpu_count() in a pod is the node's)
SHM_SIZE = "16Gi"  # DataLoader workers pass batches through /dev/shm; counts against the memory limit
TRAIN_TIMEOUT_S = 6 * 3600


def _resources(task: dsl.PipelineTask, step: str) -> dsl.PipelineTask:
    cpu_request, cpu_limit, memory_request, memory_limit = RESOURCES[step]
    return (task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
            .set_memory_request(memory_request).set_memory_limit(memory_limit))


def build_pipeline(image: str = DEFAULT_IMAGE, retries: bool = True):
    """The pipeline whose steps run in ``image``. ``retries=False`` for kfp.local, which honours
    retry policies too: a deterministic failure on a laptop should not wait out the back-off."""
    steps = build_components(image)

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Pneumonia detection on chest X-rays: quality-gated patient-level split, "
                              "ResNet-50 training on num_gpus GPUs (torchrun), calibrated evaluation with CIs and ONNX export, MLflow "
                              "registration with champion/challenger aliases.")
    def pneumonia_training(
        data_uri: str,
        mlflow_uri: str = "",
        profile: str = "gpu",
        epochs: int = 0,
        learning_rate: float = 0.0,
        batch_size: int = 0,
        image_size: int = 0,
        seed: int = 42,
        limit_per_class: int = 0,
        val_fraction: float = 0.15,
        holdout_fraction: float = 0.10,
        model_name: str = "pneumonia",
        promotion: str = "auto",
        threshold_method: str = "youden",
        target_sensitivity: float = 0.95,
        n_bootstrap: int = 1000,
        int8: bool = True,
        num_gpus: int = 1,
        exclude_blurred: bool = False,
        mask_text: bool = False,
        lung_masks_uri: str = "",
        lung_crop: str = "none",
        external_data_uri: str = "",
    ) -> NamedTuple("Outputs", [("model_uri", str), ("version", str), ("registration", str)]):
        """0 for epochs, learning_rate, batch_size, image_size: the profile's value. limit_per_class 0:
        every image. mlflow_uri empty: MLFLOW_TRACKING_URI of the image. num_gpus: the train step's GPU
        limit and its torchrun --nproc-per-node (batch_size is the global batch). lung_masks_uri: films with
        lung masks (lung_masks_256's layout) to train the lung U-Net on; empty: no lung model (lung_crop must
        then stay none). external_data_uri: an external VALIDATION set (labels.csv), scored, never fitted on."""
        lungs = steps.lung_segmentation(lung_masks_uri=lung_masks_uri, seed=seed)
        _resources(lungs, "lung_segmentation")
        lungs.set_caching_options(enable_caching=False)  # its input is a URI, as preprocess's
        if retries:
            lungs.set_retry(num_retries=1, backoff_duration="30s")
        kubernetes.use_secret_as_env(lungs, S3_SECRET, S3_SECRET_KEYS, optional=True)

        prep = steps.preprocess(data_uri=data_uri, lung_model=lungs.outputs["lung_model"], profile=profile,
                                image_size=image_size, val_fraction=val_fraction,
                                holdout_fraction=holdout_fraction, seed=seed, limit_per_class=limit_per_class,
                                exclude_blurred=exclude_blurred, mask_text=mask_text, lung_crop=lung_crop)
        _resources(prep, "preprocess").set_env_variable("PNEUMOSCOPE_WORKERS", PREPROCESS_WORKERS)
        prep.set_caching_options(enable_caching=False)
        if retries:
            prep.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2.0)
        kubernetes.use_secret_as_env(prep, S3_SECRET, S3_SECRET_KEYS, optional=True)

        fit = steps.train(dataset=prep.outputs["dataset"], profile=profile, epochs=epochs,
                          learning_rate=learning_rate, batch_size=batch_size, seed=seed, num_gpus=num_gpus)
        _resources(fit, "train").set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(num_gpus)
        fit.set_caching_options(enable_caching=True)
        if retries:
            fit.set_retry(num_retries=1, backoff_duration="60s")
        kubernetes.empty_dir_mount(fit, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=SHM_SIZE)
        kubernetes.add_toleration(fit, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
        kubernetes.set_timeout(fit, TRAIN_TIMEOUT_S)

        ev = steps.evaluate(dataset=prep.outputs["dataset"], checkpoint=fit.outputs["checkpoint"],
                            lung_model=lungs.outputs["lung_model"], model_name=model_name,
                            threshold_method=threshold_method, target_sensitivity=target_sensitivity,
                            n_bootstrap=n_bootstrap, int8=int8, external_data_uri=external_data_uri)
        _resources(ev, "evaluate")
        kubernetes.use_secret_as_env(ev, S3_SECRET, S3_SECRET_KEYS, optional=True)  # an s3:// external set
        ev.set_caching_options(enable_caching=True)
        if retries:
            ev.set_retry(num_retries=1, backoff_duration="30s")

        reg = steps.register(dataset=prep.outputs["dataset"], checkpoint=fit.outputs["checkpoint"],
                             model=ev.outputs["model"], mlflow_uri=mlflow_uri, model_name=model_name,
                             promotion=promotion, n_bootstrap=n_bootstrap,
                             pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                             pipeline_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        _resources(reg, "register")
        reg.set_caching_options(enable_caching=False)
        if retries:
            reg.set_retry(num_retries=4, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="600s")
        kubernetes.use_secret_as_env(reg, S3_SECRET, S3_SECRET_KEYS, optional=True)

        outputs = NamedTuple("Outputs", [("model_uri", str), ("version", str), ("registration", str)])
        return outputs(reg.outputs["model_uri"], reg.outputs["version"], reg.outputs["registration"])

    return pneumonia_training


#: The pipeline with the default image (for `kfp` tooling that imports a module-level pipeline).
pneumonia_training = build_pipeline()


def compile_pipeline(output: str | Path = DEFAULT_YAML, image: str = DEFAULT_IMAGE) -> Path:
    """Write the pipeline YAML for ``image``; the same inputs always give the same bytes."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    pipeline = pneumonia_training if image == DEFAULT_IMAGE else build_pipeline(image)
    compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(output))
    return output
