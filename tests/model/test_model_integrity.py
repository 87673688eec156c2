"""Model integrity fails closed: an expected digest from outside the bundle, bare file names, one bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.bundle import BUNDLE_FILE, Bundle, BundleError, canonical_digest, write_bundle
from model.preprocessing import PreprocessConfig


def make_bundle(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(b"not really onnx, but hashed like it")
    write_bundle(root, {"preprocess": PreprocessConfig(image_size=64).to_dict(), "threshold": 0.5,
                        "temperature": 1.0, "model_name": "pneumonia"})
    return Bundle.load(root).sha256


def rewrite(root: Path, **changes) -> None:
    """Alter the metadata the way an attacker would: recompute the digest stored inside, too."""
    meta = json.loads((root / BUNDLE_FILE).read_text())
    meta.update(changes)
    meta["bundle_sha256"] = canonical_digest(meta)
    (root / BUNDLE_FILE).write_text(json.dumps(meta))


def test_the_expected_digest_comes_from_outside_the_bundle(tmp_path):
    digest = make_bundle(tmp_path / "m")
    assert Bundle.load(tmp_path / "m", expected_sha256=digest).sha256 == digest
    rewrite(tmp_path / "m", threshold=0.01)  # self-consistent: its own bundle_sha256 matches
    Bundle.load(tmp_path / "m")  # corruption check alone cannot see it ...
    with pytest.raises(BundleError, match="does not match the expected"):
        Bundle.load(tmp_path / "m", expected_sha256=digest)  # ... the outside reference does
    with pytest.raises(BundleError, match="not a SHA-256"):
        Bundle.load(tmp_path / "m", expected_sha256="abc")


def test_serving_a_folder_requires_its_digest(tmp_path):
    from model.registry import fetch_model

    digest = make_bundle(tmp_path / "m")
    with pytest.raises(BundleError, match="needs its expected bundle digest"):
        fetch_model(str(tmp_path / "m"), tmp_path / "dl", require_digest=True)
    bundle, info = fetch_model(str(tmp_path / "m"), tmp_path / "dl", expected_sha256=digest, require_digest=True)
    assert bundle.sha256 == digest and info["uri"] == str(tmp_path / "m")
    with pytest.raises(BundleError, match="does not match"):
        fetch_model(str(tmp_path / "m"), tmp_path / "dl", expected_sha256="0" * 64, require_digest=True)


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "sub/model.onnx", "..", ""])
def test_bundle_file_names_are_bare(tmp_path, name):
    make_bundle(tmp_path / "m")
    rewrite(tmp_path / "m", files={name: "0" * 64})
    with pytest.raises(BundleError, match="bare file names"):
        Bundle.load(tmp_path / "m")


def test_exactly_one_bundle_per_model_folder(tmp_path):
    make_bundle(tmp_path / "root" / "a")
    make_bundle(tmp_path / "root" / "b")
    with pytest.raises(BundleError, match="2 bundles"):
        Bundle.load(tmp_path / "root")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no pneumoscope.json"):
        Bundle.load(tmp_path / "empty")
    assert Bundle.load(tmp_path / "root" / "a").root == tmp_path / "root" / "a"


def test_registry_versions_must_carry_a_matching_digest_tag(tmp_path):
    from model.registry import connect, fetch_model

    digest = make_bundle(tmp_path / "m")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = connect(uri)
    client.create_registered_model("pneumonia")
    untagged = client.create_model_version("pneumonia", source=str(tmp_path / "m")).version
    tagged = client.create_model_version("pneumonia", source=str(tmp_path / "m"),
                                         tags={"bundle_sha256": digest}).version
    with pytest.raises(BundleError, match="no bundle_sha256 tag"):
        fetch_model(f"models:/pneumonia/{untagged}", tmp_path / "dl1", uri)
    bundle, info = fetch_model(f"models:/pneumonia/{tagged}", tmp_path / "dl2", uri)
    assert bundle.sha256 == digest and info["version"] == str(tagged)
    with pytest.raises(BundleError, match="differs from the expected"):
        fetch_model(f"models:/pneumonia/{tagged}", tmp_path / "dl3", uri, expected_sha256="1" * 64)
    rewrite(tmp_path / "m", threshold=0.01)  # the stored artifact is altered after registration
    with pytest.raises(BundleError, match="does not match the expected"):
        fetch_model(f"models:/pneumonia/{tagged}", tmp_path / "dl4", uri)


def test_predictor_refuses_to_start_without_a_digest_in_one_line(tmp_path):
    digest = make_bundle(tmp_path / "m")
    for extra, expected in (([], "needs its expected bundle digest"), (["--sha256", "f" * 64], "does not match")):
        done = subprocess.run([sys.executable, "-m", "serving.predictor_main", "--model_uri", str(tmp_path / "m"),
                               "--http_port", "0", *extra], capture_output=True, text=True, timeout=180)
        assert done.returncode == 2, done.stderr[-1000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("pneumoscope predictor: error:") and expected in last, last
        assert "Traceback" not in done.stderr
    assert digest
