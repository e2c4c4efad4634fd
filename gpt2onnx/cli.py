"""The `gpt2onnx` command: a thin layer over the Python API. Each command parses, calls, prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .errors import Gpt2OnnxError, InvalidArgumentError, MissingDependencyError

EXAMPLES = """examples:
  gpt2onnx export gpt2 out/gpt2                 # download, convert, verify against PyTorch
  gpt2onnx export random:gpt2 out/random-gpt2   # offline: seeded random weights, real tokenizer
  gpt2onnx export random:gpt2 out/gpt2-int4 --precision int4   # 4-bit weights, gated on quality
  gpt2onnx generate "Hello, I'm a language model," --model out/gpt2
  gpt2onnx verify out/gpt2                      # side by side with PyTorch: logits, greedy, seeded sampling
  gpt2onnx inspect out/gpt2                     # weights, shapes, dtypes, inputs/outputs, ops, manifest
  gpt2onnx plot out/gpt2 --out plots --prompt "The cat sat on the mat"   # embeddings, weights, attention
  gpt2onnx bench                                # speed next to torch, Optimum and CTranslate2
"""


GENERATE_EXAMPLES = """examples:
  gpt2onnx generate "Hello, I'm a language model," -m out/gpt2 --max-length 30 -n 5 --do-sample --seed 42
  gpt2onnx generate "def main():" -m out/gpt2 --max-new-tokens 64 --stop "\\n\\n" --stream
  echo "Once upon a time" | gpt2onnx generate - -m out/gpt2 --do-sample --top-p 0.9 --json
"""


VERIFY_EXAMPLES = """examples:
  gpt2onnx verify out/gpt2                           # against the checkpoint recorded in the manifest
  gpt2onnx verify out/gpt2 --seeds 20 --json         # 200 sampling cases, the full report as JSON
  gpt2onnx verify out/gpt2-int4 --max-kl 0.02 --text heldout.txt
"""


def _export_module():
    try:
        import gpt2onnx_export
    except MissingDependencyError:
        raise
    except ImportError as error:
        raise MissingDependencyError(f"exporting needs the export extra (cannot import {error.name or error})",
                                     hint="pip install 'gpt2onnx[export]'") from error
    return gpt2onnx_export


def cmd_export(args: argparse.Namespace) -> int:
    export = _export_module()
    options = export.ExportOptions(precision=args.precision, seed=args.seed, revision=args.revision,
                                   allow_pickle=args.allow_pickle, force=args.force, atol=args.atol,
                                   block_size=getattr(args, "block_size", None),
                                   eval_text=getattr(args, "eval_text", None),
                                   max_perplexity_increase=getattr(args, "max_perplexity_increase", None),
                                   min_top1_agreement=getattr(args, "min_top1_agreement", None),
                                   kv_cache=getattr(args, "kv_cache", None))
    export.export_model(args.model, args.out_dir, options)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    _export_module()
    from gpt2onnx_export import verify_command

    optional = {name: getattr(args, name, None) for name in ("reference", "attention", "min_top1", "max_kl",
                                                            "max_ppl_increase", "text")}
    options = verify_command.VerifyOptions(seeds=args.seeds, max_new_tokens=args.max_new_tokens, atol=args.atol,
                                           threads=args.threads, **optional)
    report = verify_command.verify_model(args.model_dir, options)
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else verify_command.format_report(report))
    verify_command.check(report)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json as json_module
    import shlex
    from pathlib import Path

    from . import bench

    options = bench.BenchOptions(model=args.model, runs=args.runs, new_tokens=args.new_tokens,
                                 long_prompt=args.long_past, long_new_tokens=args.long_new_tokens,
                                 prefill=args.prefill, batch=args.batch, threads=args.threads,
                                 frameworks=tuple(args.only.split(",")), precisions=tuple(args.precisions.split(",")),
                                 work_dir=Path(args.work_dir).expanduser())
    command = "gpt2onnx bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    report = bench.run_bench(options, progress=lambda message: print(message, file=sys.stderr, flush=True),
                             command=command)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json_module.dumps(report, indent=2) + "\n")
    chart = bench.write_chart(report, out / "bench.png")
    print(bench.format_table(report))
    print(f"\nwrote {out / 'bench.json'}" + (f" and {chart}" if chart else " (no chart: pip install matplotlib)"),
          file=sys.stderr)
    return 0


def _unescape(text: str) -> str:
    """Let a shell user type a newline or tab in --stop as \\n or \\t."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def cmd_generate(args: argparse.Namespace) -> int:
    from .model import load

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = load(args.model, threads=args.threads)
    options = dict(max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                   min_new_tokens=args.min_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                   no_repeat_ngram_size=args.no_repeat_ngram_size, stop=[_unescape(t) for t in args.stop] if args.stop else None, seed=args.seed,
                   sampler=args.sampler, ignore_eos=args.ignore_eos or None, truncate=args.truncate,
                   allow_special_tokens=args.allow_special_tokens)
    if args.stream:
        if args.json:
            raise InvalidArgumentError("--stream and --json do not go together", hint="pick one")
        print(prompt, end="", flush=True)
        for piece in model.stream(prompt, num_return_sequences=args.num_return_sequences, **options):
            print(piece, end="", flush=True)
        print()
        return 0
    results = model.generate(prompt, num_return_sequences=args.num_return_sequences, **options)
    results = results if isinstance(results, list) else [results]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], ensure_ascii=False, indent=2))
    else:
        print("\n\n".join(prompt + r.text for r in results))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_model

    report = inspect_model(args.model_dir, check_hashes=args.check_hashes)
    print(report.to_json() if args.json else report.format())
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_model

    paths = plot_model(args.model_dir, args.out, prompt=args.prompt, weight=args.weight, weight_slice=args.slice,
                       dims=args.dims, positions=args.positions, layers=args.layers, heads=args.heads,
                       threads=args.threads)
    print("\n".join(str(path) for path in paths))
    return 0


