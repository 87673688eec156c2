"""Property-based tests (hypothesis) of the decoders and the v1 / v2 REST / gRPC request parsers.

A bounded, seeded run (``derandomize=True``): the same cases on every machine, a few hundred per
target. The property everywhere: hostile input ends in the one error type that becomes a 4xx (or the
gRPC equivalent) -- never another exception, which would be a 500. The long run against real
processes (10,000+ cases per endpoint) is ``benchmarks/fuzz_servers.py``; its findings are
regression cases here (``REGRESSIONS``).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def _dicom(array: np.ndarray) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CR", "MONOCHROME2", 1
    ds.Rows, ds.Columns = array.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = (array.astype(np.uint16) * 16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


_RAMP = np.add.outer(np.arange(96), np.arange(80)).astype(np.uint8)
SEEDS = [_png(_RAMP), _jpeg(_RAMP), _dicom(_RAMP)]


@st.composite
def mutated_files(draw):
    """A valid PNG/JPEG/DICOM, as is or with bytes flipped, cut or inserted (many stay parseable for a while)."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "flip", "flip", "cut", "insert", "truncate"]))
        if action == "flip":
            data[where] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[where:where + draw(st.integers(1, 64))]
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[where:]
        if not data:
            break
    return bytes(data)


# -- decoders -------------------------------------------------------------------------------------

@FUZZ
@given(st.one_of(mutated_files(), st.binary(max_size=2048)))
def test_decode_raises_only_invalid_image_errors(data):
    from model.errors import InvalidImageError
    from model.preprocessing import DECODED_MAX_SIDE, decode

    try:
        image = decode(data, max_pixels=4_000_000)
    except InvalidImageError as exc:
        event(f"refused: {exc.reason}")
        assert exc.reason and str(exc)
        return
    event("decoded")
    assert image.pixels.dtype == np.uint8 and max(image.pixels.shape) <= DECODED_MAX_SIDE


@FUZZ
@given(st.one_of(mutated_files(), st.binary(max_size=1024)))
def test_upload_decoding_refuses_with_a_4xx_only(data):
    from serving.errors import RequestRejected
    from serving.inputs import decode_upload
    from serving.settings import ServingSettings

    try:
        decode_upload(data, ServingSettings(max_image_pixels=4_000_000))
    except RequestRejected as exc:
        assert 400 <= exc.status < 500 and exc.reason


# -- request parsers --------------------------------------------------------------------------------

def _transformer():
    from serving.settings import ServingSettings
    from serving.transformer import PneumoniaTransformer

    return PneumoniaTransformer("pneumonia", "127.0.0.1:1", settings=ServingSettings())


def _predictor():
    from model.preprocessing import PreprocessConfig
    from serving.predictor import PneumoniaPredictor

    predictor = PneumoniaPredictor("pneumonia", "unused")
    predictor.config, predictor.model_version = PreprocessConfig(image_size=32), "1"
    return predictor


REFUSALS = None


def refusals():
    """The exception types that become a 4xx / INVALID_ARGUMENT (or another deliberate status)."""
    from kserve.errors import InvalidInput

    from serving.errors import ServiceError

    return ServiceError, InvalidInput


def assert_refusal(exc: BaseException) -> None:
    from serving.errors import ServiceError

    event(f"refused: {getattr(exc, 'reason', type(exc).__name__)}"[:60])
    assert isinstance(exc, refusals()), f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ServiceError):
        assert exc.status < 500, f"{exc.status} {exc}"


v2_tensors = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["image", "pixels", "sizes"]), json_values),
     "datatype": st.one_of(st.sampled_from(["BYTES", "UINT8", "INT32", "FP32"]), json_values),
     "shape": st.one_of(st.lists(st.integers(-3, 40), max_size=4), json_values)},
    optional={"data": json_values,
              "parameters": st.one_of(json_values, st.fixed_dictionaries({"binary_data_size": st.integers(-5, 300)}))})
v2_headers = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(v2_tensors, max_size=3), json_values)},
    optional={"id": json_values, "parameters": json_values, "outputs": json_values})


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(len(i).to_bytes(4, "little") + i for i in items)


