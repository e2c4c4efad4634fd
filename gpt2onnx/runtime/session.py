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

from ..errors import GenerationError, InvalidArgumentError, ModelLoadError
from ..format import contract as c
from ..format.config import ModelConfig
from . import user_cache
from .kv_cache import KVCache
from .limits import check_threads


@dataclass(frozen=True)
class SessionOptions:
    """How ONNX Runtime runs the graph."""

    threads: int = 0  # intra-op threads; 0 lets ONNX Runtime use one per physical core (limits.max_threads())
    optimization: str = "all"  # "disable", "basic", "extended" or "all"

    def __post_init__(self):
        object.__setattr__(self, "threads", check_threads(self.threads))
        if not isinstance(self.optimization, str) or self.optimization not in _LEVELS:
            raise InvalidArgumentError(f"optimization must be one of {', '.join(_LEVELS)}, got {self.optimization!r}",
                                       hint="'all' is the fastest; the others are for debugging a graph")


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
    checked = SessionOptions(threads=threads, optimization=optimization)  # InvalidArgumentError with a hint
    so = ort.SessionOptions()
    so.intra_op_num_threads = checked.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = _LEVELS[checked.optimization]
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


def _kept_logits(logits_for) -> np.ndarray:
    """The graph's logits_to_keep for `logits_for` ("all", "last" or a number of last positions)."""
    if isinstance(logits_for, str) and logits_for in _LOGITS_KEPT:
        return _LOGITS_KEPT[logits_for]
    if isinstance(logits_for, int) and not isinstance(logits_for, bool) and logits_for >= 1:
        return np.array(logits_for, np.int64)
    raise InvalidArgumentError(f"logits_for must be 'all', 'last' or a number of positions >= 1, got {logits_for!r}",
                               hint="'last' is what generation needs; 'all' gives every position's logits")


