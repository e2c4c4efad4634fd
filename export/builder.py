"""Build the GPT-2 ONNX graph directly from the weights (no tracing of transformers code).

Every block is a small function that emits ONNX nodes. The graph uses ONNX Runtime's fused CPU operators
(domain com.microsoft); benchmarks/graph_variants.py measures each choice against its unfused form:

  GroupQueryAttention      attention with the KV cache; reads past and writes present in one buffer when the
                           runtime binds the same memory to both (no per-step copy of the cache)
  SkipLayerNormalization   residual add + projection bias + layer norm in one pass
  FastGelu / BiasGelu      the MLP's bias and activation (tanh GELU / exact GELU)
  DynamicQuantizeMatMul    int8 weight matmuls, a scale per output column; activations quantized per call
  MatMulNBits              int4 block-quantized weight matmuls (accuracy_level 4: int8 activations)

Optionally the KV cache is int8 (GroupQueryAttention's per-channel quantized cache, scales from
quantize.kv_cache_scales); then each layer's attention is an If: a prefill attends in float32 and stores the
cache quantized, a step after a past reads the int8 cache.

Names of inputs, outputs and weights come from gpt2onnx.format.contract. `build_graph` leaves the weights as named
slots; `save_model` fills each slot from the Hugging Face weights, quantizing where the graph asks for it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from gpt2onnx.errors import InvalidArgumentError
from gpt2onnx.format import contract as c
from gpt2onnx.format import per_column, precisions
from gpt2onnx.format.config import TANH_GELUS, ModelConfig
from gpt2onnx.format.gpt2 import attention_scale
from gpt2onnx.format.matmulnbits import check_block_size
from gpt2onnx.tools.inspection import all_nodes

from . import quantize

# A model whose weights pass this size is saved with external data (protobuf's limit is 2 GB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_ALIGN = 4096
_MASK_VALUE = float(np.finfo(np.float32).min)  # what transformers puts in masked attention scores
_MS = "com.microsoft"


@dataclass(frozen=True)
class Quantization:
    """Weight quantization of the block matmuls and the head: per output column (DynamicQuantizeMatMul) or
    block-wise (MatMulNBits); see gpt2onnx/format/precisions.py."""

    bits: int  # 8 or 4
    block_size: int | None = None  # blocks: inputs per block, a power of two >= 16 (defaults: precisions.py)
    symmetric: bool = False  # blocks: True = no zero points (smaller, slightly less accurate); per-column: always
    accuracy_level: int = 4  # MatMulNBits compute type; 4 = int8 activations (0 is a slow path for 8 bits)
    scheme: str = c.SCHEME_BLOCKS

    def as_dict(self) -> dict:
        if self.scheme == c.SCHEME_PER_COLUMN:
            return {"scheme": self.scheme, "bits": self.bits, "symmetric": True, "max_code": per_column.MAX_CODE}
        return {"scheme": self.scheme, "bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level}


def quantization_for(precision: str, block_size: int | None = None) -> Quantization | None:
    """The quantization a precision of gpt2onnx/format/precisions.py means (None: float32 weights); block_size None =
    the precision's default. A new precision whose graph differs in more than bits and block size starts here."""
    p = precisions.get(precision)
    if not p.quantized:
        return None
    if p.scheme == c.SCHEME_PER_COLUMN:
        if block_size is not None:
            raise InvalidArgumentError(f"{p.name} has no block size: it quantizes with one scale per output column",
                                       hint=f"leave out --block-size (it applies to {', '.join(precisions.BLOCKED)})")
        return Quantization(bits=p.bits, scheme=c.SCHEME_PER_COLUMN, symmetric=True)
    block_size = p.default_block_size if block_size is None else block_size
    check_block_size(block_size)
    return Quantization(bits=p.bits, block_size=block_size)


class _Graph:
    """Collects nodes and initializers; `op` emits one node and returns its output name(s).

    `outputs` is a count, or a list of names where "" leaves an optional output unused.
    """

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self._numbers = itertools.count(1)  # node numbers, shared with branches so names stay unique

    def op(self, op_type: str, *inputs: str, name: str | None = None, outputs: int | list[str] = 1,
           domain: str = "", **attrs):
        number = next(self._numbers)
        base = name or f"{op_type.lower()}_{number}"
        if isinstance(outputs, list):
            outs = outputs
        else:
            outs = [base] if outputs == 1 else [f"{base}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"n{number}_{op_type}",
                                           domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, name: str, value, dtype=np.int64) -> str:
        self.constants.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def branch(self) -> _Graph:
        """A subgraph (an If branch): its own nodes, this graph's numbering and constants (names stay unique)."""
        sub = _Graph()
        sub.constants, sub._numbers = self.constants, self._numbers
        return sub

    def graph(self, name: str, outputs: list[tuple[str, int]]) -> onnx.GraphProto:
        """This branch as a GraphProto returning `outputs` (name, element type; shapes left to inference)."""
        return helper.make_graph(self.nodes, name, [], [helper.make_tensor_value_info(o, t, None) for o, t in outputs])


