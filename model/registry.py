"""MLflow tracking + Model Registry: log a pipeline run, register the bundle, manage aliases, fetch.

Aliases: every new version becomes ``challenger``; it also becomes ``champion`` when there is none
yet, or when it beats the champion's AUC on the same validation images by a one-sided paired
bootstrap test (``promotion="auto"``). Fetching resolves an alias ONCE to an immutable version.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.bundle import Bundle, BundleError

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
#: The gate a version must pass before `pneumoscope rollout` sends it traffic (without --force).
GATE_MIN_AUC = 0.75
DEFAULT_EXPERIMENT = "pneumoscope"
#: The pyfunc model, logged as code (no pickle): see its docstring.
PYFUNC_MODEL = Path(__file__).with_name("pyfunc_model.py")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


class RegistryError(Exception):
    """The tracking server cannot be reached, or a model/version/alias does not exist."""


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store under ``PNEUMOSCOPE_HOME`` (./.pneumoscope)."""
    from model.settings import Settings

    return Settings().tracking_uri()


def connect(tracking_uri: str | None = None):
    """Point MLflow at ``tracking_uri`` and check that it answers; return an MlflowClient."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    if not re.match(r"^(sqlite|postgresql|mysql|mssql|https?|file|databricks)(\+\w+)?:", uri):
        raise RegistryError(f"unsupported MLflow tracking URI {uri!r} (use sqlite:///..., postgresql://... or http://...)")
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"  # fail fast on a wrong URL instead of minutes of retries
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:
        raise RegistryError(f"MLflow tracking server at {uri} does not answer: {str(exc).splitlines()[0][:200]}") from None
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous
    return client


def _ensure_experiment(client, name: str, uri: str) -> None:
    """A SQLite store keeps artifacts beside the database, not in whatever the cwd happens to be."""
    if client.get_experiment_by_name(name) is None and uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
        client.create_experiment(name, artifact_location=artifacts.as_uri())


def git_commit() -> str:
    """The code version: baked into images as PNEUMOSCOPE_GIT_COMMIT, else asked of git."""
    if os.environ.get("PNEUMOSCOPE_GIT_COMMIT"):
        return os.environ["PNEUMOSCOPE_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def evaluation_gate(report: dict, min_auc: float = GATE_MIN_AUC) -> str:
    """"passed", or "failed: <why>": the AUC of every split that chose nothing (holdout; val without one) reaches
    ``min_auc``. Recorded as the version's ``evaluation_gate`` tag; `pneumoscope rollout` refuses a failed one."""
    splits = report.get("splits", {})
    judged = [s for s in ("holdout",) if s in splits] or [s for s in ("val",) if s in splits]
    if not judged:
        return "failed: no held-out split was evaluated"
    low = [f"{s} AUC {splits[s]['auc']:.3f} < {min_auc:.2f}" for s in judged if not splits[s]["auc"] >= min_auc]
    return f"failed: {'; '.join(low)}" if low else "passed"


@dataclass
class Registration:
    model_name: str
    version: str
    run_id: str
    aliases: list[str]
    promotion: dict
    model_uri: str

    def to_dict(self) -> dict:
        return dict(vars(self))


