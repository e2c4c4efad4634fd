"""`gpt2onnx bench`: GPT-2 generation speed next to transformers+torch, Optimum, CTranslate2 and llama.cpp, in one
report.

Every configuration (framework x precision) runs in a worker process of its own, so its load time and
peak memory are its own. All workers stay alive and the measurements go round-robin: round r measures
every configuration once before round r+1 starts, so a machine whose load drifts (ours is shared) slows
them all alike, and the ratios in one report hold. Each figure is the median over the rounds.

The workload is fixed and forced to length (EOS ignored): the same seeded token ids for everyone,
greedy decoding, threads = physical cores for every framework.

  decode@8      new tokens per second after an 8-token prompt, timed inside one call: (N - 1) / (t_N - t_1),
                t_i the wall-clock time at which the call produced its i-th new token
  decode@768    the same after a 768-token prompt (reading a long KV cache every step)
  prefill       prompt tokens per second for a 512-token prompt: 512 / time to its first token
  TTFT          time to the first new token after the 8-token prompt
  batch-5       tokens per second of 5 sampled continuations of the 8-token prompt (num_return_sequences=5)
  load, peak RSS, size on disk; for gpt2onnx also the share of a decode step spent outside ONNX Runtime
  MB read/token, of read BW   for gpt2onnx and llama.cpp: the bytes a decode step reads (weights, KV cache) and
                tok/s x bytes/token over the read bandwidth measured in every round (`read_bandwidth`)

Each framework is measured through its own generation API: transformers' and Optimum's `generate`,
CTranslate2's `generate_batch`, and gpt2onnx's generation loop (`gpt2onnx.generation.generator.generate`). The token
times t_i come from each API's own per-step hook: a transformers streamer, `generate_batch`'s `callback`,
gpt2onnx's session observer. The decode figures are never a difference between two calls: that assumed
both calls' prefills cost the same, and a long prefill jitters more than a whole decode (with an int8 KV
cache an int4 decode@768 once came out at 249 tok/s against 160 at decode@8).

llama.cpp is measured through its own `llama-bench` (a process per run, in the same rounds), which the bench
finds on disk (--llamacpp DIR or $GPT2ONNX_LLAMACPP) with the GGUF files of the same model; it never builds
or downloads it. Frameworks that are not installed or not found are skipped with one line saying why
(`pip install 'gpt2onnx[bench]'`; for llama.cpp, benchmarks/README.md). Preparing the models needs the
export extra; they are kept in --work-dir and reused.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gpt2onnx.errors import GenerationError, InvalidArgumentError, MissingDependencyError
from gpt2onnx.format.precisions import FLOAT_KV_CACHE, PRECISIONS
from gpt2onnx.runtime import cpu
from gpt2onnx.runtime.optimum_layout import has_pytorch_weights

# gpt2onnx's weights precision -> the GGUF type llama.cpp is measured at beside it, and its file type
# (general.file_type, llama.cpp's llama_ftype): what a GGUF file is recognised by
LLAMACPP_TYPES = {"fp32": ("F32", 0), "int8": ("Q8_0", 7), "int4": ("Q4_0", 2)}
# (framework, precision) in report order; gpt2onnx's precisions are the table's, and "+kv32" is one whose KV
# cache defaults to int8 exported with --kv-cache float32
# "optimum-fp32" is gpt2onnx running Optimum's fp32 export (the Optimum configuration's directory) as it is
OPTIMUM_EXPORT = "optimum-fp32"
CONFIGS = [("torch", "fp32"), ("optimum", "fp32"), ("ctranslate2", "fp32"), ("ctranslate2", "int8"),
           *[("gpt2onnx", p.name) for p in PRECISIONS.values()],
           *[("gpt2onnx", p.name + "+kv32") for p in PRECISIONS.values() if p.kv_cache_dtype != FLOAT_KV_CACHE],
           ("gpt2onnx", OPTIMUM_EXPORT), *[("llamacpp", gguf_type.lower()) for gguf_type, _ in LLAMACPP_TYPES.values()]]
LABELS = {"torch": "transformers+torch", "optimum": "Optimum ORTModelForCausalLM", "ctranslate2": "CTranslate2",
          "gpt2onnx": "gpt2onnx", "llamacpp": "llama.cpp"}
_MODULES = {"torch": "transformers", "optimum": "optimum.onnxruntime", "ctranslate2": "ctranslate2",
            "gpt2onnx": "onnxruntime"}
_WEIGHT_SUFFIXES = (".onnx", ".onnx.data", ".onnx_data", ".safetensors", ".bin")
# What makes a gpt2onnx export, for telling a prepared model made by other code (see _maker): this package's
# modules but these, and the runtime's modules the export writes by.
_NOT_EXPORT_CODE = ("bench.py", "commands.py", "verify_command.py", "parity.py", "progress.py")
_RUNTIME_EXPORT_CODE = tuple(f"format/{name}" for name in ("contract.py", "precisions.py", "gpt2.py", "matmulnbits.py",
                                                            "per_column.py", "config.py"))
_EOS = 50256


@dataclass(frozen=True)
class BenchOptions:
    """What to measure (defaults: the workload of issue 5)."""

    # random:NAME, a local Hugging Face directory, or a ready-made Optimum export (its directory, or a Hub-style
    # repository with it in onnx/: measured as it is, by Optimum and by gpt2onnx; the other configurations need
    # the PyTorch weights at the top of such a repository)
    model: str = "random:gpt2"
    runs: int = 5  # rounds; every figure is the median over them
    new_tokens: int = 128  # tokens generated after the short prompt (decode@8, batch-5)
    short_prompt: int = 8
    long_prompt: int = 768  # decode at a long past
    long_new_tokens: int = 128  # past 768..895
    prefill: int = 512  # prompt tokens of the prefill figure
    batch: int = 5  # num_return_sequences of the batch figure
    threads: int = 0  # 0 = physical cores, for every framework
    frameworks: tuple[str, ...] = ("torch", "optimum", "ctranslate2", "gpt2onnx", "llamacpp")
    precisions: tuple[str, ...] = ("fp32", "int8", "int4", "int4+kv32")  # gpt2onnx's; +kv32 = --kv-cache float32
    work_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "gpt2onnx" / "bench")
    # llama.cpp, when it is on disk: llama-bench's folder and the GGUF files' (None: $GPT2ONNX_LLAMACPP)
    llamacpp_bin: Path | None = None
    llamacpp_gguf: Path | None = None

    def check(self) -> None:
        for name in ("runs", "new_tokens", "short_prompt", "long_prompt", "long_new_tokens", "prefill", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")
        if self.new_tokens < 2 or self.long_new_tokens < 2:
            raise InvalidArgumentError("new_tokens and long_new_tokens must be at least 2 (decode rates need a step)")
        unknown = set(self.frameworks) - set(LABELS)
        if unknown:
            raise InvalidArgumentError(f"unknown frameworks {sorted(unknown)}", hint=f"choose from {', '.join(LABELS)}")
        known = {precision for framework, precision in CONFIGS if framework == "gpt2onnx"}
        if set(self.precisions) - known:
            raise InvalidArgumentError(f"unknown precisions {sorted(set(self.precisions) - known)}",
                                       hint=f"choose from {', '.join(sorted(known))}")


def physical_cores() -> int:
    """Physical cores available to this process (Linux topology; else os.cpu_count())."""
    try:
        cpus = os.sched_getaffinity(0)
        cores = set()
        for cpu in cpus:
            base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add((base / "physical_package_id").read_text().strip() + "/" + (base / "core_id").read_text().strip())
        return max(1, len(cores))
    except (OSError, AttributeError):
        return max(1, os.cpu_count() or 1)


def prompts(options: BenchOptions, vocab_size: int = _EOS) -> dict[str, list[int]]:
    """The token ids everyone gets: seeded, so every framework and every run sees the same prompts."""
    rng = np.random.default_rng(2024)
    longest = max(options.short_prompt, options.long_prompt, options.prefill)
    ids = rng.integers(0, vocab_size, longest).tolist()
    return {"short": ids[:options.short_prompt], "long": ids[:options.long_prompt], "prefill": ids[:options.prefill]}


# --------------------------------------------------------------------------------------------------------
# The parent: prepare, start workers, measure round-robin, report.

def run_bench(options: BenchOptions, *, progress: Callable[[str], None], command: str | None = None) -> dict:
    """Run the benchmark; returns the report (see `format_table`, `write_chart`). `command` is recorded."""
    options.check()
    threads = options.threads or physical_cores()
    configs, skipped = [], []
    for framework, precision in CONFIGS:
        if framework not in options.frameworks or framework == "llamacpp" or (
                framework == "gpt2onnx" and precision not in options.precisions):
            continue
        if not _installed(_MODULES[framework]):
            skipped.append(f"{LABELS[framework]} {precision}: not installed (pip install 'gpt2onnx[bench]')")
            continue
        configs.append((framework, precision))
    ready = ready_optimum_export(options.model)
    if ready is not None and not has_pytorch_weights(Path(options.model).expanduser()):
        skipped += [f"{LABELS[f]} {p}: {options.model} is an Optimum export without PyTorch weights"
                    for f, p in configs if not _uses_optimum_export(f, p)]
        configs = [(f, p) for f, p in configs if _uses_optimum_export(f, p)]
    llama = None
    if "llamacpp" in options.frameworks:
        try:
            llama = find_llamacpp(options)
        except MissingDependencyError as missing:  # optional, like the peers not installed: one line
            skipped.append(f"llama.cpp: {missing.message}: {missing.hint}")
    if not configs and not llama:
        raise InvalidArgumentError("nothing to measure", hint="check --only and --precisions")
    for note in skipped:
        progress(f"skipping {note}")
    directories = prepare(options, configs, progress=progress) if configs else {}
    if llama:
        hf = hf_checkpoint(options, progress=progress)
        for gguf in llama.ggufs.values():
            check_gguf(gguf, hf)  # the same model as ours, or a clear error now rather than a false ratio
    spec = {"prompts": prompts(options), "new_tokens": options.new_tokens, "long_new_tokens": options.long_new_tokens,
            "batch": options.batch}
    bandwidth: list[float] = []
    workers = []
    try:
        for framework, precision in configs:
            progress(f"loading {LABELS[framework]} {precision}")
            if framework == "gpt2onnx":
                _warm_user_cache(directories[(framework, precision)])
            workers.append(_Worker(framework, precision, directories[(framework, precision)], threads,
                                   options.work_dir / "logs"))
        for precision, gguf in (llama.ggufs.items() if llama else ()):
            progress(f"llama.cpp {precision}: {llama.bench} -m {gguf.path}")
            workers.append(_LlamaCppWorker(precision, gguf, llama.bench, threads, options.work_dir / "logs"))
        for worker in workers:
            worker.ask({"cmd": "warmup", "spec": spec})
        for round_ in range(1, options.runs + 1):
            # the machine's read bandwidth, in every round: the decode figures are set against it
            bandwidth.append(read_bandwidth(threads))
            progress(f"[round {round_}/{options.runs}] read bandwidth {bandwidth[-1] / 1e9:.1f} GB/s "
                     f"({threads} threads)")
            for worker in workers:
                timings = worker.ask({"cmd": "round", "spec": spec})
                worker.rounds.append(worker.figures(timings, options))
                f = worker.rounds[-1]
                progress(f"[round {round_}/{options.runs}] {worker.name:32s} decode@{options.short_prompt} "
                         f"{f['decode_short']:6.1f} tok/s, decode@{options.long_prompt} {f['decode_long']:6.1f}"
                         + (f", prefill {f['prefill']:6.0f}" if "prefill" in f else "")
                         + (f", batch-{options.batch} {f['batch']:6.1f}" if "batch" in f else ""))
        results = []
        for worker in workers:
            final = worker.ask({"cmd": "exit"})
            results.append(_summary(worker, final, options, max(bandwidth)))
    finally:
        for worker in workers:
            worker.close()
    machine = _machine(threads)
    machine["versions"].update({"llama.cpp": w.version for w in workers if getattr(w, "version", None)})
    skipped += [w.note for w in workers if getattr(w, "note", None)]
    return {"command": command, "machine": machine, "workload": _workload(options), "results": results,
            "skipped": skipped, "read_bandwidth": {"best": max(bandwidth), "rounds": bandwidth,
                                                   "method": READ_BANDWIDTH_METHOD.format(threads=threads)}}


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def ready_optimum_export(model: str) -> Path | None:
    """The folder holding model.onnx when `model` is a ready-made Optimum export, else None."""
    if model.startswith("random:"):
        return None
    from gpt2onnx.errors import ModelLoadError
    from gpt2onnx.runtime.optimum_layout import OPTIMUM, find_layout

    try:
        layout = find_layout(Path(model).expanduser())
    except ModelLoadError:
        return None
    return layout.model_file.parent if layout.kind == OPTIMUM else None


def _uses_optimum_export(framework: str, precision: str) -> bool:
    return (framework, precision) in (("optimum", "fp32"), ("gpt2onnx", OPTIMUM_EXPORT))


def prepare(options: BenchOptions, configs: list[tuple[str, str]], *,
            progress: Callable[[str], None]) -> dict[tuple[str, str], Path]:
    """Every configuration's model directory under work_dir, made once (a `.done` file marks a finished one).
    A ready-made Optimum export given as the model is used as it is."""
    try:
        from . import steps  # noqa: F401  (the export extra: torch, transformers, onnx)
    except ImportError as error:
        raise MissingDependencyError(f"preparing the benchmark's models needs the export extra ({error})",
                                     hint="pip install 'gpt2onnx[export,bench]'") from error
    root = model_root(options)
    ready = ready_optimum_export(options.model)
    hf = None
    out = {}
    for framework, precision in configs:
        if ready is not None and _uses_optimum_export(framework, precision):
            out[(framework, precision)] = ready
            continue
        hf = hf or _hf_checkpoint(options.model, root, progress)
        if framework == "torch":
            out[(framework, precision)] = hf
            continue
        # gpt2onnx on Optimum's export runs the Optimum configuration's directory
        made = ("optimum", "fp32") if (framework, precision) == ("gpt2onnx", OPTIMUM_EXPORT) else (framework, precision)
        directory = root / "-".join(made)
        done = directory / ".done"
        made_by = _maker(made[0])
        if not done.is_file() or done.read_text() != made_by:
            progress(f"preparing {LABELS[made[0]]} {made[1]} in {directory}")
            with warnings.catch_warnings():  # the converters' own warnings are not ours to show
                warnings.simplefilter("ignore")
                _convert(*made, options.model, hf, directory)
            done.write_text(made_by)
        out[(framework, precision)] = directory
    return out


def model_root(options: BenchOptions) -> Path:
    """Where the prepared models of options.model are kept (random:gpt2's Hugging Face layout in its hf/)."""
    root = Path(options.work_dir).expanduser() / options.model.replace(":", "-").replace("/", "_")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _maker(framework: str) -> str:
    """What made a prepared model: the converter's version, and for gpt2onnx a hash of the export code, so
    that a changed graph builder or quantizer is never measured through an export it did not make."""
    if framework != "gpt2onnx":
        from importlib.metadata import version

        return f"{framework} {version({'optimum': 'optimum-onnx'}.get(framework, framework))}"
    import hashlib

    import gpt2onnx

    runtime = Path(gpt2onnx.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(__file__).parent.glob("*.py") if p.name not in _NOT_EXPORT_CODE) + [
            runtime / name for name in _RUNTIME_EXPORT_CODE]:
        digest.update(path.read_bytes())
    return f"gpt2onnx export code {digest.hexdigest()[:16]}"


def hf_checkpoint(options: BenchOptions, *, progress: Callable[[str], None] = lambda message: None) -> Path:
    """options.model in Hugging Face layout, the folder the peers read (random:NAME written there once): what to
    convert to GGUF for llama.cpp, so that it runs the very weights the others do."""
    return _hf_checkpoint(options.model, model_root(options), progress)


def _hf_checkpoint(model: str, root: Path, progress) -> Path:
    """The model in Hugging Face layout (what torch, Optimum and CTranslate2 read)."""
    if not model.startswith("random:"):
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise InvalidArgumentError(f"--model must be random:NAME or a local Hugging Face directory, got {model!r}")
        return path
    hf = root / "hf"
    if (hf / ".done").is_file():
        return hf
    progress(f"writing {model} in Hugging Face layout to {hf}")
    import shutil
    import tempfile

    from .reference import torch_model
    from .sources import load_source

    with tempfile.TemporaryDirectory() as work:
        source = load_source(model, workdir=Path(work), seed=0)
        torch_model(source.config_dict, source.weights).save_pretrained(hf, safe_serialization=True)
        for path in source.tokenizer_dir.iterdir():
            shutil.copyfile(path, hf / path.name)
    (hf / ".done").write_text("")
    return hf


def _convert(framework: str, precision: str, model: str, hf: Path, directory: Path) -> None:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    if framework == "gpt2onnx":
        from .steps import ExportOptions, export_model

        spec = model if model.startswith("random:") else str(hf)
        weights, _, kv = precision.partition("+")
        options = ExportOptions(precision=weights, kv_cache=FLOAT_KV_CACHE if kv == "kv32" else None, force=True)
        export_model(spec, directory, options, progress=lambda m: None)
    elif framework == "optimum":
        from optimum.onnxruntime import ORTModelForCausalLM

        ORTModelForCausalLM.from_pretrained(hf, export=True).save_pretrained(directory)
        for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            if (hf / name).is_file():
                shutil.copyfile(hf / name, directory / name)
    elif framework == "ctranslate2":
        import ctranslate2

        ctranslate2.converters.TransformersConverter(str(hf)).convert(
            str(directory), quantization="int8" if precision == "int8" else "float32", force=True)
        shutil.copyfile(hf / "tokenizer.json", directory / "tokenizer.json")


def _warm_user_cache(directory: Path) -> None:
    """Load a gpt2onnx export once in a throwaway process, right before its worker loads it, so that the load
    figure is what a user's every later process sees: the optimized graph and the tokenizer's tables in the
    user cache (gpt2onnx/runtime/user_cache.py). Without this a graph evicted since (the cache keeps the 4 most recently
    used) was optimized afresh inside the measured load: int8 3.37 s against 0.54 s. A failure shows in the
    worker's own load, with its log."""
    subprocess.run([sys.executable, "-c", "import sys, gpt2onnx; gpt2onnx.load(sys.argv[1])", str(directory)],
                   capture_output=True)


class _Worker:
    """A worker process holding one loaded model; speaks one JSON line per request."""

    def __init__(self, framework: str, precision: str, directory: Path, threads: int, logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.name = f"{LABELS[framework]} {precision}"
        self.framework, self.precision, self.directory = framework, precision, directory
        self.log = logs / f"{framework}-{precision}.log"
        self.rounds: list[dict] = []
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "gpt2onnx_export.bench", "worker", framework, precision, str(directory),
             str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True)
        self.loaded = self._read()

    def ask(self, request: dict) -> dict:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-2000:] if self.log.is_file() else ""
            raise GenerationError(f"the {self.name} worker died; its log ({self.log}) ends with:\n{tail}",
                                  hint="fix what the log shows, or leave this framework out (--only, --precisions)")
        reply = json.loads(line)
        if "error" in reply:
            raise GenerationError(f"the {self.name} worker failed: {reply['error']}",
                                  hint=f"its log is {self.log}; leave this framework out with --only or --precisions")
        return reply

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def figures(self, timings: dict, options: BenchOptions) -> dict:
        return _figures(timings, options)

    def traffic(self) -> tuple[int, int] | None:
        """(weight bytes, KV-cache bytes per past position) a decode step reads: gpt2onnx's exports only."""
        if self.framework != "gpt2onnx":
            return None
        graphs = sorted(self.directory.glob("*.onnx"), key=lambda path: path.name != "model.onnx")
        return onnx_decode_traffic(graphs[0]) if graphs else None


