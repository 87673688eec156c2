"""The pipeline image reference (no kfp import: the CLI's parser reads the default)."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

try:
    _VERSION = version("pneumoscope")
except PackageNotFoundError:  # a source tree that was never installed
    _VERSION = "0.0.0"

#: The image built from docker/pipeline.Dockerfile, tagged with the package version.
DEFAULT_IMAGE = f"ghcr.io/pneumoscope/pipeline:{_VERSION}"

# [registry[:port]/]path[:tag][@sha256:digest] with lower-case path components (OCI reference grammar).
_IMAGE_REF = re.compile(r"^(?:[a-zA-Z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
                        r"(?::\w[\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")


def check_image(image: str) -> str:
    """The image reference, or ValueError with one line saying what is wrong with it."""
    if not image or not _IMAGE_REF.match(image):
        raise ValueError(f"not a container image reference: {image!r} (expected e.g. {DEFAULT_IMAGE})")
    return image
