"""What an exported graph itself says it is: precision, quantization scheme, KV-cache dtype and the files its
weights are read from, decoded straight from model.onnx without the onnx package (the runtime never
imports it; ONNX Runtime's Python API lists no nodes or initializers).

The manifest holds the hashes, so nothing hashes the manifest: anyone can edit its claims and re-hash the
files. `check_claims` compares what it says with these facts, so a manifest that says int4 over an fp32
graph (and would get int4's lenient quality gate in `gpt2onnx verify`) is refused at load.

Only the fields needed are decoded (field numbers from onnx/onnx.proto); a tensor's data is skipped by its
length, so the cost grows with the number of nodes and initializers (~30 us each), not with the bytes:
2.6 ms for the 2-layer test model (50 nodes, 40 initializers).
"""

from __future__ import annotations

import contextlib
import mmap
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from . import contract as c

# onnx.proto field numbers
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT = 1, 5, 11
_NODE_INPUT, _NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 1, 4, 5, 7
_ATTRIBUTE_NAME, _ATTRIBUTE_INT = 1, 3
_VALUE_INFO_NAME, _VALUE_INFO_TYPE = 1, 2
_TYPE_TENSOR, _TENSOR_ELEM_TYPE = 1, 1
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_ELEM_TYPES = {1: "float32", 3: "int8"}  # TensorProto.DataType of the cache inputs
_INPUT_TYPES = {**_ELEM_TYPES, 7: "int64", 9: "bool", 10: "float16"}  # ... and of any input read_graph_inputs names
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5

# ONNX Runtime's quantized matmuls (com.microsoft contrib ops) and the scheme each stands for
QUANTIZED_MATMUL = "MatMulNBits"  # blocks (int4; int8 exports made before per-column)
PER_COLUMN_MATMUL = "DynamicQuantizeMatMul"  # per-column int8 weights
_MATMUL_DEFAULTS = {"bits": 4, "accuracy_level": 0}  # MatMulNBits' attribute defaults (ContribOperators.md)


@dataclass(frozen=True)
class GraphFacts:
    """What model.onnx is, read from the graph itself."""

    precision: str  # "fp32" (no quantized matmul), "int8" or "int4" (every quantized matmul has these bits)
    quantization: dict | None  # {"scheme", "bits", "symmetric", ...}: the manifest's keys (contract.M_QUANTIZATION)
    kv_cache: str  # dtype of the past inputs, "float32" or "int8" (as the manifest's kv_cache "dtype")
    quantized_matmuls: int  # MatMulNBits or DynamicQuantizeMatMul nodes
    external_files: tuple[str, ...]  # locations of external weight data (model.onnx.data), as written


class _Malformed(Exception):
    pass


def read_graph_facts(path: Path) -> GraphFacts:
    """Decode the facts from model.onnx; a ModelLoadError if it is not a protobuf ONNX model."""
    with _mapped(path) as data:
        return _facts(data, Path(path))


