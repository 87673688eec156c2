"""The pipeline steps as plain functions; ``components.factory.build_components`` makes them KFP components.

KFP embeds each function's SOURCE in the compiled pipeline and runs it in the project's image with
``python -m kfp.dsl.executor_main``; nothing is pip-installed at run time. Hence the rules here:
every import sits inside the function, the bodies stay thin (a call into ``model/``, then the KFP
artifact bookkeeping, which lives in ``components.runtime``), and this module must not use
``from __future__ import annotations`` (KFP reads the annotations when it builds the component).
"""

from typing import NamedTuple

from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def lung_segmentation(lung_model: Output[Model], lung_masks_uri: str = "", epochs: int = 40, seed: int = 42):
    """Train the lung U-Net on ``lung_masks_uri`` (images/, masks/, sources.csv; split by patient) and export
    ``lung.onnx`` + ``lung.json`` with the test patients' Dice. Optional: with ``lung_masks_uri`` empty the step
    trains nothing and its artifact stays empty; preprocess and evaluate then go without a lung model."""
    import json
    import tempfile
    from pathlib import Path

    from components.runtime import exit_quickly, local_copy

    if not lung_masks_uri:
        lung_model.metadata.update({"enabled": False})
        Path(lung_model.path).mkdir(parents=True, exist_ok=True)
        return
    from model.lung_segmentation import LungTrainSettings, train_lung_model

    with tempfile.TemporaryDirectory() as tmp:
        info = train_lung_model(local_copy(lung_masks_uri, tmp), lung_model.path,
                                LungTrainSettings(epochs=epochs, seed=seed))
    (Path(lung_model.path) / "lung.pt").unlink(missing_ok=True)  # the ONNX graph is what is shipped
    lung_model.metadata.update({"enabled": True, "framework": "onnx", "arch": "monai UNet",
                                "test_dice": info["dice"]["test"],
                                "test_dice_ci95": json.dumps(info["dice"]["test_ci95"]),
                                "source": lung_masks_uri})
    exit_quickly()


def preprocess(data_uri: str, dataset: Output[Dataset], lung_model: Input[Model], profile: str = "gpu",
               image_size: int = 0, val_fraction: float = 0.15, holdout_fraction: float = 0.10, seed: int = 42,
               limit_per_class: int = 0, exclude_blurred: bool = False, mask_text: bool = False,
               lung_crop: str = "none"):
    """Decode, quality-gate (blur, burned-in text), deduplicate and split the images by patient into a uint8 cache.

    ``image_size`` 0 takes the profile's resolution; ``limit_per_class`` 0 keeps every image. ``lung_crop``
    (box, mask, box+mask) crops the films to their lungs with ``lung_model`` (the lung_segmentation step's).
    """
    from components.runtime import lung_folder
    from model.data import SplitFractions, prepare
    from model.settings import Settings

    if image_size <= 0:
        from model.profiles import get_profile

        image_size = get_profile(profile).image_size
    result = prepare(data_uri, dataset.path, image_size, SplitFractions(val_fraction, holdout_fraction, seed),
                     workers=Settings().workers, limit_per_class=limit_per_class or None,
                     exclude_blurred=exclude_blurred, mask_text=mask_text, lung_model=lung_folder(lung_model),
                     lung_crop=lung_crop)
    quality = result.summary["quality"]
    dataset.metadata.update({"source": data_uri, "image_size": image_size, "images": result.summary["kept"],
                             "splits": result.summary["splits"], "manifest_sha256": result.manifest_sha256,
                             "limit_per_class": limit_per_class, "seconds": result.summary["seconds"],
                             "blurred": quality["blurred"], "text_overlay": quality["text_overlay"],
                             "excluded_blurred": quality["excluded_blurred"], "masked_text": quality["masked_text"]})


def train(dataset: Input[Dataset], checkpoint: Output[Model], metrics: Output[Metrics], profile: str = "gpu",
          epochs: int = 0, learning_rate: float = 0.0, batch_size: int = 0, seed: int = 42, num_gpus: int = 1):
    """Train ResNet-50 at the dataset's resolution; 0 for epochs/learning_rate/batch_size = profile default.

    ``num_gpus`` > 1: ``torchrun --nproc-per-node num_gpus`` (DistributedDataParallel, one process per GPU)."""
    from pathlib import Path

    from components.runtime import exit_quickly, finite, write_train_params
    from model.data import CachedData
    from model.profiles import get_profile
    from model.training import launch

    chosen = get_profile(profile, epochs=epochs or None, lr=learning_rate or None, batch_size=batch_size or None,
                         image_size=CachedData.load(dataset.path).config.image_size)
    result = launch(dataset.path, checkpoint.path, chosen, seed=seed, nproc=num_gpus)
    # last.pt (weights + optimizer state, 4x the checkpoint) only serves a resume inside this step: a
    # retried step starts with an empty output folder, so it would be uploaded for nothing.
    (Path(checkpoint.path) / "last.pt").unlink(missing_ok=True)
    write_train_params(checkpoint.path, chosen, seed, num_gpus)
    values = finite({"best_val_auc": result.best_val_auc, "best_epoch": result.best_epoch,
                     "epochs_run": len(result.history), "images_per_second": result.images_per_second,
                     "seconds": result.seconds})
    for name, value in values.items():
        metrics.log_metric(name, value)
    checkpoint.metadata.update({"framework": "pytorch", "arch": "resnet50-gray-1logit", "profile": chosen.name,
                                "image_size": chosen.image_size, "best_val_auc": values.get("best_val_auc"),
                                "seconds": round(result.seconds, 2)})
    exit_quickly()


