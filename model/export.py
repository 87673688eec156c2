"""ONNX export (logit + CAM + layer1 statistics, dynamic batch), parity check, and static int8 QDQ quantisation."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from model.bundle import INPUT_NAME, OUTPUT_NAMES, make_session, run_images
from model.network import LogitCamAndFeatures
from model.preprocessing import PreprocessConfig, normalize

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4


def export_onnx(net: torch.nn.Module, image_size: int, path: str | Path) -> Path:
    """Export ``LogitCamAndFeatures(net)`` with a dynamic batch dimension."""
    head = LogitCamAndFeatures(net).eval()
    example = torch.zeros(2, 1, image_size, image_size)
    path = Path(path)
    # The TorchScript exporter: a plain ONNX graph with a symbolic batch axis, no batch frozen
    # to the example's size.
    torch.onnx.export(head, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                      dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}},
                      opset_version=17, dynamo=False)
    return path


@torch.no_grad()
def parity(net: torch.nn.Module, onnx_path: str | Path, images: np.ndarray, config: PreprocessConfig) -> dict:
    """Max |onnx - torch| of the logits, CAMs and features on real images (fp32, eval mode)."""
    head = LogitCamAndFeatures(net).eval()
    x = normalize(np.asarray(images), config)
    t_logit, t_cam, t_features = head(torch.from_numpy(x))
    session = make_session(onnx_path)
    o_logit, o_cam, o_features = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    return {"max_abs_logit_diff": float(np.max(np.abs(o_logit - t_logit.numpy()))),
            "max_abs_cam_diff": float(np.max(np.abs(o_cam - t_cam.numpy()))),
            "max_abs_features_diff": float(np.max(np.abs(o_features - t_features.numpy()))),
            "n": int(len(x)), "tolerance": PARITY_TOLERANCE}


class _CalibrationReader:
    """Feeds real training X-rays to ONNX Runtime's static quantisation calibrator."""

    def __init__(self, images: np.ndarray, config: PreprocessConfig, batch_size: int = 8):
        self.batches = [normalize(np.asarray(images[i:i + batch_size]), config)
                        for i in range(0, len(images), batch_size)]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {INPUT_NAME: self.batches[self.position - 1]}

    def rewind(self):
        self.position = 0


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calibration_images: np.ndarray,
                  config: PreprocessConfig) -> Path:
    """Static QDQ int8 (u8 activations, s8 per-channel weights), calibrated on real training images.

    Dynamic quantisation is avoided: on this CPU it is slower than fp32 for a CNN.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8_path), _CalibrationReader(calibration_images, config),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax,
                        # The CAM head stays fp32 (the heatmap keeps its full dynamic range), and so does all
                        # that the out-of-distribution features come from (the stem and layer1, then the
                        # statistics): quantised, they moved the OOD score beyond the engine parity gate's
                        # tolerance. The int8 speed-up comes from layers 2-4.
                        nodes_to_exclude=_head_nodes(prepared) + _feature_nodes(prepared))
    return Path(int8_path)


def _head_nodes(path: Path) -> list[str]:
    """Every node the network's trunk (up to layer4's last ReLU) does not need: the CAM head after layer4 (the 1x1
    convolution, the squeeze, the means, the bias add) and the branch that summarises layer1 into ``features``."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    last_relu = max(i for i, n in enumerate(graph.node) if n.op_type == "Relu")
    producer = {out: n for n in graph.node for out in n.output}
    trunk, stack = set(), [graph.node[last_relu]]
    while stack:  # the last ReLU's ancestors
        node = stack.pop()
        if node.name in trunk:
            continue
        trunk.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return [n.name for n in graph.node if n.name not in trunk]


def _feature_nodes(path: Path) -> list[str]:
    """Every node the ``features`` output (the out-of-distribution detector's input) depends on; none for a graph
    without that output."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: n for n in graph.node for out in n.output}
    if len(OUTPUT_NAMES) < 3 or OUTPUT_NAMES[2] not in producer:
        return []
    seen, stack = set(), [producer[OUTPUT_NAMES[2]]]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return sorted(seen)


def int8_gate(fp32_session, int8_session, images: np.ndarray, labels: np.ndarray, config: PreprocessConfig,
              max_auc_drop: float = 0.003) -> dict:
    """The int8 export gate: keep the int8 graph in the bundle only if its val AUC is within ``max_auc_drop``
    of fp32's, on every val image, once, at export.

    Not the engine parity gate (:mod:`model.engine_gate`), which every server runs at load on its own CPU, for
    every engine and precision, against the fp32 reference's logits and CAMs: an int8 graph that ranks the
    images as well as fp32 (this gate) may still move the calibrated log-odds too far to serve (that gate)."""
    from model.metrics import auc

    fp32 = run_images(fp32_session, images, config)
    int8 = run_images(int8_session, images, config)
    auc_fp32, auc_int8 = auc(labels, fp32), auc(labels, int8)
    delta = auc_fp32 - auc_int8
    return {"auc_fp32": auc_fp32, "auc_int8": auc_int8, "auc_drop": float(delta), "max_auc_drop": max_auc_drop,
            "accepted": bool(delta <= max_auc_drop), "n": int(len(labels)),
            "max_abs_logit_diff": float(np.max(np.abs(fp32 - int8)))}
