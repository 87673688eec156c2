"""Small helpers around kserve's v2 tensor classes."""

from __future__ import annotations

import numpy as np
from kserve.protocol.infer_type import InferOutput


def tensor_output(name: str, datatype: str, array: np.ndarray) -> InferOutput:
    """An output whose data is already raw bytes.

    kserve 0.21's ``InferResponse.to_grpc`` evaluates ``output.data`` as a boolean when the request
    came with raw inputs (tritonclient's gRPC client), which fails for a numpy array of more than one
    element; raw data avoids that, gives gRPC clients ``raw_output_contents`` (the only place
    tritonclient reads tensors from), and ``to_rest`` still renders JSON lists for JSON requests.
    """
    output = InferOutput(name, list(array.shape), datatype)
    output.set_data_from_numpy(array, binary_data=True)
    return output


# -- the transformer -> predictor transport ------------------------------------------------------------
#
# One predictor request carries all images of one client request, so that one model version answers
# all of them: ``pixels`` UINT8 [N, H, W] (stage-1 pixels, each image in the top-left corner of a
# zero canvas as large as the largest) and ``sizes`` INT32 [N, 2] (each image's height and width).
# ``H, W <= DECODED_MAX_SIDE``, so a request is at most N * 512 * 512 bytes.

PIXELS, SIZES = "pixels", "sizes"
#: Optional input FP32 [N]: each image's patient age in years, negative where unknown (read by the transformer from
#: the DICOM header or the client's ``patient_age``); the predictor applies its version's age limit.
AGES = "ages"
#: Response parameter of the predictor (and the transformer): a JSON object describing the version that answered
#: (``model.intended_use.answer_summary``: profile, demonstration, population, age limit, registered figures).
INTENDED_USE_PARAMETER = "intended_use"
#: The decision outputs every answer carries beside ``probability``, ``label`` and ``threshold``.
DECISION_OUTPUTS = ("decision", "ood_score", "in_intended_use", "refer_reasons")
#: Request parameter naming the stage-1 definition the pixels come from (``PREPROCESSING_VERSION``).
PREPROCESSING_PARAMETER = "preprocessing"
#: Response parameter naming the SHA-256 of the bundle that computed the answer (predictor -> transformer -> client).
MODEL_DIGEST_PARAMETER = "model_sha256"


def pack_images(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (h_i, w_i) images -> (pixels [N, H, W], sizes [N, 2])."""
    sizes = np.array([im.shape for im in images], dtype=np.int32).reshape(len(images), 2)
    height, width = (int(v) for v in sizes.max(axis=0))
    pixels = np.zeros((len(images), height, width), dtype=np.uint8)
    for canvas, image in zip(pixels, images):
        canvas[:image.shape[0], :image.shape[1]] = image
    return pixels, sizes


def unpack_images(pixels: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """The inverse of :func:`pack_images` (sizes already validated)."""
    return [np.ascontiguousarray(canvas[:h, :w]) for canvas, (h, w) in zip(pixels, sizes.tolist())]


def transport_bytes(max_images: int, max_side: int) -> int:
    """The largest transformer -> predictor message: pixels, sizes and a generous header."""
    return max_images * (max_side * max_side + 8) + 64 * 1024
