"""Build the GPT-2 ONNX graph directly from the weights (no tracing of transformers code).

Every block is a small function that emits ONNX nodes, so a fused operator or a quantized matmul can
replace a block without touching the rest. Names of inputs and outputs come from gpt2onnx.contract.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from gpt2onnx import contract as c
from gpt2onnx.config import TANH_GELUS, ModelConfig

# A model whose weights pass this size is saved with external data (protobuf's limit is 2 GB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_ALIGN = 4096
_MASK_VALUE = float(np.finfo(np.float32).min)  # what transformers puts in masked attention scores


def weight_names(config: ModelConfig) -> list[str]:
    """The Hugging Face state-dict names of the weights the graph stores, in graph order."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        names += [p + s for s in (
            "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
            "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
            "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
    names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    e, f, v = config.n_embd, config.inner_dim, config.vocab_size
    shapes = {"transformer.wte.weight": (v, e), "transformer.wpe.weight": (config.n_positions, e),
              "transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,), "lm_head.weight": (v, e)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (e,), p + "ln_1.bias": (e,), p + "ln_2.weight": (e,), p + "ln_2.bias": (e,),
            p + "attn.c_attn.weight": (e, 3 * e), p + "attn.c_attn.bias": (3 * e,),
            p + "attn.c_proj.weight": (e, e), p + "attn.c_proj.bias": (e,),
            p + "mlp.c_fc.weight": (e, f), p + "mlp.c_fc.bias": (f,),
            p + "mlp.c_proj.weight": (f, e), p + "mlp.c_proj.bias": (e,)})
    return shapes


class _Graph:
    """Collects nodes and initializers; `op` emits one node and returns its output name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self._count = 0

    def op(self, op_type: str, *inputs: str, name: str | None = None, outputs: int = 1, **attrs):
        self._count += 1
        base = name or f"{op_type.lower()}_{self._count}"
        outs = [base] if outputs == 1 else [f"{base}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"n{self._count}_{op_type}", **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, name: str, value, dtype=np.int64) -> str:
        self.constants.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


def _layer_norm(g: _Graph, x: str, prefix: str, eps: float) -> str:
    return g.op("LayerNormalization", x, prefix + ".weight", prefix + ".bias", axis=-1, epsilon=eps)


def _linear(g: _Graph, x: str, prefix: str) -> str:
    """GPT-2's Conv1D: x @ W + b with W stored [in, out]."""
    return g.op("Add", g.op("MatMul", x, prefix + ".weight"), prefix + ".bias")


def _activation(g: _Graph, x: str, kind: str) -> str:
    if kind == "relu":
        return g.op("Relu", x)
    if kind in TANH_GELUS:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = g.op("Mul", g.op("Mul", x, x), x)
        inner = g.op("Mul", g.op("Add", x, g.op("Mul", cube, "c_gelu_a")), "c_gelu_b")
        return g.op("Mul", g.op("Mul", x, "c_half"), g.op("Add", g.op("Tanh", inner), "c_one"))
    # exact GELU: 0.5 x (1 + erf(x / sqrt(2)))
    return g.op("Mul", g.op("Mul", x, "c_half"), g.op("Add", g.op("Erf", g.op("Mul", x, "c_inv_sqrt2")), "c_one"))


def _attention(g: _Graph, x: str, layer: int, config: ModelConfig, allowed: str) -> str:
    """Causal self-attention over the past plus the new positions; emits present.{layer}.key/value."""
    p = f"transformer.h.{layer}.attn"
    qkv = _linear(g, x, p + ".c_attn")
    q, k, v = g.op("Split", qkv, "c_split3", axis=2, outputs=3)

    def heads(t: str, name: str | None = None) -> str:  # [B, S, E] -> [B, H, S, D]
        return g.op("Transpose", g.op("Reshape", t, "c_heads_shape"), perm=[0, 2, 1, 3], name=name)

    key = g.op("Concat", c.past_key(layer), heads(k), axis=2, name=c.present_key(layer))
    value = g.op("Concat", c.past_value(layer), heads(v), axis=2, name=c.present_value(layer))
    scores = g.op("MatMul", heads(q, c.attention_query(layer)), g.op("Transpose", key, perm=[0, 1, 3, 2]))
    scale = 1.0
    if config.scale_attn_weights:
        scale /= math.sqrt(config.head_dim)
    if config.scale_attn_by_inverse_layer_idx:
        scale /= layer + 1
    if scale != 1.0:
        scores = g.op("Mul", scores, g.const(f"c_scale_{layer}", scale, np.float32))
    scores = g.op("Where", allowed, scores, "c_mask_value")
    probs = g.op("Softmax", scores, axis=-1)
    context = g.op("Transpose", g.op("MatMul", probs, value), perm=[0, 2, 1, 3])  # [B, S, H, D]
    context = g.op("Reshape", context, "c_merge_shape")
    return _linear(g, context, p + ".c_proj")


def _attention_allowed(g: _Graph) -> str:
    """Bool [B, 1, S, T]: query i (at absolute position past + i) may see key j when j <= past + i and
    the attention mask keeps j."""
    total = g.op("Gather", g.op("Shape", c.ATTENTION_MASK), "c_one_i", axis=0)
    seq = g.op("Gather", g.op("Shape", c.INPUT_IDS), "c_one_i", axis=0)
    past = g.op("Sub", total, seq)
    query_pos = g.op("Unsqueeze", g.op("Range", past, total, "c_one_i"), "c_axis1")  # [S, 1]
    key_pos = g.op("Unsqueeze", g.op("Range", "c_zero_i", total, "c_one_i"), "c_axis0")  # [1, T]
    causal = g.op("LessOrEqual", key_pos, query_pos)  # [S, T]
    keep = g.op("Unsqueeze", g.op("Cast", c.ATTENTION_MASK, to=TensorProto.BOOL), "c_axes12")  # [B,1,1,T]
    return g.op("And", causal, keep, name="attention_allowed")


