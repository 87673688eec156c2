"""The Open Inference Protocol's binary extension (model.wire_format): round trips, kserve agreeing with
it both ways, malformed bodies refused with one clear line, and declared sizes checked before the work."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.wire_format import (HEADER_LENGTH, BinaryInput, WireFormatError, bytes_input, decode_bytes_elements,
                               decode_request, encode_bytes_elements, encode_request)

ROUND_TRIPS = settings(derandomize=True, database=None, deadline=None, max_examples=200)


def _body(header, tail: bytes = b"") -> tuple[bytes, int]:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return head + tail, len(head)


def test_imports_the_standard_library_only():
    """The servers, the web app, the client and the gateway all import it: no kserve, no tritonclient (the two
    register the same protobuf symbols), no HTTP client, nothing of the packages above ``model``."""
    code = ("import sys; before = set(sys.modules); import model.wire_format; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-500:]
    assert result.stdout.strip() == "['model']", f"model.wire_format imports {result.stdout.strip()}"


@ROUND_TRIPS
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_bytes_elements_round_trip(items):
    raw = encode_bytes_elements(items)
    assert len(raw) == sum(4 + len(i) for i in items)
    assert decode_bytes_elements(raw, len(items)) == items


@ROUND_TRIPS
@given(st.lists(st.binary(max_size=30), min_size=1, max_size=4), st.integers(1, 6),
       st.dictionaries(st.sampled_from(["heatmap", "preprocessing"]), st.booleans() | st.integers(0, 9), max_size=2))
def test_requests_round_trip(files, n, parameters):
    pixels = np.arange(n * 3 * 2, dtype=np.uint8).reshape(n, 3, 2)
    sizes = np.full((n, 2), 7, dtype="<i4")
    sent = [bytes_input("image", files), BinaryInput("pixels", "UINT8", [n, 3, 2], pixels.tobytes()),
            BinaryInput("sizes", "INT32", [n, 2], sizes.tobytes())]
    body, headers = encode_request(sent, parameters)
    assert headers["content-type"] == "application/octet-stream"
    request = decode_request(body, headers[HEADER_LENGTH])
    assert request.parameters == parameters and request.id is None and request.outputs is None
    assert [(i.name, i.datatype, i.shape, i.raw) for i in request.inputs] == [
        (s.name, s.datatype, s.shape, s.raw) for s in sent]
    assert decode_bytes_elements(request.inputs[0].raw, len(files)) == files
    assert np.array_equal(np.frombuffer(request.inputs[1].raw, np.uint8).reshape(n, 3, 2), pixels)


def test_kserve_reads_what_we_write_and_we_read_what_kserve_writes():
    """An independent implementation of the same format agrees in both directions."""
    from kserve.protocol.infer_type import InferInput, InferRequest, deserialize_bytes_tensor

    files = [b"\xff\xd8\xff not UTF-8 \xfe", b"", b"\x89PNG"]
    assert list(deserialize_bytes_tensor(encode_bytes_elements(files))) == files
    # (kserve's from_bytes turns BYTES into JSON strings, so the framing is checked with UTF-8 elements)
    body, headers = encode_request([bytes_input("image", [b"a", b"", b"bc"]),
                                    BinaryInput("pixels", "UINT8", [2, 2], bytes([1, 2, 3, 4]))], {"heatmap": True})
    theirs = InferRequest.from_bytes(body, int(headers[HEADER_LENGTH]), "pneumonia")
    assert list(theirs.inputs[0].as_numpy()) == ["a", "", "bc"] and theirs.parameters == {"heatmap": True}
    assert theirs.inputs[1].as_numpy().tolist() == [[1, 2], [3, 4]]

    tensor = InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
    pixels = InferInput("pixels", [2, 2], "UINT8")
    pixels.set_data_from_numpy(np.array([[1, 2], [3, 4]], dtype=np.uint8), binary_data=True)
    body, length = InferRequest(model_name="pneumonia", infer_inputs=[tensor, pixels], request_id="r1",
                                parameters={"heatmap": True}).to_rest()
    ours = decode_request(body, str(length))
    assert ours.id == "r1" and [i.name for i in ours.inputs] == ["image", "pixels"]
    assert decode_bytes_elements(ours.inputs[0].raw, len(files)) == files
    assert ours.inputs[1].raw == bytes([1, 2, 3, 4])


def test_json_data_outputs_and_ids_are_kept():
    body, length = _body({"id": "abc", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                   "data": ["eA=="]}],
                          "outputs": [{"name": "probability"}, {"name": "cam", "parameters": {"binary_data": True}}]})
    request = decode_request(body, length)
    assert request.id == "abc" and request.inputs[0].data == ["eA=="] and request.inputs[0].raw is None
    assert [(o.name, o.parameters) for o in request.outputs] == [("probability", None), ("cam", {"binary_data": True})]


@pytest.mark.parametrize("raw, count, message", [
    (encode_bytes_elements([b"a", b"b"]), 1, "holds more than the 1 elements its shape declares"),
    (encode_bytes_elements([b"a"]), 2, "has shape [2] but 1 elements"),
    (encode_bytes_elements([b"abc"])[:-1], 1, "the binary BYTES data is malformed"),  # an element runs past the end
    (b"\x01\x00", 1, "the binary BYTES data is malformed"),  # a length prefix cut short
    (b"", 1, "has shape [1] but 0 elements"),
])
def test_malformed_bytes_tensors_are_refused_with_one_line(raw, count, message):
    with pytest.raises(WireFormatError) as info:
        decode_bytes_elements(raw, count, "image")
    assert message in str(info.value) and "'image'" in str(info.value) and "\n" not in str(info.value)


def test_the_walk_stops_at_the_first_element_beyond_the_declared_count():
    """A huge tensor costs ``count + 1`` steps: what lies beyond (here a length prefix far past the end) is
    never read, and the error names the count, not the garbage."""
    raw = encode_bytes_elements([b"a", b"b", b"c"]) + (2**32 - 1).to_bytes(4, "little") + b"\0" * 10**6
    with pytest.raises(WireFormatError, match="more than the 2 elements"):
        decode_bytes_elements(raw, 2, "image")


_IMAGE = {"name": "image", "datatype": "BYTES", "shape": [1]}
AUTO = "auto"  # the header's real length


@pytest.mark.parametrize("header, tail, length, message", [
    ({"inputs": []}, b"", "x", "must be an integer"),
    ({"inputs": []}, b"", None, "must be an integer"),
    ({"inputs": []}, b"", "0", "does not fit"),
    ({"inputs": []}, b"", "100000", "does not fit"),
    (b"{not json", b"", AUTO, "not valid JSON"),
    (b'{"inputs": [], "p": NaN}', b"", AUTO, "not valid JSON"),
    (b'{"inputs": [], "p": "\\ud800"}', b"", AUTO, "lone UTF-16 surrogate"),
    (b"\xff\xfe{}", b"", AUTO, "not valid JSON"),
    (b"[" * 100_000, b"", AUTO, "not valid JSON"),  # nesting deeper than the parser recurses
    ({"inputs": "nope"}, b"", AUTO, '"inputs" list'),
    ({"inputs": [dict(_IMAGE, data=[])] * 17}, b"", AUTO, "at most 16 inputs"),
    ({"inputs": [{"name": "image"}]}, b"", AUTO, "needs name, shape and datatype"),
    ({"inputs": [dict(_IMAGE, name="x" * 65, data=[])]}, b"", AUTO, "short strings"),
    ({"inputs": [dict(_IMAGE, shape=[1] * 9, data=[])]}, b"", AUTO, "at most 8 non-negative integers"),
    ({"inputs": [dict(_IMAGE, shape=[-1], data=[])]}, b"", AUTO, "non-negative integers"),
    ({"inputs": [dict(_IMAGE, shape=[True], data=[])]}, b"", AUTO, "non-negative integers"),
    ({"inputs": [dict(_IMAGE, shape=[2**31 + 1], data=[])]}, b"", AUTO, "non-negative integers"),
    ({"inputs": [dict(_IMAGE, shape=["1e3"], data=[])]}, b"", AUTO, "non-negative integers"),
    ({"inputs": [dict(_IMAGE, parameters=[1], data=[])]}, b"", AUTO, "parameters must be an object"),
    ({"inputs": [_IMAGE]}, b"", AUTO, "neither data nor binary_data_size"),
    ({"inputs": [dict(_IMAGE, parameters={"binary_data_size": 99})]}, b"abc", AUTO, "runs past the end"),
    ({"inputs": [dict(_IMAGE, parameters={"binary_data_size": -1})]}, b"abc", AUTO, "runs past the end"),
    ({"inputs": [dict(_IMAGE, parameters={"binary_data_size": "3"})]}, b"abc", AUTO, "runs past the end"),
    ({"inputs": [dict(_IMAGE, parameters={"binary_data_size": 2})] * 2}, b"abc", AUTO, "runs past the end"),
    ({"id": {"nested": 1}, "inputs": []}, b"", AUTO, '"id" must be a string'),
    ({"id": "x" * 257, "inputs": []}, b"", AUTO, '"id" must be a string'),
    ({"inputs": [], "outputs": "all"}, b"", AUTO, '"outputs" must be a list'),
    ({"inputs": [], "outputs": [{"name": "p"}] * 17}, b"", AUTO, '"outputs" must be a list'),
    ({"inputs": [], "outputs": [{"name": 1}]}, b"", AUTO, '"outputs" must be a list'),
    ({"inputs": [], "parameters": [1]}, b"", AUTO, '"parameters" must be an object'),
])
def test_malformed_requests_are_refused_with_one_clear_line(header, tail, length, message):
    body, json_length = _body(header, tail)
    with pytest.raises(WireFormatError) as info:
        decode_request(body, json_length if length == AUTO else length)
    text = str(info.value)
    assert message in text and "\n" not in text and len(text) < 400, text


@ROUND_TRIPS
@given(st.binary(max_size=200), st.one_of(st.none(), st.integers(-5, 300), st.text(max_size=5)))
def test_any_bytes_are_a_request_or_a_wire_format_error(body, length):
    try:
        decode_request(body, length)
    except WireFormatError:
        pass
