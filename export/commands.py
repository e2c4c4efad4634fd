"""The export side's commands of the `gpt2onnx` CLI: `export`, `verify`, `bench`.

Each `register_*(subparsers, formatter)` adds its parser; pyproject.toml names them in the entry-point group
`gpt2onnx.commands`, through which gpt2onnx/tools/cli.py finds them (gpt2onnx/tools/plugins.py).
Loading this module must stay cheap — the CLI loads it to list the commands in `gpt2onnx --help` — so the heavy
imports are in the command functions. When the export extra is missing, the help says so and the command exits
with the hint.
"""

from __future__ import annotations

import argparse
import json
import sys

from gpt2onnx.format import precisions
from gpt2onnx.format.contract import KV_CACHE_DTYPES
from gpt2onnx.tools.plugins import KNOWN

from . import INSTALL_HINT, missing_extra, require_extra
from .progress import stderr

VERIFY_EXAMPLES = """examples:
  gpt2onnx verify out/gpt2                           # against the checkpoint recorded in the manifest
  gpt2onnx verify out/gpt2 --seeds 20 --json         # 200 sampling cases, the full report as JSON
  gpt2onnx verify out/gpt2-int4 --max-kl 0.02 --text heldout.txt
  gpt2onnx verify optimum-gpt2/ --reference gpt2     # an Optimum export, against the checkpoint it came from
"""


def _help(command: str) -> str:
    """A command's one-line help (the runtime lists it by the same words when this package is not installed),
    with how to install the export extra when that is missing."""
    text = KNOWN[command][0]
    return text if missing_extra() is None else f"{text} (needs: {INSTALL_HINT.split(' (')[0]})"


def _defaults(field: str) -> str:
    """'(default 0.01 for int8, 0.05 for int4)': a field of every quantized precision, from the table."""
    return f"(default {precisions.per_precision(field)})"


def _quality_flags(p, *, increase: str, top1: str) -> None:
    """The quality gate's three thresholds, for export and verify (which spell two of them differently)."""
    quantized = "/".join(precisions.QUANTIZED)
    p.add_argument(increase, type=float, default=argparse.SUPPRESS,
                   help=f"{quantized}: largest perplexity increase over PyTorch fp32, as a fraction "
                        f"{_defaults('max_perplexity_increase')}")
    p.add_argument("--max-kl", type=float, default=argparse.SUPPRESS,
                   help=f"{quantized}: largest mean KL divergence from PyTorch fp32, nats per token "
                        f"{_defaults('max_kl')}")
    p.add_argument(top1, type=float, default=argparse.SUPPRESS,
                   help=f"{quantized}: smallest share of the positions where PyTorch is decisive whose most likely "
                        f"next token equals PyTorch's {_defaults('min_top1_agreement')}")


# -- export ---------------------------------------------------------------------------------------------