def build_graph(config: ModelConfig) -> onnx.ModelProto:
    """The graph with weights as named (empty) initializer slots; `save_model` fills in the data."""
    g = _Graph()
    e, h, d = config.n_embd, config.n_head, config.head_dim
    g.const("c_split3", [e, e, e])
    g.const("c_heads_shape", [0, 0, h, d])
    g.const("c_merge_shape", [0, 0, e])
    g.const("c_flat_shape", [-1, e])
    g.const("c_vocab", [config.vocab_size])
    g.const("c_one_i", 1)
    g.const("c_zero_i", 0)
    g.const("c_axis0", [0])
    g.const("c_axis1", [1])
    g.const("c_axes12", [1, 2])
    g.const("c_mask_value", _MASK_VALUE, np.float32)
    g.const("c_half", 0.5, np.float32)
    g.const("c_one", 1.0, np.float32)
    g.const("c_gelu_a", 0.044715, np.float32)
    g.const("c_gelu_b", math.sqrt(2.0 / math.pi), np.float32)
    g.const("c_inv_sqrt2", 1.0 / math.sqrt(2.0), np.float32)

    allowed = _attention_allowed(g)
    hidden = g.op("Add", g.op("Gather", "transformer.wte.weight", c.INPUT_IDS, axis=0),
                  g.op("Gather", "transformer.wpe.weight", c.POSITION_IDS, axis=0))
    eps = config.layer_norm_epsilon
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        hidden = g.op("Add", hidden, _attention(g, _layer_norm(g, hidden, p + ".ln_1", eps), i, config, allowed))
        mlp = _linear(g, _layer_norm(g, hidden, p + ".ln_2", eps), p + ".mlp.c_fc")
        mlp = _linear(g, _activation(g, mlp, config.activation_function), p + ".mlp.c_proj")
        hidden = g.op("Add", hidden, mlp)
    hidden = _layer_norm(g, hidden, "transformer.ln_f", eps)
    # lm_head: hidden @ wte^T, reading the tied embedding (stored once) through Gemm's transB.
    head = "transformer.wte.weight" if config.tie_word_embeddings else "lm_head.weight"
    flat = g.op("Gemm", g.op("Reshape", hidden, "c_flat_shape"), head, transB=1)
    out_shape = g.op("Concat", g.op("Shape", c.INPUT_IDS), "c_vocab", axis=0)
    g.op("Reshape", flat, out_shape, name=c.LOGITS)

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    cache = [c.DIM_BATCH, h, c.DIM_PAST, d]
    present = [c.DIM_BATCH, h, c.DIM_TOTAL, d]
    inputs = [helper.make_tensor_value_info(c.INPUT_IDS, i64, [c.DIM_BATCH, c.DIM_SEQUENCE]),
              helper.make_tensor_value_info(c.ATTENTION_MASK, i64, [c.DIM_BATCH, c.DIM_TOTAL]),
              helper.make_tensor_value_info(c.POSITION_IDS, i64, [c.DIM_BATCH, c.DIM_SEQUENCE])]
    inputs += [helper.make_tensor_value_info(n, f32, cache) for n in c.past_names(config.n_layer)]
    outputs = [helper.make_tensor_value_info(c.LOGITS, f32, [c.DIM_BATCH, c.DIM_SEQUENCE, config.vocab_size])]
    outputs += [helper.make_tensor_value_info(n, f32, present) for n in c.present_names(config.n_layer)]
    graph = helper.make_graph(g.nodes, "gpt2", inputs, outputs, initializer=g.constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", c.OPSET)],
                              producer_name="gpt2onnx")
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    return model


def save_model(model: onnx.ModelProto, weights: dict[str, np.ndarray], config: ModelConfig,
               directory: Path) -> list[str]:
    """Attach the weights and write model.onnx (and model.onnx.data when large). Returns the file names.

    Large weights are streamed straight into the data file, so no second in-memory copy is made.
    """
    names = weight_names(config)
    arrays = [np.ascontiguousarray(weights[n], dtype=np.float32) for n in names]
    external = sum(a.nbytes for a in arrays) > EXTERNAL_DATA_THRESHOLD
    files = [c.MODEL_FILE]
    tensors = []
    if external:
        files.append(c.MODEL_DATA_FILE)
        with open(Path(directory) / c.MODEL_DATA_FILE, "wb") as data:
            for name, array in zip(names, arrays):
                data.write(b"\0" * (-data.tell() % _ALIGN))
                offset = data.tell()
                data.write(memoryview(array).cast("B"))
                t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
                t.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", c.MODEL_DATA_FILE), ("offset", str(offset)),
                                   ("length", str(array.nbytes))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                tensors.append(t)
    else:
        tensors = [onnx.numpy_helper.from_array(a, n) for n, a in zip(names, arrays)]
    model.graph.initializer.extend(tensors)
    with open(Path(directory) / c.MODEL_FILE, "wb") as f:
        f.write(model.SerializeToString())
    return files
