"""The Open Inference Protocol's binary tensor extension, on the wire: the one encoder and decoder.

A REST v2 request with binary data is a JSON header followed by raw bytes. The header's length in bytes
travels in the ``Inference-Header-Content-Length`` HTTP header; each input that carries its data in
binary says how many bytes it takes in ``parameters.binary_data_size``, and the inputs' bytes follow
the header in input order. A BYTES tensor's binary data is its elements one after the other, each a
4-byte little-endian length and then that many bytes.

Everything that speaks this format goes through here: the servers (``serving.dataplane`` turns a
:class:`WireRequest` into kserve's request), the transformer (BYTES elements), ``pneumoscope predict``,
the web app, the benchmarks, and the DICOM gateway when it is built. This module imports the standard
library only -- no kserve, no tritonclient (the two register the same protobuf symbols), no HTTP
client -- so that every one of them may import it.

Cost bounds (docs/design.md, section 2): every size and count the sender controls is checked before the
work it would cost. The header must fit the body; at most 16 inputs and 16 outputs, names and datatypes
short, shapes of at most 8 non-negative dimensions of at most 2**31, ``binary_data_size`` inside the body;
a BYTES tensor is walked for at most the element count its shape declares (which the caller bounds
first) and refused at the first element beyond it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The HTTP header that carries the JSON header's length (HTTP header names are case-insensitive).
HEADER_LENGTH = "inference-header-content-length"
CONTENT_TYPE = "application/octet-stream"
MAX_INPUTS = MAX_OUTPUTS = 16
MAX_DIMS = 8
MAX_DIM = 1 << 31
MAX_NAME_CHARS, MAX_DATATYPE_CHARS, MAX_ID_CHARS = 64, 16, 256
_LENGTH_BYTES = 4  # a BYTES element's length prefix: uint32, little-endian


class WireFormatError(ValueError):
    """The bytes do not follow the binary extension; the message is one line, fit for the sender."""


@dataclass
class WireInput:
    """One input tensor as sent: its data is either JSON (``data``) or binary (``raw``), never both."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict = field(default_factory=dict)
    data: Any = None
    raw: bytes | None = None


@dataclass
class WireOutput:
    name: str
    parameters: dict | None = None


@dataclass
class WireRequest:
    inputs: list[WireInput]
    id: str | None = None
    parameters: dict | None = None
    outputs: list[WireOutput] | None = None  # None: the request named none


# -- BYTES tensors ---------------------------------------------------------------------------------

def encode_bytes_elements(items: Iterable[bytes]) -> bytes:
    """The binary data of a BYTES tensor: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(len(item).to_bytes(_LENGTH_BYTES, "little") + bytes(item) for item in items)


def decode_bytes_elements(raw: bytes, count: int, where: str = "the tensor") -> list[bytes]:
    """The elements of a BYTES tensor whose shape declares exactly ``count`` of them.

    The caller bounds ``count`` before calling; the walk stops at the first element beyond it, so a
    tensor of a million empty elements costs no more than ``count + 1`` steps.
    """
    view, position, items = memoryview(raw), 0, []
    while position < len(view):
        if len(items) == count:
            raise WireFormatError(f"input {where!r} holds more than the {count} elements its shape declares")
        if position + _LENGTH_BYTES > len(view):
            raise WireFormatError(f"input {where!r}: the binary BYTES data is malformed")
        size = int.from_bytes(view[position:position + _LENGTH_BYTES], "little")
        position += _LENGTH_BYTES
        if position + size > len(view):
            raise WireFormatError(f"input {where!r}: the binary BYTES data is malformed")
        items.append(bytes(view[position:position + size]))
        position += size
    if len(items) != count:
        raise WireFormatError(f"input {where!r} has shape [{count}] but {len(items)} elements")
    return items


# -- requests ----------------------------------------------------------------------------------------

@dataclass
class BinaryInput:
    """An input to send as binary data: ``raw`` is its bytes as the datatype lays them out."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes


def bytes_input(name: str, items: Sequence[bytes]) -> BinaryInput:
    """A BYTES [N] input holding ``items`` (e.g. encoded image files, one per element)."""
    return BinaryInput(name, "BYTES", [len(items)], encode_bytes_elements(items))


