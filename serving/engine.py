"""The ONNX Runtime session the predictor runs (kserve-free, so benchmarks can time the bare engine)."""

from __future__ import annotations

from pathlib import Path


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