def _figures(t: dict, options: BenchOptions) -> dict:
    """One round's timings -> its figures (steps_*: seconds from a call's first new token to its last)."""
    return {"decode_short": (options.new_tokens - 1) / t["steps_short"],
            "decode_long": (options.long_new_tokens - 1) / t["steps_long"],
            "prefill": options.prefill / t["first_prefill"],
            "ttft_ms": 1000 * t["first_short"],
            "batch": options.batch * options.new_tokens / t["batch"],
            **({"outside_ort": t["outside_ort"]} if "outside_ort" in t else {})}


def _summary(worker: _Worker, final: dict, options: BenchOptions, bandwidth: float) -> dict:
    keys = dict.fromkeys(k for r in worker.rounds for k in r)  # a figure a round lacks is not in its median
    median = {k: float(np.median([r[k] for r in worker.rounds if k in r])) for k in keys}
    summary = {"name": worker.name, "framework": worker.framework, "precision": worker.precision,
               **median, "decode_long_over_short": median["decode_long"] / median["decode_short"],
               **({"load_s": worker.loaded["load_s"]} if worker.loaded.get("load_s") is not None else {}),
               "peak_rss_mb": final["peak_rss_bytes"] / 2**20, "size_mb": worker.loaded["size_bytes"] / 2**20}
    traffic = worker.traffic()
    if traffic is not None:
        summary.update(bandwidth_share(median, traffic, bandwidth, options))
    return {**summary, "rounds": worker.rounds}


