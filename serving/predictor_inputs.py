"""What the predictor accepts: the Open Inference Protocol v2 inputs of one request, checked before any copy.

``pixels`` UINT8 [N,H,W] (stage-1 pixels), optionally ``sizes`` INT32 [N,2] (each image's height and width on
its canvas) and ``ages`` FP32 [N] (years, negative when unknown); the request parameter ``preprocessing`` must
name the stage-1 definition this code runs. A malformed request is refused (400 / INVALID_ARGUMENT) with one
line saying what is wrong; pixels from another stage-1 definition are a deployment error (409 /
FAILED_PRECONDITION). No kserve server code here: the servers call these through the predictor.
"""

from __future__ import annotations

import numpy as np
from kserve.protocol.infer_type import InferRequest, to_http_parameters

from model.preprocessing import PREPROCESSING_VERSION
from serving.errors import RequestRejected, ServiceError
from serving.metrics import reject_count
from serving.protocol import AGES, PIXELS, PREPROCESSING_PARAMETER, SIZES, unpack_images

#: Most typed (non-raw) values a gRPC tensor may carry: image tensors travel as raw_input_contents.
MAX_TYPED_VALUES = 4096


def refuse(message: str) -> RequestRejected:
    reject_count("invalid_tensor")
    return RequestRejected("invalid_tensor", message)


class IncompatibleTransformer(ServiceError):
    """Pixels from another stage-1 definition: a deployment error, not the client's (409 / FAILED_PRECONDITION)."""

    status = 409
    grpc_code = "FAILED_PRECONDITION"

    def __init__(self, message: str):
        super().__init__("incompatible_preprocessing", message)


def precheck_grpc(request) -> None:
    """Before kserve copies a gRPC request into Python lists: tensors travel raw, and are small."""
    if len(request.inputs) > 3:
        raise refuse(f"expected the inputs {PIXELS!r}, {SIZES!r} and {AGES!r}, got {len(request.inputs)} inputs")
    for tensor in request.inputs:
        contents = tensor.contents
        values = (len(contents.uint_contents) + len(contents.int_contents) + len(contents.fp32_contents) +
                  len(contents.bytes_contents) + len(contents.int64_contents) + len(contents.uint64_contents) +
                  len(contents.fp64_contents) + len(contents.bool_contents))
        if values > MAX_TYPED_VALUES:
            raise refuse(f"input {tensor.name!r}: send image tensors as raw_input_contents, not {values} typed values")


def check_preprocessing(request: InferRequest, model_version: str | None) -> None:
    parameters = to_http_parameters(request.parameters) if request.parameters else {}
    declared = parameters.get(PREPROCESSING_PARAMETER)
    if declared is None:
        raise refuse(f"the request parameter {PREPROCESSING_PARAMETER!r} is missing: it names the stage-1 "
                     f"preprocessing of the pixels (this version needs {PREPROCESSING_VERSION})")
    if isinstance(declared, bool) or declared != PREPROCESSING_VERSION:
        raise IncompatibleTransformer(f"the pixels come from preprocessing {declared!r}; model version "
                                      f"{model_version} needs {PREPROCESSING_VERSION}")


def read_images(request: InferRequest, most: int, side: int) -> list[np.ndarray]:
    """The request's images (stage-1 pixels, each cut to its size): at most ``most``, each side at most ``side``."""
    by_name = {}
    for tensor in request.inputs:
        if tensor.name not in (PIXELS, SIZES, AGES) or tensor.name in by_name:
            raise refuse(f"expected the inputs {PIXELS!r} and optionally {SIZES!r} and {AGES!r}, got "
                         f"{[t.name for t in request.inputs]}")
        by_name[tensor.name] = tensor
    if PIXELS not in by_name:
        raise refuse(f"the input {PIXELS!r} (UINT8 [N,H,W]) is missing")
    pixels = tensor_array(by_name[PIXELS], "UINT8", np.uint8, 3)
    n, height, width = pixels.shape
    if not (1 <= n <= most and 1 <= height <= side and 1 <= width <= side):
        raise refuse(f"input {PIXELS!r} must be [N,H,W] with 1 <= N <= {most} and 1 <= H, W <= {side}, got "
                     f"{list(pixels.shape)}")
    if SIZES in by_name:
        sizes = tensor_array(by_name[SIZES], "INT32", np.int32, 2)
        if sizes.shape != (n, 2) or (sizes < 1).any() or (sizes > np.array([height, width])).any():
            raise refuse(f"input {SIZES!r} must be [N,2] of heights <= {height} and widths <= {width}, each >= 1")
    else:
        sizes = np.tile(np.array([height, width], dtype=np.int32), (n, 1))
    return unpack_images(pixels, sizes)


def read_ages(request: InferRequest, n: int) -> np.ndarray:
    """Each image's patient age in years from the optional input ``ages`` (NaN where unknown or not sent)."""
    tensor = next((t for t in request.inputs if t.name == AGES), None)
    if tensor is None:
        return np.full(n, np.nan)
    given = tensor_array(tensor, "FP32", np.float32, 1).astype(np.float64)
    if given.shape != (n,) or not np.isfinite(given).all():
        raise refuse(f"input {AGES!r} must be [N] finite ages in years (negative: unknown)")
    return np.where(given < 0, np.nan, given)


def tensor_array(tensor, datatype: str, dtype, ndim: int) -> np.ndarray:
    """A v2 input as a numpy array of ``dtype``, checked against its declared shape before any copy."""
    if tensor.datatype != datatype:
        raise refuse(f"input {tensor.name!r} must be {datatype}, not {tensor.datatype}")
    shape = tensor.shape
    if (not isinstance(shape, (list, tuple)) or len(shape) != ndim
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 20 for d in shape)):
        raise refuse(f"input {tensor.name!r} must have {ndim} non-negative integer dimensions, got {shape}")
    count = int(np.prod(shape, dtype=np.int64))
    raw = getattr(tensor, "_raw_data", None)
    if raw is not None:
        if len(raw) != count * np.dtype(dtype).itemsize:
            raise refuse(f"input {tensor.name!r}: {len(raw)} bytes do not hold {datatype} {list(shape)}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    data = tensor.data
    if not isinstance(data, list) or len(data) != count:
        raise refuse(f"input {tensor.name!r}: {len(data) if isinstance(data, list) else 'no'} values for shape "
                     f"{list(shape)}")
    if np.issubdtype(dtype, np.floating):  # JSON numbers (ages): any int or float, never a bool or a string
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
            raise refuse(f"input {tensor.name!r} must hold numbers")
        return np.asarray(data, dtype=dtype).reshape(shape)
    info = np.iinfo(dtype)
    if not all(isinstance(v, int) and not isinstance(v, bool) and info.min <= v <= info.max for v in data):
        raise refuse(f"input {tensor.name!r} must hold integers in {info.min}..{info.max}")
    return np.asarray(data, dtype=dtype).reshape(shape)