class OnnxSession:
    """Runs one step of the graph. Safe to use from many threads at once, each with its own cache."""

    def __init__(self, path: Path, config: ModelConfig, options: SessionOptions = SessionOptions(), *,
                 model_hashes: dict[str, str] | None = None):
        """model_hashes: the verified sha256 of the model's files (model.onnx and its external data, by name):
        then ONNX Runtime's optimized graph is kept in the user cache and the next load opens that instead of
        optimizing again (gpt2onnx/runtime/user_cache.py)."""
        self._open(path, config, options, model_hashes=model_hashes,
                   hint="export the model again; the file may be damaged")
        self._output_names = c.output_names(config.n_layer)
        types = {i.name: i.type for i in self._session.get_inputs()}
        # the cache's dtype: float32, or int8 for exports with an int8 cache (see the contract)
        self.cache_dtype = np.int8 if types.get(c.past_key(0)) == "tensor(int8)" else np.float32
        have = set(types)
        want = set(c.input_names(config.n_layer))
        if have != want or {o.name for o in self._session.get_outputs()} != set(self._output_names):
            raise ModelLoadError(f"{path} does not have the inputs and outputs of format {c.FORMAT_VERSION} "
                                 f"(missing inputs: {sorted(want - have)}, unexpected: {sorted(have - want)})")

    def _open(self, path: Path, config: ModelConfig, options: SessionOptions, *,
              model_hashes: dict[str, str] | None = None, hint: str) -> None:
        """Open the graph (a ModelLoadError with `hint` when ONNX Runtime cannot) and set what every run reads."""
        so = ort_options(threads=options.threads, optimization=options.optimization)
        try:
            if model_hashes and options.optimization != "disable":
                self._session = user_cache.open_session(
                    path, lambda: ort_options(threads=options.threads, optimization=options.optimization),
                    options.optimization, model_hashes)
            else:
                self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise ModelLoadError(f"ONNX Runtime cannot load {path}: {error}", hint=hint) from error
        self.config = config
        self.path = Path(path)
        self._observers: tuple[Callable[[StepRecord], None], ...] = ()
        self._observers_lock = threading.Lock()
        self._past_names = c.past_names(config.n_layer)
        self._present_names = c.present_names(config.n_layer)

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
            cache: KVCache, *, logits_for: str | int = "all", reuse_logits: bool = False
            ) -> tuple[np.ndarray, KVCache]:
        """Logits and the cache extended by the new positions: `cache` itself, updated in place.

        logits_for: "all" gives [batch, new positions, vocab]; "last" only the last position's
        [batch, 1, vocab], and skips the head's work for the others (what generation needs); an int k from 1 to
        the new positions keeps the last k, [batch, k, vocab] (what checking k - 1 draft tokens needs).
        reuse_logits: write the logits into a buffer kept with `cache` and bound once, instead of a new
        array every run (what the generation loop does: it is done with a step's logits before the next
        step). The next run with this cache overwrites them; copy what must be kept.
        """
        kept = _kept_logits(logits_for)
        self._check_shapes(input_ids, attention_mask, position_ids, cache)
        batch, new = input_ids.shape
        if isinstance(logits_for, int) and logits_for > new:
            raise InvalidArgumentError(f"logits_for={logits_for} asks for more positions than the {new} new ones",
                                       hint="keep at most as many positions as the step feeds")
        total = attention_mask.shape[1]
        cache.reserve(total, self.config.n_positions)
        binding = self._bind_cache(cache)
        binding.bind_cpu_input(c.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(c.ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input(c.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input(c.LOGITS_TO_KEEP, kept)
        shape = (batch, int(kept) or new, self.config.vocab_size)
        if reuse_logits and cache.logits is not None and cache.logits.shape == shape:
            logits = cache.logits  # bound to the output already
        else:
            logits = np.empty(shape, np.float32)
            binding.bind_ortvalue_output(c.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
            cache.logits = logits if reuse_logits else None
        self._run_bound(binding, input_ids, total - new, logits)
        cache.length = total
        return logits, cache

    def _run_bound(self, binding: ort.IOBinding, input_ids: np.ndarray, past_length: int, logits: np.ndarray) -> None:
        """Run a step whose inputs and outputs are bound, then show it to the observers (logits: what run returns)."""
        observers = self._observers
        start = time.perf_counter() if observers else 0.0
        try:
            self._session.run_with_iobinding(binding)
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            # the inputs passed the contract's checks above, so it is the graph that failed
            raise GenerationError(f"ONNX Runtime failed to run a step of {self.path.name}: {error}",
                                  hint="the model directory may be damaged: run `gpt2onnx verify` on it, or export "
                                       "it again") from error
        if observers:
            record = StepRecord(input_ids, past_length, logits, time.perf_counter() - start)
            for observer in observers:
                observer(record)

    def _check_shapes(self, input_ids, attention_mask, position_ids, cache: KVCache) -> None:
        """The contract's shapes and integer dtypes (2 us a step: no pass over the data but the prefill's ids)."""
        try:
            batch, new = shape = input_ids.shape
            ok = (position_ids.shape == shape and attention_mask.shape == (batch, cache.length + new) and new >= 1
                  and cache.batch == batch and input_ids.dtype.kind in "iu" and attention_mask.dtype.kind in "iu"
                  and position_ids.dtype.kind in "iu")
        except (AttributeError, ValueError, TypeError):  # not arrays, or not 2-D
            ok = False
        if not ok:
            shapes = ("input_ids and position_ids [batch, new], attention_mask [batch, past + new], past = the cache's "
                      "length")
            arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            got = ", ".join(f"{name} {getattr(a, 'shape', type(a).__name__)}" for name, a in arrays.items())
            raise InvalidArgumentError(f"a step needs integer arrays shaped {shapes}; got {got} and a cache of "
                                       f"{cache.batch} rows x {cache.length} positions",
                                       hint="start from session.empty_cache(batch) and pass the cache each run "
                                            "returned")
        total = attention_mask.shape[1]
        if total > self.config.n_positions:
            raise InvalidArgumentError(f"a step would reach {total} positions; this model has n_positions="
                                       f"{self.config.n_positions}", hint="shorten the sequence")
        # ids from outside (a prompt) are checked; a decode step's ids come from sampling
        outside = cache.length == 0 or new > 1
        if outside and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise InvalidArgumentError(f"input_ids must be token ids from 0 to {self.config.vocab_size - 1}, got "
                                       f"{int(input_ids.min())} .. {int(input_ids.max())}",
                                       hint="encode text with the model's tokenizer")

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
