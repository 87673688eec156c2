"""The engine choice per kind of machine: timed once, recorded, reused (gated) by the next replicas.

One random-weight ResNet-50 bundle (128 px, fp32 + an accepted int8 graph, its gate set of real X-rays) serves
the module. No speed is asserted; what is asserted is what ran: which candidates were built, whether timing
happened, what was recorded and where, and that the reused choice is the recorded one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from serving_fixtures import free_port_pair, register, require_data, shared_bundle, spawn_server, stop_server, \
    wait_ready


@pytest.fixture(scope="module")
def bundle_dir() -> Path:
    require_data()
    pytest.importorskip("openvino", reason="openvino is pinned in pyproject (serve extra); run `make setup`")
    return shared_bundle()[0]


def _settings(**overrides):
    from serving.settings import ServingSettings

    return ServingSettings(**{"threads": 2, "max_batch_size": 4, "engine_timing_s": 0.2, **overrides})


class CountingFactory:
    """The real engine factory, counting which engine x precision it was asked to build."""

    def __init__(self, plant=None):
        self.built: list[tuple[str, str]] = []
        self.plant = plant  # (engine, precision) -> wrapper class, to plant a broken candidate

    def __call__(self, engine, path, precision, threads, parallel=1, spinning=False):
        from serving.engine import create_engine

        self.built.append((engine, precision))
        real = create_engine(engine, path, precision, threads, parallel, spinning)
        wrapper = (self.plant or {}).get((engine, precision))
        return wrapper(real) if wrapper else real


class OffByOne:
    """Answers one logit off: beyond the gate's tolerance."""

    def __init__(self, real):
        self.real = real

    def run(self, x):
        logits, cams = self.real.run(x)
        return logits + 1.0, cams


def _select(bundle, settings, store_dir: Path, factory=None):
    from serving.engine_choice import Choice, FileStore, choice_key
    from serving.engine_selection import select_engine

    factory = factory or CountingFactory()
    choice = Choice(FileStore(store_dir), choice_key(bundle.sha256, settings), settings.engine_choice)
    return select_engine(bundle, settings, "pneumonia", "1", factory=factory, choice=choice), factory


