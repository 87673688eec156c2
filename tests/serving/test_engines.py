"""Inference engines: ONNX Runtime and OpenVINO on the same bundle, the engine parity gate, the choice by measurement.

One random-weight ResNet-50 bundle (128 px, fp32 + int8, its gate set of real X-rays with their true labels)
serves the module. No timing is asserted: which engine is faster depends on the machine and its load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serving_fixtures import XRAY_FULL, build_bundle, free_port_pair, require_data, xray_files

REPO = Path(__file__).resolve().parents[2]
NO_OPENVINO = "import sys; sys.modules['openvino'] = None  # as in an environment without the package\n"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    require_data()
    pytest.importorskip("openvino", reason="openvino is pinned in pyproject (serve extra); run `make setup`")
    path, _ = build_bundle(tmp_path_factory.mktemp("engines") / "bundle")
    return path


def _digest(bundle_dir: Path) -> str:
    """A folder is served with its expected digest (integrity fails closed)."""
    from model.bundle import Bundle

    return Bundle.load(bundle_dir, verify=False).sha256


def _settings(**overrides):
    from serving.settings import ServingSettings

    return ServingSettings(**{"threads": 2, "max_batch_size": 4, "engine_timing_s": 0.3, **overrides})


def _real_xrays(config) -> np.ndarray:
    """24 real X-rays the gate set does not hold: 16 from the 224 px copies, 8 full-resolution originals."""
    from model.preprocessing import load_resized, normalize

    files = xray_files(per_class=8, offset=400) + xray_files(per_class=4, root=XRAY_FULL)
    return normalize(np.stack([load_resized(f.read_bytes(), config).pixels for f in files]), config)


def _copy(bundle_dir: Path, dest: Path) -> Path:
    shutil.copytree(bundle_dir, dest)
    return dest


def _rewrite(folder: Path, **meta_updates) -> None:
    from model.bundle import BUNDLE_FILE, write_bundle

    meta = json.loads((folder / BUNDLE_FILE).read_text())
    meta.update(meta_updates)
    write_bundle(folder, {k: v for k, v in meta.items() if k not in ("files", "bundle_sha256", "format")})


# ---------------------------------------------------------------------------------------------------------

def test_both_engines_give_the_same_decisions_on_real_xrays(bundle_dir):
    from concurrent.futures import ThreadPoolExecutor

    from model.bundle import Bundle
    from model.engine_gate import GateSet
    from serving.engine import create_engine

    bundle = Bundle.load(bundle_dir)
    gate = GateSet.load(bundle)
    x = _real_xrays(bundle.preprocess)
    threshold_logit = bundle.temperature * (np.log(bundle.threshold / (1 - bundle.threshold)) - bundle.logit_bias)
    reference = create_engine("onnxruntime", bundle_dir / "model.onnx", "fp32", 2).run(x)[0]
    assert (reference >= threshold_logit).any() and (reference < threshold_logit).any()  # both labels occur
    from model.ood import OodDetector

    detector = OodDetector.load(bundle)
    for precision, graph in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        ort_logits, ort_cams, ort_features = create_engine("onnxruntime", bundle_dir / graph, precision, 2).run(x)
        ov_logits, ov_cams, ov_features = create_engine("openvino", bundle_dir / graph, precision, 2).run(x)
        assert ort_features.shape == ov_features.shape == (len(x), 512)  # the third output, on both engines
        # Two single-threaded OpenVINO streams called at once (the predictor under load) answer the same.
        narrow = create_engine("openvino", bundle_dir / graph, precision, 1, parallel=2)
        with ThreadPoolExecutor(2) as pool:
            halves = list(pool.map(narrow.run, (x[:12], x[12:])))
        np.testing.assert_allclose(np.concatenate([h[0] for h in halves]), ov_logits, atol=1e-3)
        assert ov_cams.shape == ort_cams.shape == (len(x), 4, 4)
        if precision == "fp32":
            np.testing.assert_allclose(ov_logits, ort_logits, atol=1e-3)
            np.testing.assert_allclose(ov_cams, ort_cams, atol=1e-3 * float(np.abs(ort_cams).max()))
            assert np.array_equal(ov_logits >= threshold_logit, ort_logits >= threshold_logit)
            # the two fp32 engines' out-of-distribution scores stay within the detector's precision tolerance
            assert np.max(np.abs(detector.scores(ov_features) - detector.scores(ort_features))) \
                <= gate.max_ood_score_diff
        else:
            # int8 graphs round differently per engine and CPU; within the gate's logit tolerance of fp32,
            # every image further than that tolerance from the threshold keeps its fp32 decision on both.
            clear = np.abs(reference - threshold_logit) > gate.max_abs_logit_diff
            assert clear.sum() >= len(x) // 2
            for logits in (ort_logits, ov_logits):
                assert np.max(np.abs(logits - reference)) <= gate.max_abs_logit_diff
                assert np.array_equal((logits >= threshold_logit)[clear], (reference >= threshold_logit)[clear])


def test_auto_gates_times_and_reports_its_choice(bundle_dir):
    from prometheus_client import REGISTRY

    from serving.predictor import PneumoniaPredictor

    model = PneumoniaPredictor("pneumonia", str(bundle_dir), _settings(model_sha256=_digest(bundle_dir)))
    assert model.load() and model.ready
    table = {(row["engine"], row["precision"]): row for row in model.engine.table}
    # the test bundle's int8 graph did not pass its export gate: auto compares fp32 on both engines
    assert set(table) == {("onnxruntime", "fp32"), ("openvino", "fp32")}
    chosen = [key for key, row in table.items() if row["status"] == "chosen"]
    assert chosen == [(model.engine.engine, model.engine.precision)]
    (engine, precision), = chosen
    other, = set(table) - set(chosen)
    # the fastest candidate was gated first and passed, so the slower one needed no gate
    assert table[chosen[0]]["img_per_s"] >= table[other]["img_per_s"] > 0
    assert table[chosen[0]]["max_abs_logit_diff"] < 1e-3 and table[chosen[0]]["auc_drop"] <= 0.003
    assert table[other]["status"] == "not gated: slower than the chosen one"
    assert model.platform == f"{engine}_onnx/{precision}" and model.precision == precision
    assert REGISTRY.get_sample_value("pneumoscope_engine_info", {
        "model_name": "pneumonia", "model_version": model.model_version, "engine": engine, "precision": precision,
        "selection": "auto"}) == 1
    assert REGISTRY.get_sample_value("pneumoscope_engine_candidate_eligible",
                                     {"engine": engine, "precision": precision}) == 1
    for key in table:
        labels = {"engine": key[0], "precision": key[1]}
        assert REGISTRY.get_sample_value("pneumoscope_engine_candidate_images_per_second", labels) > 0
    # the chosen engine serves, wide and narrow, and matches the stored fp32 reference
    from model.engine_gate import GateSet

    gate = GateSet.load(model.bundle)
    x = gate.tensors(model.bundle.preprocess)[:4]
    for run in (model.run_engine, model.run_narrow):
        np.testing.assert_allclose(run(x)[0], gate.logits[:4], atol=1e-3)
    model.stop()


def test_forced_openvino_serves_through_dynamic_batching_and_streams(bundle_dir, tmp_path):
    import asyncio

    from serving.predictor import PneumoniaPredictor

    # The random-weight test graph's int8 features move its out-of-distribution score beyond the detector's
    # tolerance (test_the_gate_refuses_a_precision_that_moves_the_ood_score): batching is tested on a copy
    # exported without a detector, whose int8 graph the gate judges by its logits and CAMs alone.
    plain = _copy(bundle_dir, tmp_path / "plain")
    (plain / "ood.npz").unlink()
    _rewrite(plain, intended_use=None)
    model = PneumoniaPredictor("pneumonia", str(plain), _settings(engine="openvino", precision="int8",
                                                                  model_sha256=_digest(plain)))
    assert model.load() and model.ready  # gated and warmed up before ready
    assert (model.engine.engine, model.engine.precision, model.engine.mode) == ("openvino", "int8", "forced")
    assert model.platform == "openvino_onnx/int8"
    x = _real_xrays(model.bundle.preprocess)[:16]
    alone = np.concatenate([model.run_engine(x[i:i + 1])[0] for i in range(len(x))])

    async def sixteen_in_flight():
        return await asyncio.gather(*(model.batcher.submit(x[i:i + 1]) for i in range(len(x))))

    answers = asyncio.run(sixteen_in_flight())
    # every request gets its own row back; they ran as batches on the parallel single-threaded streams
    np.testing.assert_allclose(np.concatenate([a[0] for a in answers]), alone, atol=1e-3)
    assert all(a[1].shape == (1, 4, 4) for a in answers)
    assert model.batcher.calls["narrow"] >= 1 and sum(model.batcher.calls.values()) < len(x)
    model.stop()


def test_a_candidate_that_fails_the_gate_is_never_chosen(bundle_dir, tmp_path):
    import onnx
    from onnx import numpy_helper
    from prometheus_client import REGISTRY

    from model.bundle import Bundle
    from serving.engine import EngineError, create_engine
    from serving.engine_selection import select_engine

    # An int8 graph with one wrong quantisation scale, declared accepted: the fastest graph, and broken.
    broken = _copy(bundle_dir, tmp_path / "broken")
    graph = onnx.load(str(broken / "model.int8.onnx"))
    initializers = {i.name: i for i in graph.graph.initializer}
    weight_scales = [n.input[1] for n in graph.graph.node if n.op_type == "DequantizeLinear"
                     and n.input[0] in initializers and initializers[n.input[0]].data_type == onnx.TensorProto.INT8]
    scale = initializers[weight_scales[len(weight_scales) // 2]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 4, scale.name))
    onnx.save(graph, str(broken / "model.int8.onnx"))
    _rewrite(broken, int8={"accepted": True, "reason": "deliberately broken for this test"})
    bundle = Bundle.load(broken)

    selection = select_engine(bundle, _settings())
    table = {(row["engine"], row["precision"]): row for row in selection.table}
    assert set(table) == {(e, p) for e in ("onnxruntime", "openvino") for p in ("fp32", "int8")}
    assert selection.precision == "fp32" and table[(selection.engine, "fp32")]["status"] == "chosen"
    for engine in ("onnxruntime", "openvino"):  # faster, so gated first, and refused (unless slower: not gated)
        assert table[(engine, "int8")]["status"] in ("failed the engine parity gate", "not gated: slower than the "
                                                                                 "chosen one"), table
    # Only int8 allowed: both broken graphs are gated, both fail, and the predictor refuses to start.
    with pytest.raises(EngineError, match="no engine passed the engine parity gate") as refused:
        select_engine(bundle, _settings(precision="int8"))
    assert str(refused.value).count("max |logit diff|") == 2, refused.value
    for engine in ("onnxruntime", "openvino"):
        assert REGISTRY.get_sample_value("pneumoscope_engine_candidate_eligible",
                                         {"engine": engine, "precision": "int8"}) == 0

    # A candidate that answers wrongly AND faster than anything else (planted through the engine factory).
    class FastButWrong:
        def __init__(self, real):
            self.real, self.cache = real, {}

        def run(self, x):
            key = (x.shape, float(x[0].sum()))
            if key not in self.cache:
                logits, cams, features = self.real.run(x)
                self.cache[key] = (logits + 1.0, cams, features)  # off by 1 logit: beyond the tolerance, same ranking
            return self.cache[key]

    def factory(engine, path, precision, threads, parallel=1, spinning=False):
        real = create_engine(engine, path, precision, threads, parallel, spinning)
        return FastButWrong(real) if (engine, precision) == ("openvino", "fp32") else real

    selection = select_engine(Bundle.load(bundle_dir), _settings(), factory=factory)
    table = {(row["engine"], row["precision"]): row for row in selection.table}
    assert table[("openvino", "fp32")]["img_per_s"] > table[("onnxruntime", "fp32")]["img_per_s"]  # the fastest
    assert table[("openvino", "fp32")]["status"] == "failed the engine parity gate"
    assert table[("openvino", "fp32")]["auc_drop"] == 0.0  # AUC alone would not have caught it
    assert (selection.engine, selection.precision) == ("onnxruntime", "fp32")


def test_the_gate_refuses_a_precision_that_moves_the_ood_score(bundle_dir):
    """An engine whose logits and CAMs are right but whose pooled features drift: refused when the drift moves a gate
    film's out-of-distribution score beyond the detector's tolerance, accepted below it."""
    from model.bundle import Bundle
    from model.engine_gate import GateSet
    from serving.engine import EngineError, create_engine
    from serving.engine_selection import select_engine

    bundle = Bundle.load(bundle_dir)
    gate = GateSet.load(bundle)
    reference = gate.reference_ood_scores()
    assert gate.max_ood_score_diff == bundle.meta["intended_use"]["ood"]["score_tolerance"] > 0

    def drifting(scale: float):
        """An engine whose pooled features come out ``scale`` too large (an activation rounded the wrong way)."""
        class Drifting:
            def __init__(self, real):
                self.real = real

            def run(self, x):
                logits, cams, features = self.real.run(x)
                return logits, cams, features * (1 + scale)

        def factory(engine, path, precision, threads, parallel=1, spinning=False):
            return Drifting(create_engine(engine, path, precision, threads, parallel, spinning))
        return factory

    def moved(scale: float) -> float:
        return float(np.max(np.abs(gate.detector.scores(gate.features * (1 + scale)) - reference)))

    # the drifts that move the gate films' scores by half and by twice the tolerance
    scales = np.geomspace(1e-7, 1.0, 141)
    low = max(v for v in scales if moved(v) < gate.max_ood_score_diff / 2)
    high = min(v for v in scales if moved(v) > gate.max_ood_score_diff * 2)
    accepted = select_engine(bundle, _settings(engine="onnxruntime", precision="fp32"), factory=drifting(low))
    assert accepted.table[0]["max_ood_score_diff"] == pytest.approx(moved(low), rel=1e-3, abs=1e-6)
    with pytest.raises(EngineError, match=r"max \|ood_score diff\|") as refused:
        select_engine(bundle, _settings(engine="onnxruntime", precision="fp32"), factory=drifting(high))
    assert "max |logit diff|" not in str(refused.value)  # the logits and CAMs were right


def test_forcing_an_engine_that_is_not_installed_fails_in_one_line(bundle_dir):
    port, digest = free_port_pair(), _digest(bundle_dir)
    runs = {
        "pneumoscope serve": NO_OPENVINO + "from model.cli import main\nsys.exit(main(['serve', '--model', "
                             f"{str(bundle_dir)!r}, '--sha256', '{digest}', '--port', '{port}', '--engine', "
                             "'openvino']))",
        "predictor": NO_OPENVINO + "from serving.predictor_main import main\nsys.exit(main(['--model_uri', "
                     f"{str(bundle_dir)!r}, '--sha256', '{digest}', '--http_port', '{port}', '--grpc_port', "
                     f"'{port + 1}', '--engine', 'openvino']))",
    }
    for what, code in runs.items():
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=REPO)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (what, result.stderr[-2000:])
        assert len(lines) == 1 and "Traceback" not in result.stderr, (what, result.stderr[-2000:])
        assert "'openvino' requested" in lines[0] and "not installed" in lines[0], lines
    # Without openvino, auto serves with ONNX Runtime alone.
    code = (NO_OPENVINO + "from model.bundle import Bundle\nfrom serving.settings import ServingSettings\n"
            "from serving.engine_selection import select_engine\n"
            f"s = select_engine(Bundle.load({str(bundle_dir)!r}), ServingSettings(threads=1, engine_timing_s=0.1))\n"
            "print(s.engine, [r['engine'] for r in s.table])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "onnxruntime ['onnxruntime']"


def test_gate_set_is_hashed_and_old_bundles_keep_onnx_runtime(bundle_dir, tmp_path):
    from model.bundle import Bundle, BundleError
    from serving.engine_selection import select_engine

    tampered = _copy(bundle_dir, tmp_path / "tampered")
    with np.load(tampered / "gate.npz") as data:
        arrays = dict(data)
    arrays["logits"] = arrays["logits"] + 5  # a shifted reference: refused before any gate runs
    np.savez_compressed(tampered / "gate.npz", **arrays)
    with pytest.raises(BundleError, match="sha256 mismatch for gate.npz"):
        Bundle.load(tampered)

    old = _copy(bundle_dir, tmp_path / "old")
    (old / "gate.npz").unlink()
    _rewrite(old, engine_gate=None)
    selection = select_engine(Bundle.load(old), _settings())
    assert (selection.engine, selection.precision, selection.gated) == ("onnxruntime", "fp32", False)
    assert [row["engine"] for row in selection.table] == ["onnxruntime"]


def test_bf16_is_a_candidate_only_on_openvino_where_the_cpu_has_it(bundle_dir, monkeypatch):
    from model.bundle import Bundle
    from serving import engine_selection
    from serving.engine import EngineError, create_engine, native_bf16

    bundle = Bundle.load(bundle_dir)

    def pairs(**overrides):
        return [(c.engine, c.precision) for c in engine_selection.candidate_list(bundle, _settings(**overrides))]

    if not native_bf16():  # this CPU (AVX2 only in development): no bf16 candidate, forcing it says why
        assert pairs() == [("onnxruntime", "fp32"), ("openvino", "fp32")]
        with pytest.raises(EngineError, match="native bf16"):
            pairs(precision="bf16")
        with pytest.raises(EngineError, match="native bf16"):
            create_engine("openvino", bundle_dir / "model.onnx", "bf16", 1)
    monkeypatch.setattr(engine_selection, "native_bf16", lambda: True)  # as on an AMX Xeon
    assert pairs() == [("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]
    assert pairs(precision="bf16") == [("openvino", "bf16")]
    with pytest.raises(EngineError, match="no engine can run precision bf16 with engine onnxruntime"):
        pairs(precision="bf16", engine="onnxruntime")


def test_the_engine_layer_needs_neither_torch_nor_scipy():
    """The serving image installs only the serve extra: the gate and the selection run without the training stack."""
    code = ("import sys, serving.engine_selection, serving.predictor; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'scipy', 'sklearn', 'matplotlib'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, f"the engine layer imports {result.stdout.strip()} {result.stderr[-500:]}"


def test_gate_auc_equals_the_training_metric():
    from model.engine_gate import auc
    from model.metrics import auc as training_auc

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # rounded: many ties
    assert auc(labels, scores) == pytest.approx(training_auc(labels, scores), abs=1e-12)
    assert np.isnan(auc(np.ones(5), scores[:5]))


def test_engine_settings_from_environment(monkeypatch):
    from serving.settings import ServingSettings

    monkeypatch.setenv("PNEUMOSCOPE_ENGINE", "openvino")
    monkeypatch.setenv("PNEUMOSCOPE_PRECISION", "bf16")
    assert (ServingSettings().engine, ServingSettings().precision) == ("openvino", "bf16")
    monkeypatch.setenv("PNEUMOSCOPE_ENGINE", "tensorrt")
    with pytest.raises(ValueError):
        ServingSettings()


def test_an_engine_that_breaks_while_timed_drops_out():
    from serving.engine_selection import Candidate, _time

    class Breaks:
        def run(self, x):
            raise RuntimeError("device lost")

    class Works:
        def run(self, x):
            return np.zeros(len(x), np.float32), np.zeros((len(x), 4, 4), np.float32), np.zeros((len(x), 0), np.float32)

    broken, fine = Candidate("openvino", "int8", wide=Breaks()), Candidate("onnxruntime", "fp32", wide=Works())
    assert _time([broken, fine], np.zeros((2, 1, 8, 8), np.float32), streams=1, seconds=0.05) == [fine]
    assert broken.status == "failed while timed: device lost" and broken.wide is None
    assert fine.img_per_s > 0
