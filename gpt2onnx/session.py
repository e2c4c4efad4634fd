"""One ONNX Runtime session over an exported graph: feeds in, logits and the grown cache out.

Steps run through an IO binding: each cache buffer is bound as both the past input and the present output
of its layer (the graph's attention writes the new positions in place), and the logits land in an array
allocated for them, so the only per-step work outside ONNX Runtime is binding the three small id arrays.

A tool that needs to see each step (the parity checker records the logits the sampler saw, the benchmark
times ONNX Runtime's share) observes the session: `with session.observe(callback):` calls
`callback(StepRecord)` after every run in the block.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
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


def ort_options(*, threads: int = 0, optimization: str = "all") -> ort.SessionOptions:
    """ONNX Runtime's options for one of our graphs (every session gpt2onnx opens, and the benchmark's).

    threads: intra-op threads, 0 = one per physical core; the graph is a chain, so one inter-op thread.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise InvalidArgumentError(f"threads must be an integer >= 0 (0 = one per physical core), got {threads!r}")
    if optimization not in _LEVELS:
        raise InvalidArgumentError(f"optimization must be one of {', '.join(_LEVELS)}, got {optimization!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = _LEVELS[optimization]
    so.log_severity_level = 3  # errors only: its warnings about unused initializers are not the user's concern
    return so


@dataclass(frozen=True)
class StepRecord:
    """One run of the graph, as an observer sees it. The arrays are the step's own, not copies: the logits
    of a run with reuse_logits=True are overwritten by the next step, so copy what you keep."""

    input_ids: np.ndarray  # [batch, new positions]
    past_length: int  # positions in the cache before the step
    logits: np.ndarray  # what run returned: [batch, new positions or 1, vocab]
    seconds: float  # time inside ONNX Runtime's run


# logits_for -> the graph's logits_to_keep input (0 = every position)
_LOGITS_KEPT = {"all": np.array(0, np.int64), "last": np.array(1, np.int64)}


class OnnxSession:
    """Runs one step of the graph. Safe to use from many threads at once, each with its own cache."""

    def __init__(self, path: Path, config: ModelConfig, options: SessionOptions = SessionOptions()):
        so = ort_options(threads=options.threads, optimization=options.optimization)
        try:
            self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise ModelLoadError(f"ONNX Runtime cannot load {path}: {error}",
                                 hint="export the model again; the file may be damaged") from error
        self.config = config
        self._observers: tuple[Callable[[StepRecord], None], ...] = ()
        self._observers_lock = threading.Lock()
        self._past_names = c.past_names(config.n_layer)
        self._output_names = c.output_names(config.n_layer)
        self._present_names = c.present_names(config.n_layer)
        types = {i.name: i.type for i in self._session.get_inputs()}
        # the cache's dtype: float32, or int8 for exports with an int8 cache (see the contract)
        self.cache_dtype = np.int8 if types.get(c.past_key(0)) == "tensor(int8)" else np.float32
        have = set(types)
        want = set(c.input_names(config.n_layer))
        if have != want or {o.name for o in self._session.get_outputs()} != set(self._output_names):
            raise ModelLoadError(f"{path} does not have the inputs and outputs of format {c.FORMAT_VERSION} "
                                 f"(missing inputs: {sorted(want - have)}, unexpected: {sorted(have - want)})")

    @contextlib.contextmanager
    def observe(self, callback: Callable[[StepRecord], None]) -> Iterator[None]:
        """Call `callback(record)` after every run of this session until the block ends (the runs of every
        thread using the session: observe a session of your own to see only yours)."""
        with self._observers_lock:
            self._observers += (callback,)
        try:
            yield
        finally:
            with self._observers_lock:
                i = self._observers.index(callback)
                self._observers = self._observers[:i] + self._observers[i + 1:]

    def empty_cache(self, batch: int, *, capacity: int = 0) -> KVCache:
        """The cache before the first step: length 0, with room for `capacity` positions (it grows as needed)."""
        return KVCache.empty(self.config, batch, capacity, dtype=self.cache_dtype)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            cache: KVCache, *, logits_for: str = "all", reuse_logits: bool = False) -> tuple[np.ndarray, KVCache]:
        """Logits and the cache extended by the new positions: `cache` itself, updated in place.

        logits_for: "all" gives [batch, new positions, vocab]; "last" only the last position's
        [batch, 1, vocab], and skips the head's work for the others (what generation needs).
        reuse_logits: write the logits into a buffer kept with `cache` and bound once, instead of a new
        array every run (what the generation loop does: it is done with a step's logits before the next
        step). The next run with this cache overwrites them; copy what must be kept.
        """
        if logits_for not in _LOGITS_KEPT:
            raise InvalidArgumentError(f"logits_for must be 'all' or 'last', got {logits_for!r}")
        batch, new = input_ids.shape
        total = attention_mask.shape[1]
        cache.reserve(total, self.config.n_positions)
        binding = self._bind_cache(cache)
        binding.bind_cpu_input(c.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(c.ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input(c.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input(c.LOGITS_TO_KEEP, _LOGITS_KEPT[logits_for])
        shape = (batch, new if logits_for == "all" else 1, self.config.vocab_size)
        if reuse_logits and cache.logits is not None and cache.logits.shape == shape:
            logits = cache.logits  # bound to the output already
        else:
            logits = np.empty(shape, np.float32)
            binding.bind_ortvalue_output(c.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
            cache.logits = logits if reuse_logits else None
        observers = self._observers
        start = time.perf_counter() if observers else 0.0
        try:
            self._session.run_with_iobinding(binding)
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise InvalidArgumentError(f"ONNX Runtime rejected the step: {error}",
                                       hint="check the shapes: input_ids and position_ids [batch, new], "
                                            "attention_mask [batch, past + new]") from error
        cache.length = total
        if observers:
            record = StepRecord(input_ids, total - new, logits, time.perf_counter() - start)
            for observer in observers:
                observer(record)
        return logits, cache

    def _bind_cache(self, cache: KVCache) -> ort.IOBinding:
        """The cache's binding to this session: each buffer is its layer's past input and present output."""
        if cache.binding is not None and cache.binding[0] is self:
            return cache.binding[1]
        binding = self._session.io_binding()
        values = [ort.OrtValue.ortvalue_from_numpy(b) for b in cache.buffers]  # views of the buffers
        for past, present, value in zip(self._past_names, self._present_names, values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        cache.binding = (self, binding, values)
        cache.logits = None  # a new binding has no logits output bound yet
        return binding
