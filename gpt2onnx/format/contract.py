"""The ONNX contract: every name, dimension and file the export writes and the runtime reads.

Both sides import this module and nothing else spells these strings. Changing anything here that an
existing export depends on means bumping FORMAT_VERSION.

The graph (one graph for prefill and decode):

  inputs
    input_ids                    int64   [batch_size, sequence_length]
    attention_mask               int64   [batch_size, total_sequence_length]   1 = attend, 0 = padding
    position_ids                 int64   [batch_size, sequence_length]
    past_key_values.{i}.key      float32 [batch_size, n_head, past_sequence_length, head_dim]
    past_key_values.{i}.value    float32 [batch_size, n_head, past_sequence_length, head_dim]
    logits_to_keep               int64   scalar: logits for the last N positions only, 0 = every position
  outputs
    logits                       float32 [batch_size, sequence_length or N, vocab_size]
    present.{i}.key              float32 [batch_size, n_head, total_sequence_length, head_dim]
    present.{i}.value            float32 [batch_size, n_head, total_sequence_length, head_dim]

total_sequence_length = past_sequence_length + sequence_length. The first step passes a past of length 0.
Generation passes logits_to_keep = 1 (the head's work for the other positions is skipped); checks pass 0.

The past and present of a layer may be one shared buffer [batch_size, n_head, capacity, head_dim]: the
runtime binds the same memory as both, attention reads the first total_sequence_length positions and the
step writes its new positions after the past ones, in place. Given separate tensors the graph returns the
present concatenated, as shaped above. A step of several new positions after a non-empty past needs
batch_size 1 (ONNX Runtime's GroupQueryAttention); prefill (empty past) and one-token steps take any batch.

The cache may be stored as int8 (`gpt2onnx export --kv-cache int8`; manifest `kv_cache`): past and present
are then int8 with the same shapes, and each layer's float32 scales `transformer.h.{i}.attn.k_scale` and
`.v_scale` [1, n_head, 1, head_dim] (per channel, calibrated at export; initializers, see kv_scale_names)
give the values: float = int8 * scale. The attention dequantizes as it reads, so a step reads a quarter of
the bytes of a float32 cache. A prefill (empty past) attends in float32 and stores its keys and values as
round(value / scale) (half to even), clipped to int8: the int8 attention's own rounding.

Every graph names, per layer, the attention's input projection `transformer.h.{i}.attn.qkv` (float32
[batch_size, sequence_length, 3 * n_embd]: query | key | value, c_attn's bias included). It is not a graph
output and nothing extra is computed for it; analysis tools expose it to compute real attention maps from
any export (fused or quantized) together with the present keys.

Weights are ONNX initializers named exactly as in the Hugging Face state dict
(`transformer.h.0.attn.c_attn.weight`, ...); the tied `lm_head.weight` is not stored, the graph reuses
`transformer.wte.weight`.

Quantized exports replace each block matmul weight and the head by the inputs of an ONNX Runtime quantized
matmul, named after the Hugging Face weight (see quantized_names). int8 (scheme per-column): DynamicQuantizeMatMul
with `NAME.qweight` (int8 [in, out], Conv1D's own layout; the head's is wte transposed) and `NAME.scales`
(float32 [out]), symmetric, c_attn's bias as the op's bias input. int4 (scheme blocks; also int8 exports made
before per-column): MatMulNBits, block-wise along the input dimension, with `NAME.qweight` (uint8
[out, in / block_size, block_size * bits / 8], the codes, transposed to [out, in] first: Conv1D stores
[in, out]), `NAME.scales` (float32 [out, in / block_size]) and, for asymmetric schemes, `NAME.zero_points`
(uint8, packed like the codes). The tied head is quantized as
its own copy, `lm_head.weight.*`; the embedding `transformer.wte.weight` stays float32 for its Gather. Biases,
layer norms and `transformer.wpe.weight` stay float32. The manifest's `quantization` entry gives the scheme.
"""

