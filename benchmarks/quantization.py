"""How the quantization defaults were chosen: bits x block size x zero points (MatMulNBits) and int8 per
column (DynamicQuantizeMatMul), speed against quality.

    python benchmarks/quantization.py [--speed-model random:gpt2] [--quality-model DIR] [--rounds 9]

For every scheme: the size of the export and a decode step (past 8, 10th percentile and median of
round-robin rounds) on the speed model, and perplexity / top-1 agreement against PyTorch fp32 on the
quality model's held-out text (the first 20,000 tokens in 512-token windows, as its TRAINING.md measures),
scored by the same code as the export's quality gate (export/verify.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

TRAINED = Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt2-tiny-trained"
SCHEMES = [(bits, block, symmetric) for bits in (8, 4) for block in (32, 64, 128) for symmetric in (False, True)]


def _build(model: str, out: Path, quantization) -> Path:
    from gpt2onnx_export import builder, sources
    from gpt2onnx_export.steps import _write_side_files

    with tempfile.TemporaryDirectory() as work:
        source = sources.load_source(model, workdir=Path(work))
        out.mkdir(parents=True, exist_ok=True)
        builder.save_model(builder.build_graph(source.config, quantization), source.weights, source.config, out)
        _write_side_files(source, out)
    return out


def _quality(model_dir: Path, quantization, tokens: int) -> dict:
    from gpt2onnx.format.config import ModelConfig
    from gpt2onnx.runtime.session import OnnxSession
    from gpt2onnx.text.tokenizer import Tokenizer
    from gpt2onnx_export import sources, verify
    from gpt2onnx_export.reference import torch_model

    with tempfile.TemporaryDirectory() as tmp:
        out = _build(str(model_dir), Path(tmp) / "m", quantization)
        config = ModelConfig.from_file(out / "config.json")
        session = OnnxSession(out / "model.onnx", config)
        tokenizer = Tokenizer(out / "tokenizer.json")
        source = sources.load_source(str(model_dir), workdir=Path(tmp) / "w")
        reference = torch_model(source.config_dict, source.weights)
        ids = tokenizer.encode((model_dir / "heldout.txt").read_text())[:tokens]
        # fp32 too is scored like a quantized export: the thresholds are switched off below
        precision = "int4" if quantization is not None and quantization.bits == 4 else "int8"
        report = verify.verify_quality(session, reference, tokenizer, precision=precision, eval_ids=ids,
                                       eval_source="heldout.txt", max_perplexity_increase=float("inf"),
                                       min_top1_agreement=0.0)
    return {"perplexity": report["perplexity"]["export"], "reference": report["perplexity"]["reference"],
            "increase": report["perplexity"]["increase"], "top1": report["top1_agreement"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed-model", default="random:gpt2")
    parser.add_argument("--quality-model", default=str(TRAINED))
    parser.add_argument("--tokens", type=int, default=20000, help="held-out tokens scored")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time (with --threads 1, steadier on a shared machine)")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    from gpt2onnx.format.config import ModelConfig
    from gpt2onnx.runtime.session import OnnxSession, SessionOptions
    from gpt2onnx_export.builder import Quantization, quantization_for

    schemes = {"fp32": None, "int8 per-column": quantization_for("int8")}
    schemes.update({f"int{b} block {k}{' sym' if s else ''}": Quantization(bits=b, block_size=k, symmetric=s)
                    for b, k, s in SCHEMES})
    quality = {}
    for name, q in schemes.items():
        print(f"scoring {name} on {args.quality_model}", flush=True)
        quality[name] = _quality(Path(args.quality_model), q, args.tokens)
    sessions, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, q in schemes.items():
            print(f"building {name} of {args.speed_model}", flush=True)
            out = _build(args.speed_model, Path(tmp) / name.replace(" ", "-"), q)
            sizes[name] = (out / "model.onnx").stat().st_size / 2**20
            sessions[name] = OnnxSession(out / "model.onnx", ModelConfig.from_file(out / "config.json"),
                                         SessionOptions(threads=args.threads))
        ids = np.random.default_rng(0).integers(0, 50000, (1, 8))
        times = {name: [] for name in schemes}
        for _ in range(args.rounds):
            for name, session in sessions.items():
                _, cache = session.run(ids, np.ones((1, 8), np.int64), np.arange(8)[None], session.empty_cache(1))
                start = clock()
                for i in range(args.steps):
                    _, cache = session.run(np.array([[1]]), np.ones((1, 9 + i), np.int64), np.array([[8 + i]]), cache,
                                           logits_for="last")
                times[name].append((clock() - start) / args.steps * 1000)
    print(f"\nspeed: {args.speed_model}, decode step after 8 tokens, {args.clock} clock, {args.threads or 'default'} "
          f"threads (10th percentile / median of {args.rounds} rounds);"
          f" quality: {Path(args.quality_model).name}, first {args.tokens} held-out tokens")
    print("| scheme | size MB | decode step ms | perplexity | vs PyTorch fp32 | top-1 agreement |\n"
          "|---|---|---|---|---|---|")
    for name in schemes:
        qd = quality[name]
        print(f"| {name} | {sizes[name]:.0f} | {np.percentile(times[name], 10):.2f} / {np.median(times[name]):.2f} | "
              f"{qd['perplexity']:.2f} | {100 * qd['increase']:+.2f}% | {100 * qd['top1']:.1f}% |")


if __name__ == "__main__":
    main()