def _linear(g: _Graph, x: str, prefix: str, n_in: int, n_out: int, q: Quantization | None,
            bias: bool = True, name: str | None = None) -> str:
    """GPT-2's Conv1D: x @ W (+ b), W stored [in, out]; a quantized matmul when quantized. `name`: the output
    tensor's name."""
    if q is None:
        if not bias:
            return g.op("MatMul", x, prefix + ".weight", name=name)
        return g.op("Add", g.op("MatMul", x, prefix + ".weight"), prefix + ".bias", name=name)
    return _quantized_matmul(g, x, prefix + ".weight", n_in, n_out, q, prefix + ".bias" if bias else "", name=name)


def _quantized_matmul(g: _Graph, x: str, weight: str, n_in: int, n_out: int, q: Quantization, bias: str = "",
                      name: str | None = None) -> str:
    """x @ W (+ bias) in the quantization's scheme."""
    if q.scheme == c.SCHEME_PER_COLUMN:
        return _dynamic_quantize_matmul(g, x, weight, bias, name=name)
    return _matmul_nbits(g, x, weight, n_in, n_out, q, bias, name=name)


def _dynamic_quantize_matmul(g: _Graph, x: str, weight: str, bias: str = "", name: str | None = None) -> str:
    """x @ W (+ bias) with W [in, out] as int8 codes and a scale per output column (no zero point)."""
    codes, scales, _ = c.quantized_names(weight)
    inputs = [x, codes, scales] + (["", bias] if bias else [])
    return g.op("DynamicQuantizeMatMul", *inputs, domain=_MS, name=name)


def _matmul_nbits(g: _Graph, x: str, weight: str, n_in: int, n_out: int, q: Quantization, bias: str = "",
                  name: str | None = None) -> str:
    """x @ W^T with W [n_out, n_in] block-quantized; zero points only for asymmetric schemes."""
    codes, scales, zero_points = c.quantized_names(weight)
    inputs = [x, codes, scales, "" if q.symmetric else zero_points, "", bias]  # "" g_idx: deprecated
    while not inputs[-1]:
        inputs.pop()
    return g.op("MatMulNBits", *inputs, domain=_MS, name=name, K=n_in, N=n_out, bits=q.bits,
                block_size=q.block_size, accuracy_level=q.accuracy_level)


def _skip_layer_norm(g: _Graph, x: str, residual: str, norm: str, bias: str, eps: float) -> tuple[str, str]:
    """(layer_norm(residual + x + bias), residual + x + bias): the residual add and the next norm at once."""
    normed, _, _, total = g.op("SkipLayerNormalization", x, residual, norm + ".weight", norm + ".bias", bias,
                               domain=_MS, epsilon=eps, outputs=[f"{norm}.out", "", "", f"{norm}.residual"])
    return normed, total


def _mlp(g: _Graph, x: str, layer: int, config: ModelConfig, q: Quantization | None) -> str:
    """c_fc, activation, c_proj without its bias (the next SkipLayerNormalization adds it)."""
    p = f"transformer.h.{layer}.mlp"
    e, f = config.n_embd, config.inner_dim
    hidden = _linear(g, x, p + ".c_fc", e, f, q, bias=False)
    kind = config.activation_function
    if kind in TANH_GELUS:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        hidden = g.op("FastGelu", hidden, p + ".c_fc.bias", domain=_MS)
    elif kind == "relu":
        hidden = g.op("Relu", g.op("Add", hidden, p + ".c_fc.bias"))
    else:  # exact GELU: 0.5 x (1 + erf(x / sqrt(2)))
        hidden = g.op("BiasGelu", hidden, p + ".c_fc.bias", domain=_MS)
    return _linear(g, hidden, p + ".c_proj", f, e, q, bias=False)