def log_and_register(bundle_dir: str | Path, report: dict, history: list[dict], params: dict, *,
                     tracking_uri: str | None, model_name: str, plots_dir: str | Path | None = None,
                     pipeline_run_id: str = "", experiment: str = DEFAULT_EXPERIMENT, promotion: str = "auto",
                     alpha: float = 0.05, champion_val_images=None, n_bootstrap: int = 1000,
                     data_quality_dir: str | Path | None = None, registration_id: str | None = None) -> Registration:
    """One MLflow run per pipeline run: params, per-epoch metrics, eval metrics, plots, the data-quality
    thumbnails (``data prepare``'s ``quality/``), the model.

    ``registration_id`` (the pipeline run's id) makes it idempotent: a version already registered under that id
    is finished (aliases, promotion) or returned, never registered twice; the runs of an earlier attempt that
    registered nothing (MLflow or its artifact store went away halfway) are deleted with their artifacts."""
    import mlflow

    client = connect(tracking_uri)
    bundle = Bundle.load(bundle_dir)
    if registration_id:
        existing = _version_of_registration(client, model_name, registration_id)
        if existing is not None:
            log.info("%s version %s was registered by an earlier attempt of %s; finishing it", model_name,
                     existing.version, registration_id)
            return _finish_registration(client, model_name, existing.version, existing.tags["run_id"], report,
                                        promotion, alpha, champion_val_images, n_bootstrap)
        _discard_partial_runs(client, experiment, registration_id)
    _ensure_experiment(client, experiment, tracking_uri or default_tracking_uri())
    mlflow.set_experiment(experiment)
    tags = {"pneumoscope.manifest_sha256": report["manifest_sha256"], "pneumoscope.git_commit": git_commit(),
            "pneumoscope.pipeline_run_id": pipeline_run_id or "local", "pneumoscope.bundle_sha256": bundle.sha256}
    if registration_id:
        tags[REGISTRATION_TAG] = registration_id
    with mlflow.start_run(run_name=f"{model_name}-{pipeline_run_id or 'local'}"[:250], tags=tags) as run:
        mlflow.log_params({k: v for k, v in params.items() if v is not None})
        for record in history:
            mlflow.log_metrics({k: float(v) for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))
        for split, m in report["splits"].items():
            mlflow.log_metrics({f"{split}_{k}": float(m[k]) for k in ("auc", "accuracy", "sensitivity",
                                                                       "specificity", "f1", "brier", "ece")})
            for k, (lo, hi) in m.get("ci95", {}).items():
                mlflow.log_metrics({f"{split}_{k}_ci_low": lo, f"{split}_{k}_ci_high": hi})
        mlflow.log_metrics({"threshold": report["threshold"], "temperature": report["temperature"],
                            "logit_bias": report.get("logit_bias", 0.0)})
        if report["int8"].get("auc_drop") is not None:
            mlflow.log_metric("int8_auc_drop", report["int8"]["auc_drop"])
        for split, m in report.get("abstention", {}).items():  # the refer band's coverage per split
            if isinstance(m, dict) and np.isfinite(m["coverage"]):
                mlflow.log_metric(f"{split}_refer_coverage", m["coverage"])
        from model.evaluation import intended_use_metrics

        mlflow.log_metrics(intended_use_metrics(report))  # decided-case figures, risk-coverage, OOD shares
        from model.lung_evaluation import report_metrics

        mlflow.log_metrics(report_metrics(report))  # where the evidence falls; the external validation set
        if plots_dir and Path(plots_dir).is_dir():
            mlflow.log_artifacts(str(plots_dir), artifact_path="plots")
        if data_quality_dir and Path(data_quality_dir).is_dir():
            mlflow.log_artifacts(str(data_quality_dir), artifact_path="data_quality")
        mlflow.log_dict(report, "evaluation/report.json")
        model_info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_MODEL), artifacts={"bundle": str(Path(bundle_dir).resolve())},
            code_paths=[str(Path(__file__).resolve().parent)],
            pip_requirements=["onnxruntime", "numpy", "pillow", "pydicom"],
            metadata={"pneumoscope": {"threshold": bundle.threshold, "temperature": bundle.temperature,
                                      "logit_bias": bundle.logit_bias,
                                      "preprocess": bundle.meta["preprocess"], "bundle_sha256": bundle.sha256}})
        version_tags = {"bundle_sha256": bundle.sha256, "run_id": run.info.run_id,
                        "evaluation_gate": evaluation_gate(report)}
        if registration_id:
            version_tags["registration_id"] = registration_id
        if report.get("reference"):  # the prediction mix `pneumoscope rollout analyze` compares live traffic with
            version_tags["reference_distribution"] = json.dumps(report["reference"], separators=(",", ":"))
        version = mlflow.register_model(model_info.model_uri, model_name, tags=version_tags)
        run_id = run.info.run_id
    return _finish_registration(client, model_name, version.version, run_id, report, promotion, alpha,
                                champion_val_images, n_bootstrap)


#: The run tag and version tag that name the registration (the pipeline run) a version came from.
REGISTRATION_TAG = "pneumoscope.registration_id"


def _finish_registration(client, model_name: str, version: str, run_id: str, report: dict, promotion: str,
                         alpha: float, champion_val_images, n_bootstrap: int) -> Registration:
    """Aliases and the promotion decision; a version that has its ``promotion`` tag was finished before."""
    tags = client.get_model_version(model_name, version).tags
    if "promotion" in tags:
        decision = {"promote": CHAMPION in client.get_model_version(model_name, version).aliases,
                    "reason": tags["promotion"]}
    else:
        client.set_registered_model_alias(model_name, CHALLENGER, version)
        decision = _decide_promotion(client, model_name, version, report, promotion, alpha,
                                     champion_val_images, n_bootstrap)
        if decision["promote"]:
            client.set_registered_model_alias(model_name, CHAMPION, version)
        client.set_model_version_tag(model_name, version, "promotion", decision["reason"])
    aliases = client.get_model_version(model_name, version).aliases
    log.info("registered %s version %s (aliases: %s): %s", model_name, version, ", ".join(aliases),
             decision["reason"])
    return Registration(model_name, str(version), run_id, list(aliases), decision,
                        f"models:/{model_name}/{version}")


def _version_of_registration(client, model_name: str, registration_id: str):
    """The version an earlier attempt of ``registration_id`` registered, or None."""
    quoted = registration_id.replace("'", "")
    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.registration_id = '{quoted}'")
    except Exception as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc):
            return None
        raise
    return max(found, key=lambda v: int(v.version)) if found else None


