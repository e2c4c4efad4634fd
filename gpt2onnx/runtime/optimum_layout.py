"""Model directories `gpt2onnx.load` reads: our exports, and GPT-2s that Optimum exported.

An Optimum export (`optimum-cli export onnx --model gpt2 --task text-generation-with-past DIR`, or the
`onnx/` folder many Hub repos ship) holds model.onnx [+ model.onnx_data], config.json,
generation_config.json and the tokenizer, and no manifest. Its graph has the inputs input_ids,
attention_mask, position_ids (exports of some versions lack it) and past_key_values.{i}.key|value, the
outputs logits and present.{i}.key|value: our contract's names, without logits_to_keep. The layout is told
from the files and the graph's input names (read from model.onnx without onnx); nothing in the directory is
executed. A Hub-style repository keeps the ONNX files in `onnx/` and the tokenizer (and often PyTorch
weights) at the top: files are taken from the ONNX folder first, then from the top.

Its cache is not ours: each step's present is a new tensor, the past concatenated with the new positions,
so it cannot be bound in place. `OptimumSession` has OnnxSession's interface and returns every step a new
KVCache wrapping the presents ONNX Runtime wrote into arrays allocated for them (no copy besides the graph's
own concatenation), so the generation loop, scoring and the engine (KVCache.gather, join, drop,
repeat_rows) run it unchanged. The head runs over every position (no logits_to_keep): a prefill costs more
than with our export.

Without a manifest there are no hashes: `check_hashes` has nothing to check, and nothing vouches for the
graph. Loading says so in one log line; `gpt2onnx verify DIR --reference MODEL` compares it with PyTorch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import ModelLoadError
from ..format import contract as c
from ..format.config import ModelConfig
from ..format.graph_facts import read_graph_inputs
from .kv_cache import KVCache
from .session import OnnxSession, SessionOptions, _kept_logits

GPT2ONNX, OPTIMUM = "gpt2onnx", "optimum"
ONNX_FOLDER = "onnx"  # where a Hub-style repository keeps its ONNX files
# The PyTorch weight files of a checkpoint directory, as glob patterns: safetensors (shards included), then
# pickle checkpoints. The export side reads them in this order (its sources module); here they only tell
# that a directory has them.
PYTORCH_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
_REEXPORT = ("export it again with `optimum-cli export onnx --model MODEL --task text-generation-with-past DIR`, "
             "or with `gpt2onnx export MODEL DIR`")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where a model directory keeps what the runtime reads, and which session runs its graph."""

    kind: str  # GPT2ONNX (an export with a manifest) or OPTIMUM
    directory: Path  # the directory given to load
    model_file: Path
    config_file: Path
    tokenizer_file: Path
    generation_config_file: Path  # read when it exists

    @classmethod
    def gpt2onnx(cls, directory: Path) -> Layout:
        directory = Path(directory)
        return cls(GPT2ONNX, directory, directory / c.MODEL_FILE, directory / c.CONFIG_FILE,
                   directory / c.TOKENIZER_FILE, directory / c.GENERATION_CONFIG_FILE)

    def open_session(self, config: ModelConfig, options: SessionOptions, *,
                     model_hashes: dict[str, str] | None = None) -> OnnxSession:
        """model_hashes: see OnnxSession (an Optimum graph is opened as it is, its optimized graph not kept)."""
        if self.kind == OPTIMUM:
            return OptimumSession(self.model_file, config, options)
        return OnnxSession(self.model_file, config, options, model_hashes=model_hashes)


def find_layout(directory: str | Path) -> Layout:
    """The layout of a model directory. A directory with a manifest, or with no model.onnx in it or in its
    onnx/ folder, is ours (read_manifest then says what is missing); a graph with our inputs but no manifest
    too (an unfinished export is refused). A graph with Optimum's inputs is Optimum's; any other graph is a
    ModelLoadError naming its inputs."""
    directory = Path(directory)
    ours = Layout.gpt2onnx(directory)
    if not directory.is_dir() or (directory / c.MANIFEST_FILE).exists():
        return ours
    folder = next((d for d in (directory, directory / ONNX_FOLDER) if (d / c.MODEL_FILE).is_file()), None)
    if folder is None:
        others = sorted(p.name for d in (directory, directory / ONNX_FOLDER) for p in d.glob("*.onnx"))
        if others:  # an older Optimum layout (decoder_model_merged.onnx, ...) or another exporter's
            raise ModelLoadError(f"{directory} holds {', '.join(others[:3])} but no {c.MODEL_FILE} and no "
                                 f"{c.MANIFEST_FILE}: not a layout gpt2onnx reads", hint=_REEXPORT)
        return ours
    model_file = folder / c.MODEL_FILE
    inputs = read_graph_inputs(model_file)
    if c.LOGITS_TO_KEEP in inputs:
        return ours  # our graph without its manifest: read_manifest refuses it
    _check_inputs(model_file, inputs)

    def beside(name: str) -> Path:  # the ONNX folder's own file, else the repository's top-level one
        return next((d / name for d in (folder, directory) if (d / name).is_file()), folder / name)

    layout = Layout(OPTIMUM, directory, model_file, beside(c.CONFIG_FILE), beside(c.TOKENIZER_FILE),
                    beside(c.GENERATION_CONFIG_FILE))
    for path in (layout.config_file, layout.tokenizer_file):
        if not path.is_file():
            raise ModelLoadError(f"{directory} holds an Optimum export ({model_file}) but no {path.name}",
                                 hint=f"copy the model's {path.name} beside model.onnx (Optimum writes it there), or "
                                      + _REEXPORT)
    return layout