SERVE_EXAMPLES = """examples:
  gpt2onnx serve out/gpt2                                   # http://127.0.0.1:8000 (playground at /)
  gpt2onnx serve out/gpt2 --api-key-file key.txt --max-batch 32 --port 9000
  gpt2onnx serve out/gpt2 --ray --replicas 2 --cpus-per-replica 1   # 2 replicas on Ray Serve, 1 core each
  # then, from Python:  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY").completions.create(
  #                         model="gpt2", prompt="Hello", max_tokens=20, seed=1)
"""


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    try:
        from . import server
    except ImportError as error:
        raise MissingDependencyError(f"serving needs the serve extra (cannot import {error.name or error})",
                                     hint="pip install 'gpt2onnx[serve]'") from error
    from .engine import Engine, EngineOptions
    from .manifest import read_manifest
    from .model import load

    directory = Path(args.model_dir)
    read_manifest(directory, check_hashes=False)  # a wrong directory fails now, not after the server started
    keys = [args.api_key] if args.api_key else []
    if args.api_key_file:
        try:
            keys += [line.strip() for line in Path(args.api_key_file).read_text().splitlines() if line.strip()]
        except OSError as error:
            raise InvalidArgumentError(f"cannot read --api-key-file {args.api_key_file}: {error.strerror}",
                                       hint="give a file holding one key per line") from None
        if not keys:
            raise InvalidArgumentError(f"--api-key-file {args.api_key_file} holds no key",
                                       hint="write the key on the file's first line")
    keys += [os.environ["GPT2ONNX_API_KEY"]] if not keys and os.environ.get("GPT2ONNX_API_KEY") else []
    engine_options = dict(max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk)
    EngineOptions(**engine_options)  # bad values fail here, before the port opens

    def engine(on_step):
        return Engine(load(directory, threads=args.threads), EngineOptions(**engine_options, on_step=on_step))

    if args.ray:
        return _serve_on_ray(args, directory, keys)
    _no_ray_options(args)
    options = server.ServerOptions(model_name=args.model_name or directory.resolve().name, api_keys=tuple(keys),
                                   drain_timeout=args.drain_timeout)
    print(f"gpt2onnx: serving {directory} as {options.model_name!r} on http://{args.host}:{args.port} "
          f"(playground at /, API at /v1; {'API key required' if keys else 'no API key'})", file=sys.stderr,
          flush=True)
    return server.serve(engine, options, host=args.host, port=args.port, log_level=args.log_level)


