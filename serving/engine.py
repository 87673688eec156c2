"""The inference engines a predictor can run a bundle on: ONNX Runtime and OpenVINO.

Both read the bundle's ONNX graphs as they are (``model.onnx``, ``model.int8.onnx``); no other artefact
format. Each engine object is thread-safe and answers ``run(x) -> (logits [N], cams [N,h,w], features [N,d])``
for an FP32 batch ``x`` [N,1,S,S]; ``features`` (layer1's channel statistics, what the out-of-distribution detector reads)
is [N,0] for a graph exported before it existed. ``parallel`` > 1 makes one object run that many calls side by side (the predictor's
narrow streams under load); ``threads`` is the intra-op threads of one call.

Precisions: ``fp32`` (``model.onnx``), ``int8`` (the static QDQ ``model.int8.onnx``), and ``bf16`` (OpenVINO
only: ``model.onnx`` with ``INFERENCE_PRECISION_HINT=bf16``, offered only where the CPU computes bf16 natively).
kserve-free, so the benchmarks time exactly what the predictor runs.
"""

from __future__ import annotations

import functools
import importlib
import logging
import queue
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from model.bundle import INPUT_NAME, OUTPUT_NAMES

log = logging.getLogger(__name__)

ENGINES = ("onnxruntime", "openvino")
#: the v2 model-metadata ``platform`` of each engine (Triton's name for ONNX Runtime)
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino_onnx"}


class EngineError(RuntimeError):
    """An engine that cannot serve: not installed, a precision this CPU or bundle lacks, or no candidate
    passed the engine parity gate. The message is one line for the operator."""


class Engine(Protocol):
    engine: str
    precision: str

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FP32 [N,1,S,S] -> (logits FP32 [N], cams FP32 [N,h,w], features FP32 [N,d]); safe to call from several
        threads."""


def installed(engine: str) -> bool:
    try:
        importlib.import_module(engine)
    except ImportError:
        return False
    return True


def require(engine: str) -> None:
    """Fail with one clear line when the package of a requested engine cannot be imported."""
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r} (auto, {', '.join(ENGINES)})")
    if not installed(engine):
        raise EngineError(f"engine {engine!r} requested (PNEUMOSCOPE_ENGINE / --engine) but the {engine} package is "
                          f"not installed here: install pneumoscope's 'serve' extra, or use --engine auto")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        return set()


def native_bf16() -> bool:
    """True where OpenVINO offers bf16 AND the CPU computes it natively (AVX512_BF16 or AMX), not emulated."""
    if not installed("openvino"):
        return False
    if "BF16" not in _ov_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return False
    flags = cpu_flags()
    return not flags or bool(flags & {"avx512_bf16", "amx_bf16"})  # no /proc/cpuinfo: trust OpenVINO


def _no_features(n: int) -> np.ndarray:
    return np.zeros((n, 0), dtype=np.float32)


# -- ONNX Runtime ----------------------------------------------------------------------------------------

def create_session(onnx_path: str | Path, threads: int, spinning: bool = False):
    """An ORT CPU session tuned for serving: ``threads`` intra-op threads, no busy-waiting by default."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning threads burn the cores the HTTP/gRPC event loops need between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeEngine:
    """One ORT session; its runs are thread-safe, so ``parallel`` calls share it (each uses its own thread)."""

    engine = "onnxruntime"

    def __init__(self, onnx_path: str | Path, precision: str, threads: int, parallel: int = 1,
                 spinning: bool = False):
        if precision == "bf16":
            raise EngineError("ONNX Runtime's CPU provider has no bf16 mode; bf16 is an OpenVINO precision")
        self.precision, self.threads, self.parallel = precision, threads, parallel
        self.session = create_session(onnx_path, threads, spinning)
        graph_outputs = {o.name for o in self.session.get_outputs()}
        self.outputs = [name for name in OUTPUT_NAMES if name in graph_outputs]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits, cams, *features = self.session.run(self.outputs, {INPUT_NAME: x})
        return (logits.reshape(-1).astype(np.float32, copy=False), cams.astype(np.float32, copy=False),
                features[0].astype(np.float32, copy=False) if features else _no_features(len(logits)))


# -- OpenVINO --------------------------------------------------------------------------------------------

@functools.cache
def _ov_core():
    import openvino as ov

    return ov.Core()


_NUMPY_BRIDGE = threading.Lock()
_numpy_bridge_ready = False


def _init_numpy_bridge() -> None:
    """Make OpenVINO's first numpy <-> Tensor conversion in this process, from one thread.

    OpenVINO's Python bindings initialise their numpy bridge lazily, inside a C++ function-local static whose
    initialiser releases and re-takes the GIL (pybind11's call-once). Two threads making the process's first
    conversions at once deadlock: one holds the static's guard and waits for the GIL, the other holds the GIL
    and waits for the guard. The engine selection's timing makes exactly that first call from ``streams``
    threads at once, so a predictor could hang at load, idle, forever. Converting once here, under a lock,
    before any engine runs, leaves nothing to initialise later.
    """
    global _numpy_bridge_ready
    with _NUMPY_BRIDGE:
        if not _numpy_bridge_ready:
            import openvino as ov

            np.asarray(ov.Tensor(np.zeros((1, 1), np.float32)).data).sum()  # numpy -> Tensor -> numpy
            _numpy_bridge_ready = True


class OpenVinoEngine:
    """The ONNX graph compiled by OpenVINO's CPU plugin, with ``parallel`` streams of ``threads`` threads.

    Each stream has its own infer request; a call borrows one, runs it asynchronously on OpenVINO's stream
    executor (synchronous calls from foreign threads would share one stream) and returns copies of the outputs.
    """

    engine = "openvino"

    def __init__(self, onnx_path: str | Path, precision: str, threads: int, parallel: int = 1):
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        if precision == "bf16" and not native_bf16():
            raise EngineError("bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX); this one has neither")
        self.precision, self.threads, self.parallel = precision, threads, parallel
        _init_numpy_bridge()
        core = _ov_core()
        config = {
            props.inference_num_threads: threads * parallel,
            props.num_streams: parallel,
            # Explicit f32 for fp32 and int8: on bf16-capable CPUs OpenVINO would otherwise lower every
            # non-quantised layer (including the CAM head) to bf16 on its own.
            hints.inference_precision: ov.Type.bf16 if precision == "bf16" else ov.Type.f32,
            # Pinned threads would fight the HTTP/gRPC event loops for the same cores.
            hints.enable_cpu_pinning: False,
        }
        self.compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
        graph_outputs = {name for output in self.compiled.outputs for name in output.get_names()}
        self._outputs = [self.compiled.output(name) for name in OUTPUT_NAMES if name in graph_outputs]
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(parallel):
            self._requests.put(self.compiled.create_infer_request())

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        request = self._requests.get()
        try:
            request.start_async({0: np.ascontiguousarray(x, dtype=np.float32)}, share_inputs=True)
            request.wait()
            logits, cams, *features = (np.array(request.get_tensor(out).data, dtype=np.float32)
                                       for out in self._outputs)
        finally:
            self._requests.put(request)
        return logits.reshape(-1), cams, features[0] if features else _no_features(len(logits))


def create_engine(engine: str, onnx_path: str | Path, precision: str, threads: int, parallel: int = 1,
                  spinning: bool = False) -> Engine:
    """``engine`` running ``onnx_path`` at ``precision``, ``parallel`` calls of ``threads`` threads at once."""
    require(engine)
    if engine == "onnxruntime":
        return OnnxRuntimeEngine(onnx_path, precision, threads, parallel, spinning)
    return OpenVinoEngine(onnx_path, precision, threads, parallel)