def _attention(g: _Graph, x: str, layer: int, config: ModelConfig, q: Quantization | None, lengths: dict,
               kv_int8: bool = False) -> str:
    """Causal self-attention over the past plus the new positions; emits present.{layer}.key/value.

    Returns the output before c_proj's bias (the next SkipLayerNormalization adds it).
    """
    p = f"transformer.h.{layer}.attn"
    e, h = config.n_embd, config.n_head
    # [B, S, 3E] = q | k | v, GroupQueryAttention's packing; named by the contract for analysis tools
    qkv = _linear(g, x, p + ".c_attn", e, 3 * e, q, name=c.attention_qkv(layer))
    # causal=0: the causal and padding masks both come in through attention_bias, built once per step
    inputs = [qkv, "", "", c.past_key(layer), c.past_value(layer), lengths["seqlens_k"], lengths["total"], "", "", "",
              lengths["bias"]]
    attrs = dict(num_heads=h, kv_num_heads=h, scale=attention_scale(config, layer), causal=0)
    outputs = [f"{p}.context", c.present_key(layer), c.present_value(layer)]
    if not kv_int8:
        context = g.op("GroupQueryAttention", *inputs, domain=_MS, outputs=outputs, **attrs)[0]
    else:
        # int8 cache with per-channel scales. A prefill (empty past) attends in float32 and stores its keys and
        # values quantized, as the int8 attention would: ONNX Runtime's int8-cache attention dequantizes key by
        # key (prefill@512 of random:gpt2 int8, 2 threads: 572 tok/s through it, 914 this way; decode steps
        # unchanged). Steps after a past keep the int8 path: there the cache's bytes are the cost.
        scales = c.kv_scale_names(layer)
        step, stepped = g.branch(), [o + ".int8" for o in outputs]  # inputs: head_sink (unused), k_scale, v_scale
        step.op("GroupQueryAttention", *inputs, "", *scales, domain=_MS, outputs=stepped,
                k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8, **attrs)
        types = (TensorProto.FLOAT, TensorProto.INT8, TensorProto.INT8)
        context = g.op("If", lengths["prefill"], outputs=outputs,
                       then_branch=_float_prefill(g, inputs, attrs, scales, types, f"{p}.float_prefill"),
                       else_branch=step.graph(f"{p}.int8_step", list(zip(stepped, types))))[0]
    return _linear(g, context, p + ".c_proj", e, e, q, bias=False)


def _float_prefill(g: _Graph, inputs: list[str], attrs: dict, scales: tuple[str, str], types: tuple[int, ...],
                   name: str) -> onnx.GraphProto:
    """The If branch of an int8-cache layer's prefill: float32 attention without a past, then its keys and
    values quantized with the int8 attention's rounding (round half to even, clipped to int8: layer 0 of
    random:gpt2 at int8, whose keys and values both paths compute alike, stored the same bytes) and padded to the
    cache buffer's length, as the int8 attention's present would be."""
    b = g.branch()
    no_past = [*inputs[:3], "", "", *inputs[5:]]
    context, key, value = b.op("GroupQueryAttention", *no_past, domain=_MS, outputs=3, **attrs)
    new = b.op("Gather", b.op("Shape", c.INPUT_IDS), "c_one_i", axis=0)
    capacity = b.op("Gather", b.op("Shape", inputs[3]), "c_two_i", axis=0)  # the buffer's length, or 0 if separate
    room = b.op("Unsqueeze", b.op("Max", b.op("Sub", capacity, new), "c_zero_i"), "c_axis0")
    pads = b.op("Concat", "c_zeros6", room, "c_zero_1d", axis=0)  # after the new positions, on the length axis
    stored = [b.op("Pad", b.op("Cast", b.op("Clip", b.op("Round", b.op("Div", t, scale)), "c_int8_min", "c_int8_max"),
                                 to=TensorProto.INT8), pads) for t, scale in zip((key, value), scales)]
    return b.graph(name, list(zip((context, *stored), types)))


