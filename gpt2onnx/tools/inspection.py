"""Look inside an exported model: its weights under their Hugging Face names, the graph's inputs and
outputs, op counts and the manifest.

    report = inspect_model("out/random-gpt2")           # ModelReport; report.format() is the `inspect` listing
    wpe = ModelFile("out/random-gpt2").weight("transformer.wpe.weight")   # float32, state-dict layout

Reading the graph needs the `onnx` package (the `plot` extra); the runtime itself never imports it. Weights
are read one at a time (from model.onnx, or model.onnx.data for large models), never all at once.

Quantized weights: a weight that is not plain float32 is listed with its dtype and a scheme read from the
node that consumes it. The codes, scales and zero points of a quantized op (MatMulNBits, ...) are listed as
one weight under its state-dict name (named as `contract.quantized_names` says, or `NAME_Q{bits}` as ONNX
Runtime's own quantizer names them), and `ModelFile.weight` dequantizes MatMulNBits (int4, older int8:
gpt2onnx/format/matmulnbits.py) and DynamicQuantizeMatMul (int8, per column: gpt2onnx/format/per_column.py) weights for
display.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, MissingDependencyError, ModelLoadError
from ..format import contract as c
from ..format import matmulnbits, per_column
from ..format.gpt2 import EMBEDDING, OUT_IN_WEIGHTS, state_dict_shapes
from ..runtime.limits import format_bytes
from ..runtime.loading import read_config
from ..runtime.manifest import read_manifest

PLOT_EXTRA_HINT = "pip install 'gpt2onnx[plot]'"
TIED_TO = EMBEDDING

# Quantized ops whose constant inputs form one weight: (data, scales, zero points) input positions.
QUANTIZED_INPUTS = {"MatMulNBits": (1, 2, 3), "DynamicQuantizeMatMul": (1, 2, 3), "GatherBlockQuantized": (0, 2, 3),
                    "DequantizeLinear": (0, 1, 2)}
_STATE_DICT_NAME = re.compile(r"^(transformer\.|lm_head\.)")
_QUANT_SUFFIX = re.compile(r"_Q\d+$")
_SUB_BYTE_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}


def require_onnx():
    """The `onnx` module, or a MissingDependencyError saying how to install it."""
    try:
        import onnx
    except ImportError as error:
        raise MissingDependencyError("looking inside a model needs the onnx package (the plot extra)",
                                     hint=PLOT_EXTRA_HINT) from error
    return onnx


@dataclass(frozen=True)
class StoredTensor:
    """One initializer as stored in the graph."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass(frozen=True)
class WeightInfo:
    """A weight under its Hugging Face state-dict name."""

    name: str
    shape: tuple[int, ...]  # as in the PyTorch state dict (dequantized shape for quantized weights)
    dtype: str  # dtype of the stored data ("float32", "uint8", ...)
    nbytes: int  # bytes stored, all parts together (0 for a tied weight)
    scheme: str | None = None  # how a non-float32 weight is encoded, read from the node that consumes it
    parts: tuple[StoredTensor, ...] = ()  # the initializers holding it
    tied_to: str | None = None  # set when the weight is not stored but shared with another one