def encode_request(inputs: Sequence[BinaryInput], parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """(body, HTTP headers) of a v2 inference request whose inputs all travel as binary data."""
    header: dict[str, Any] = {"inputs": [{"name": i.name, "datatype": i.datatype, "shape": list(i.shape),
                                          "parameters": {"binary_data_size": len(i.raw)}} for i in inputs]}
    if parameters is not None:
        header["parameters"] = parameters
    head = json.dumps(header).encode()
    return head + b"".join(i.raw for i in inputs), {"content-type": CONTENT_TYPE, HEADER_LENGTH: str(len(head))}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _strict_json(data: bytes) -> Any:
    """JSON as RFC 8259 has it: UTF-8, no NaN/Infinity, no lone surrogates (which no UTF-8 encoder
    could write back into an error message or a log line)."""
    value = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a string holds a lone UTF-16 surrogate") from None
    return value


def _header(body: bytes, json_length: Any) -> tuple[dict, int]:
    try:
        length = int(json_length)
    except (TypeError, ValueError):
        raise WireFormatError("Inference-Header-Content-Length must be an integer") from None
    if not 0 < length <= len(body):
        raise WireFormatError(f"Inference-Header-Content-Length {length} does not fit a {len(body)}-byte body")
    try:
        header = _strict_json(bytes(body[:length]))
    except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError; deep nesting recurses)
        raise WireFormatError(f"the JSON header of the request is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or len(header["inputs"]) > MAX_INPUTS:
        raise WireFormatError(f'the request needs an "inputs" list (of at most {MAX_INPUTS} inputs)')
    return header, length


def _input(item: Any, body: bytes, offset: int) -> tuple[WireInput, int]:
    """One input of the header, and the offset of the next input's binary data."""
    if not isinstance(item, dict) or not all(k in item for k in ("name", "shape", "datatype")):
        raise WireFormatError("every input needs name, shape and datatype")
    name, shape, datatype = item["name"], item["shape"], item["datatype"]
    parameters = item.get("parameters") or {}
    if (not isinstance(name, str) or not isinstance(datatype, str) or len(name) > MAX_NAME_CHARS
            or len(datatype) > MAX_DATATYPE_CHARS):
        raise WireFormatError("input names and datatypes must be short strings")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
        raise WireFormatError(f"input {name!r}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    if not isinstance(parameters, dict):
        raise WireFormatError(f"input {name!r}: parameters must be an object")
    tensor = WireInput(name, datatype, shape, parameters)
    if "data" in item:
        tensor.data = item["data"]
    elif "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not _is_int(size) or size < 0 or offset + size > len(body):
            raise WireFormatError(f"input {name!r}: binary_data_size {str(size)[:20]!r} runs past the end of the body")
        tensor.raw = bytes(body[offset:offset + size])
        offset += size
    else:
        raise WireFormatError(f"input {name!r} has neither data nor binary_data_size")
    return tensor, offset


def decode_request(body: bytes, json_length: Any) -> WireRequest:
    """A v2 request with binary data -> :class:`WireRequest`; ``json_length`` is the header's value as sent.

    Everything the sender controls is type-checked and bounded here, before any work: the JSON header,
    names, datatypes, shapes, the id, parameters, requested outputs and the binary sizes.
    Raises :class:`WireFormatError`.
    """
    header, offset = _header(body, json_length)
    request_id = header.get("id")
    if request_id is not None and not (isinstance(request_id, str) and len(request_id) <= MAX_ID_CHARS):
        raise WireFormatError(f'the request "id" must be a string of at most {MAX_ID_CHARS} characters')
    inputs = []
    for item in header["inputs"]:
        tensor, offset = _input(item, body, offset)
        inputs.append(tensor)
    outputs = header.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or len(outputs) > MAX_OUTPUTS or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) and isinstance(o.get("parameters") or {}, dict)
                for o in outputs):
            raise WireFormatError(f'"outputs" must be a list of at most {MAX_OUTPUTS} {{"name": ...}} objects')
        outputs = [WireOutput(o["name"], o.get("parameters")) for o in outputs]
    parameters = header.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise WireFormatError('"parameters" must be an object')
    return WireRequest(inputs, request_id, parameters, outputs)