def bandwidth_share(median: dict, traffic: tuple[int, int], bandwidth: float, options: BenchOptions) -> dict:
    """The bytes a decode step reads (the weights it multiplies, the KV cache at the decode's mean past) and
    the share of the machine's read bandwidth that makes at the measured rate: tok/s x bytes/token / (bytes/s)."""
    weights, per_position = traffic
    share = {}
    for key, past in (("short", options.short_prompt + options.new_tokens / 2),
                      ("long", options.long_prompt + options.long_new_tokens / 2)):
        read = weights + per_position * past
        share[f"bytes_{key}"] = read
        share[f"read_share_{key}"] = median[f"decode_{key}"] * read / bandwidth
    return share


def _machine(threads: int) -> dict:
    versions = {}
    for name in ("onnxruntime", "torch", "transformers", "optimum", "ctranslate2", "numpy"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            pass
    return {"cpu": cpu.model_name(), "flags": list(cpu.vector_flags()), "physical_cores": physical_cores(),
            "threads": threads, "python": platform.python_version(), "versions": versions}


def _workload(options: BenchOptions) -> dict:
    d = asdict(options)
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


# --------------------------------------------------------------------------------------------------------
# Batch-1 decode against the memory: what a step reads, and how fast this machine reads.

READ_BANDWIDTH_METHOD = ("numpy, {threads} threads each OR-reducing its half of a 1 GiB buffer (as uint64), "
                         "the best of 3 passes, once per round; the report's figure is the best round's")


def read_bandwidth(threads: int, *, size: int = 2**30, passes: int = 3) -> float:
    """Bytes per second `threads` threads read from memory: each reduces its share of a `size`-byte buffer
    (far larger than the caches; numpy lets go of the GIL inside a reduction), the best of `passes`.
    A bitwise OR over uint64 does one instruction per loaded vector, so the reads, not the arithmetic, set
    its pace (numpy's float sum is slower per byte, torch.sum no faster)."""
    import threading

    buffer = np.ones(size // 8, dtype=np.uint64)  # written once: pages that exist, not the zero page
    parts = np.array_split(buffer, threads)
    best = 0.0
    for _ in range(passes):
        workers = [threading.Thread(target=np.bitwise_or.reduce, args=(part,)) for part in parts]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, buffer.nbytes / (time.perf_counter() - start))
    return best


def onnx_decode_traffic(graph: Path) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes per past position) one decode step of this ONNX graph reads.

    Weights: every initializer once (a tied embedding read by both the embedding's Gather and the head's Gemm
    counts once), except that a table only gathered from (the token and position embeddings of an export
    whose head has its own quantized copy) counts one row. The cache: the past inputs' bytes per position
    (every dimension but the batch and the past's length), float32 or int8 as exported."""
    import onnx

    from gpt2onnx.format.contract import DIM_PAST

    model = onnx.load(str(graph), load_external_data=False)
    readers: dict[str, set[tuple[str, int]]] = {}  # initializer -> (op, input slot) of every node reading it
    initializers = {}  # by name: each counted once

    def walk(g) -> None:  # an If's branches read the outer graph's initializers too
        initializers.update((tensor.name, tensor) for tensor in g.initializer)
        for node in g.node:
            for slot, name in enumerate(node.input):
                readers.setdefault(name, set()).add((node.op_type, slot))
            for attribute in node.attribute:
                for sub in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                    walk(sub)

    walk(model.graph)
    weights = 0
    for tensor in initializers.values():
        size = _tensor_bytes(tensor)
        if readers.get(tensor.name) == {("Gather", 0)} and tensor.dims:
            size //= tensor.dims[0]  # gathered from only: one row per token
        weights += size
    per_position = 0
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if any(d.dim_param == DIM_PAST for d in dims):
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).itemsize
            per_position += itemsize * int(np.prod([d.dim_value for d in dims if not d.dim_param]))
    return weights, per_position


