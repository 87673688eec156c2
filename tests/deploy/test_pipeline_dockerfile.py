"""docker/pipeline.Dockerfile: non-root, the git commit baked in, nothing installed at run time.

hadolint and checkov run on every Dockerfile in tests/deploy/test_manifests.py. The image itself (CUDA torch,
~6 GB) is built by `make images`, not by the tests; the pipeline's YAML tests check the other half of the
contract (every step runs `python3 -m kfp.dsl.executor_main` in this image with no pip install).
"""

from __future__ import annotations

import re
from pathlib import Path


DOCKERFILE = Path(__file__).resolve().parents[2] / "docker" / "pipeline.Dockerfile"


def final_stage() -> str:
    return DOCKERFILE.read_text().split("\nFROM ")[-1]


def test_runs_as_non_root_with_the_commit_baked_in():
    stage = final_stage()
    user = re.findall(r"^USER\s+(\S+)", stage, re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^ARG GIT_COMMIT", stage, re.MULTILINE)
    assert "PNEUMOSCOPE_GIT_COMMIT=${GIT_COMMIT}" in stage


def test_the_runtime_stage_installs_nothing_and_ships_no_pip():
    stage = final_stage()
    assert "pip install" not in stage
    assert "pip uninstall --yes pip" in DOCKERFILE.read_text()  # the venv copied into the runtime stage
    assert "site-packages/pip" in stage  # the base image's own pip
