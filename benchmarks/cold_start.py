"""Cold start: from a fresh process to the first token, gpt2onnx next to CTranslate2 int8.

    python benchmarks/cold_start.py [--model random:gpt2] [--precision int4] [--rounds 9] [--threads 0]
                                    [--work-dir DIR] [--json FILE]

Prepares the models as `gpt2onnx bench` does (the export and CTranslate2's conversion, once, in --work-dir;
needs the export and bench extras), then measures, every configuration in its own fresh process and round
by round in turn (load drifting on a shared machine hits all alike; medians over the rounds):

- `gpt2onnx generate "Hello" -m DIR --max-new-tokens 1`: the whole process, start to exit;
- `import gpt2onnx; gpt2onnx.load(DIR)` + the first token, in the process (from before the import);
- the same with the user cache off (GPT2ONNX_CACHE_DIR=off): every file hashed, the graph optimized afresh;
- `import ctranslate2, tokenizers; Generator(DIR, compute_type="int8")` + its tokenizer + the first token.

One unmeasured run of each first fills the page cache and gpt2onnx's user cache (gpt2onnx/runtime/user_cache.py).
Prints the CPU and its flags: ONNX Runtime's and CTranslate2's kernels depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Hello"

GPT2ONNX = """
import time
start = time.perf_counter()
import gpt2onnx
model = gpt2onnx.load({directory!r}, threads={threads})
loaded = time.perf_counter()
model.generate({prompt!r}, max_new_tokens=1)
print("FIGURES", loaded - start, time.perf_counter() - start)
"""

CTRANSLATE2 = """
import time
start = time.perf_counter()
import ctranslate2, tokenizers
generator = ctranslate2.Generator({directory!r}, device="cpu", compute_type="int8", intra_threads={threads},
                                  inter_threads=1)
tokenizer = tokenizers.Tokenizer.from_file({tokenizer!r})
loaded = time.perf_counter()
tokens = tokenizer.encode({prompt!r}).tokens
generator.generate_batch([tokens], max_length=1, beam_size=1, include_prompt_in_result=False)
print("FIGURES", loaded - start, time.perf_counter() - start)
"""


def cpu_description() -> str:
    """The CPU model and the flags that decide the kernels (AVX2, AVX-512, AMX, VNNI), and the CPU count."""
    from gpt2onnx.runtime import cpu

    return f"{cpu.summary()}; {os.cpu_count()} CPUs"


def commands(model_dir: Path, ct2_dir: Path, threads: int) -> dict[str, tuple[list[str], dict]]:
    env = dict(os.environ)
    off = {**env, "GPT2ONNX_CACHE_DIR": "off"}
    code = GPT2ONNX.format(directory=str(model_dir), threads=threads, prompt=PROMPT)
    cli = [sys.executable, "-m", "gpt2onnx", "generate", PROMPT, "-m", str(model_dir), "--max-new-tokens", "1",
           "--threads", str(threads)]
    ct2 = CTRANSLATE2.format(directory=str(ct2_dir), tokenizer=str(ct2_dir / "tokenizer.json"), threads=threads,
                             prompt=PROMPT)
    return {"gpt2onnx generate (CLI)": (cli, env),
            "gpt2onnx load + first token": ([sys.executable, "-c", code], env),
            "gpt2onnx, user cache off": ([sys.executable, "-c", code], off),
            "CTranslate2 int8 load + first token": ([sys.executable, "-c", ct2], env)}


def run_once(argv: list[str], env: dict) -> dict:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed:\n{done.stderr[-2000:]}")
    figures = {"process_s": wall}
    for line in done.stdout.splitlines():
        if line.startswith("FIGURES"):
            load, first = map(float, line.split()[1:])
            figures.update(load_s=load, first_token_s=first)
    return figures


def measure(model_dir: Path, ct2_dir: Path, *, rounds: int, threads: int) -> dict[str, list[dict]]:
    configs = commands(model_dir, ct2_dir, threads)
    for argv, env in configs.values():  # warm: the page cache, gpt2onnx's user cache
        run_once(argv, env)
    results = {name: [] for name in configs}
    for round_ in range(rounds):
        for name, (argv, env) in configs.items():
            results[name].append(run_once(argv, env))
        print(f"round {round_ + 1}/{rounds}: " + ", ".join(
            f"{name} {results[name][-1]['process_s']:.3f} s" for name in configs), file=sys.stderr, flush=True)
    return results


def table(results: dict[str, list[dict]]) -> str:
    def median(rows, key):
        values = [r[key] for r in rows if key in r]
        return f"{statistics.median(values):.3f}" if values else "—"

    lines = ["| configuration | whole process s | import + load s | import + load + first token s |",
             "|---|---|---|---|"]
    for name, rows in results.items():
        lines.append(f"| {name} | {median(rows, 'process_s')} | {median(rows, 'load_s')} | "
                     f"{median(rows, 'first_token_s')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:gpt2", help="random:NAME or a local Hugging Face directory")
    parser.add_argument("--precision", default="int4", choices=["fp32", "int8", "int4"], help="gpt2onnx's export")
    parser.add_argument("--rounds", type=int, default=9, help="rounds; every figure is the median over them")
    parser.add_argument("--threads", type=int, default=0, help="threads per framework (0: the physical cores)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a gpt2onnx export to use instead of preparing one")
    parser.add_argument("--ct2-dir", type=Path, default=None,
                        help="a CTranslate2 int8 model (with tokenizer.json) to use instead of converting one")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "gpt2onnx" / "bench",
                        help="where the prepared models are kept (shared with gpt2onnx bench)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rounds to this file")
    args = parser.parse_args()

    from gpt2onnx_export.bench import BenchOptions, physical_cores, prepare

    given = {("gpt2onnx", args.precision): args.model_dir, ("ctranslate2", "int8"): args.ct2_dir}
    wanted = [config for config, directory in given.items() if directory is None]
    dirs = prepare(BenchOptions(model=args.model, work_dir=args.work_dir), wanted, progress=print) if wanted else {}
    model_dir = args.model_dir or dirs[("gpt2onnx", args.precision)]
    ct2_dir = args.ct2_dir or dirs[("ctranslate2", "int8")]
    threads = args.threads or physical_cores()
    print(f"{cpu_description()}; {threads} threads per framework")
    results = measure(model_dir, ct2_dir, rounds=args.rounds, threads=threads)
    print(f"{model_dir} ({args.precision}) and {ct2_dir}, {args.rounds} rounds (medians):")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_description(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