@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output: name, element type, dimensions (numbers or symbolic names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class ModelReport:
    """What `gpt2onnx inspect` prints."""

    directory: str
    config: dict
    manifest: dict  # the manifest without the file hashes and the per-check parity list
    weights: tuple[WeightInfo, ...]
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]
    op_counts: dict[str, int]
    constants: tuple[StoredTensor, ...] = field(default=())  # initializers that are not weights (shapes, scalars)

    @property
    def parameters(self) -> int:
        """Parameters stored (a tied weight counts once)."""
        return sum(math.prod(w.shape) for w in self.weights if w.tied_to is None)

    @property
    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["parameters"], out["weight_bytes"] = self.parameters, self.weight_bytes
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        """The human-readable listing."""
        m, cfg = self.manifest, self.config
        lines = [f"model      {self.directory}",
                 f"format     {c.FORMAT_NAME} {m.get(c.M_FORMAT_VERSION)}, precision {m.get(c.M_PRECISION)}, "
                 f"opset {m.get(c.M_OPSET)}, created {m.get(c.M_CREATED)}",
                 f"source     {_key_values(m.get(c.M_SOURCE))}",
                 f"parity     {_parity_text(m.get(c.M_PARITY))}",
                 *([f"quantized  {_key_values(m[c.M_QUANTIZATION])}"] if m.get(c.M_QUANTIZATION) else []),
                 f"config     n_layer={cfg['n_layer']} n_head={cfg['n_head']} n_embd={cfg['n_embd']} "
                 f"n_positions={cfg['n_positions']} vocab_size={cfg['vocab_size']}",
                 "", f"weights    {len(self.weights)} tensors, {self.parameters:,} parameters, "
                     f"{format_bytes(self.weight_bytes)} stored"]
        width = max(len(w.name) for w in self.weights)
        for w in self.weights:
            shape = "[" + ", ".join(map(str, w.shape)) + "]"
            if w.tied_to:
                lines.append(f"  {w.name:<{width}}  {shape:<14} tied to {w.tied_to} (not stored)")
                continue
            line = f"  {w.name:<{width}}  {shape:<14} {w.dtype:<8} {format_bytes(w.nbytes):>10}"
            lines.append(line + (f"  {w.scheme}" if w.scheme else ""))
        if self.constants:
            constants = format_bytes(sum(t.nbytes for t in self.constants))
            lines.append(f"  (+ {len(self.constants)} graph constants, {constants})")
        lines += ["", "inputs"] + [f"  {v.name:<28} {v.dtype:<8} {_dims(v.shape)}" for v in self.inputs]
        lines += ["outputs"] + [f"  {v.name:<28} {v.dtype:<8} {_dims(v.shape)}" for v in self.outputs]
        ops = sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        lines += ["", f"ops        {sum(self.op_counts.values())} nodes: " + ", ".join(f"{op} {n}" for op, n in ops)]
        return "\n".join(lines)