from __future__ import annotations

FORMAT_NAME = "gpt2onnx"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
OPSET = 17

# Files of an exported model directory.
MODEL_FILE = "model.onnx"
MODEL_DATA_FILE = "model.onnx.data"  # external weights, only when the model is over 2 GB
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"  # what the runtime reads (tokenizer.py)
TOKENIZER_EXTRA_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

# Graph inputs and outputs.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS_TO_KEEP = "logits_to_keep"
LOGITS = "logits"

# Symbolic dimensions.
DIM_BATCH = "batch_size"
DIM_SEQUENCE = "sequence_length"
DIM_PAST = "past_sequence_length"
DIM_TOTAL = "total_sequence_length"

ID_DTYPE = "int64"
FLOAT_DTYPE = "float32"

# Manifest keys.
M_FORMAT = "format"
M_FORMAT_VERSION = "format_version"
M_PRECISION = "precision"  # a name of gpt2onnx/format/precisions.py's table
M_OPSET = "opset"
M_SOURCE = "source"
M_VERSIONS = "versions"
M_FILES = "files"
M_PARITY = "parity"
M_CREATED = "created"
# quantized exports only: {"scheme": SCHEME_PER_COLUMN, "bits", "symmetric", "max_code"} or
# {"scheme": SCHEME_BLOCKS, "bits", "block_size", "symmetric", "accuracy_level"} (no "scheme": blocks, older exports)
M_QUANTIZATION = "quantization"
SCHEME_PER_COLUMN = "per-column"  # DynamicQuantizeMatMul (gpt2onnx/format/per_column.py)
SCHEME_BLOCKS = "blocks"  # MatMulNBits (gpt2onnx/format/matmulnbits.py)
M_KV_CACHE = "kv_cache"  # {"dtype": "float32" or "int8", ...how int8 scales were calibrated}

# How the KV cache can be stored (the graph's past/present dtype).
KV_CACHE_DTYPES = ("float32", "int8")

# Suffixes of a quantized weight's tensors (appended to its Hugging Face name).
Q_WEIGHT, Q_SCALES, Q_ZERO_POINTS = ".qweight", ".scales", ".zero_points"


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


def attention_qkv(layer: int) -> str:
    """Internal tensor: layer's packed q | k | v [batch, sequence_length, 3 * n_embd] (see the module docstring)."""
    return f"transformer.h.{layer}.attn.qkv"


def quantized_names(weight: str) -> tuple[str, str, str]:
    """(codes, scales, zero points) initializer names of a quantized Hugging Face weight."""
    return weight + Q_WEIGHT, weight + Q_SCALES, weight + Q_ZERO_POINTS


def quantized_source(initializer: str) -> str | None:
    """The Hugging Face weight a quantized initializer belongs to, or None if it is not one."""
    for suffix in (Q_WEIGHT, Q_SCALES, Q_ZERO_POINTS):
        if initializer.endswith(suffix):
            return initializer[: -len(suffix)]
    return None


def kv_scale_names(layer: int) -> tuple[str, str]:
    """(key scales, value scales) of an int8 cache: float32 [1, n_head, 1, head_dim] initializers."""
    return f"transformer.h.{layer}.attn.k_scale", f"transformer.h.{layer}.attn.v_scale"


def past_names(n_layer: int) -> list[str]:
    """Cache inputs in graph order: key then value, layer by layer."""
    return [name for i in range(n_layer) for name in (past_key(i), past_value(i))]


def present_names(n_layer: int) -> list[str]:
    """Cache outputs in graph order, matching past_names."""
    return [name for i in range(n_layer) for name in (present_key(i), present_value(i))]


def input_names(n_layer: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layer), LOGITS_TO_KEEP]


def output_names(n_layer: int) -> list[str]:
    return [LOGITS, *present_names(n_layer)]
