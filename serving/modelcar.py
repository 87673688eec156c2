"""``pneumoscope export-modelcar models:/NAME/N``: one registered version's bundle as a KServe Modelcar image.

A Modelcar is an OCI image that holds the model under ``/models``. With ``storageUri: oci://IMAGE`` (and
modelcars enabled in KServe's ``inferenceservice-config``), KServe runs it as a sidecar of the predictor in a
shared process namespace; the sidecar links its ``/models`` to ``/mnt/models`` (``ln -sf /proc/$$/root/models
/mnt/models && sleep infinity``), so the predictor reads the bundle straight from the image's layers: nothing
is downloaded at start, and the node's image cache serves every later replica.

The image is built on the serving image's base (so it shares its layers and has the ``sh``, ``ln`` and
``sleep`` the sidecar runs), the bundle's files are owned by root and readable by anyone (the predictor runs
as another user and can change nothing), and it is labelled with the model name, version and bundle digest.
The tag is the version number, never ``latest``: KServe pulls a tagged modelcar ``IfNotPresent``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "modelcar.Dockerfile"
DEFAULT_REGISTRY = "ghcr.io/pneumoscope"
DEFAULT_BASE_IMAGE = "python:3.11.14-slim-bookworm"


class ModelcarError(RuntimeError):
    """One line: what failed and why."""


def image_reference(registry: str, model_name: str, version: str) -> str:
    return f"{registry.rstrip('/')}/{model_name}-modelcar:{version}"


def build_context(bundle, context: Path) -> Path:
    """The Docker build context: ``models/`` with exactly the bundle's listed files (and nothing else)."""
    from model.bundle import BUNDLE_FILE

    models = context / "models"
    models.mkdir(parents=True)
    for name in [BUNDLE_FILE, *bundle.meta["files"]]:
        shutil.copyfile(bundle.root / name, models / name)
        (models / name).chmod(0o444)
    shutil.copyfile(DOCKERFILE, context / "Dockerfile")
    return context


def export_modelcar(model_uri: str, *, registry: str = DEFAULT_REGISTRY, tag: str | None = None,
                    base_image: str = DEFAULT_BASE_IMAGE, push: bool = False, tracking_uri: str | None = None,
                    docker: str | None = None) -> dict:
    """Fetch and verify ``model_uri`` (its registry digest), build the modelcar image, push it if asked.

    Returns what a deployment needs: the image, its ``oci://`` storage URI, the version and the bundle digest
    (the chart's ``inference.model.sha256``)."""
    from model.registry import RegistryError, fetch_model

    if not model_uri.startswith("models:/"):
        raise RegistryError(f"export-modelcar takes a registered version, models:/NAME/N, not {model_uri!r}")
    docker = docker or os.environ.get("DOCKER", "/usr/bin/docker")
    try:
        working = subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        working = False
    if not working:
        raise ModelcarError(f"no working Docker engine ({docker} info fails): start dockerd or set DOCKER_HOST")
    with tempfile.TemporaryDirectory(prefix="pneumoscope-modelcar-") as tmp:
        bundle, info = fetch_model(model_uri, Path(tmp) / "download", tracking_uri, require_digest=True)
        ref = tag or image_reference(registry, info["name"], info["version"])
        if ref.rpartition(":")[2] in ("latest", "") or ":" not in ref.rpartition("/")[2]:
            raise ModelcarError(f"{ref}: tag the modelcar with a version (KServe pulls :latest on every start)")
        context = build_context(bundle, Path(tmp) / "context")
        labels = {"org.opencontainers.image.title": f"pneumoscope model {info['name']} version {info['version']}",
                  "io.pneumoscope.model.name": info["name"], "io.pneumoscope.model.version": info["version"],
                  "io.pneumoscope.model.uri": info["uri"], "io.pneumoscope.bundle-sha256": bundle.sha256}
        argv = [docker, "build", "--progress=plain", "-t", ref, "--build-arg", f"BASE_IMAGE={base_image}"]
        for key, value in labels.items():
            argv += ["--label", f"{key}={value}"]
        built = subprocess.run([*argv, str(context)], capture_output=True, text=True,
                               env=dict(os.environ, DOCKER_BUILDKIT="1"))
        if built.returncode != 0:
            tail = " | ".join(built.stderr.strip().splitlines()[-3:])[-400:]
            raise ModelcarError(f"building {ref} failed: {tail}")
    result = {"image": ref, "storage_uri": f"oci://{ref}", "model_uri": info["uri"], "model_version": info["version"],
              "sha256": bundle.sha256, "pushed": False}
    if push:
        host = ref.split("/", 1)[0]
        name, _, port = host.partition(":")
        try:
            socket.create_connection((name, int(port or 443)), 5).close()
        except (OSError, ValueError):
            result["not_pushed"] = f"registry {host} cannot be reached from here"
            return result
        pushed = subprocess.run([docker, "push", ref], capture_output=True, text=True)
        if pushed.returncode != 0:
            raise ModelcarError(f"pushing {ref} failed: {pushed.stderr.strip().splitlines()[-1][:300]}")
        result["pushed"] = True
    return result


def add_command(commands) -> None:
    parser = commands.add_parser(
        "export-modelcar", help="build a KServe Modelcar image holding one registered model version",
        description="Fetch models:/NAME/N from the registry, verify it against its bundle_sha256 tag, and build an "
                    "OCI image with the bundle under /models (read-only, on the serving image's base), tagged "
                    "REGISTRY/NAME-modelcar:N. Serve it with the chart's inference.model.storageUri: oci://IMAGE "
                    "and inference.model.sha256 (both printed, as one JSON line).")
    parser.add_argument("model", metavar="MODEL_URI", help="models:/NAME/N (an alias is resolved to its version)")
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"image registry (default {DEFAULT_REGISTRY})")
    parser.add_argument("--tag", help="the full image reference instead of REGISTRY/NAME-modelcar:N")
    parser.add_argument("--base-image", default=DEFAULT_BASE_IMAGE,
                        help="base image: the serving image's (it must have sh, ln and sleep)")
    parser.add_argument("--push", action="store_true", help="push the image when the registry can be reached")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, then local SQLite)")
    parser.set_defaults(func=cmd_export_modelcar)


def cmd_export_modelcar(args) -> int:
    from model.cli import CommandError

    try:
        result = export_modelcar(args.model, registry=args.registry, tag=args.tag, base_image=args.base_image,
                                 push=args.push, tracking_uri=args.mlflow_uri)
    except ModelcarError as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps(result))
    return 0