def _discard_partial_runs(client, experiment: str, registration_id: str) -> None:
    """Delete the runs (and their artifacts) of earlier attempts of ``registration_id`` that registered nothing:
    half-logged metrics and half-uploaded model files must not stay behind in the tracking server or S3."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    found = client.get_experiment_by_name(experiment)
    if found is None:
        return
    quoted = registration_id.replace("'", "")
    for run in client.search_runs([found.experiment_id], f"tags.`{REGISTRATION_TAG}` = '{quoted}'"):
        try:
            get_artifact_repository(run.info.artifact_uri).delete_artifacts()
        except Exception as exc:  # an artifact store that cannot delete (or is empty): the run goes anyway
            log.warning("could not delete the artifacts of the partial run %s: %s", run.info.run_id,
                        str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        client.delete_run(run.info.run_id)
        log.info("deleted run %s: an earlier attempt of %s that registered nothing", run.info.run_id,
                 registration_id)


def _decide_promotion(client, model_name: str, version: str, report: dict, promotion: str, alpha: float,
                      champion_val_images, n_bootstrap: int) -> dict:
    from model.evaluation import score_bundle_on_images
    from model.metrics import paired_bootstrap_auc

    if promotion not in ("auto", "always", "never"):
        raise ValueError(f"unknown promotion policy {promotion!r} (auto, always or never)")
    if promotion == "never":
        return {"promote": False, "reason": "promotion disabled"}
    try:
        champion = client.get_model_version_by_alias(model_name, CHAMPION)
    except Exception:
        return {"promote": True, "reason": "no champion yet"}
    if promotion == "always":
        return {"promote": True, "reason": f"promotion forced over version {champion.version}"}
    if champion_val_images is None:
        return {"promote": False, "reason": "no validation images given for the champion comparison"}
    with tempfile.TemporaryDirectory() as tmp:
        champion_bundle, _ = fetch_model(f"models:/{model_name}/{champion.version}", tmp)
        images = champion_val_images(champion_bundle.preprocess.image_size)
        old = score_bundle_on_images(champion_bundle, images)
    preds = report["val_predictions"]
    test = paired_bootstrap_auc(np.array(preds["label"]), np.array(preds["probability"]), old, n_bootstrap)
    test["champion_version"] = str(champion.version)
    promote = test["delta"] > 0 and test["p_value"] < alpha
    verdict = "beats" if promote else "does not beat"
    test.update(promote=promote, reason=(f"{verdict} champion v{champion.version}: val AUC {test['auc_new']:.4f} vs "
                                         f"{test['auc_old']:.4f}, paired bootstrap p={test['p_value']:.3f} (alpha {alpha})"))
    return test


def resolve_model_uri(model_uri: str, client=None) -> tuple[str, str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version, immutable uri)."""
    match = _MODEL_URI.match(model_uri)
    if not match:
        raise RegistryError(f"not a registry URI: {model_uri!r} (use models:/NAME/VERSION or models:/NAME@ALIAS)")
    client = client or connect()
    name = match["name"]
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(name, match["alias"]).version
        else:
            version = client.get_model_version(name, match["version"]).version
    except Exception as exc:
        raise RegistryError(f"{model_uri} does not exist in the registry: {str(exc).splitlines()[0][:160]}") from None
    return name, str(version), f"models:/{name}/{version}"


def fetch_model(model_uri: str, dest: str | Path, tracking_uri: str | None = None,
                expected_sha256: str | None = None, require_digest: bool = False) -> tuple[Bundle, dict]:
    """Download one immutable version (or open a local path) and verify it.

    Integrity fails closed: a registry version must carry its ``bundle_sha256`` tag (and match
    ``expected_sha256`` when that is given too); a folder is checked against ``expected_sha256``,
    which ``require_digest`` (servers) makes mandatory. The digest inside the bundle is never the
    reference. Returns the bundle and ``{"name", "version", "uri"}``; the version is fixed here, once.
    """
    local = Path(model_uri.removeprefix("file://"))
    if not model_uri.startswith("models:/") and local.exists():
        if expected_sha256 is None and require_digest:
            raise BundleError(f"{model_uri}: a model folder needs its expected bundle digest (--sha256, "
                              "PNEUMOSCOPE_MODEL_SHA256, or the manifest's annotation); refusing to serve an "
                              "unverified model")
        bundle = Bundle.load(local, expected_sha256=expected_sha256)
        return bundle, {"name": bundle.meta.get("model_name", "pneumonia"), "version": bundle.meta.get("version", "local"),
                        "uri": str(local)}
    if not model_uri.startswith("models:/"):
        raise RegistryError(f"model not found: {model_uri} is neither a local bundle nor a models:/ URI")
    import mlflow

    client = connect(tracking_uri)
    name, version, pinned = resolve_model_uri(model_uri, client)
    tagged = client.get_model_version(name, version).tags.get("bundle_sha256")
    if not tagged:
        raise BundleError(f"{pinned} has no bundle_sha256 tag: its integrity cannot be checked; refusing it")
    if expected_sha256 is not None and str(expected_sha256).strip().lower() != str(tagged).strip().lower():
        raise BundleError(f"{pinned}: the registry's bundle_sha256 {str(tagged)[:12]}... differs from the expected "
                          f"{str(expected_sha256)[:12]}...")
    target = Path(dest)
    target.mkdir(parents=True, exist_ok=True)
    path = mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(target))
    try:
        bundle = Bundle.load(path, expected_sha256=tagged)
    except BundleError as exc:
        raise BundleError(f"{pinned}: {exc}") from None
    return bundle, {"name": name, "version": version, "uri": pinned}
