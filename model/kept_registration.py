"""A registration that MLflow could not take, kept on this machine and finished later.

When the register step cannot reach MLflow (down, restarting, or its artifact store away), nothing of the
training is lost: everything the registration needs is kept under ``PNEUMOSCOPE_HOME/registrations/RUN/``
(the bundle, the evaluation report, the training history and parameters, the plots, the data-quality
thumbnails and the validation images the champion comparison scores), and ``pneumoscope register --retry RUN``
finishes it against the same (or another) MLflow. The registration itself is idempotent per RUN
(:func:`model.registry.log_and_register` with ``registration_id``), so a retry after a partial one registers
one version, not two. On a cluster the pipeline's retry policy does the same from the pipeline's artifacts.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np

KEPT_FOLDER = "registrations"
REQUEST_FILE = "registration.json"
#: The exception modules of a registry that is away (down, restarting, its S3 away), as opposed to a bug.
UNAVAILABLE_MODULES = {"mlflow", "requests", "urllib3", "botocore", "boto3", "s3transfer", "aiohttp", "http"}


class KeptRegistrationError(Exception):
    """No such kept registration, or it cannot be read: one line for the user."""


def registry_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the registry (or its artifact store) is away, so keeping the run locally is right."""
    from model.registry import RegistryError

    if isinstance(exc, (RegistryError, ConnectionError, TimeoutError, OSError)):
        return True
    return any(klass.__module__.split(".")[0] in UNAVAILABLE_MODULES for klass in type(exc).__mro__)


def kept_root(home: str | Path) -> Path:
    return Path(home) / KEPT_FOLDER


def safe_run_id(run_id: str) -> str:
    """A folder name for ``run_id`` (a KFP job id, or a made-up one for a local run)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip(".-")[:100]
    return cleaned or time.strftime("local-%Y%m%d-%H%M%S")


def keep(home: str | Path, run_id: str, bundle_dir: str | Path, report: dict, history: list[dict], params: dict, *,
         tracking_uri: str | None, model_name: str, promotion: str, n_bootstrap: int, error: str,
         plots_dir: str | Path | None = None, data_quality_dir: str | Path | None = None,
         champion_val_images=None, image_size: int | None = None) -> Path:
    """Copy everything the registration needs under ``home/registrations/RUN`` and return the folder."""
    folder = kept_root(home) / safe_run_id(run_id)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.copytree(bundle_dir, partial / "bundle")
    for source, name in ((plots_dir, "plots"), (data_quality_dir, "data_quality")):
        if source and Path(source).is_dir():
            shutil.copytree(source, partial / name)
    if champion_val_images is not None and image_size:
        np.save(partial / "val_images.npy", np.asarray(champion_val_images(image_size), dtype=np.uint8))
    (partial / "report.json").write_text(json.dumps(report))
    (partial / "history.json").write_text(json.dumps(history))
    (partial / "params.json").write_text(json.dumps(params, default=str))
    (partial / REQUEST_FILE).write_text(json.dumps({
        "run_id": run_id, "tracking_uri": tracking_uri, "model_name": model_name, "promotion": promotion,
        "n_bootstrap": n_bootstrap, "image_size": image_size, "error": error,
        "kept_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # complete or absent: a crash while keeping leaves only a .partial folder
    return folder


def list_kept(home: str | Path) -> list[dict]:
    root = kept_root(home)
    found = []
    for request in sorted(root.glob(f"*/{REQUEST_FILE}")) if root.is_dir() else []:
        if request.parent.name.endswith(".partial"):
            continue
        info = json.loads(request.read_text())
        found.append({"run": request.parent.name, "model_name": info["model_name"],
                      "tracking_uri": info["tracking_uri"], "kept_at": info["kept_at"], "error": info["error"]})
    return found


def retry(home: str | Path, run: str, tracking_uri: str | None = None):
    """Finish the kept registration ``run`` (at ``tracking_uri``, default the one it was meant for); on success
    the kept folder is removed. Returns the :class:`model.registry.Registration`."""
    from model.preprocessing import PreprocessConfig, resize
    from model.registry import log_and_register

    folder = kept_root(home) / run
    if not (folder / REQUEST_FILE).is_file():
        kept = ", ".join(item["run"] for item in list_kept(home)) or "none"
        raise KeptRegistrationError(f"no kept registration {run!r} under {kept_root(home)} (kept: {kept})")
    request = json.loads((folder / REQUEST_FILE).read_text())
    val_images = None
    if (folder / "val_images.npy").is_file():
        kept_images = np.load(folder / "val_images.npy")

        def val_images(size: int):
            if size == kept_images.shape[-1]:
                return kept_images
            return np.stack([resize(px, PreprocessConfig(image_size=size)) for px in kept_images])

    registration = log_and_register(
        folder / "bundle", json.loads((folder / "report.json").read_text()),
        json.loads((folder / "history.json").read_text()), json.loads((folder / "params.json").read_text()),
        tracking_uri=tracking_uri or request["tracking_uri"], model_name=request["model_name"],
        plots_dir=folder / "plots", data_quality_dir=folder / "data_quality", pipeline_run_id=request["run_id"],
        promotion=request["promotion"], n_bootstrap=request["n_bootstrap"], champion_val_images=val_images,
        registration_id=request["run_id"])
    shutil.rmtree(folder)
    return registration