def _tensor_bytes(tensor) -> int:
    import onnx

    return int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


# --------------------------------------------------------------------------------------------------------
# llama.cpp: a peer this package never builds or downloads. The bench finds its `llama-bench` and the GGUF
# files of the same model (converted by llama.cpp's own convert_hf_to_gguf.py), runs llama-bench on the same
# workload, round-robin with the rest, and puts the ratios beside ours.

LLAMACPP_ENV = "GPT2ONNX_LLAMACPP"
LLAMACPP_HOWTO = ("build llama.cpp's llama-bench and convert the model with llama.cpp's convert_hf_to_gguf.py "
                  "(f32, q8_0; llama-quantize for q4_0); see benchmarks/README.md")


@dataclass(frozen=True)
class Gguf:
    """What the bench reads of a GGUF file's header: enough to recognise the model and count its bytes."""

    path: Path
    metadata: dict  # the scalar and string keys (arrays such as the vocabulary are skipped)
    tensors: dict[str, tuple[int, tuple[int, ...], int]]  # name -> (ggml type, shape ne0 first, offset in data)
    data_start: int

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    @property
    def file_type(self) -> int | None:
        return self.metadata.get("general.file_type")

    def get(self, key: str):
        """An architecture's key, e.g. get('block_count') -> gpt2.block_count."""
        return self.metadata.get(f"{self.architecture}.{key}")


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
# ggml tensor types: (values per block, bytes per block) — F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, the
# k-quants Q2_K..Q8_K, BF16
_GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
                10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
                30: (1, 2)}