@contextlib.contextmanager
def _mapped(path: Path):
    """model.onnx's bytes, memory-mapped; what goes wrong reading or decoding them is a ModelLoadError."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield data
    except ValueError as error:  # mmap of an empty file
        raise ModelLoadError(f"{path} is empty or unreadable ({error})",
                             hint="export the model again; the file may be damaged") from error
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error}", hint="check the file's permissions") from error
    except _Malformed as error:
        raise ModelLoadError(f"{path} is not a valid ONNX file: {error}",
                             hint="export the model again; the file may be damaged or truncated") from error


def _facts(data, path: Path) -> GraphFacts:
    graph = None
    for number, wire, value in _fields(data, 0, len(data)):
        if number == _MODEL_GRAPH and wire == _LENGTH:
            graph = value
    if graph is None:
        raise _Malformed("it holds no graph")
    schemes, inputs, external = [], {}, []
    for number, wire, value in _fields(data, *graph):
        if wire != _LENGTH:
            continue
        if number == _GRAPH_NODE:
            scheme = _quantized_matmul(data, value)
            if scheme is not None:
                schemes.append(scheme)
        elif number == _GRAPH_INPUT:
            name, elem_type = _value_info(data, value)
            inputs[name] = elem_type
        elif number == _GRAPH_INITIALIZER:
            external += _external_locations(data, value)
    kv_type = inputs.get(c.past_key(0))
    if kv_type not in _ELEM_TYPES:
        raise _Malformed(f"its input {c.past_key(0)} is missing or of element type {kv_type} "
                         f"(expected {' or '.join(_ELEM_TYPES.values())})")
    distinct = sorted(set(schemes), key=repr)
    if len(distinct) > 1:
        raise ModelLoadError(f"{path} mixes quantization schemes: "
                             + "; ".join(_scheme_text(dict(s)) for s in distinct),
                             hint="gpt2onnx exports quantize every matmul alike; export the model again")
    quantization = dict(distinct[0]) if distinct else None
    precision = "fp32" if quantization is None else f"int{quantization['bits']}"
    return GraphFacts(precision=precision, quantization=quantization, kv_cache=_ELEM_TYPES[kv_type],
                      quantized_matmuls=len(schemes), external_files=tuple(dict.fromkeys(external)))


def read_graph_inputs(path: Path) -> dict[str, str | None]:
    """The graph's input names and element types ("float32", "int8", "int64", "bool", ...; None when not a tensor
    or another type), in graph order: what a model directory's layout is recognized by (optimum_layout)."""
    with _mapped(path) as data:
        graph = [v for number, wire, v in _fields(data, 0, len(data)) if number == _MODEL_GRAPH and wire == _LENGTH]
        if not graph:
            raise _Malformed("it holds no graph")
        inputs = [_value_info(data, value) for number, wire, value in _fields(data, *graph[-1])
                  if number == _GRAPH_INPUT and wire == _LENGTH]
    return {name: _INPUT_TYPES.get(elem_type) for name, elem_type in inputs}


def check_claims(manifest: dict, facts: GraphFacts, directory: Path) -> None:
    """A ModelLoadError when the manifest's precision, quantization or kv_cache disagree with the graph, or
    when the graph reads weight data from a file the manifest does not hash."""
    hint = "the manifest was edited or belongs to another export; export the model again"
    claim = manifest.get(c.M_PRECISION)
    if claim != facts.precision:
        raise ModelLoadError(f"{directory}: manifest says precision {claim} but the graph is {facts.precision}"
                             + (f" ({facts.quantized_matmuls} quantized matmuls, {_scheme_text(facts.quantization)})"
                                if facts.quantization else " (no quantized matmuls)"), hint=hint)
    claimed = manifest.get(c.M_QUANTIZATION)
    if facts.quantization is None and claimed is not None:
        raise ModelLoadError(f"{directory}: manifest gives a quantization ({_scheme_text(claimed)}) but the graph is "
                             "fp32", hint=hint)
    if facts.quantization is not None:
        if not isinstance(claimed, dict):
            raise ModelLoadError(f"{directory}: manifest says precision {claim} but gives no quantization entry",
                                 hint=hint)
        claimed = {"scheme": c.SCHEME_BLOCKS, **claimed}  # exports before per-column name no scheme
        differ = [k for k, v in facts.quantization.items() if claimed.get(k) != v]
        if differ:
            raise ModelLoadError(f"{directory}: manifest says quantization {_scheme_text(claimed)} but the graph's "
                                 f"quantized matmuls have {_scheme_text(facts.quantization)} ({', '.join(differ)} "
                                 "differ)", hint=hint)
    kv = manifest.get(c.M_KV_CACHE)
    kv_claim = kv.get("dtype") if isinstance(kv, dict) else kv
    if kv is not None and kv_claim != facts.kv_cache:  # exports before kv_cache was recorded have none
        raise ModelLoadError(f"{directory}: manifest says kv_cache {kv_claim} but the graph's cache inputs are "
                             f"{facts.kv_cache}", hint=hint)
    files = manifest.get(c.M_FILES) or {}
    for location in facts.external_files:
        if location not in files:
            raise ModelLoadError(f"{directory}: the graph reads weights from {location!r}, which the manifest does "
                                 "not list (so nothing checks its sha256)", hint=hint)


def _scheme_text(scheme) -> str:
    if not isinstance(scheme, dict):
        return repr(scheme)
    if scheme.get("scheme") == c.SCHEME_PER_COLUMN:
        return " ".join(f"{k}={scheme.get(k)}" for k in ("scheme", "bits", "symmetric"))
    return " ".join(f"{k}={scheme.get(k)}" for k in ("bits", "block_size", "symmetric", "accuracy_level"))