def _attention_inputs(g: _Graph, kv_int8: bool) -> dict:
    """GroupQueryAttention's per-step inputs, from the attention mask's shape and values.

    Every row counts all total_sequence_length positions (left padding included), so seqlens_k is total - 1
    for each row and the new keys go at the same offset for all rows; padding and the causal order are
    masked by attention_bias [B, 1, S, T]: 0 where query i (at absolute position past + i) may see key j,
    i.e. j <= past + i and the attention mask keeps j, and the mask value elsewhere.
    """
    total = g.op("Gather", g.op("Shape", c.ATTENTION_MASK), "c_one_i", axis=0)
    seq = g.op("Gather", g.op("Shape", c.INPUT_IDS), "c_one_i", axis=0)
    batch = g.op("Shape", c.INPUT_IDS, start=0, end=1)
    past = g.op("Sub", total, seq)
    query_pos = g.op("Unsqueeze", g.op("Range", past, total, "c_one_i"), "c_axis1")  # [S, 1]
    key_pos = g.op("Unsqueeze", g.op("Range", "c_zero_i", total, "c_one_i"), "c_axis0")  # [1, T]
    causal = g.op("LessOrEqual", key_pos, query_pos)  # [S, T]
    keep = g.op("Unsqueeze", g.op("Cast", c.ATTENTION_MASK, to=TensorProto.BOOL), "c_axes12")  # [B,1,1,T]
    allowed = g.op("And", causal, keep, name="attention_allowed")
    bias = g.op("Where", allowed, "c_zero_f", g.const("c_mask_value", _MASK_VALUE, np.float32), name="attention_bias")
    total_i32 = g.op("Cast", total, to=TensorProto.INT32, name="total_sequence_length")
    last = g.op("Sub", total_i32, "c_one_i32")
    seqlens_k = g.op("Expand", last, batch, name="seqlens_k")
    lengths = {"total": total_i32, "seqlens_k": seqlens_k, "bias": bias}
    if kv_int8:  # the If of every int8-cache layer: True when this step is a prefill (no past)
        lengths["prefill"] = g.op("Equal", past, "c_zero_i", name="prefill")
    return lengths


def _keep_last(g: _Graph, x: str) -> str:
    """x[:, -logits_to_keep:] (all positions when logits_to_keep is 0)."""
    keep = g.op("Unsqueeze", c.LOGITS_TO_KEEP, "c_axis0")  # [1]
    start = g.op("Where", g.op("Greater", keep, "c_zero_1d"), g.op("Neg", keep), "c_zero_1d")
    return g.op("Slice", x, start, "c_int_max_1d", "c_axis1")


def build_graph(config: ModelConfig, quantization: Quantization | None = None,
                kv_cache: str = "float32") -> onnx.ModelProto:
    """The graph with weights as named (empty) initializer slots; `save_model` fills in the data.

    kv_cache "int8" stores the cache as int8 with per-channel scales (slots named by contract.kv_scale_names,
    filled from `kv_cache_scales`)."""
    precisions.check_kv_cache(kv_cache)
    g = _Graph()
    q = quantization
    e, h, d, v = config.n_embd, config.n_head, config.head_dim, config.vocab_size
    g.const("c_one_i", 1)
    g.const("c_one_i32", 1, np.int32)
    g.const("c_zero_i", 0)
    g.const("c_zero_f", 0.0, np.float32)
    g.const("c_zero_1d", [0])
    g.const("c_int_max_1d", [np.iinfo(np.int64).max])
    g.const("c_axis0", [0])
    g.const("c_axis1", [1])
    g.const("c_axes12", [1, 2])

    kv_int8 = kv_cache == "int8"
    if kv_int8:  # the float prefill's quantization (_float_prefill)
        g.const("c_two_i", 2)
        g.const("c_zeros6", [0] * 6)
        g.const("c_int8_min", -128.0, np.float32)
        g.const("c_int8_max", 127.0, np.float32)
    lengths = _attention_inputs(g, kv_int8)
    hidden = g.op("Add", g.op("Gather", "transformer.wte.weight", c.INPUT_IDS, axis=0),
                  g.op("Gather", "transformer.wpe.weight", c.POSITION_IDS, axis=0))
    eps = config.layer_norm_epsilon
    x = g.op("LayerNormalization", hidden, "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
             axis=-1, epsilon=eps)
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        attn = _attention(g, x, i, config, q, lengths, kv_int8=kv_int8)
        x, hidden = _skip_layer_norm(g, attn, hidden, p + ".ln_2", p + ".attn.c_proj.bias", eps)
        mlp = _mlp(g, x, i, config, q)
        after = f"transformer.h.{i + 1}.ln_1" if i + 1 < config.n_layer else "transformer.ln_f"
        x, hidden = _skip_layer_norm(g, mlp, hidden, after, p + ".mlp.c_proj.bias", eps)
    x = _keep_last(g, x)
    # lm_head: x @ wte^T. fp32 reads the tied embedding (stored once) through Gemm's transB; quantized
    # exports quantize a copy of it under lm_head.weight's name.
    head = "lm_head.weight" if q is not None or not config.tie_word_embeddings else "transformer.wte.weight"
    if q is None:
        flat = g.op("Gemm", g.op("Reshape", x, g.const("c_flat_shape", [-1, e])), head, transB=1)
        out_shape = g.op("Concat", g.op("Shape", x, start=0, end=2), g.const("c_vocab", [v]), axis=0)
        g.op("Reshape", flat, out_shape, name=c.LOGITS)
    else:
        _quantized_matmul(g, x, head, e, v, q, name=c.LOGITS)

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv = TensorProto.INT8 if kv_cache == "int8" else f32
    cache = [c.DIM_BATCH, h, c.DIM_PAST, d]
    present = [c.DIM_BATCH, h, c.DIM_TOTAL, d]
    inputs = [helper.make_tensor_value_info(c.INPUT_IDS, i64, [c.DIM_BATCH, c.DIM_SEQUENCE]),
              helper.make_tensor_value_info(c.ATTENTION_MASK, i64, [c.DIM_BATCH, c.DIM_TOTAL]),
              helper.make_tensor_value_info(c.POSITION_IDS, i64, [c.DIM_BATCH, c.DIM_SEQUENCE])]
    inputs += [helper.make_tensor_value_info(n, kv, cache) for n in c.past_names(config.n_layer)]
    inputs.append(helper.make_tensor_value_info(c.LOGITS_TO_KEEP, i64, []))
    outputs = [helper.make_tensor_value_info(c.LOGITS, f32, [c.DIM_BATCH, "logits_sequence_length", v])]
    outputs += [helper.make_tensor_value_info(n, kv, present) for n in c.present_names(config.n_layer)]
    graph = helper.make_graph(g.nodes, "gpt2", inputs, outputs, initializer=g.constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", c.OPSET), helper.make_opsetid(_MS, 1)],
                              producer_name="gpt2onnx")
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    return model