def register_export(subparsers, formatter) -> None:
    quantized = "/".join(precisions.QUANTIZED)
    p = subparsers.add_parser("export", formatter_class=formatter,
                              help=_help("export"),
                              description="Convert MODEL to ONNX with a KV cache, verify it against PyTorch, and "
                                          "write OUT_DIR only if it passes.")
    p.add_argument("model", metavar="MODEL", help="hub id (gpt2, gpt2-medium, distilgpt2, user/repo), local directory "
                                                   "in Hugging Face layout, or random:NAME (tiny, gpt2, gpt2-xl, ...)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds an earlier export")
    p.add_argument("--precision", default="fp32", choices=precisions.NAMES,
                   help=f"weights: fp32 (verified to --atol) or quantized {quantized} (gated on quality)")
    p.add_argument("--block-size", type=int, default=argparse.SUPPRESS,
                   help=f"{'/'.join(precisions.BLOCKED)}: weights per quantization block, 16, 32, 64, ...: smaller is "
                        "more accurate, "
                        f"larger faster {_defaults('default_block_size')}")
    kv_defaults = ", ".join(f"{x.kv_cache_dtype} for {x.name}" for x in precisions.PRECISIONS.values())
    p.add_argument("--kv-cache", default=argparse.SUPPRESS, choices=KV_CACHE_DTYPES,
                   help="the KV cache's dtype; int8 (per-channel scales calibrated at export) reads a quarter of "
                        f"the bytes per step at long contexts (default: {kv_defaults})")
    _quality_flags(p, increase="--max-perplexity-increase", top1="--min-top1-agreement")
    p.add_argument("--eval-text", default=argparse.SUPPRESS, metavar="FILE",
                   help=f"{quantized}: text the quality gate scores (default: heldout.txt in a local MODEL "
                        "directory, else a built-in sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of random:NAME weights and of the verification inputs")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit (default: the hub's main branch)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model.bin checkpoints (pickle can run code: trusted sources only)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest |logit difference| from PyTorch accepted")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    require_extra()
    from .steps import ExportOptions, export_model

    optional = {name: getattr(args, name, None) for name in ("block_size", "eval_text", "max_perplexity_increase",
                                                            "max_kl", "min_top1_agreement", "kv_cache")}
    options = ExportOptions(precision=args.precision, seed=args.seed, revision=args.revision,
                            allow_pickle=args.allow_pickle, force=args.force, atol=args.atol, **optional)
    export_model(args.model, args.out_dir, options)
    return 0


# -- verify ---------------------------------------------------------------------------------------------


def register_verify(subparsers, formatter) -> None:
    p = subparsers.add_parser("verify", formatter_class=formatter,
                              help=_help("verify"),
                              description="Run MODEL_DIR side by side with transformers' GPT2LMHeadModel on the same "
                                          "weights and report every difference: logits and cache per prompt length, "
                                          "greedy parity, and seeded sampling (model.generate(seed=s) against "
                                          "set_seed(s) + generate(do_sample=True)) over seeds x prompts x settings. "
                                          "A flip of a near-tie by float noise is reported with its margin; any "
                                          "other difference exits non-zero. Quantized exports are measured instead "
                                          "(KL divergence, perplexity, top-1 agreement where PyTorch is decisive) "
                                          "against the thresholds below. Needs the export extra.",
                              epilog=VERIFY_EXAMPLES)
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="exported model directory (gpt2onnx's, or an Optimum text-generation-with-past export)")
    p.add_argument("--reference", metavar="HF_ID_OR_DIR", default=argparse.SUPPRESS,
                   help="checkpoint to compare with: hub id, local directory or random:NAME (default: the source "
                        "in the manifest; for an Optimum export, MODEL_DIR itself when it holds PyTorch weights)")
    p.add_argument("--reference-seed", type=int, default=argparse.SUPPRESS,
                   help="the seed of a random:NAME reference (default: the manifest's, else 0)")
    p.add_argument("--seeds", type=int, default=10,
                   help="sampling: seeds 0..N-1, each with every setting of export/parity.py "
                        "(beam sampling: 3 at most)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="sampling: tokens generated per case")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="fp32: largest |logit difference| that counts as float noise")
    p.add_argument("--attention", choices=["sdpa", "eager"], default=argparse.SUPPRESS,
                   help="the reference's attention (default: sdpa, as from_pretrained loads it, unless the config "
                        "needs eager)")
    _quality_flags(p, increase="--max-ppl-increase", top1="--min-top1")
    p.add_argument("--text", metavar="FILE", default=argparse.SUPPRESS,
                   help="quantized: text to score (default: heldout.txt beside a local source, else a built-in "
                        "sample)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per physical core)")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    require_extra()
    from . import verify_command

    optional = {name: getattr(args, name, None) for name in ("reference", "reference_seed", "attention", "min_top1",
                                                            "max_kl", "max_ppl_increase", "text")}
    options = verify_command.VerifyOptions(seeds=args.seeds, max_new_tokens=args.max_new_tokens, atol=args.atol,
                                           threads=args.threads, **optional)
    report = verify_command.verify_model(args.model_dir, options)
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else verify_command.format_report(report))
    verify_command.check(report)
    return 0


# -- bench ----------------------------------------------------------------------------------------------


