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