def has_pytorch_weights(directory: str | Path) -> bool:
    """Whether `directory` holds PyTorch weights the export side reads (a file PYTORCH_WEIGHTS matches): a Hub
    repository with an onnx/ folder often keeps them at its top."""
    directory = Path(directory)
    return any(any(directory.glob(pattern)) for pattern in PYTORCH_WEIGHTS)


def _check_inputs(model_file: Path, inputs: dict[str, str | None]) -> None:
    """A ModelLoadError unless the graph has the inputs of Optimum's text-generation-with-past GPT-2 export."""
    names = set(inputs)
    past = {n for n in names if n.startswith("past_key_values.")}
    layers = len(past) // 2
    want = {c.INPUT_IDS, c.ATTENTION_MASK, *c.past_names(layers)}
    unexpected = names - want - {c.POSITION_IDS}
    if not past or past != set(c.past_names(layers)) or unexpected or not want <= names:
        what = "it has no past_key_values inputs (an export without a KV cache)" if not past else \
            f"its inputs are {sorted(names)}"
        raise ModelLoadError(f"{model_file} is neither a gpt2onnx export nor an Optimum text-generation-with-past "
                             f"export of GPT-2: {what}", hint=_REEXPORT)
    floats = {inputs[n] for n in past}
    if floats != {"float32"}:
        raise ModelLoadError(f"{model_file} has a KV cache of {', '.join(sorted(map(str, floats)))}; gpt2onnx runs "
                             "Optimum exports with a float32 cache only", hint=_REEXPORT + " (fp32)")


def note_unverified(layout: Layout) -> None:
    """The one log line loading an Optimum export gives (see the module docstring)."""
    _log.warning("%s is an Optimum export without a gpt2onnx manifest: no file hashes to check and no parity report; "
                 "`gpt2onnx verify %s --reference MODEL` compares it with PyTorch", layout.directory,
                 layout.directory)


class OptimumSession(OnnxSession):
    """OnnxSession's interface over an Optimum graph: each run returns a new KVCache holding the presents.

    Shares OnnxSession's step observers and shape checks; the binding is its own (see the module docstring).
    """

    def __init__(self, path: Path, config: ModelConfig, options: SessionOptions = SessionOptions()):
        self._open(path, config, options, hint="the file may be damaged; " + _REEXPORT)
        self.cache_dtype = np.float32
        shapes = {i.name: i.shape for i in self._session.get_inputs()}
        inputs = set(shapes)
        outputs = {o.name for o in self._session.get_outputs()}
        self._positions = c.POSITION_IDS in inputs
        if not self._positions:
            _log.warning("%s has no position_ids input: the graph counts positions from the first column, so rows of "
                         "a left-padded batch (and the engine's) differ from transformers'; one prompt at a time is "
                         "exact", path)
        want = {c.INPUT_IDS, c.ATTENTION_MASK, *self._past_names}
        missing = sorted((want - inputs) | ({c.LOGITS, *self._present_names} - outputs))
        if missing:
            raise ModelLoadError(f"{path} lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} for the "
                                 f"{config.n_layer} layers its config.json gives",
                                 hint="config.json belongs to another model; " + _REEXPORT)
        heads = shapes[c.past_key(0)][1::2]  # [batch, n_head, past, head_dim]: the fixed dimensions are ints
        if heads != [config.n_head, config.head_dim]:
            raise ModelLoadError(f"{path} has a cache of {heads[0]} heads x {heads[1]} dimensions; its config.json "
                                 f"gives {config.n_head} x {config.head_dim}",
                                 hint="config.json belongs to another model; " + _REEXPORT)

    def empty_cache(self, batch: int, *, capacity: int = 0) -> KVCache:
        """The cache before the first step: length 0 (each step returns a new cache, so no room is kept)."""
        return KVCache.empty(self.config, batch, 0, dtype=self.cache_dtype)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            cache: KVCache, *, logits_for: str | int = "all", reuse_logits: bool = False
            ) -> tuple[np.ndarray, KVCache]:
        """As OnnxSession.run, but the cache returned is a new one (`cache` is left as it was): the graph
        writes past + new positions into new present arrays. logits_for="last" (or k) slices the last position
        (the last k) of the logits the graph computed for every position."""
        keep = int(_kept_logits(logits_for))  # 0: every position
        self._check_shapes(input_ids, attention_mask, position_ids, cache)
        batch, new = input_ids.shape
        total = attention_mask.shape[1]
        binding = self._session.io_binding()
        binding.bind_cpu_input(c.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(c.ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        if self._positions:
            binding.bind_cpu_input(c.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        # a cache our KVCache methods made (gather, a preallocated one) may be a strided view: one copy then
        for name, past in zip(self._past_names, cache.tensors):
            binding.bind_cpu_input(name, np.ascontiguousarray(past))
        shape = (batch, self.config.n_head, total, self.config.head_dim)
        presents = [np.empty(shape, self.cache_dtype) for _ in self._present_names]
        for name, present in zip(self._present_names, presents):
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(present))
        shape = (batch, new, self.config.vocab_size)
        kept = cache.logits if reuse_logits and cache.logits is not None and cache.logits.shape == shape else None
        logits = kept if kept is not None else np.empty(shape, np.float32)
        binding.bind_ortvalue_output(c.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        out = logits[:, -keep:] if keep else logits
        self._run_bound(binding, input_ids, total - new, out)
        grown = KVCache(presents, length=total)
        grown.logits = logits if reuse_logits else None
        return out, grown