def register_bench(subparsers, formatter) -> None:
    from . import bench

    p = subparsers.add_parser("bench", formatter_class=formatter,
                              help=_help("bench"),
                              description="Measure GPT-2 generation speed of gpt2onnx at each precision next to "
                                          "transformers+torch, Optimum and CTranslate2 (those installed) and "
                                          "llama.cpp (when found: --llamacpp), on one fixed workload, round-robin "
                                          "in one run, with the bytes a decode step reads and the share of the "
                                          "machine's read bandwidth that makes. Prints a table; writes "
                                          "OUT_DIR/bench.json and OUT_DIR/bench.png.")
    b = bench.BenchOptions()  # the defaults are the benchmark's own
    p.add_argument("--model", default=b.model,
                   help="random:NAME, a local Hugging Face directory, or a ready-made Optimum export (measured as it "
                        "is by Optimum and by gpt2onnx: --precisions optimum-fp32)")
    p.add_argument("--runs", type=int, default=b.runs, help="rounds; each figure is the median over them")
    p.add_argument("--new-tokens", type=int, default=b.new_tokens, help="tokens generated after the short prompt")
    p.add_argument("--long-past", type=int, default=b.long_prompt, help="prompt tokens before the long-past decode")
    p.add_argument("--long-new-tokens", type=int, default=b.long_new_tokens,
                   help="tokens generated after the long prompt (the decode@768 figure is their rate)")
    p.add_argument("--prefill", type=int, default=b.prefill, help="prompt tokens of the prefill figure")
    p.add_argument("--batch", type=int, default=b.batch, help="sampled continuations of the batch figure")
    p.add_argument("--threads", type=int, default=b.threads, help="threads of every framework (0: physical cores)")
    p.add_argument("--only", default=",".join(b.frameworks), help="frameworks to measure")
    p.add_argument("--llamacpp", metavar="DIR", default=None,
                   help="llama.cpp to measure beside gpt2onnx (F32, Q8_0, Q4_0 against fp32, int8, int4): a folder "
                        "holding llama-bench (in it, its bin/ or build/bin/) and the GGUF files of the same model "
                        "(default: $GPT2ONNX_LLAMACPP; benchmarks/README.md says how to make them)")
    p.add_argument("--llamacpp-bin", metavar="DIR", default=None, help="the folder of llama-bench, if elsewhere")
    p.add_argument("--llamacpp-gguf", metavar="DIR", default=None, help="the folder of the GGUF files, if elsewhere")
    p.add_argument("--precisions", default=",".join(b.precisions),
                   help="gpt2onnx precisions to measure (+kv32: exported with --kv-cache float32; optimum-fp32: "
                        "Optimum's fp32 export, run by gpt2onnx)")
    p.add_argument("--work-dir", default="~/.cache/gpt2onnx/bench", help="where the prepared models are kept")
    p.add_argument("--out-dir", default="bench-results", help="where bench.json and bench.png go")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from . import bench

    options = bench.BenchOptions(model=args.model, runs=args.runs, new_tokens=args.new_tokens,
                                 long_prompt=args.long_past, long_new_tokens=args.long_new_tokens,
                                 prefill=args.prefill, batch=args.batch, threads=args.threads,
                                 frameworks=tuple(args.only.split(",")), precisions=tuple(args.precisions.split(",")),
                                 work_dir=Path(args.work_dir).expanduser(),
                                 llamacpp_bin=_path(args.llamacpp_bin or args.llamacpp),
                                 llamacpp_gguf=_path(args.llamacpp_gguf or args.llamacpp))
    command = "gpt2onnx bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    report = bench.run_bench(options, progress=stderr, command=command)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    chart = bench.write_chart(report, out / "bench.png")
    print(bench.format_table(report))
    print(f"\nwrote {out / 'bench.json'}" + (f" and {chart}" if chart else " (no chart: pip install matplotlib)"),
          file=sys.stderr)
    return 0


def _path(value: str | None):
    from pathlib import Path

    return Path(value).expanduser() if value else None
