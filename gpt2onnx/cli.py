"""The `gpt2onnx` command: a thin layer over the Python API. Each command parses, calls, prints."""

from __future__ import annotations

import argparse
import sys

from .errors import Gpt2OnnxError, MissingDependencyError

EXAMPLES = """examples:
  gpt2onnx export gpt2 out/gpt2                 # download, convert, verify against PyTorch
  gpt2onnx export random:gpt2 out/random-gpt2   # offline: seeded random weights, real tokenizer
  gpt2onnx generate "Hello, I'm a language model," --model out/gpt2
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
                                   allow_pickle=args.allow_pickle, force=args.force, atol=args.atol)
    export.export_model(args.model, args.out_dir, options)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .model import load

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = load(args.model, threads=args.threads)
    result = model.generate(prompt, max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos)
    print(prompt + result.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
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
    p.add_argument("--precision", default="fp32", help="weight precision of the graph (fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of random:NAME weights and of the verification inputs")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model.bin checkpoints (pickle can run code: trusted sources only)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest |logit difference| from PyTorch accepted")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("generate", formatter_class=formatter, help="continue a prompt",
                            description="Continue PROMPT with an exported model and print prompt + continuation.")
    p.add_argument("prompt", metavar="PROMPT", help="text to continue; - reads it from stdin")
    p.add_argument("--model", "-m", required=True, help="exported model directory")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens to add after the prompt")
    p.add_argument("--ignore-eos", action="store_true", help="keep going after <|endoftext|>")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per physical core)")
    p.set_defaults(func=cmd_generate)
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


if __name__ == "__main__":
    sys.exit(main())