def test_the_second_selection_on_this_machine_gates_the_recorded_choice_without_timing(bundle_dir, tmp_path):
    from prometheus_client import REGISTRY

    from model.bundle import Bundle

    bundle, settings = Bundle.load(bundle_dir), _settings()
    first, built = _select(bundle, settings, tmp_path)
    assert first.mode == "auto" and first.timing_seconds > 0
    assert len(set(built.built)) == len(first.table) >= 2  # every candidate was built and timed
    records = list(tmp_path.glob("engine-choice-*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert (record["engine"], record["precision"]) == (first.engine, first.precision)
    assert record["key"]["bundle_sha256"] == bundle.sha256 and record["key"]["threads"] == 2
    assert record["table"] == first.table

    second, built = _select(bundle, settings, tmp_path)
    assert second.mode == "reused" and second.timing_seconds == 0.0
    assert (second.engine, second.precision) == (first.engine, first.precision)
    assert set(built.built) == {(first.engine, first.precision)}  # only the recorded candidate was built
    from model.engine_gate import GateSet

    gate = GateSet.load(bundle)
    chosen = second.table[0]
    assert chosen["status"].startswith("chosen (reused")
    assert 0 <= chosen["max_abs_logit_diff"] <= gate.max_abs_logit_diff and chosen["gate"]  # gated here
    assert REGISTRY.get_sample_value("pneumoscope_engine_timing_seconds") == 0.0
    assert REGISTRY.get_sample_value("pneumoscope_engine_info", {
        "model_name": "pneumonia", "model_version": "1", "engine": second.engine, "precision": second.precision,
        "selection": "reused"}) == 1
    # the reused engines serve
    x = gate.tensors(bundle.preprocess)[:2]
    assert second.wide.run(x)[0].shape == (2,) and second.narrow.run(x)[0].shape == (2,)


def test_another_key_refresh_and_a_corrupt_record_time_again(bundle_dir, tmp_path, caplog):
    from model.bundle import Bundle

    bundle = Bundle.load(bundle_dir)
    first, _ = _select(bundle, _settings(), tmp_path)
    # other settings that change what is timed: another key, so timed (and recorded beside the first)
    other, _ = _select(bundle, _settings(threads=1), tmp_path)
    assert other.mode == "auto" and other.timing_seconds > 0
    assert len(list(tmp_path.glob("engine-choice-*.json"))) == 2
    # refresh: times although a record exists, and overwrites it
    path = next(p for p in tmp_path.glob("engine-choice-*.json") if json.loads(p.read_text())["key"]["threads"] == 2)
    before = json.loads(path.read_text())
    refreshed, _ = _select(bundle, _settings(engine_choice="refresh"), tmp_path)
    assert refreshed.mode == "auto" and refreshed.timing_seconds > 0
    assert json.loads(path.read_text())["table"] != before["table"]  # measured anew (img/s never repeat exactly)
    # a record that is not for this key (edited by hand), and one that is not JSON: timed again, said so
    record = json.loads(path.read_text())
    record["key"]["cpu_model"] = "another CPU"
    path.write_text(json.dumps(record))
    again, _ = _select(bundle, _settings(), tmp_path)
    assert again.mode == "auto" and "does not match this machine" in caplog.text
    path.write_text("{not json")
    again, _ = _select(bundle, _settings(), tmp_path)
    assert again.mode == "auto" and "cannot read" in caplog.text
    assert json.loads(path.read_text())["key"]["cpu_model"] != "another CPU"  # rewritten by the timing replica


def test_a_recorded_choice_that_fails_the_gate_here_is_timed_again(bundle_dir, tmp_path, caplog):
    from model.bundle import Bundle

    bundle = Bundle.load(bundle_dir)
    first, _ = _select(bundle, _settings(), tmp_path)
    recorded = (first.engine, first.precision)
    # the same kind of machine, but the recorded candidate now answers wrongly (a broken engine build, say)
    again, built = _select(bundle, _settings(), tmp_path, CountingFactory(plant={recorded: OffByOne}))
    assert "failed the engine parity gate here" in caplog.text
    assert again.mode == "auto" and again.timing_seconds > 0
    assert (again.engine, again.precision) != recorded
    assert len(set(built.built)) == len(again.table)  # all timed
    record = json.loads(next(tmp_path.glob("engine-choice-*.json")).read_text())
    assert (record["engine"], record["precision"]) == (again.engine, again.precision)  # the new choice is recorded


def test_where_the_choice_is_kept(tmp_path):
    from serving.engine_choice import FileStore, RegistryStore, choice_store

    digest = "a" * 64
    assert choice_store(_settings(engine_choice="off"), "models:/pneumonia/3", digest) is None
    assert isinstance(choice_store(_settings(), "models:/pneumonia/3", digest), RegistryStore)
    assert choice_store(_settings(), "/mnt/models", digest) is None  # a folder, nowhere to record: time as before
    assert isinstance(choice_store(_settings(engine_choice_dir=str(tmp_path)), "/mnt/models", digest), FileStore)
    store = choice_store(_settings(engine_choice_model="models:/pneumonia/3", engine_choice_dir=str(tmp_path)),
                         "/mnt/models", digest)
    assert isinstance(store, RegistryStore) and store.model_uri == "models:/pneumonia/3"
    # a folder that cannot be made (a file is in the way): a warning, never a failure
    (tmp_path / "in-the-way").write_text("")
    FileStore(tmp_path / "in-the-way" / "sub").write("k", {"x": 1})
    assert FileStore(tmp_path / "in-the-way" / "sub").read("k") is None


def test_a_registry_version_holding_another_bundle_keeps_no_choice(bundle_dir, tmp_path, caplog):
    from model.bundle import Bundle
    from serving.engine_choice import RegistryStore

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = register(bundle_dir, uri, alias=None)
    store = RegistryStore(f"models:/pneumonia/{version}", uri, "b" * 64)  # not the registered bundle's digest
    store.write("k", {"x": 1})
    assert store.read("k") is None and "holds another bundle" in caplog.text
    good = RegistryStore(f"models:/pneumonia/{version}", uri, Bundle.load(bundle_dir).sha256)
    good.write("k", {"x": 1})
    assert good.read("k") == {"x": 1}


def _metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_the_second_predictor_process_reuses_the_registry_tag_and_serves_the_same_choice(bundle_dir, tmp_path):
    """Two starts of the real predictor on a registered version: the first times and tags the version, the
    second finds the tag, skips the timing (its log and /metrics say so) and serves the same engine."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = register(bundle_dir, uri)
    starts = []
    for run in range(2):
        port = free_port_pair()
        log = tmp_path / f"predictor-{run}.log"
        process = spawn_server(["serving.predictor_main", "--model_name=pneumonia",
                                f"--model_uri=models:/pneumonia/{version}", f"--http_port={port}",
                                f"--grpc_port={port + 1}", "--bind=127.0.0.1", "--threads=2", "--max_batch_size=4",
                                "--engine_timing_s=0.2", f"--model_cache={tmp_path / f'cache-{run}'}"],
                               log, env={"MLFLOW_TRACKING_URI": uri})
        try:
            wait_ready(process, f"http://127.0.0.1:{port}/v2/models/pneumonia/ready")
            base = f"http://127.0.0.1:{port}"
            platform = httpx.get(f"{base}/v2/models/pneumonia", timeout=10).json()["platform"]
            metrics = httpx.get(f"{base}/metrics", timeout=10).text
        finally:
            assert stop_server(process) == 0
        starts.append((platform, metrics, log.read_text()))
    (first_platform, first_metrics, first_log), (second_platform, second_metrics, second_log) = starts
    assert second_platform == first_platform
    engine, _, precision = first_platform.partition("/")
    engine = engine.removesuffix("_onnx")
    assert _metric(first_metrics, "pneumoscope_engine_timing_seconds") > 0
    assert _metric(first_metrics, "pneumoscope_engine_info", engine=engine, precision=precision,
                   selection="auto") == 1
    assert "engine choice recorded (registry tag" in first_log
    assert _metric(second_metrics, "pneumoscope_engine_timing_seconds") == 0
    assert _metric(second_metrics, "pneumoscope_engine_info", engine=engine, precision=precision,
                   selection="reused") == 1
    assert re.search(rf"reusing {engine}/{precision}, chosen on this kind of machine", second_log)
    assert "engine choice recorded" not in second_log and "gating" in second_log
    tags = MlflowClient(uri, uri).get_model_version("pneumonia", version).tags
    records = [json.loads(v) for k, v in tags.items() if k.startswith("engine_choice.")]
    assert len(records) == 1 and (records[0]["engine"], records[0]["precision"]) == (engine, precision)
