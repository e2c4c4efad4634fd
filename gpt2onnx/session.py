"""One ONNX Runtime session over an exported graph: feeds in, logits and the grown cache out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import contract as c
from .config import ModelConfig
from .errors import InvalidArgumentError, ModelLoadError
from .kv_cache import KVCache


@dataclass(frozen=True)
class SessionOptions:
    """How ONNX Runtime runs the graph."""

    threads: int = 0  # intra-op threads; 0 lets ONNX Runtime use one per physical core
    optimization: str = "all"  # "disable", "basic", "extended" or "all"


_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OnnxSession:
    """Runs one step of the graph. Safe to use from many threads at once (ONNX Runtime's `run` is)."""

    def __init__(self, path: Path, config: ModelConfig, options: SessionOptions = SessionOptions()):
        if not isinstance(options.threads, int) or options.threads < 0:
            raise InvalidArgumentError(f"threads must be an integer >= 0 (0 = one per physical core), got {options.threads!r}")
        if options.optimization not in _LEVELS:
            raise InvalidArgumentError(f"optimization must be one of {', '.join(_LEVELS)}, got {options.optimization!r}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = _LEVELS[options.optimization]
        so.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise ModelLoadError(f"ONNX Runtime cannot load {path}: {error}",
                                 hint="export the model again; the file may be damaged") from error
        self.config = config
        self._past_names = c.past_names(config.n_layer)
        self._output_names = c.output_names(config.n_layer)
        have = {i.name for i in self._session.get_inputs()}
        want = set(c.input_names(config.n_layer))
        if have != want or {o.name for o in self._session.get_outputs()} != set(self._output_names):
            raise ModelLoadError(f"{path} does not have the inputs and outputs of format {c.FORMAT_VERSION} "
                                 f"(missing inputs: {sorted(want - have)}, unexpected: {sorted(have - want)})")

    def empty_cache(self, batch: int) -> KVCache:
        """The cache before the first step: every past tensor with length 0."""
        return KVCache.empty(self.config, batch)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Logits [batch, new positions, vocab] and the cache extended by the new positions."""
        feeds = {c.INPUT_IDS: input_ids, c.ATTENTION_MASK: attention_mask, c.POSITION_IDS: position_ids}
        feeds.update(zip(self._past_names, cache.tensors))
        logits, *present = self._session.run(self._output_names, feeds)
        return logits, KVCache(present)