class ModelFile:
    """An exported model's graph opened for reading: weight metadata at once, weight data on request."""

    def __init__(self, directory: str | Path):
        onnx = require_onnx()
        self.directory = Path(directory)
        path = self.directory / c.MODEL_FILE
        if not path.is_file():
            raise ModelLoadError(f"{self.directory} has no {c.MODEL_FILE}",
                                 hint="pass an exported model directory (gpt2onnx export ... DIR)")
        try:
            self.proto = onnx.load(str(path), load_external_data=False)  # weight data is read per tensor
        except Exception as error:  # onnx raises DecodeError and others
            raise ModelLoadError(f"cannot read {path}: {error}", hint="export the model again") from error
        self.config = read_config(self.directory / c.CONFIG_FILE)[1]
        self._initializers = {t.name: t for t in self.proto.graph.initializer}
        self.weights, self.constants = self._group_weights()

    # -- the listing ---------------------------------------------------------------------------------

    def _group_weights(self) -> tuple[dict[str, WeightInfo], list[StoredTensor]]:
        """Initializers as state-dict weights, in state-dict order; the rest are graph constants."""
        weights = self._quantized_weights()
        used = {part.name for w in weights.values() for part in w.parts}
        constants = []
        for name in self._initializers:
            if name in used:
                continue
            if _STATE_DICT_NAME.match(name):
                weights[name] = self._plain_weight(name)
            else:
                constants.append(self._stored(name))
        if self.config.tie_word_embeddings and "lm_head.weight" not in weights and TIED_TO in weights:
            weights["lm_head.weight"] = WeightInfo(name="lm_head.weight", shape=weights[TIED_TO].shape,
                                                   dtype=weights[TIED_TO].dtype, nbytes=0, tied_to=TIED_TO)
        order = {n: i for i, n in enumerate(state_dict_shapes(self.config))}
        ordered = sorted(weights.values(), key=lambda w: (order.get(w.name, len(order)), w.name))
        return {w.name: w for w in ordered}, constants

    def _quantized_weights(self) -> dict[str, WeightInfo]:
        """The codes, scales and zero points each quantized op reads, as one weight under its state-dict name."""
        self._quantized: dict[str, tuple] = {}  # weight name -> (node, data, scales, zero points)
        weights: dict[str, WeightInfo] = {}
        for node in self.proto.graph.node:
            positions = QUANTIZED_INPUTS.get(node.op_type)
            if not positions or len(node.input) <= positions[0] or node.input[positions[0]] not in self._initializers:
                continue
            data, scales, zeros = (node.input[p] if p < len(node.input) and node.input[p] else None for p in positions)
            name = c.quantized_source(data) or _QUANT_SUFFIX.sub("", data)
            if name in weights or (name != data and name in self._initializers):
                name = data  # a quantized copy beside a float32 original: list it under its own name
            parts = tuple(self._stored(n) for n in (data, scales, zeros) if n in self._initializers)
            weights[name] = WeightInfo(name=name, shape=self._logical_shape(name, node, parts[0]),
                                       dtype=parts[0].dtype, nbytes=sum(p.nbytes for p in parts),
                                       scheme=_scheme(node, zeros), parts=parts)
            self._quantized[name] = (node, data, scales, zeros)
        return weights

    def _plain_weight(self, name: str) -> WeightInfo:
        """An initializer stored under its state-dict name; if not float32, the nodes reading it give the scheme."""
        stored = self._stored(name)
        scheme = None
        if stored.dtype != c.FLOAT_DTYPE:
            readers = [node for node in self.proto.graph.node if name in node.input]
            scheme = "; ".join(_scheme(node, None) for node in readers) or "unused"
        return WeightInfo(name=name, shape=stored.shape, dtype=stored.dtype, nbytes=stored.nbytes, scheme=scheme,
                          parts=(stored,))

    def _stored(self, name: str) -> StoredTensor:
        tensor = self._initializers[name]
        shape = tuple(int(d) for d in tensor.dims)
        return StoredTensor(name=name, shape=shape, dtype=_dtype_name(tensor.data_type),
                            nbytes=_nbytes(tensor.data_type, math.prod(shape)))

    @staticmethod
    def _logical_shape(name: str, node, data: StoredTensor) -> tuple[int, ...]:
        attrs = _attributes(node)
        if node.op_type == "MatMulNBits":
            k, n = int(attrs["K"]), int(attrs["N"])
            return (n, k) if name.endswith(OUT_IN_WEIGHTS) else (k, n)
        if node.op_type == "DynamicQuantizeMatMul":  # stored [K, N]
            return data.shape[::-1] if name.endswith(OUT_IN_WEIGHTS) else data.shape
        return data.shape  # other schemes: the stored shape

    def report(self, manifest: dict) -> ModelReport:
        cfg = self.config
        graph = self.proto.graph
        return ModelReport(
            directory=str(self.directory),
            config={k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")},
            manifest=_manifest_summary(manifest),
            weights=tuple(self.weights.values()),
            inputs=tuple(_value_info(v) for v in graph.input),
            outputs=tuple(_value_info(v) for v in graph.output),
            op_counts=dict(Counter(_op_name(node) for node in all_nodes(graph))),
            constants=tuple(self.constants))

    # -- the data ------------------------------------------------------------------------------------

    def weight(self, name: str) -> np.ndarray:
        """A weight as float32 in its state-dict layout, dequantized when stored quantized."""
        info = self.weights.get(name)
        if info is None:
            close = difflib.get_close_matches(name, list(self.weights), n=3, cutoff=0.6)
            raise InvalidArgumentError(
                f"the model has no weight named {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""),
                hint="weights are named as in the Hugging Face state dict, e.g. transformer.wpe.weight or "
                     "transformer.h.0.attn.c_attn.weight; `gpt2onnx inspect MODEL_DIR` lists them all")
        if info.tied_to:
            return self.weight(info.tied_to)
        if name not in self._quantized:
            return np.array(self._array(name), dtype=np.float32)  # a writable copy, as dequantized ones are
        node, data, scales, zeros = self._quantized[name]
        if node.op_type == "DynamicQuantizeMatMul":  # [K, N]
            dense = per_column.dequantize(self._array(data), self._array(scales),
                                          self._array(zeros) if zeros else None)
            return np.ascontiguousarray(dense.T) if name.endswith(OUT_IN_WEIGHTS) else dense
        if node.op_type != "MatMulNBits":
            raise InvalidArgumentError(f"{name} is stored as {info.scheme}, which cannot be dequantized for display "
                                       "yet",
                                       hint="plot another weight, or a float32 export of the same model")
        attrs = _attributes(node)
        dense = matmulnbits.dequantize(self._array(data), self._array(scales),
                                        self._array(zeros) if zeros else None, k=int(attrs["K"]), n=int(attrs["N"]),
                                        bits=int(attrs.get("bits", 4)), block_size=int(attrs["block_size"]))
        return dense if name.endswith(OUT_IN_WEIGHTS) else np.ascontiguousarray(dense.T)

    def _array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self._initializers[name], base_dir=str(self.directory))


