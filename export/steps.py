"""`gpt2onnx export`: check inputs, load, build, verify, publish atomically — the same steps every time.

The model is written into a hidden temporary directory beside OUT_DIR and renamed into place only after
verification passed and the manifest was written, so an interrupted or failed export leaves nothing that
loads as a model.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpt2onnx import __version__
from gpt2onnx import contract as c
from gpt2onnx import precisions
from gpt2onnx.errors import ExportError, InvalidArgumentError
from gpt2onnx.session import OnnxSession
from gpt2onnx.tokenizer import Tokenizer

from . import builder, quantize, sources, verify
from .progress import stderr, stopwatch
from .reference import torch_model

PARTIAL_MARK = ".partial-"


@dataclass(frozen=True)
class ExportOptions:
    """How to export."""

    precision: str = "fp32"  # weight precision of the graph: fp32, int8 or int4 (weight-only, block-wise)
    block_size: int | None = None  # int8/int4: weights per block (power of two >= 16); None: the default
    seed: int = 0  # seed of random:NAME weights and of the verification inputs
    revision: str | None = None  # hub revision (branch, tag or commit)
    allow_pickle: bool = False  # accept pytorch_model.bin checkpoints (pickle can run code: trusted sources only)
    force: bool = False  # replace an existing export at OUT_DIR
    atol: float = verify.DEFAULT_ATOL  # largest |difference| from PyTorch accepted for logits and cache
    # quantized exports: the quality gate (None = the precision's default in gpt2onnx/precisions.py)
    max_perplexity_increase: float | None = None  # relative to PyTorch fp32, e.g. 0.01 = 1%
    max_kl: float | None = None  # mean KL(PyTorch fp32 || export) of the next-token distributions, nats
    min_top1_agreement: float | None = None  # share of the decisive positions whose top token equals PyTorch's
    eval_text: str | None = None  # text file to score (default: heldout.txt beside a local checkpoint, else a sample)
    # the KV cache's dtype: "int8" (int8/int4 exports only) reads a quarter of the bytes per step; None: int8 for
    # int8/int4 exports, float32 for fp32 (verified exactly)
    kv_cache: str | None = None


def export_model(model: str, out_dir: str | Path, options: ExportOptions = ExportOptions(), *,
                 progress: Callable[[str], None] = stderr) -> dict:
    """Export MODEL (hub id, local directory or random:NAME) to OUT_DIR. Returns the manifest."""
    out = _check_output(Path(out_dir), options)
    precision = precisions.get(options.precision)
    quantization = builder.quantization_for(precision.name, options.block_size)  # checks the block size
    kv_cache = options.kv_cache or precision.kv_cache_dtype
    if kv_cache not in c.KV_CACHE_DTYPES:
        raise InvalidArgumentError(f"kv_cache must be one of {', '.join(c.KV_CACHE_DTYPES)}, got {kv_cache!r}")
    if kv_cache not in precision.kv_cache_dtypes:
        raise InvalidArgumentError(f"an {kv_cache} KV cache needs quantized weights (the {precision.name} export is "
                                   f"verified exactly)", hint="add --precision " + " or --precision ".join(
                                       precisions.QUANTIZED))
    step = stopwatch(progress)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL_MARK}", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the published model is not
    try:
        with tempfile.TemporaryDirectory(prefix="gpt2onnx-work-") as work:
            step(f"loading {model}")
            source = sources.load_source(model, workdir=Path(work), seed=options.seed, revision=options.revision,
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
            files = builder.save_model(builder.build_graph(config, quantization, kv_cache), weights, config,
                                       staging)
            files += _write_side_files(source, staging)
        step("verifying against PyTorch")
        session = OnnxSession(staging / c.MODEL_FILE, config)
        reference = torch_model(source.config_dict, source.weights)
        tokenizer = Tokenizer(staging / c.TOKENIZER_FILE)
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
        del session, reference
        step(f"verified: {summary}")
        manifest = _manifest(source, options, staging, files, report, quantization, kv_info)
        _publish(staging, out)
        step(f"wrote {out}")
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_output(out: Path, options: ExportOptions) -> Path:
    """Refuse to overwrite without --force, and never delete something that is not an export of ours."""
    out = out.expanduser().absolute()
    if out.exists() or out.is_symlink():
        if not options.force:
            raise ExportError(f"{out} already exists", hint="pass --force to replace it, or choose another OUT_DIR")
        if not out.is_dir() or (any(out.iterdir()) and not _is_export(out)):
            raise ExportError(f"{out} exists and is not a gpt2onnx export; refusing to replace it even with --force",
                              hint="choose another OUT_DIR or remove it yourself")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _is_export(path: Path) -> bool:
    try:
        return json.loads((path / c.MANIFEST_FILE).read_text()).get(c.M_FORMAT) == c.FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _write_side_files(source: sources.Source, directory: Path) -> list[str]:
    (directory / c.CONFIG_FILE).write_text(json.dumps(source.config_dict, indent=2) + "\n")
    (directory / c.GENERATION_CONFIG_FILE).write_text(json.dumps(source.generation_config, indent=2) + "\n")
    files = [c.CONFIG_FILE, c.GENERATION_CONFIG_FILE]
    for name in (c.TOKENIZER_FILE, *c.TOKENIZER_EXTRA_FILES):
        if (source.tokenizer_dir / name).is_file():
            shutil.copyfile(source.tokenizer_dir / name, directory / name)
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
    from gpt2onnx.manifest import hash_files, write_manifest

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


def _publish(staging: Path, out: Path) -> None:
    """Move the finished export into place; an existing export is swapped out and then removed."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "model")
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)
