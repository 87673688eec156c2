"""S3 going away while the training data is read (``model.data.prepare("s3://...")``): a real moto_server behind a
fault-injecting proxy (tests/fault_proxy.py), real X-rays.

A short outage is ridden out by retries with back-off and every image arrives; a long one stops the ingest with
one line and writes no cache, instead of training on whichever images happened to arrive (before, a read error
made an image "unreadable" and it was silently left out).
"""

from __future__ import annotations

import threading

import pytest

from fault_proxy import FaultProxy
from serving_fixtures import require_data, xray_files
from webapp_fixtures import make_bucket

pytestmark = pytest.mark.integration

BUCKET = "ingest-faults"


@pytest.fixture
def s3_through_proxy(moto_endpoint, monkeypatch):
    """A bucket of 6 real X-rays per class, reached through a FaultProxy in front of moto_server."""
    import boto3
    import s3fs

    require_data()
    make_bucket(moto_endpoint, BUCKET)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    files = xray_files(per_class=6)
    for path in files:
        s3.upload_file(str(path), BUCKET, f"data/train/{path.parent.name}/{path.name}")
    port = int(moto_endpoint.rsplit(":", 1)[1])
    with FaultProxy(port) as proxy:
        for key, value in {"AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        yield proxy, f"s3://{BUCKET}/data", len(files)
        s3fs.S3FileSystem.clear_instance_cache()


def outage_during_the_reads(monkeypatch, proxy: FaultProxy, seconds: float | None):
    """Cut S3 off once the images are listed, for ``seconds`` (None: for good)."""
    import model.data

    original = model.data.gate_images

    def gate_images(*args, **kwargs):
        proxy.set("refuse")
        if seconds is not None:
            threading.Timer(seconds, proxy.set, ("pass",)).start()
        return original(*args, **kwargs)

    monkeypatch.setattr(model.data, "gate_images", gate_images)


def test_a_short_s3_outage_during_ingest_is_ridden_out_and_no_image_is_lost(s3_through_proxy, monkeypatch,
                                                                            tmp_path):
    from model.data import SplitFractions, prepare

    proxy, uri, uploaded = s3_through_proxy
    outage_during_the_reads(monkeypatch, proxy, seconds=2.0)
    before = proxy.connections
    result = prepare(uri, tmp_path / "cache", 64, SplitFractions(val=0.2, holdout=0.0, seed=1), workers=1)
    assert proxy.connections - before > uploaded, "the reads were retried"
    summary = result.summary
    assert summary["found"] == uploaded and summary["kept"] == uploaded, summary
    assert not summary["excluded"].get("unreadable"), summary["excluded"]


def test_a_long_s3_outage_stops_the_ingest_with_one_line_and_writes_no_cache(s3_through_proxy, monkeypatch,
                                                                             tmp_path):
    import model.data
    from model.data import DataError, SplitFractions, prepare

    proxy, uri, _ = s3_through_proxy
    monkeypatch.setattr(model.data, "REMOTE_READ_BACKOFF_S", 0.05)  # the same attempts, sooner
    outage_during_the_reads(monkeypatch, proxy, seconds=None)
    before = proxy.connections
    with pytest.raises(DataError) as stopped:
        prepare(uri, tmp_path / "cache", 64, SplitFractions(val=0.2, holdout=0.0, seed=1), workers=1)
    message = str(stopped.value)
    assert "did not answer" in message and f"{model.data.REMOTE_READ_ATTEMPTS} attempts" in message, message
    assert "\n" not in message and uri.removeprefix("s3://") in message
    assert proxy.connections - before >= model.data.REMOTE_READ_ATTEMPTS, "each attempt reached for S3"
    assert not any((tmp_path / "cache" / name).exists() for name in ("images.npy", "manifest.csv", "summary.json"))
