"""`gpt2onnx export`: check inputs, load, build, verify, publish atomically — the same steps every time.

The model is written into a hidden directory beside OUT_DIR and renamed into place only after verification
passed and the manifest was written (`staging`), so an interrupted or failed export leaves nothing that loads
as a model; Ctrl-C and SIGTERM remove that directory, and after a kill -9 the next export to OUT_DIR does.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpt2onnx import __version__
from gpt2onnx.errors import InvalidArgumentError
from gpt2onnx.format import contract as c
from gpt2onnx.format import precisions
from gpt2onnx.runtime.session import OnnxSession
from gpt2onnx.text.tokenizer import Tokenizer

from . import builder, quantize, sources, staging, verify
from .progress import stderr, stopwatch
from .reference import torch_model


@dataclass(frozen=True)
class ExportOptions:
    """How to export."""

    precision: str = "fp32"  # weight precision of the graph: fp32, int8 (per output column) or int4 (block-wise)
    block_size: int | None = None  # int4: weights per block (power of two >= 16); None: the default
    seed: int = 0  # seed of random:NAME weights and of the verification inputs
    revision: str | None = None  # hub revision (branch, tag or commit)
    allow_pickle: bool = False  # accept pytorch_model.bin checkpoints (pickle can run code: trusted sources only)
    force: bool = False  # replace an existing export at OUT_DIR
    atol: float = verify.DEFAULT_ATOL  # largest |difference| from PyTorch accepted for logits and cache
    # quantized exports: the quality gate (None = the precision's default in gpt2onnx/format/precisions.py)
    max_perplexity_increase: float | None = None  # relative to PyTorch fp32, e.g. 0.01 = 1%
    max_kl: float | None = None  # mean KL(PyTorch fp32 || export) of the next-token distributions, nats
    min_top1_agreement: float | None = None  # share of the decisive positions whose top token equals PyTorch's
    eval_text: str | None = None  # text file to score (default: heldout.txt beside a local checkpoint, else a sample)
    # the KV cache's dtype: "int8" (int8/int4 exports only) reads a quarter of the bytes per step; None: int8 for
    # int8/int4 exports, float32 for fp32 (verified exactly)
    kv_cache: str | None = None


def check_options(options: ExportOptions) -> tuple[builder.Quantization | None, str]:
    """Every option, checked before any work: InvalidArgumentError naming the first bad one.
    Returns (the quantization, None for fp32; the KV cache's dtype)."""
    if not isinstance(options, ExportOptions):
        raise InvalidArgumentError(f"options must be an ExportOptions, got {type(options).__name__}",
                                   hint="gpt2onnx_export.ExportOptions(precision=..., force=...)")
    o = options
    precision = precisions.get(o.precision)
    if o.block_size is not None and not precision.quantized:
        raise InvalidArgumentError(f"a block size applies to {' and '.join(precisions.BLOCKED)} exports only",
                                   hint="add --precision " + " or --precision ".join(precisions.BLOCKED)
                                        + ", or leave out --block-size")
    quantization = builder.quantization_for(precision.name, o.block_size)  # checks the block size
    if not verify.is_int(o.seed) or not 0 <= o.seed < 2**63:
        raise InvalidArgumentError(f"seed must be an integer from 0 to 2**63-1, got {o.seed!r}",
                                   hint="it seeds random:NAME weights and the verification inputs (default 0)")
    if o.revision is not None and (not isinstance(o.revision, str) or not o.revision.strip()):
        raise InvalidArgumentError(f"revision must be a branch, tag or commit name, got {o.revision!r}",
                                   hint="leave it out for the hub's main branch")
    for name in ("allow_pickle", "force"):
        if not isinstance(getattr(o, name), bool):
            raise InvalidArgumentError(f"{name} must be True or False, got {getattr(o, name)!r}",
                                       hint=f"pass {name}=True or {name}=False")
    verify.check_atol(o.atol, meaning="the largest |difference| from PyTorch accepted")
    verify.check_thresholds(o.max_perplexity_increase, o.max_kl, o.min_top1_agreement)
    if o.eval_text is not None and (not isinstance(o.eval_text, (str, os.PathLike))
                                    or not Path(o.eval_text).expanduser().is_file()):
        raise InvalidArgumentError(f"the evaluation text {o.eval_text!r} is not a file",
                                   hint="pass a UTF-8 text file to --eval-text")
    kv_cache = precisions.check_kv_cache(o.kv_cache or precision.kv_cache_dtype)
    if kv_cache not in precision.kv_cache_dtypes:
        raise InvalidArgumentError(f"an {kv_cache} KV cache needs quantized weights (the {precision.name} export is "
                                   "verified exactly)", hint="add --precision " + " or --precision ".join(
                                       precisions.QUANTIZED))
    return quantization, kv_cache


def export_model(model: str, out_dir: str | Path, options: ExportOptions = ExportOptions(), *,
                 progress: Callable[[str], None] = stderr) -> dict:
    """Export MODEL (hub id, local directory or random:NAME) to OUT_DIR. Returns the manifest.

    Raises InvalidArgumentError for a bad option (before any work), ModelLoadError for a damaged checkpoint,
    ExportError when OUT_DIR cannot be written or the source found, VerificationError (an ExportError) when
    the graph differs from PyTorch. A SIGTERM in the main thread removes the unfinished export, then exits.
    """
    quantization, kv_cache = check_options(options)
    if not isinstance(model, str) or not model.strip():
        raise InvalidArgumentError(f"MODEL must be a hub id (gpt2), a local directory or random:NAME, got {model!r}",
                                   hint="for example: gpt2onnx export random:tiny out/tiny")
    out = staging.check_output(Path(out_dir), force=options.force)
    step = stopwatch(progress)

    with staging.terminate_cleanly():
        staging.remove_stale(out, step)
        directory = staging.make_staging(out)
        try:
            source, files, kv_info = _load_and_build(model, directory, options, quantization, kv_cache, step)
            report = _verify(model, source, directory, options, quantization, step)
            manifest = _manifest(source, options, directory, files, report, quantization, kv_info)
            staging.publish(directory, out)
        except staging.Terminated:
            step("terminated (SIGTERM): removing the unfinished export")
            raise
        except OSError as error:
            raise staging.output_error(error, out, directory) from error
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    step(f"wrote {out}")
    return manifest


def _load_and_build(model: str, directory: Path, options: ExportOptions, quantization, kv_cache: str,
                    step: Callable[[str], None]) -> tuple[sources.Source, list[str], dict]:
    """Load the source and write the graph and its side files into `directory`. Returns (source, the files
    written, the manifest's KV cache entry)."""
    work = staging.make_workdir(directory)
    try:
        step(f"loading {model}")
        source = sources.load_source(model, workdir=work, seed=options.seed, revision=options.revision,
                                     allow_pickle=options.allow_pickle)
        config = source.config
        step(f"building the {options.precision} graph: {config.n_layer} layers, n_embd {config.n_embd}, "
             f"{sum(w.size for w in source.weights.values()) / 1e6:.1f}M stored parameters")
        weights, kv_info = source.weights, {"dtype": kv_cache}
        if kv_cache == "int8":
            step("calibrating the int8 KV cache's scales with PyTorch")
            windows = _calibration_windows(source, config, options.seed)
            scales = quantize.kv_cache_scales(torch_model(source.config_dict, source.weights), config, windows)
            weights = {**source.weights, **scales}
            kv_info.update(scales="per head and channel, float = int8 * scale",
                           calibration=f"{sum(map(len, windows))} tokens: the built-in sample text and seeded "
                                       f"random tokens", margin=quantize.KV_SCALE_MARGIN)
        graph = builder.build_graph(config, quantization, kv_cache)
        files = builder.save_model(graph, weights, config, directory)
        files += _write_side_files(source, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return source, files, kv_info


def _verify(model: str, source: sources.Source, directory: Path, options: ExportOptions, quantization,
            step: Callable[[str], None]) -> dict:
    """The verification gate on the graph in `directory`; raises VerificationError. Returns the report."""
    step("verifying against PyTorch")
    session = OnnxSession(directory / c.MODEL_FILE, source.config)
    reference = torch_model(source.config_dict, source.weights)
    tokenizer = Tokenizer(directory / c.TOKENIZER_FILE)
    if quantization is None:
        report = verify.verify(session, reference, tokenizer, atol=options.atol, seed=options.seed)
        worst = max(report["max_abs_diff"].values())
        summary = (f"largest |difference| {worst:.2e} (atol {options.atol:g}), "
                   f"greedy {report['greedy']['tokens']} tokens identical")
    else:
        beside = None if model.startswith(sources.RANDOM_PREFIX) else Path(model).expanduser()
        eval_source, eval_ids = verify.eval_tokens(tokenizer, text_file=options.eval_text, beside=beside)
        step(f"scoring quality on {eval_source}")
        report = verify.verify_quality(session, reference, tokenizer, precision=options.precision,
                                       eval_ids=eval_ids, eval_source=eval_source, seed=options.seed,
                                       max_perplexity_increase=options.max_perplexity_increase,
                                       max_kl=options.max_kl, min_top1_agreement=options.min_top1_agreement)
        ppl, top1 = report["perplexity"], report["top1_agreement"]
        summary = (f"KL {report['kl_divergence']['mean']:.2g} nats/token, perplexity {ppl['export']:.3f} vs "
                   f"PyTorch fp32 {ppl['reference']:.3f} ({100 * ppl['increase']:+.2f}%), top-1 agreement "
                   + ("n/a" if top1 is None else f"{100 * top1:.1f}%")
                   + f" at {report['top1_positions']} decisive positions")
    step(f"verified: {summary}")
    return report


def _write_side_files(source: sources.Source, directory: Path) -> list[str]:
    """config.json, generation_config.json and the tokenizer files. Keys that point transformers' Auto*
    classes at Python files (auto_map) are not passed on: an export never asks anyone to run code."""
    (directory / c.CONFIG_FILE).write_text(json.dumps(source.config_dict, indent=2) + "\n")
    (directory / c.GENERATION_CONFIG_FILE).write_text(json.dumps(source.generation_config, indent=2) + "\n")
    files = [c.CONFIG_FILE, c.GENERATION_CONFIG_FILE]
    for name in (c.TOKENIZER_FILE, *c.TOKENIZER_EXTRA_FILES):
        path = source.tokenizer_dir / name
        if not path.is_file():
            continue
        settings = sources.read_json(path) if name.endswith("_config.json") else None
        if settings is not None and settings != sources.without_code_references(settings):
            (directory / name).write_text(json.dumps(sources.without_code_references(settings), indent=2) + "\n")
        else:
            shutil.copyfile(path, directory / name)
        files.append(name)
    return files


def _calibration_windows(source: sources.Source, config, seed: int) -> list[list[int]]:
    """Tokens the int8 KV cache's scales are calibrated on (not the evaluation text, which judges them)."""
    import numpy as np

    text = Tokenizer(source.tokenizer_dir / c.TOKENIZER_FILE).encode(verify.SAMPLE_TEXT)
    width = min(256, config.n_positions)
    rng = np.random.default_rng(seed + 1)
    return [text[:config.n_positions], rng.integers(0, config.vocab_size, width).tolist()]


def _manifest(source: sources.Source, options: ExportOptions, directory: Path, files: list[str],
              report: dict, quantization: builder.Quantization | None, kv_info: dict) -> dict:
    """Written last: a directory without it is not a model."""
    from gpt2onnx.runtime.manifest import hash_files, write_manifest

    manifest = {c.M_FORMAT: c.FORMAT_NAME, c.M_FORMAT_VERSION: c.FORMAT_VERSION, c.M_PRECISION: options.precision,
                c.M_OPSET: c.OPSET, c.M_SOURCE: source.description, c.M_VERSIONS: _versions(),
                c.M_CREATED: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                c.M_FILES: hash_files(directory, files), c.M_PARITY: report}
    if quantization is not None:
        manifest[c.M_QUANTIZATION] = quantization.as_dict()
    manifest[c.M_KV_CACHE] = kv_info
    write_manifest(directory, manifest)
    return manifest


def _versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import tokenizers
    import torch
    import transformers

    return {"gpt2onnx": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__,
            "tokenizers": tokenizers.__version__, "python": sys.version.split()[0]}