def inspect_model(directory: str | Path, *, check_hashes: bool = True) -> ModelReport:
    """Weights (state-dict names, shapes, dtypes, bytes, quantization scheme), graph inputs/outputs, op counts
    and the manifest of an exported model directory, after the checks `gpt2onnx.load` makes: a damaged or
    mislabelled export is refused (ModelLoadError), not listed.

    check_hashes: verify every file's sha256 against the manifest (a few seconds for large models); the
    manifest's claims are checked against the graph either way.
    """
    manifest = read_manifest(Path(directory), check_hashes=check_hashes)
    return ModelFile(directory).report(manifest)


dequantize_matmul_nbits = matmulnbits.dequantize  # the float32 [N, K] a MatMulNBits node multiplies by


# -- small helpers ----------------------------------------------------------------------------------


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _scheme(node, zero_points: str | None) -> str:
    """E.g. "MatMulNBits bits=4 block_size=32 symmetric accuracy_level=4"."""
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in _attributes(node).items()
             if isinstance(v, (int, float, bytes)) and k not in ("K", "N")}
    text = " ".join([_op_name(node)] + [f"{k}={v}" for k, v in sorted(attrs.items())])
    if node.op_type in QUANTIZED_INPUTS:
        text += " zero points" if zero_points else " symmetric"
    return text


def all_nodes(graph):
    """Every node of an onnx GraphProto, those of its If branches included (each after the If that holds it):
    an int8-cache export's attention is an If per layer."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g.node:  # a subgraph attribute (AttributeProto.GRAPH)
                yield from all_nodes(attribute.g)


def _op_name(node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _dtype_name(data_type: int) -> str:
    from onnx import TensorProto, helper

    name = TensorProto.DataType.Name(data_type)
    if name in _SUB_BYTE_BITS:
        return name.lower()
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).name


def _nbytes(data_type: int, count: int) -> int:
    from onnx import TensorProto, helper

    name = TensorProto.DataType.Name(data_type)
    if name in _SUB_BYTE_BITS:
        return -(-count * _SUB_BYTE_BITS[name] // 8)
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def _value_info(value) -> ValueInfo:
    t = value.type.tensor_type
    dims = tuple(d.dim_param or int(d.dim_value) for d in t.shape.dim)
    return ValueInfo(name=value.name, dtype=_dtype_name(t.elem_type), shape=dims)


def _manifest_summary(manifest: dict) -> dict:
    summary = {k: v for k, v in manifest.items() if k != c.M_FILES}
    summary["files"] = sorted(manifest.get(c.M_FILES, {}))
    parity = manifest.get(c.M_PARITY)
    if isinstance(parity, dict):
        summary[c.M_PARITY] = {k: v for k, v in parity.items() if k != "checks"}
        summary[c.M_PARITY]["checks"] = len(parity.get("checks", []))
    return summary


def _key_values(source) -> str:
    if not isinstance(source, dict):
        return str(source)
    return " ".join(f"{k}={v}" for k, v in source.items())


def _parity_text(parity) -> str:
    if not isinstance(parity, dict):
        return "not recorded"
    parts = ["passed" if parity.get("passed") else "FAILED"]
    diffs = parity.get("max_abs_diff")
    if isinstance(diffs, dict) and diffs:
        worst = max(diffs, key=diffs.get)
        parts.append(f"largest |diff| {diffs[worst]:.2g} ({worst}) over {len(diffs)} outputs, "
                     f"atol {parity.get('atol')}")
    greedy = parity.get("greedy")
    if isinstance(greedy, dict):
        parts.append(f"greedy {greedy.get('tokens')} tokens {'identical' if greedy.get('equal') else 'DIFFER'}")
    if parity.get("reference"):
        parts.append(f"vs {parity['reference']}")
    return "; ".join(parts)


def _dims(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"