def read_gguf(path: Path) -> Gguf:
    """A GGUF file's header (version 2 or 3): its metadata and tensor table, not the tensors."""
    import struct

    path = Path(path)
    with open(path, "rb") as f:
        def unpack(fmt: str):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(unpack("<Q")).decode("utf-8", errors="replace")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                return unpack(_GGUF_SCALARS[kind])
            if kind == _GGUF_STRING:
                return string()
            if kind != _GGUF_ARRAY:
                raise ValueError(f"unknown GGUF value type {kind}")
            item, count = unpack("<I"), unpack("<Q")
            if item in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    value(item)
            return None  # arrays (the vocabulary, merges) are not kept

        try:
            if f.read(4) != b"GGUF":
                raise InvalidArgumentError(f"{path} is not a GGUF file")
            version, n_tensors, n_keys = unpack("<I"), unpack("<Q"), unpack("<Q")
            if version < 2:
                raise InvalidArgumentError(f"{path}: GGUF version {version} is too old", hint=LLAMACPP_HOWTO)
            metadata = {}
            for _ in range(n_keys):
                key = string()
                metadata[key] = value(unpack("<I"))
            tensors = {}
            for _ in range(n_tensors):
                name = string()
                shape = tuple(unpack("<Q") for _ in range(unpack("<I")))
                tensors[name] = (unpack("<I"), shape, unpack("<Q"))
            alignment = metadata.get("general.alignment") or 32
            data_start = -(-f.tell() // alignment) * alignment
        except struct.error as error:  # the file ends inside its header
            raise InvalidArgumentError(f"{path} is not a whole GGUF file ({error})") from error
    return Gguf(path, {k: v for k, v in metadata.items() if v is not None}, tensors, data_start)


def gguf_decode_traffic(gguf: Gguf) -> tuple[int, int] | None:
    """(weight bytes, KV-cache bytes per past position) one llama.cpp decode step of this GGUF reads: every
    tensor once, but one row of the position table and of the token table when the head has its own
    `output.weight` (GPT-2's is tied: llama.cpp multiplies by token_embd); the KV cache in f16, llama-bench's
    default (-ctk/-ctv f16), keys and values of every layer. None if a tensor type is not in the table."""
    total = 0
    for name, (kind, shape, _) in gguf.tensors.items():
        if kind not in _GGML_BLOCKS:
            return None
        per_block, block_bytes = _GGML_BLOCKS[kind]
        rows = 1 if name == "position_embd.weight" or (name == "token_embd.weight" and "output.weight" in
                                                       gguf.tensors) else int(np.prod(shape[1:]))
        total += rows * shape[0] // per_block * block_bytes
    layers, width = gguf.get("block_count"), gguf.get("embedding_length")
    return total, (2 * layers * width * 2 if layers and width else 0)


@dataclass(frozen=True)
class LlamaCpp:
    """llama.cpp as found on disk: its llama-bench, and a GGUF file per precision the bench compares."""

    bench: Path
    ggufs: dict[str, Gguf]  # "f32", "q8_0", "q4_0" -> the file


def llamacpp_folders(root: Path | None = None, *, bin_dir: Path | None = None,
                     gguf_dir: Path | None = None) -> tuple[Path | None, Path | None]:
    """(where to look for llama.cpp's programs, where for GGUF files): the flags, else $GPT2ONNX_LLAMACPP."""
    root = root or (Path(os.environ[LLAMACPP_ENV]) if os.environ.get(LLAMACPP_ENV) else None)
    folders = [Path(d).expanduser() if d else None for d in (bin_dir or root, gguf_dir or root)]
    return folders[0], folders[1]


def find_program(name: str, folder: Path | None) -> Path:
    """llama.cpp's program `name` in folder, its bin/ or build/bin/, or one level further down (a llama.cpp
    checkout in folder: llama.cpp/build/bin; a second build: build-*/bin), else on PATH."""
    import shutil

    candidates = []
    if folder is not None:
        candidates = [folder, folder / "bin", folder / "build" / "bin", *sorted(folder.glob("build*/bin")),
                      *sorted(folder.glob("*/bin")), *sorted(folder.glob("*/build*/bin"))]
    for directory in candidates:
        if (directory / name).is_file() and os.access(directory / name, os.X_OK):
            return directory / name
    found = shutil.which(name)
    if found:
        return Path(found)
    where = f"in {folder} (nor its bin/, build/bin/)" if folder else f"(no --llamacpp, {LLAMACPP_ENV} unset)"
    raise MissingDependencyError(f"{name} not found {where} nor on PATH", hint=LLAMACPP_HOWTO)


def find_ggufs(folder: Path | None, *, types: dict[str, int] | None = None) -> dict[str, Gguf]:
    """The GGUF files in folder (and one level down), by their file type: {"f32": ..., "q8_0": ..., "q4_0": ...}
    for those present (the first in name order when several have one type)."""
    if folder is None:
        raise MissingDependencyError(f"no folder of GGUF files (no --llamacpp-gguf, {LLAMACPP_ENV} unset)",
                                     hint=LLAMACPP_HOWTO)
    wanted = types or {name.lower(): kind for name, kind in LLAMACPP_TYPES.values()}
    found: dict[str, Gguf] = {}
    for path in sorted([*folder.glob("*.gguf"), *folder.glob("*/*.gguf")]):
        try:
            gguf = read_gguf(path)
        except (OSError, ValueError):  # not a GGUF file (InvalidArgumentError is a ValueError)
            continue
        for name, kind in wanted.items():
            if gguf.file_type == kind and name not in found:
                found[name] = gguf
    return found


def find_llamacpp(options: BenchOptions) -> LlamaCpp:
    """llama-bench and the GGUF files of the precisions asked for; MissingDependencyError (one line, with how
    to get them) when either is missing."""
    bin_dir, gguf_dir = llamacpp_folders(bin_dir=options.llamacpp_bin, gguf_dir=options.llamacpp_gguf)
    bench = find_program("llama-bench", bin_dir)
    wanted = [gguf_type.lower() for ours, (gguf_type, _) in LLAMACPP_TYPES.items()
              if any(p.partition("+")[0] == ours for p in options.precisions)]
    ggufs = find_ggufs(gguf_dir)
    if not any(name in ggufs for name in wanted):
        raise MissingDependencyError(f"no GGUF file of type {', '.join(wanted) or '(none asked for)'} in {gguf_dir}",
                                     hint=LLAMACPP_HOWTO)
    return LlamaCpp(bench, {name: ggufs[name] for name in wanted if name in ggufs})


def check_gguf(gguf: Gguf, hf: Path) -> None:
    """The GGUF holds the model being measured: its shape, and its first layer norm's weights (float32 at
    every llama.cpp quantization) equal to the checkpoint's. Raises InvalidArgumentError otherwise."""
    config = json.loads((hf / "config.json").read_text())
    got = (gguf.architecture, gguf.get("block_count"), gguf.get("embedding_length"))
    want = ("gpt2", config.get("n_layer"), config.get("n_embd"))
    hint = f"convert {hf} with llama.cpp's convert_hf_to_gguf.py, or point --llamacpp-gguf elsewhere"
    if got != want:
        raise InvalidArgumentError(f"{gguf.path} is a {got[0]} of {got[1]} layers x {got[2]}, the model measured "
                                   f"a {want[0]} of {want[1]} x {want[2]}", hint=hint)
    kind, shape, offset = gguf.tensors.get("blk.0.attn_norm.weight", (None, (), 0))
    weights = sorted(hf.glob("*.safetensors"))
    if kind != 0 or not weights:
        return  # nothing comparable: the shape check stands alone
    from safetensors import safe_open

    with safe_open(str(weights[0]), "np") as f:
        name = next((k for k in f.keys() if k.endswith("h.0.ln_1.weight")), None)
        if name is None:
            return
        ours = f.get_tensor(name)
    theirs = np.fromfile(gguf.path, dtype="<f4", count=shape[0], offset=gguf.data_start + offset)
    if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=0, atol=1e-6):
        raise InvalidArgumentError(f"{gguf.path} has other weights than {hf} (the first layer norm differs)",
                                   hint=hint)