def evaluate(dataset: Input[Dataset], checkpoint: Input[Model], lung_model: Input[Model], model: Output[Model],
             metrics: Output[Metrics], classification: Output[ClassificationMetrics], report: Output[HTML],
             model_name: str = "pneumonia", threshold_method: str = "youden", target_sensitivity: float = 0.95,
             n_bootstrap: int = 1000, int8: bool = True, external_data_uri: str = ""):
    """Export to ONNX, calibrate, pick the threshold on val, score every split; ``model`` holds
    ``bundle/`` (the servable model, with the lung model when there is one), ``plots/`` and ``report.json``
    (with the CAM lung share). ``external_data_uri``: an external VALIDATION set (labels.csv) scored with
    val's operating point, never fitted on."""
    import tempfile
    from pathlib import Path

    from components.runtime import exit_quickly, local_copy, log_evaluation, lung_folder, report_html
    from model.evaluation import EvalSettings, evaluate_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        external = local_copy(external_data_uri, tmp) if external_data_uri else ""
        settings = EvalSettings(threshold_method=threshold_method, target_sensitivity=target_sensitivity,
                                n_bootstrap=n_bootstrap, int8=int8, external_data=external)
        result = evaluate_checkpoint(Path(checkpoint.path) / "checkpoint.pt", dataset.path, model.path, settings,
                                     model_name, lung_model=lung_folder(lung_model))
    log_evaluation(result, metrics, classification)
    Path(report.path).write_text(report_html(result, Path(model.path) / "plots"))
    model.metadata.update({"framework": "onnx", "threshold": result["threshold"],
                           "temperature": result["temperature"], "int8": bool(result["int8"].get("accepted")),
                           "manifest_sha256": result["manifest_sha256"], "seconds": result["seconds"]})
    exit_quickly()


def register(dataset: Input[Dataset], checkpoint: Input[Model], model: Input[Model], mlflow_uri: str = "",
             model_name: str = "pneumonia", promotion: str = "auto", n_bootstrap: int = 1000,
             pipeline_run_id: str = "", pipeline_run_name: str = "",
             ) -> NamedTuple("Registered", [("model_uri", str), ("version", str), ("registration", str)]):
    """Log the run to MLflow, register the bundle, set ``challenger`` (and ``champion`` if it wins).

    ``mlflow_uri`` empty: the image's ``MLFLOW_TRACKING_URI``. ``registration`` is a JSON object.
    """
    import json
    import os
    from pathlib import Path

    from components.runtime import champion_val_images, exit_quickly, keep_unregistered, registration_params
    from model.registry import log_and_register

    tracking_uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not tracking_uri:
        raise ValueError("no MLflow tracking URI: set the pipeline parameter mlflow_uri "
                         "(or MLFLOW_TRACKING_URI in the step's environment)")
    evaluation = Path(model.path)
    report = json.loads((evaluation / "report.json").read_text())
    history = json.loads((Path(checkpoint.path) / "history.json").read_text())
    params = registration_params(dataset, checkpoint.path, report, pipeline_run_name)
    val_images = champion_val_images(dataset.path, report["val_predictions"]["index"])
    try:
        registration = log_and_register(
            evaluation / "bundle", report, history, params, tracking_uri=tracking_uri, model_name=model_name,
            plots_dir=evaluation / "plots", data_quality_dir=Path(dataset.path) / "quality",
            pipeline_run_id=pipeline_run_id, promotion=promotion, n_bootstrap=n_bootstrap,
            champion_val_images=val_images, registration_id=pipeline_run_id or None)
    except Exception as exc:
        keep_unregistered(exc, evaluation, report, history, params, dataset.path, val_images, tracking_uri=tracking_uri,
                          model_name=model_name, promotion=promotion, n_bootstrap=n_bootstrap,
                          pipeline_run_id=pipeline_run_id)
        raise
    info = dict(registration.to_dict(), pipeline_run_id=pipeline_run_id, pipeline_run_name=pipeline_run_name)
    exit_quickly()
    return registration.model_uri, registration.version, json.dumps(info, default=str, sort_keys=True)