RAY_FLAGS = {"replicas": 1, "cpus_per_replica": 1.0, "min_replicas": None, "max_replicas": None,
             "target_ongoing_requests": None, "ray_address": None, "ray_metrics_port": None}


def _no_ray_options(args: argparse.Namespace) -> None:
    given = [name for name, default in RAY_FLAGS.items() if getattr(args, name) != default]
    if given:
        raise InvalidArgumentError(f"--{given[0].replace('_', '-')} needs --ray",
                                   hint="add --ray to serve on Ray Serve (pip install 'gpt2onnx[ray]')")


def _serve_on_ray(args: argparse.Namespace, directory, keys: list[str]) -> int:
    """`gpt2onnx serve --ray`: the same app as replicas on Ray Serve (gpt2onnx/ray_serve.py)."""
    import os

    from .manifest import read_manifest

    if not args.ray_address:  # a local cluster: Ray reads this when imported; "0" keeps it on 127.0.0.1
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        read_manifest(directory, check_hashes=True)  # a damaged file fails now, not in every replica
    from . import ray_serve  # raises MissingDependencyError without ray

    options = ray_serve.RayServeOptions(
        model_dir=str(directory.resolve()), replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
        threads=args.threads, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests, max_batch=args.max_batch, max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk, model_name=args.model_name or directory.resolve().name,
        api_keys=tuple(keys), drain_timeout=args.drain_timeout)
    scale = (f"{options.autoscale_min}..{options.max_replicas} replicas (autoscaling)"
             if options.max_replicas is not None else f"{options.replicas} replica(s)")
    print(f"gpt2onnx: starting {scale} of {directory} on Ray ({options.cpus_per_replica:g} CPU and "
          f"{options.ort_threads} ORT thread(s) each) at {args.ray_address or 'a local cluster on 127.0.0.1'}",
          file=sys.stderr, flush=True)

    def ready(metrics_url: str):
        print(f"gpt2onnx: serving {options.model_name!r} on http://{args.host}:{args.port} through Ray's proxy "
              f"(playground at /, API at /v1; {'API key required' if keys else 'no API key'}); metrics of all "
              f"replicas for Prometheus at {metrics_url}; Ctrl-C stops", file=sys.stderr, flush=True)

    return ray_serve.run(options, host=args.host, port=args.port, address=args.ray_address,
                         metrics_port=args.ray_metrics_port, on_ready=ready)


def _numbers(text: str) -> list[int]:
    """"0,2,5" -> [0, 2, 5]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0,1,2, got {text!r}") from None


def _selection(text: str) -> list[int] | None:
    """"0,2,5" -> [0, 2, 5]; "all" -> None."""
    return None if text.strip() == "all" else _numbers(text)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults (an unset option, None, says its default in its help); epilogs keep their lines."""

    unset = ""  # what an option left unset (None) means, if the help should say it

    def _get_help_string(self, action):
        if action.default is None and action.option_strings and not action.required:
            return action.help + (f" (default: {self.unset})" if self.unset else "")
        return super()._get_help_string(action)


class _GenerateFormatter(_Formatter):
    unset = "the model's"  # generate's unset options come from the model directory


