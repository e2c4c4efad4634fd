"""Real attention maps: how much each prompt token attends to every earlier one, per layer and head,
computed by ONNX Runtime from the exported graph itself.

Every export names, per layer, the attention's packed input projection q | k | v
(`contract.attention_qkv(i)`) and outputs the keys (`present.{i}.key`). We expose the projections as extra
outputs of an in-memory copy of the graph (the files on disk are not touched), run the prompt once, split
off the query heads and take softmax(q·kᵀ · scale) with the causal mask in numpy. This works for any export
that keeps the contract's tensor names, fused or quantized.

    maps = attention_maps("out/random-gpt2", "The cat sat on the mat")
    maps.probs[layer, head]   # [tokens, tokens]; row i is query token i, its entries sum to 1
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, ModelLoadError
from ..format import contract as c
from ..format.config import ModelConfig
from ..format.gpt2 import attention_scale
from ..runtime.loading import read_config
from ..runtime.manifest import read_manifest
from ..runtime.session import ort_options
from ..text.tokenizer import Tokenizer
from .inspection import require_onnx

# ONNX Runtime reads external weights (model.onnx.data) from this folder when the graph comes from memory.
_EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


@dataclass(frozen=True)
class AttentionMaps:
    """Attention probabilities of one prompt."""

    token_ids: list[int]
    tokens: list[str]  # each token's text, for the axes of a plot
    probs: np.ndarray  # float32 [n_layer, n_head, tokens, tokens]; probs[l, h, i, j]: query i's weight on key j


def attention_probabilities(query: np.ndarray, key: np.ndarray, *, scale: float) -> np.ndarray:
    """softmax(query · keyᵀ · scale) under the causal mask.

    query: [batch, n_head, new, head_dim]; key: [batch, n_head, total, head_dim], the new positions last.
    Returns float32 [batch, n_head, new, total]; query i (at position total - new + i) sees keys up to its own.
    """
    new, total = query.shape[2], key.shape[2]
    scores = np.matmul(query.astype(np.float64), np.swapaxes(key.astype(np.float64), -1, -2)) * scale
    allowed = np.arange(total)[None, :] <= (total - new + np.arange(new))[:, None]
    scores = np.where(allowed, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def attention_maps(directory: str | Path, prompt: str, *, threads: int = 0, check_hashes: bool = True) -> AttentionMaps:
    """Attention probabilities of every layer and head for `prompt`, from one run of the exported graph.

    threads: ONNX Runtime intra-op threads; 0 uses one per physical core.
    check_hashes: verify every file's sha256 against the manifest first, as `gpt2onnx.load` does.
    """
    options = ort_options(threads=threads)  # checks `threads` before any work
    directory = Path(directory)
    read_manifest(directory, check_hashes=check_hashes)
    config = read_config(directory / c.CONFIG_FILE)[1]
    tokenizer = Tokenizer(directory / c.TOKENIZER_FILE)
    if not isinstance(prompt, str) or not prompt:
        raise InvalidArgumentError("the prompt for attention maps must be non-empty text",
                                   hint='pass a sentence, e.g. --prompt "The cat sat on the mat"')
    ids = tokenizer.encode(prompt)
    if len(ids) > config.n_positions:
        raise InvalidArgumentError(f"the prompt has {len(ids)} tokens; this model sees at most n_positions="
                                   f"{config.n_positions}", hint="shorten the prompt")

    session = _analysis_session(directory, config, options)
    batch = np.asarray([ids], dtype=np.int64)
    feeds = {c.INPUT_IDS: batch, c.ATTENTION_MASK: np.ones_like(batch),
             c.POSITION_IDS: np.arange(len(ids), dtype=np.int64)[None, :]}
    empty = np.zeros((1, config.n_head, 0, config.head_dim), np.float32)  # the first step's past: length 0
    feeds.update({name: empty for name in c.past_names(config.n_layer)})
    if c.LOGITS_TO_KEEP in {i.name for i in session.get_inputs()}:
        feeds[c.LOGITS_TO_KEEP] = np.array(1, np.int64)  # the logits are not needed: skip most of the head
    layers = range(config.n_layer)
    outputs = session.run([c.attention_qkv(i) for i in layers] + [c.present_key(i) for i in layers], feeds)
    queries = [_query_heads(qkv, config) for qkv in outputs[:config.n_layer]]
    keys = outputs[config.n_layer:]
    probs = np.stack([attention_probabilities(q, k, scale=attention_scale(config, i))[0]
                      for i, (q, k) in enumerate(zip(queries, keys))])
    tokens = [tokenizer.decode([i]) for i in ids]
    return AttentionMaps(token_ids=ids, tokens=tokens, probs=probs)


def _query_heads(qkv: np.ndarray, config: ModelConfig) -> np.ndarray:
    """[batch, seq, 3 * n_embd] q | k | v -> the query [batch, n_head, seq, head_dim]."""
    batch, seq, _ = qkv.shape
    return qkv[..., :config.n_embd].reshape(batch, seq, config.n_head, config.head_dim).transpose(0, 2, 1, 3)


def _analysis_session(directory: Path, config: ModelConfig, options):
    """An InferenceSession over the export with every layer's q | k | v projection added as a graph output."""
    import onnxruntime as ort

    onnx = require_onnx()
    proto = onnx.load(str(directory / c.MODEL_FILE), load_external_data=False)  # external weights stay on disk
    computed = {out for node in proto.graph.node for out in node.output}
    missing = [c.attention_qkv(i) for i in range(config.n_layer) if c.attention_qkv(i) not in computed]
    if missing:
        raise ModelLoadError(f"the graph does not compute {', '.join(missing[:3])}, the projections the "
                             f"contract names for attention maps",
                             hint="export the model again with this version of gpt2onnx")
    for i in range(config.n_layer):
        proto.graph.output.append(onnx.helper.make_tensor_value_info(c.attention_qkv(i), onnx.TensorProto.FLOAT, None))
    options.add_session_config_entry(_EXTERNAL_DATA_FOLDER, str(directory.resolve()))
    try:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped exceptions
        raise ModelLoadError(f"ONNX Runtime cannot load the analysis graph of {directory}: {error}",
                             hint="export the model again; the file may be damaged") from error
