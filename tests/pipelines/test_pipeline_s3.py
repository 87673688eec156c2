"""The s3:// data path: a real moto S3 server on a free loopback port, real X-rays uploaded with boto3,
``model.data.prepare("s3://...")`` reading them through s3fs (the path the preprocess step takes in a
cluster), and the CLI's pre-run check of an s3:// URI.

s3fs 2026.9 builds its client with aiobotocore, which reads botocore's ``AWS_ENDPOINT_URL``; fsspec's
``FSSPEC_S3_ENDPOINT_URL`` only counts if set before fsspec is imported, so the test uses the former.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipelines.test_pipeline_fixtures import free_port, shared_xrays, stop_process, wait_for_port

BUCKET, PREFIX = "pneumoscope-data", "chest_xray"
PER_CLASS = 14  # training images per class; val gets a few too


@pytest.fixture(scope="module")
def moto_s3():
    """moto_server from this venv on an unusual free port; stopped by its PID."""
    port = free_port()
    process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"),
                                "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


@pytest.fixture
def s3_env(moto_s3, monkeypatch):
    for key, value in {"AWS_ENDPOINT_URL": moto_s3, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no client left over with another endpoint
    yield moto_s3
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(s3_env):
    """A tiny Kaggle-layout subset of the real images, uploaded with boto3."""
    import boto3

    source = shared_xrays()
    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket=BUCKET)
    uploaded = 0
    for split, per_class in (("train", PER_CLASS), ("val", 2)):
        for cls in ("NORMAL", "PNEUMONIA"):
            for path in sorted((source / split / cls).iterdir())[:per_class]:
                s3.upload_file(str(path), BUCKET, f"{PREFIX}/{split}/{cls}/{path.name}")
                uploaded += 1
    return f"s3://{BUCKET}/{PREFIX}", uploaded


def test_prepare_reads_a_kaggle_layout_from_s3(bucket, tmp_path):
    from model.data import CachedData, SplitFractions, prepare

    uri, uploaded = bucket
    result = prepare(uri, tmp_path / "cache", 64, SplitFractions(val=0.2, holdout=0.0, seed=1), workers=1)
    summary = result.summary
    assert summary["source"] == uri
    assert summary["found"] == uploaded
    assert summary["kept"] + sum(summary["excluded"].values()) == uploaded
    assert summary["splits"]["sanity"] == {"NORMAL": 2, "PNEUMONIA": 2}
    cache = CachedData.load(tmp_path / "cache")
    assert cache.images.shape == (summary["kept"], 64, 64)
    assert all(row["file"].startswith(("train/", "val/")) for row in cache.manifest)
    assert len(result.manifest_sha256) == 64


def test_prepare_with_parallel_workers_reads_s3(bucket, tmp_path):
    """Remote filesystems are not fork-safe: prepare() spawns its decode workers for them."""
    from model.data import prepare

    result = prepare(bucket[0], tmp_path / "cache", 64, workers=2)
    assert result.summary["kept"] > 0


def test_the_preprocess_step_reads_s3_with_parallel_workers(bucket, tmp_path, monkeypatch):
    from kfp.dsl import Dataset, Model

    from components.steps import lung_segmentation, preprocess

    monkeypatch.setenv("PNEUMOSCOPE_WORKERS", "2")
    uri, uploaded = bucket
    dataset = Dataset(name="dataset", uri=str(tmp_path / "dataset"))
    # the pipeline's lung_segmentation step without lung_masks_uri: an empty artifact, no lung crop
    lung_model = Model(name="lung_model", uri=str(tmp_path / "lung_model"))
    lung_segmentation(lung_model=lung_model)
    assert lung_model.metadata["enabled"] is False
    try:
        preprocess(data_uri=uri, dataset=dataset, lung_model=lung_model, profile="smoke", image_size=64,
                   val_fraction=0.2, holdout_fraction=0.0)
    finally:
        import multiprocessing

        multiprocessing.set_start_method(None, force=True)  # the step ran in this process: undo its setting
    assert dataset.metadata["source"] == uri and dataset.metadata["image_size"] == 64
    assert 0 < dataset.metadata["images"] <= uploaded
    assert len(dataset.metadata["manifest_sha256"]) == 64
    assert (tmp_path / "dataset" / "images.npy").is_file()


def test_a_missing_s3_prefix_is_a_data_error(s3_env):
    import boto3

    from model.data import DataError, prepare

    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="empty-bucket")
    with pytest.raises(DataError, match="data folder not found: s3://empty-bucket/nothing"):
        prepare("s3://empty-bucket/nothing", "/tmp/unused", 64)


def test_the_cli_checks_an_s3_uri_before_the_run(bucket, tmp_path, monkeypatch, capsys):
    from model.cli import main
    from model.settings import Settings
    from pipelines.cli import local_data_uri

    uri, _ = bucket
    assert local_data_uri(Settings(), uri) == uri
    monkeypatch.setenv("PNEUMOSCOPE_HOME", str(tmp_path / "home"))
    assert main(["pipeline", "run", "--local", "--profile", "smoke", "--data", f"s3://{BUCKET}/elsewhere"]) == 2
    assert capsys.readouterr().err.strip() == f"pneumoscope: error: data folder not found: s3://{BUCKET}/elsewhere"