def build_parser() -> argparse.ArgumentParser:
    from . import bench

    formatter = _Formatter
    parser = argparse.ArgumentParser(prog="gpt2onnx", description="GPT-2 on ONNX Runtime, verified against PyTorch.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gpt2onnx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("export", formatter_class=formatter, help="convert a GPT-2 checkpoint to a verified ONNX model",
                            description="Convert MODEL to ONNX with a KV cache, verify it against PyTorch, and write "
                                        "OUT_DIR only if it passes.")
    p.add_argument("model", metavar="MODEL", help="hub id (gpt2, gpt2-medium, distilgpt2, user/repo), local directory "
                                                   "in Hugging Face layout, or random:NAME (tiny, gpt2, gpt2-xl, ...)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds an earlier export")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int4"],
                   help="weights: fp32 (verified to --atol) or block-quantized int8/int4 (gated on quality)")
    p.add_argument("--block-size", type=int, default=argparse.SUPPRESS,
                   help="int8/int4: weights per quantization block, 16, 32, 64, ...: smaller is more accurate, "
                        "larger faster (default 128)")
    p.add_argument("--kv-cache", default=argparse.SUPPRESS, choices=["float32", "int8"],
                   help="the KV cache's dtype; int8 (per-channel scales calibrated at export) reads a quarter of "
                        "the bytes per step at long contexts (default: int8 for int8/int4, float32 for fp32)")
    p.add_argument("--max-perplexity-increase", type=float, default=argparse.SUPPRESS,
                   help="int8/int4: largest perplexity increase over PyTorch fp32, as a fraction "
                        "(default 0.01 for int8, 0.05 for int4)")
    p.add_argument("--min-top1-agreement", type=float, default=argparse.SUPPRESS,
                   help="int8/int4: smallest share of positions whose most likely next token equals PyTorch's "
                        "(default 0.95 for int8, 0.85 for int4)")
    p.add_argument("--eval-text", default=argparse.SUPPRESS, metavar="FILE",
                   help="int8/int4: text the quality gate scores (default: heldout.txt in a local MODEL "
                        "directory, else a built-in sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of random:NAME weights and of the verification inputs")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit (default: the hub's main branch)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model.bin checkpoints (pickle can run code: trusted sources only)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest |logit difference| from PyTorch accepted")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("verify", formatter_class=formatter, help="compare an export with PyTorch: logits, greedy, "
                                                                      "seeded sampling",
                            description="Run MODEL_DIR side by side with transformers' GPT2LMHeadModel on the same "
                                        "weights and report every difference: logits and cache per prompt length, "
                                        "greedy parity, and seeded sampling (model.generate(seed=s) against "
                                        "set_seed(s) + generate(do_sample=True)) over seeds x prompts x settings. A "
                                        "flip of a near-tie by float noise is reported with its margin; any other "
                                        "difference exits non-zero. Quantized exports are measured instead (top-1 "
                                        "agreement, KL divergence, perplexity) against the thresholds below. Needs "
                                        "the export extra.",
                            epilog=VERIFY_EXAMPLES)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model directory")
    p.add_argument("--reference", metavar="HF_ID_OR_DIR", default=argparse.SUPPRESS,
                   help="checkpoint to compare with: hub id, local directory or random:NAME (default: the source "
                        "in the manifest)")
    p.add_argument("--seeds", type=int, default=10, help="sampling: seeds 0..N-1, each with every setting (10 settings)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="sampling: tokens generated per case")
    p.add_argument("--atol", type=float, default=1e-4, help="fp32: largest |logit difference| that counts as float noise")
    p.add_argument("--attention", choices=["sdpa", "eager"], default=argparse.SUPPRESS,
                   help="the reference's attention (default: sdpa, as from_pretrained loads it, unless the config "
                        "needs eager)")
    p.add_argument("--min-top1", type=float, default=argparse.SUPPRESS,
                   help="quantized: least share of positions whose most likely token is PyTorch's (default 0.95 "
                        "int8, 0.85 int4, 0 for random weights)")
    p.add_argument("--max-kl", type=float, default=argparse.SUPPRESS,
                   help="quantized: largest mean KL divergence from PyTorch, nats per token (default 0.005 int8, "
                        "0.05 int4)")
    p.add_argument("--max-ppl-increase", type=float, default=argparse.SUPPRESS,
                   help="quantized: largest perplexity increase over PyTorch fp32, as a fraction (default 0.01 "
                        "int8, 0.05 int4)")
    p.add_argument("--text", metavar="FILE", default=argparse.SUPPRESS,
                   help="quantized: text to score (default: heldout.txt beside a local source, else a built-in "
                        "sample)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per physical core)")
    p.set_defaults(func=cmd_verify)

    p = commands.add_parser("bench", formatter_class=formatter, help="measure speed against torch, Optimum, CTranslate2",
                            description="Measure GPT-2 generation speed of gpt2onnx at each precision next to "
                                        "transformers+torch, Optimum and CTranslate2 (those installed), on one "
                                        "fixed workload, round-robin in one run. Prints a table; writes "
                                        "OUT_DIR/bench.json and OUT_DIR/bench.png.")
    b = bench.BenchOptions()  # the defaults are the benchmark's own
    p.add_argument("--model", default=b.model, help="random:NAME or a local Hugging Face directory")
    p.add_argument("--runs", type=int, default=b.runs, help="rounds; each figure is the median over them")
    p.add_argument("--new-tokens", type=int, default=b.new_tokens, help="tokens generated after the short prompt")
    p.add_argument("--long-past", type=int, default=b.long_prompt, help="prompt tokens before the long-past decode")
    p.add_argument("--long-new-tokens", type=int, default=b.long_new_tokens,
                   help="tokens generated after the long prompt (the decode@768 figure is their rate)")
    p.add_argument("--prefill", type=int, default=b.prefill, help="prompt tokens of the prefill figure")
    p.add_argument("--batch", type=int, default=b.batch, help="sampled continuations of the batch figure")
    p.add_argument("--threads", type=int, default=b.threads, help="threads of every framework (0: physical cores)")
    p.add_argument("--only", default=",".join(b.frameworks), help="frameworks to measure")
    p.add_argument("--precisions", default=",".join(b.precisions),
                   help="gpt2onnx precisions to measure (+kv32: exported with --kv-cache float32)")
    p.add_argument("--work-dir", default="~/.cache/gpt2onnx/bench", help="where the prepared models are kept")
    p.add_argument("--out-dir", default="bench-results", help="where bench.json and bench.png go")
    p.set_defaults(func=cmd_bench)

    p = commands.add_parser("generate", formatter_class=_GenerateFormatter, help="continue a prompt",
                            description="Continue PROMPT with an exported model and print prompt + continuation. "
                                        "Options left unset come from the model directory (generation_config.json, "
                                        "task_specific_params), then transformers' defaults.",
                            epilog=GENERATE_EXAMPLES)
    p.add_argument("prompt", metavar="PROMPT", help="text to continue; - reads it from stdin")
    p.add_argument("--model", "-m", required=True, help="exported model directory")
    p.add_argument("--max-new-tokens", type=int, help="tokens to add after the prompt (wins over --max-length)")
    p.add_argument("--max-length", type=int, help="prompt + new tokens")
    p.add_argument("--min-new-tokens", type=int, help="forbid <|endoftext|> before this many new tokens")
    p.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample (--do-sample) or take the most likely token (--no-do-sample); default: the model's")
    p.add_argument("--temperature", type=float, help="divide logits by this before sampling; 0 = greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, help="sample among the fewest tokens reaching this probability")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeating tokens")
    p.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size")
    p.add_argument("-n", "--num-return-sequences", type=int, default=None, help="continuations (needs sampling)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="end where the new text contains TEXT "
                                                                  "(repeatable; \\n is a newline)")
    p.add_argument("--seed", type=int, help="same seed, same text (the tokens transformers gives after set_seed)")
    p.add_argument("--sampler", choices=["torch", "numpy"], help="random stream: torch (transformers' tokens, the "
                                                                 "default) or numpy")
    p.add_argument("--ignore-eos", action="store_true", help="keep going after <|endoftext|>")
    p.add_argument("--truncate", choices=["left"], help="drop the oldest prompt tokens when it does not fit")
    p.add_argument("--allow-special-tokens", action="store_true", help="read <|endoftext|> in PROMPT as the token")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--json", action="store_true", help="print the results (text, token ids, finish reason, seed) "
                                                       "as JSON")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per physical core)")
    p.set_defaults(func=cmd_generate)

    from . import plot

    p = commands.add_parser("inspect", formatter_class=formatter, help="list the weights, graph and manifest",
                            description="List an exported model's weights under their Hugging Face state-dict names "
                                        "(shape, dtype, bytes, quantization scheme), the graph's inputs and outputs, "
                                        "op counts and the manifest (precision, source, parity report). Needs the "
                                        "plot extra: pip install 'gpt2onnx[plot]'.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model directory")
    p.add_argument("--json", action="store_true", help="print everything as JSON, for scripts")
    p.add_argument("--check-hashes", action="store_true", help="also verify every file's sha256 against the manifest")
    p.set_defaults(func=cmd_inspect)

    p = commands.add_parser("plot", formatter_class=formatter, help="draw embeddings, weights and attention maps",
                            description="Write PNGs of an exported model to DIR: the positional-embedding heat map, "
                                        "chosen positional dimensions over positions, a weight matrix, and the "
                                        "attention maps of a prompt (per layer, one square per head; computed by ONNX "
                                        "Runtime from the export). Needs the plot extra: pip install 'gpt2onnx[plot]'.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model directory")
    p.add_argument("--out", "-o", required=True, default=argparse.SUPPRESS, metavar="DIR", help="directory for the PNGs (created if missing)")
    p.add_argument("--prompt", default=plot.DEFAULT_PROMPT, help="text whose attention maps are drawn")
    p.add_argument("--weight", default=plot.DEFAULT_WEIGHT, metavar="NAME",
                   help="state-dict name of the weight to draw (gpt2onnx inspect lists them)")
    p.add_argument("--slice", default=plot.DEFAULT_SLICE, metavar="SLICE",
                   help="part of the weight to draw: start:stop or an index per dimension, comma-separated")
    p.add_argument("--dims", type=_numbers, default=",".join(map(str, plot.DEFAULT_DIMS)),
                   help="positional-embedding dimensions to draw over the positions")
    p.add_argument("--positions", type=int, default=plot.DEFAULT_POSITIONS, help="positions those lines cover")
    p.add_argument("--layers", type=_selection, default="all", help="layers to draw attention for (e.g. 0,5)")
    p.add_argument("--heads", type=_selection, default="all", help="heads to draw in each of those layers (e.g. 0,1)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per physical core)")
    p.set_defaults(func=cmd_plot)

    from .engine import EngineOptions

    e = EngineOptions()  # the defaults are the engine's own
    p = commands.add_parser("serve", formatter_class=formatter, help="serve an OpenAI-compatible API and a playground",
                            description="Serve MODEL_DIR over HTTP: OpenAI's legacy Completions API at "
                                        "/v1/completions (streaming, logprobs, echo), /v1/models, /health, "
                                        "/metrics (Prometheus), /tokenize, /detokenize, and a playground page at /. "
                                        "Concurrent requests share one continuously batched engine. SIGTERM "
                                        "drains: no new requests, the ones in flight finish, then exit. Needs the "
                                        "serve extra: pip install 'gpt2onnx[serve]'.",
                            epilog=SERVE_EXAMPLES)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port to bind")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health "
                                                   "(visible in ps: prefer --api-key-file or $GPT2ONNX_API_KEY)")
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="read the accepted keys from FILE, one per line")
    p.add_argument("--max-batch", type=int, default=e.max_batch, help="rows (sequences) decoded together at most")
    p.add_argument("--max-queue", type=int, default=e.max_queue,
                   help="requests waiting to join the batch at most; beyond, 429 with Retry-After")
    p.add_argument("--prefill-chunk", type=int, default=e.prefill_chunk,
                   help="prompt tokens prefilled per step (a long prompt never freezes the others)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per physical core)")
    p.add_argument("--model-name", default=None, help="the model name clients pass (default: MODEL_DIR's name)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight before ending them")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log level")
    ray = p.add_argument_group("Ray Serve (replicas on one machine or a cluster; pip install 'gpt2onnx[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve the same API as Ray Serve replicas behind Ray's proxy")
    ray.add_argument("--replicas", type=int, default=RAY_FLAGS["replicas"], help="replicas, one engine each")
    ray.add_argument("--cpus-per-replica", type=float, default=RAY_FLAGS["cpus_per_replica"], metavar="C",
                     help="CPUs Ray reserves per replica; --threads defaults to C (replicas x C = the cores)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many replicas (default 1)")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    ray.add_argument("--target-ongoing-requests", type=float, default=None, metavar="R",
                     help="autoscaling aim: requests per replica (default 0.75 x --max-batch)")
    ray.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="join this Ray cluster (e.g. auto) instead of starting a local one on 127.0.0.1")
    ray.add_argument("--ray-metrics-port", type=int, default=None, metavar="PORT",
                     help="port where the local cluster exports every replica's metrics to Prometheus (default: Ray picks)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Gpt2OnnxError as error:
        print(f"gpt2onnx: error: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("gpt2onnx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