def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench's `-o json` output -> one dict per test: n_prompt, n_gen, n_depth, avg_ns, avg_ts and the
    rest of what it reports."""
    tests = json.loads(text)
    if not isinstance(tests, list) or not all(isinstance(t, dict) and "avg_ts" in t for t in tests):
        raise GenerationError("llama-bench's output is not its JSON list of tests",
                              hint="run llama-bench -o json by hand and check its version")
    return tests


def llama_bench_figures(tests: list[dict], spec: dict) -> dict:
    """The bench's figures from llama-bench's tests of the workload: decode@short and @long are tg tests (one
    token per step) after a KV cache filled to that depth, prefill a pp test of the prefill's length, TTFT
    the time of a pp test of the short prompt's length (one batch: the logits of its last token). Of tests
    that differ only in their settings (flash attention on and off), the fastest: llama.cpp at its best on
    each figure. Without pp tests (a build that crashes on batches), no prefill and no TTFT."""
    p = spec["prompts"]

    def test(n_prompt: int, n_gen: int, depth: int) -> dict:
        found = [t for t in tests if (t.get("n_prompt"), t.get("n_gen"), t.get("n_depth", 0)) == (n_prompt, n_gen,
                                                                                                   depth)]
        if not found:
            raise GenerationError(f"llama-bench gave no test of {n_prompt} prompt and {n_gen} new tokens at depth "
                                  f"{depth}", hint="llama-bench needs -d (--n-depth): a llama.cpp of 2025 or later")
        return min(found, key=lambda t: t["avg_ns"])

    figures = {"decode_short": test(0, spec["new_tokens"], len(p["short"]))["avg_ts"],
               "decode_long": test(0, spec["long_new_tokens"], len(p["long"]))["avg_ts"]}
    if any(t.get("n_gen") == 0 for t in tests):
        figures.update(prefill=test(len(p["prefill"]), 0, 0)["avg_ts"],
                       ttft_ms=test(len(p["short"]), 0, 0)["avg_ns"] / 1e6)
    return figures


def llama_bench_commands(bench: Path, gguf: Path, threads: int, spec: dict) -> tuple[list[str], list[list[str]]]:
    """The llama-bench runs of one round: (the prompts' run: pp tests of the short prompt and the prefill,
    the decodes' runs: tg tests after a cache filled to the short and the long prompt's lengths, -d). One
    repetition each (the bench's rounds repeat), llama-bench's own warm-up run before each test, its defaults
    otherwise but flash attention, both on and off (-fa on,off; the figures take the faster: on the AVX-512
    Xeon, on was 5-25% faster at past 8 and off 1.3-1.9x at past 768, where `auto` picks on).
    The decodes fill their cache one token at a time (-ub 1): the same cache, and the only way there for a
    build whose AMX path crashes on batches (seen in VMs), whose one-token steps are llama.cpp's fastest on
    such CPUs; the steps themselves do not depend on it (Q8_0 and Q4_0 without AMX, at past 8 and 768:
    within 2%)."""
    p = spec["prompts"]
    common = [str(bench), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json", "-fa", "on,off"]
    prompts_run = common + ["-p", f"{len(p['short'])},{len(p['prefill'])}", "-n", "0"]
    if spec["new_tokens"] == spec["long_new_tokens"]:
        depths = [(spec["new_tokens"], f"{len(p['short'])},{len(p['long'])}")]
    else:
        depths = [(spec["new_tokens"], str(len(p["short"]))), (spec["long_new_tokens"], str(len(p["long"])))]
    return prompts_run, [common + ["-p", "0", "-n", str(new), "-d", depth, "-ub", "1"] for new, depth in depths]


class _Crashed(GenerationError):
    """llama-bench was killed by a signal of its own making (not by the bench's timeout)."""


class _LlamaCppWorker:
    """llama.cpp at one GGUF type, answering the bench's requests as its workers do, by running llama-bench
    afresh for each (a process per run: its peak RSS is its own, sampled from /proc while it runs)."""

    timeout = 900  # seconds per llama-bench run

    def __init__(self, precision: str, gguf: Gguf, bench: Path, threads: int, logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.framework, self.precision = "llamacpp", precision
        self.gguf, self.bench, self.threads = gguf, bench, threads
        self.name = f"{LABELS['llamacpp']} {precision}"
        self.log = logs / f"llamacpp-{precision}.log"
        self.log.write_text("")
        self.rounds: list[dict] = []
        self.peak_rss = 0
        self.version = None  # llama-bench's build number and commit, once it has run
        self.note = None  # why prefill and TTFT are missing, when they are
        self.loaded = {"load_s": None, "size_bytes": gguf.path.stat().st_size}

    def ask(self, request: dict) -> dict:
        if request["cmd"] == "warmup":
            # a fresh process's load and one token: what `load s` means for the others
            start = time.perf_counter()
            tests = self._run([str(self.bench), "-m", str(self.gguf.path), "-t", str(self.threads), "-r", "1",
                               "-o", "json", "-p", "0", "-n", "1", "--no-warmup"])
            self.loaded["load_s"] = time.perf_counter() - start - tests[0]["avg_ns"] / 1e9
            self.version = f"{tests[0].get('build_number')} ({tests[0].get('build_commit')})"
            return {"ok": True}
        if request["cmd"] == "round":
            prompts_run, decode_runs = llama_bench_commands(self.bench, self.gguf.path, self.threads, request["spec"])
            tests = []
            if self.note is None:
                try:
                    tests += self._run(prompts_run)
                except _Crashed as crash:  # the decodes can still be measured: said in one line, not tried again
                    self.note = (f"{self.name} prefill and TTFT: {crash.message.splitlines()[0]} on a prompt (ggml's "
                                 "AMX path does on batches in VMs: a build without AMX measures them)")
            tests += [t for command in decode_runs for t in self._run(command)]
            return {**llama_bench_figures(tests, request["spec"]), "tests": tests}
        return {"peak_rss_bytes": self.peak_rss}

    def _run(self, command: list[str]) -> list[dict]:
        with open(self.log, "a") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
            deadline = time.monotonic() + self.timeout
            reader = _Reader(process.stdout)
            while process.poll() is None and time.monotonic() < deadline:
                self.peak_rss = max(self.peak_rss, _vm_hwm(process.pid))
                time.sleep(0.05)
            timed_out = process.poll() is None
            if timed_out:
                process.kill()
            process.wait()
            out = reader.text()
            log.write(out)  # its JSON too: the log holds every figure llama-bench gave
        code = process.returncode
        if code != 0:
            import signal

            how = (f"took over {self.timeout} s" if timed_out else f"was killed by {signal.Signals(-code).name}"
                   if code < 0 else f"failed (exit code {code})")
            tail = self.log.read_text()[-1500:]
            error = _Crashed if code < 0 and not timed_out else GenerationError
            raise error(f"llama-bench {how} on {self.gguf.path.name}\nits log ({self.log}) ends with:\n{tail}",
                        hint="run the command in the log by hand; in VMs whose CPU has AMX, a llama.cpp built with "
                             "AMX can crash on batches (build it without: -mno-amx-tile -mno-amx-int8 -mno-amx-bf16), "
                             "or leave llama.cpp out (--only)")
        return parse_llama_bench(out)

    def figures(self, timings: dict, options: BenchOptions) -> dict:
        return {k: v for k, v in timings.items() if k != "tests"}

    def traffic(self) -> tuple[int, int] | None:
        return gguf_decode_traffic(self.gguf)

    def close(self) -> None:
        pass


class _Reader:
    """A pipe read to its end in a thread (llama-bench's JSON can outgrow the pipe's buffer)."""

    def __init__(self, pipe):
        import threading

        self._chunks: list[str] = []
        self._thread = threading.Thread(target=lambda: self._chunks.append(pipe.read()), daemon=True)
        self._thread.start()

    def text(self) -> str:
        self._thread.join()
        return "".join(self._chunks)


def _vm_hwm(pid: int) -> int:
    """A running process's peak resident memory so far (VmHWM), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# --------------------------------------------------------------------------------------------------------
# Output: a table, JSON, a chart.

_COLUMNS = [("decode_short", "decode@{short} tok/s", "{:.1f}"), ("decode_long", "decode@{long} tok/s", "{:.1f}"),
            ("decode_long_over_short", "@{long}/@{short}", "{:.2f}"), ("prefill", "prefill@{prefill} tok/s", "{:.0f}"),
            ("ttft_ms", "TTFT ms", "{:.1f}"), ("batch", "batch-{batch} tok/s", "{:.1f}"),
            ("load_s", "load s", "{:.2f}"),
            ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("size_mb", "disk MB", "{:.0f}"),
            ("outside_ort", "outside ORT", "{:.1%}"), ("mb_short", "MB read/token @{short}", "{:.0f}"),
            ("read_share_short", "of read BW @{short}", "{:.0%}"), ("read_share_long", "@{long}", "{:.0%}")]
# the figures the comparison with llama.cpp sets side by side: (key, title, format, higher is better)
_PEER_COLUMNS = [("decode_short", "decode@{short} tok/s", "{:.1f}", True),
                 ("decode_long", "decode@{long} tok/s", "{:.1f}", True),
                 ("prefill", "prefill@{prefill} tok/s", "{:.0f}", True), ("ttft_ms", "TTFT ms", "{:.1f}", False)]


def format_table(report: dict) -> str:
    """The report as a Markdown table (what the README shows), with the machine underneath."""
    w = report["workload"]
    names = {"short": w["short_prompt"], "long": w["long_prompt"], "prefill": w["prefill"], "batch": w["batch"]}
    header = ["configuration"] + [title.format(**names) for _, title, _ in _COLUMNS]
    rows = []
    for r in report["results"]:
        r = {**r, **({"mb_short": r["bytes_short"] / 1e6} if "bytes_short" in r else {})}
        rows.append([r["name"]] + [fmt.format(r[key]) if key in r else "—" for key, _, fmt in _COLUMNS])
    lines = _markdown(header, rows)
    peers = _peer_rows(report["results"])
    if peers:
        lines += ["", *_markdown(["gpt2onnx / llama.cpp"] + [title.format(**names) for _, title, _, _ in _PEER_COLUMNS]
                                 + [f"of read BW @{w['short_prompt']}"], peers)]
    lines.append("")
    if report.get("read_bandwidth"):
        b = report["read_bandwidth"]
        lines.append(f"read bandwidth {b['best'] / 1e9:.1f} GB/s ({b['method']}; rounds: "
                     + ", ".join(f"{x / 1e9:.1f}" for x in b["rounds"]) + "); MB read/token: the weights a decode "
                     "step multiplies and the KV cache at the decode's mean past (docs/benchmarks.md)")
    m = report["machine"]
    lines.append(f"{m['cpu']} (flags: {' '.join(m.get('flags', [])) or 'unknown'}), {m['physical_cores']} physical "
                 f"cores, {m['threads']} threads each; "
                 f"{w['model']}, medians of {w['runs']} interleaved rounds; "
                 + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    for note in report.get("skipped", []):
        lines.append(f"skipped: {note}")
    return "\n".join(lines)


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _peer_rows(results: list[dict]) -> list[list[str]]:
    """gpt2onnx at each precision against llama.cpp at its GGUF type: both figures and their ratio, a ratio
    above 1 meaning gpt2onnx is ahead (TTFT: theirs over ours)."""
    theirs = {r["precision"]: r for r in results if r["framework"] == "llamacpp"}
    rows = []
    for ours in (r for r in results if r["framework"] == "gpt2onnx"):
        gguf_type = LLAMACPP_TYPES.get(ours["precision"].partition("+")[0], ("",))[0]
        peer = theirs.get(gguf_type.lower())
        if peer is None:
            continue
        row = [f"{ours['precision']} / {gguf_type}"]
        for key, _, fmt, higher in _PEER_COLUMNS:
            if key in ours and key in peer:
                ratio = ours[key] / peer[key] if higher else peer[key] / ours[key]
                row.append(f"{fmt.format(ours[key])} / {fmt.format(peer[key])} = {ratio:.2f}×")
            else:
                row.append("—")
        row.append(" / ".join(f"{r['read_share_short']:.0%}" if "read_share_short" in r else "—" for r in (ours, peer)))
        rows.append(row)
    return rows


def write_chart(report: dict, path: Path) -> Path | None:
    """A PNG of the main figures; None (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    w = report["workload"]
    results = report["results"]
    names = [r["name"].replace("Optimum ORTModelForCausalLM", "Optimum").replace("transformers+torch", "torch")
             for r in results]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    y = np.arange(len(results))
    ax = axes[0, 0]
    ax.barh(y - 0.2, [r["decode_short"] for r in results], 0.4, label=f"past {w['short_prompt']}")
    ax.barh(y + 0.2, [r["decode_long"] for r in results], 0.4, label=f"past {w['long_prompt']}")
    ax.set_title("decode, tokens/s (batch 1, greedy)")
    ax.legend()
    panels = [(axes[0, 1], "prefill", f"prefill of {w['prefill']} tokens, tokens/s"),
              (axes[1, 0], "batch", f"{w['batch']} sampled continuations, tokens/s"),
              (axes[1, 1], "peak_rss_mb", "peak RSS, MB")]
    for ax, key, title in panels:
        ax.barh(y, [r.get(key, 0) for r in results], 0.6, color="tab:gray" if key == "peak_rss_mb" else "tab:green")
        ax.set_title(title)
    for ax in axes.flat:
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    m = report["machine"]
    fig.suptitle(f"GPT-2 ({w['model']}) on {m['cpu']}, {m['threads']} threads; medians of {w['runs']} rounds")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------
# The worker: one framework, one model, timings on request.

class _Runner:
    """generate(prompt ids, new tokens, rows) -> (the new token ids of every row, forced to length; for one row,
    the time.perf_counter() at which each new token was produced, else [])."""

    def generate(self, prompt: list[int], new: int, rows: int = 1) -> tuple[list[list[int]], list[float]]:
        raise NotImplementedError


class _TorchRunner(_Runner):
    def __init__(self, directory: Path, precision: str, threads: int, *, optimum: bool = False):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        if optimum:
            from optimum.onnxruntime import ORTModelForCausalLM

            from gpt2onnx.runtime.session import ort_options

            self.model = ORTModelForCausalLM.from_pretrained(directory, session_options=ort_options(threads=threads),
                                                             provider="CPUExecutionProvider")
        else:
            from transformers import GPT2LMHeadModel

            self.model = GPT2LMHeadModel.from_pretrained(directory).eval()

    def generate(self, prompt, new, rows=1):
        ids = self.torch.tensor([prompt])
        # transformers' streamers take one row: the decode figures are batch 1
        clock = _token_clock() if rows == 1 else None
        sampling = dict(do_sample=True, top_k=50, num_return_sequences=rows) if rows > 1 else dict(do_sample=False)
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new,
                                      min_new_tokens=new, pad_token_id=_EOS, streamer=clock, **sampling)
        return out[:, len(prompt):].tolist(), clock.stamps if clock else []


def _token_clock():
    """A transformers streamer that records when each new token is produced: `generate` calls its `put` with
    the prompt first, then with every new token as soon as it is picked. (Imported here: only the torch and
    Optimum workers have transformers.)"""
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        def __init__(self):
            self.stamps: list[float] = []
            self._prompt = True

        def put(self, value) -> None:
            if self._prompt:
                self._prompt = False
            else:
                self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    return TokenClock()


class _CTranslate2Runner(_Runner):
    def __init__(self, directory: Path, precision: str, threads: int):
        import ctranslate2
        import tokenizers

        self.generator = ctranslate2.Generator(str(directory), device="cpu", intra_threads=threads, inter_threads=1,
                                               compute_type="int8" if precision == "int8" else "float32")
        self.tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))

    def generate(self, prompt, new, rows=1):
        tokens = [self.tokenizer.id_to_token(i) for i in prompt]
        stamps: list[float] = []

        def produced(step) -> bool:  # generate_batch calls it as each token is picked (beam_size 1)
            stamps.append(time.perf_counter())
            return False  # True would stop the decoding

        # the same blocking generate_batch with a step callback (generate_tokens would run it in a thread of
        # its own and hand the tokens over through a queue)
        results = self.generator.generate_batch([tokens] * rows, max_length=new, min_length=new, beam_size=1,
                                                sampling_topk=50 if rows > 1 else 1, include_prompt_in_result=False,
                                                callback=produced if rows == 1 else None)
        return [r.sequences_ids[0] for r in results], stamps


class _Gpt2OnnxRunner(_Runner):
    def __init__(self, directory: Path, precision: str, threads: int):
        from gpt2onnx import load

        self.model = load(directory, threads=threads)
        self.timer = _StepClock()

    def generate(self, prompt, new, rows=1):
        from gpt2onnx.generation.generator import generate
        from gpt2onnx.generation.settings import GenerationSettings

        if rows > 1:
            settings = GenerationSettings(max_new_tokens=new, ignore_eos=True, do_sample=True,
                                          num_return_sequences=rows, sampler="numpy")
            rng = np.random.default_rng(0)
        else:
            settings, rng = GenerationSettings(max_new_tokens=new, ignore_eos=True), None
        self.timer.reset()
        with self.model.session.observe(self.timer):
            out = generate(self.model.session, [prompt], settings, eos_id=self.model.eos_token_id, rng=rng)
        # the loop runs the graph once per new token (the prompt's run gives the first): the end of the run
        # whose logits pick a token is when it is produced
        return out, self.timer.stamps if rows == 1 else []


class _StepClock:
    """Observes an OnnxSession: adds up the time its steps spent inside ONNX Runtime, and records when each
    step ended."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Before each call: its ORT seconds and step times only."""
        self.seconds = 0.0
        self.stamps: list[float] = []

    def __call__(self, record) -> None:
        self.stamps.append(time.perf_counter())
        self.seconds += record.seconds


_RUNNERS = {"torch": _TorchRunner, "optimum": lambda d, p, t: _TorchRunner(d, p, t, optimum=True),
            "ctranslate2": _CTranslate2Runner, "gpt2onnx": _Gpt2OnnxRunner}


def _timed(runner: _Runner, prompt: list[int], new: int, rows: int = 1) -> tuple[float, float | None]:
    """The whole call's seconds, and (one row) the seconds from its first new token to its last."""
    start = time.perf_counter()
    out, stamps = runner.generate(prompt, new, rows)
    seconds = time.perf_counter() - start
    if len(out) != rows or any(len(row) != new for row in out):
        raise GenerationError(f"asked for {rows} x {new} tokens, got {[len(row) for row in out]}",
                              hint="every runner must ignore <|endoftext|> and give exactly the tokens asked for")
    if rows > 1:
        return seconds, None
    ordered = stamps == sorted(stamps)
    if len(stamps) != new or not ordered:
        raise GenerationError(f"asked for {new} tokens, got {len(stamps)} token times"
                              + ("" if ordered else ", out of order"),
                              hint="every runner must time each new token of a single row once, as it is produced")
    return seconds, stamps[-1] - stamps[0]


def _round(runner: _Runner, spec: dict) -> dict:
    """One round's timings; a decode is timed inside one call, from its first new token to its last."""
    p = spec["prompts"]
    t = {"first_short": _timed(runner, p["short"], 1)[0]}
    full_short, t["steps_short"] = _timed(runner, p["short"], spec["new_tokens"])
    timer = getattr(runner, "timer", None)  # gpt2onnx's: the ORT seconds of its last call
    if timer is not None:
        t["outside_ort"] = 1.0 - timer.seconds / full_short
    t["steps_long"] = _timed(runner, p["long"], spec["long_new_tokens"])[1]
    t["first_prefill"] = _timed(runner, p["prefill"], 1)[0]
    t["batch"] = _timed(runner, p["short"], spec["new_tokens"], spec["batch"])[0]
    return t


def _peak_rss() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    parent through fork and exec, and the parent holds the models it prepared."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker_main(argv: list[str]) -> int:
    """python -m gpt2onnx_export.bench worker FRAMEWORK PRECISION DIRECTORY THREADS; JSON lines on stdin/stdout."""
    framework, precision, directory, threads = argv[0], argv[1], Path(argv[2]), int(argv[3])
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints go to the log, not into the protocol
    start = time.perf_counter()
    runner = _RUNNERS[framework](directory, precision, threads)
    load_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))

    def reply(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    reply({"load_s": load_s, "size_bytes": size})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["cmd"] == "warmup":
                p = request["spec"]["prompts"]
                _timed(runner, p["short"], 4)
                _timed(runner, p["prefill"], 1)
                _timed(runner, p["short"], 4, request["spec"]["batch"])
                reply({"ok": True})
            elif request["cmd"] == "round":
                reply(_round(runner, request["spec"]))
            else:
                reply({"peak_rss_bytes": _peak_rss()})
                return 0
        except Exception as error:  # reported to the parent, which names the worker
            reply({"error": f"{type(error).__name__}: {error}"})
            return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: gpt2onnx bench (this module's own entry point is for its worker processes)")