# -- the few messages we decode --------------------------------------------------------------------


def _quantized_matmul(data, span) -> tuple | None:
    """A quantized matmul's scheme as (key, value) pairs; None for any other node."""
    inputs, op_type, domain, attributes = [], "", "", {}
    for number, wire, value in _fields(data, *span):
        if wire != _LENGTH:
            continue
        if number == _NODE_INPUT:
            inputs.append(_text(data, value))
        elif number == _NODE_OP_TYPE:
            op_type = _text(data, value)
        elif number == _NODE_DOMAIN:
            domain = _text(data, value)
        elif number == _NODE_ATTRIBUTE:
            attributes.update(_int_attribute(data, value))
    if op_type not in (QUANTIZED_MATMUL, PER_COLUMN_MATMUL) or domain not in ("com.microsoft", ""):
        return None
    if op_type == PER_COLUMN_MATMUL:  # int8 (or uint8) codes [K, N]; a zero point input makes it asymmetric
        return (("scheme", c.SCHEME_PER_COLUMN), ("bits", 8), ("symmetric", not (len(inputs) > 3 and inputs[3])))
    if "block_size" not in attributes:
        raise _Malformed(f"a {QUANTIZED_MATMUL} node has no block_size")
    values = {**_MATMUL_DEFAULTS, **attributes}
    return (("scheme", c.SCHEME_BLOCKS), ("bits", values["bits"]), ("block_size", values["block_size"]),
            ("symmetric", not (len(inputs) > 3 and inputs[3])), ("accuracy_level", values["accuracy_level"]))


def _int_attribute(data, span) -> dict:
    name, number_value = None, None
    for number, wire, value in _fields(data, *span):
        if number == _ATTRIBUTE_NAME and wire == _LENGTH:
            name = _text(data, value)
        elif number == _ATTRIBUTE_INT and wire == _VARINT:
            number_value = value - (1 << 64) if value >= 1 << 63 else value  # int64, two's complement
    return {name: number_value} if name is not None and number_value is not None else {}


def _value_info(data, span) -> tuple[str, int | None]:
    name, elem_type = "", None
    for number, wire, value in _fields(data, *span):
        if number == _VALUE_INFO_NAME and wire == _LENGTH:
            name = _text(data, value)
        elif number == _VALUE_INFO_TYPE and wire == _LENGTH:
            for n, w, v in _fields(data, *value):
                if n == _TYPE_TENSOR and w == _LENGTH:
                    for n2, w2, v2 in _fields(data, *v):
                        if n2 == _TENSOR_ELEM_TYPE and w2 == _VARINT:
                            elem_type = v2
    return name, elem_type


def _external_locations(data, span) -> list[str]:
    """The `location` of an initializer stored outside model.onnx (none for one stored inside)."""
    external, locations = False, []
    for number, wire, value in _fields(data, *span):
        if number == _TENSOR_DATA_LOCATION and wire == _VARINT:
            external = value == _EXTERNAL
        elif number == _TENSOR_EXTERNAL_DATA and wire == _LENGTH:
            entry = {n: _text(data, v) for n, w, v in _fields(data, *value) if w == _LENGTH}
            if entry.get(_ENTRY_KEY) == "location":
                locations.append(entry.get(_ENTRY_VALUE, ""))
    return locations if external else []


# -- protobuf wire format --------------------------------------------------------------------------


def _text(data, span) -> str:
    return bytes(data[span[0]:span[1]]).decode("utf-8", "replace")


def _varint(data, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed(f"a number runs past its message at byte {pos}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data, start: int, end: int):
    """(field number, wire type, value) of each field in data[start:end]: an int for varints, the
    (start, end) span of a length-delimited field, None for fixed-width ones."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(data, pos, end)
        elif wire == _LENGTH:
            length, pos = _varint(data, pos, end)
            value = (pos, pos + length)
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            value = None
            pos += 8 if wire == _FIXED64 else 4
        else:
            raise _Malformed(f"unknown wire type {wire} at byte {pos}")
        if pos > end or number == 0:
            raise _Malformed(f"a field at byte {pos} runs past the end of its message")
        yield number, wire, value