def initializer_slots(model: onnx.ModelProto) -> list[str]:
    """Names the graph reads that are neither graph inputs, node outputs nor already-stored constants."""
    nodes = list(all_nodes(model.graph))
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    known |= {o for n in nodes for o in n.output}
    slots: list[str] = []
    for node in nodes:
        for name in node.input:
            if name and name not in known and name not in slots:
                slots.append(name)
    return slots


def _weight_arrays(model: onnx.ModelProto, weights: dict[str, np.ndarray], config: ModelConfig):
    """(name, array) for every slot of the graph, quantizing on the way; one weight at a time."""
    matmuls = {n.input[1]: n for n in model.graph.node if n.op_type in ("MatMulNBits", "DynamicQuantizeMatMul")}
    quantized: dict[str, quantize.QuantizedWeight | quantize.PerColumnWeight] = {}
    for name in initializer_slots(model):
        source = c.quantized_source(name)
        if source is None:
            yield name, np.ascontiguousarray(weights[name], dtype=np.float32)
            continue
        if source not in quantized:
            node = matmuls[c.quantized_names(source)[0]]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if source == "lm_head.weight":  # [vocab, n_embd] is already [out, in]; tied: a copy of wte
                w = weights.get(source, weights["transformer.wte.weight"])
            else:
                w = weights[source].T  # Conv1D stores [in, out]
            if node.op_type == "DynamicQuantizeMatMul":  # reads [in, out]
                quantized = {source: quantize.quantize_per_column(np.asarray(w).T)}
            else:
                symmetric = len(node.input) < 4 or not node.input[3]
                quantized = {source: quantize.quantize(w, bits=attrs["bits"], block_size=attrs["block_size"],
                                                       symmetric=symmetric)}
        codes, scales, zero_points = c.quantized_names(source)
        qw = quantized[source]
        yield name, {codes: qw.codes, scales: qw.scales, zero_points: qw.zero_points}[name]


def save_model(model: onnx.ModelProto, weights: dict[str, np.ndarray], config: ModelConfig,
               directory: Path) -> list[str]:
    """Attach the weights and write model.onnx (and model.onnx.data when large). Returns the file names.

    Large weights are streamed straight into the data file, so no second in-memory copy is made.
    """
    arrays = list(_weight_arrays(model, weights, config))
    external = sum(a.nbytes for _, a in arrays) > EXTERNAL_DATA_THRESHOLD
    files = [c.MODEL_FILE]
    tensors = []
    if external:
        files.append(c.MODEL_DATA_FILE)
        with open(Path(directory) / c.MODEL_DATA_FILE, "wb") as data:
            for name, array in arrays:
                data.write(b"\0" * (-data.tell() % _ALIGN))
                offset = data.tell()
                data.write(memoryview(np.ascontiguousarray(array)).cast("B"))
                t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                     dims=array.shape)
                t.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", c.MODEL_DATA_FILE), ("offset", str(offset)),
                                   ("length", str(array.nbytes))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                tensors.append(t)
    else:
        tensors = [onnx.numpy_helper.from_array(a, n) for n, a in arrays]
    model.graph.initializer.extend(tensors)
    with open(Path(directory) / c.MODEL_FILE, "wb") as f:
        f.write(model.SerializeToString())
    return files