@st.composite
def well_formed_v2(draw):
    """A binary v2 request close to a real one: its elements, sizes and parameters slightly off."""
    if draw(st.booleans()):  # to the transformer: BYTES of (mutated) files
        items = draw(st.lists(mutated_files(), min_size=0, max_size=3))
        raw = _bytes_tensor(items)
        raw = raw[:draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw
        inputs = [{"name": "image", "datatype": "BYTES", "shape": [draw(st.sampled_from([len(items), 1, 0, 3]))],
                   "parameters": {"binary_data_size": len(raw)}}]
    else:  # to the predictor: stage-1 pixels and sizes
        n, h, w = draw(st.integers(0, 3)), draw(st.integers(0, 40)), draw(st.integers(0, 40))
        pixels = bytes(draw(st.binary(min_size=n * h * w, max_size=n * h * w)))
        sizes = np.array(draw(st.lists(st.integers(-2, 45), min_size=2 * n, max_size=2 * n + 1)), dtype="<i4")
        raw = pixels + sizes.tobytes()
        inputs = [{"name": "pixels", "datatype": "UINT8", "shape": [n, h, w],
                   "parameters": {"binary_data_size": len(pixels)}},
                  {"name": "sizes", "datatype": "INT32", "shape": [n, 2],
                   "parameters": {"binary_data_size": sizes.nbytes}}]
    header = {"inputs": inputs, "parameters": draw(st.one_of(st.just({"preprocessing": 2}), st.dictionaries(
        st.sampled_from(["heatmap", "preprocessing"]), json_values, max_size=2)))}
    if draw(st.booleans()):
        header["id"] = draw(json_values)
    if draw(st.booleans()):
        header["outputs"] = draw(st.one_of(st.lists(st.fixed_dictionaries({"name": st.sampled_from(
            ["probability", "heatmap_png", "cam", "nope"])}), max_size=2), json_values))
    return header, raw


@FUZZ
@given(st.one_of(st.tuples(v2_headers, st.binary(max_size=300)), well_formed_v2()),
       st.one_of(st.none(), st.none(), st.integers(-10, 4000), st.text(max_size=6)))
def test_binary_v2_requests_are_refused_cleanly(request_parts, declared_length):
    from serving.dataplane import parse_binary_request

    header, tail = request_parts
    head = json.dumps(header).encode()
    body = head + tail
    length = len(head) if declared_length is None else declared_length
    try:
        request = parse_binary_request(body, length, "pneumonia")
    except Exception as exc:
        assert_refusal(exc)
        return
    for parse in (_transformer()._v2_elements, lambda r: (_predictor()._check_preprocessing(r),
                                                          _predictor()._images(r))):
        try:
            parse(request)
            event("accepted")
        except Exception as exc:
            assert_refusal(exc)


@FUZZ
@given(st.one_of(json_values, st.fixed_dictionaries(
    {"instances": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {"image": st.one_of(json_values, st.fixed_dictionaries({"b64": st.one_of(
            st.text(max_size=40), st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()))}))}),
        max_size=3))}, optional={"parameters": json_values})))
def test_v1_requests_are_refused_cleanly(payload):
    if not isinstance(payload, dict):
        return  # kserve's own route refuses non-objects before the transformer sees them
    try:
        _transformer()._v1_elements(payload)
    except Exception as exc:
        assert_refusal(exc)


@st.composite
def grpc_requests(draw):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name="pneumonia", id=draw(st.text(max_size=10)))
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2, 3]))):
        tensor = request.inputs.add()
        tensor.name = draw(st.sampled_from(["image", "image", "pixels", "sizes", "x", ""]))
        tensor.datatype = draw(st.sampled_from(["BYTES", "BYTES", "UINT8", "INT32", "FP32", "BOOL", "nonsense", ""]))
        tensor.shape.extend(draw(st.one_of(st.lists(st.integers(-3, 40), max_size=4), st.just([1]))))
        kind = draw(st.sampled_from(["bytes", "bytes", "uint", "int", "fp32", "none"]))
        if kind == "bytes":
            tensor.contents.bytes_contents.extend(draw(st.lists(st.one_of(mutated_files(), st.binary(max_size=64)),
                                                                max_size=3)))
        elif kind == "uint":
            tensor.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=50)))
        elif kind == "int":
            tensor.contents.int_contents.extend(draw(st.lists(st.integers(-2**31, 2**31 - 1), max_size=20)))
        elif kind == "fp32":
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=20)))
    if draw(st.integers(0, 3)) == 0:
        for _ in range(draw(st.integers(1, 2))):
            request.raw_input_contents.append(draw(st.one_of(st.binary(max_size=200), st.lists(
                mutated_files(), max_size=2).map(_bytes_tensor))))
    for key in draw(st.lists(st.sampled_from(["heatmap", "preprocessing", "binary_data_output"]), max_size=2)):
        value = draw(st.one_of(st.booleans(), st.integers(-5, 5), st.text(max_size=5)))
        parameter = request.parameters[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        else:
            parameter.string_param = value
    return request


@FUZZ
@given(grpc_requests())
def test_grpc_requests_are_refused_cleanly(request):
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.infer_type import InferRequest

    for model, checks in ((_transformer(), lambda m, r: m._v2_elements(r)),
                          (_predictor(), lambda m, r: (m._check_preprocessing(r), m._images(r)))):
        try:  # the order of Servicer.ModelInfer: our precheck, kserve's validation, the conversion, the model
            model.precheck_grpc(request)
            InferenceServicer.validate_grpc_request(request)
            checks(model, InferRequest.from_grpc(request))
            event("accepted")
        except Exception as exc:
            assert_refusal(exc)


# -- regressions found by the long run (benchmarks/fuzz_servers.py) -----------------------------------

REGRESSIONS: list[tuple[str, bytes]] = []


@pytest.mark.parametrize("name, data", REGRESSIONS or [pytest.param("none yet", b"", id="none-yet")])
def test_fuzz_findings_stay_fixed(name, data):
    if not data:
        return
    from serving.errors import RequestRejected
    from serving.inputs import decode_upload
    from serving.settings import ServingSettings

    with pytest.raises(RequestRejected):
        decode_upload(data, ServingSettings())
