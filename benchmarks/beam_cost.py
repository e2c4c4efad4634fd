"""What beam search costs next to greedy decoding of the same length.

    python benchmarks/beam_cost.py [--model-dir DIR | --model random:gpt2] [--beams 4] [--new-tokens 64]
                                   [--rounds 5] [--threads 1] [--clock wall|cpu]

Times `model.generate(PROMPT, max_new_tokens=N, ignore_eos=True)` greedy and with num_beams=B (fixed length,
batch 1, fp32 export), median of round-robin rounds, and prints the ratio (target: <= 2.5 for 4 beams) with
the CPU model and its SIMD flags. Also counts the KV-cache rows KVCache.reorder copied per step, against the
B rows a whole-cache gather would copy. On a shared machine, --clock cpu (this process's CPU time, with one
ONNX Runtime thread) is steadier than the wall clock.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

PROMPT = "Hello, I'm a language model,"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="an fp32 export to use (default: export --model into --work-dir)")
    parser.add_argument("--model", default="random:gpt2", help="MODEL to export when no --model-dir is given")
    parser.add_argument("--work-dir", default="~/.cache/gpt2onnx/parity", help="where the export is kept")
    parser.add_argument("--beams", type=int, default=4, help="num_beams (default 4)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per run (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall time or process CPU time")
    args = parser.parse_args()

    import gpt2onnx
    from gpt2onnx.runtime import cpu
    from gpt2onnx.runtime.kv_cache import KVCache

    model_dir = Path(args.model_dir) if args.model_dir else (
        Path(args.work_dir).expanduser() / args.model.replace(":", "-").replace("/", "_"))
    if not model_dir.is_dir():
        from gpt2onnx_export import ExportOptions, export_model

        export_model(args.model, model_dir, ExportOptions(force=True), progress=lambda message: None)
    model = gpt2onnx.load(model_dir, threads=args.threads)
    copies = []
    reorder = KVCache.reorder

    def counted(self, index):
        copies.append(reorder(self, index))
        return copies[-1]

    KVCache.reorder = counted
    runs = {"greedy": {}, f"num_beams={args.beams}": {"num_beams": args.beams}}
    times = {name: [] for name in runs}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model.generate(PROMPT, max_new_tokens=4, ignore_eos=True, num_beams=args.beams)  # warm up
    for _ in range(args.rounds):
        for name, options in runs.items():
            copies.clear()
            start = clock()
            model.generate(PROMPT, max_new_tokens=args.new_tokens, ignore_eos=True, **options)
            times[name].append(clock() - start)
    greedy, beams = (statistics.median(t) for t in times.values())
    print(f"CPU: {cpu.summary()}, {args.threads} ONNX Runtime thread(s), {args.clock} clock")
    print(f"model: {model_dir} ({model.manifest.get('precision') if model.manifest else '?'}), batch 1, "
          f"{args.new_tokens} new tokens, median of {args.rounds} rounds")
    print(f"greedy:           {1000 * greedy:8.1f} ms ({1000 * greedy / args.new_tokens:.1f} ms/token)")
    print(f"num_beams={args.beams}:      {1000 * beams:8.1f} ms ({1000 * beams / args.new_tokens:.1f} ms/token)")
    print(f"ratio: {beams / greedy:.2f} x greedy")
    print(f"cache rows copied by reorder: {sum(copies) / max(len(copies), 1):.2f} per step (a gather copies "
          f"{args.beams}), {sum(c == 0 for c in copies)} of {len(copies)} steps copied nothing")


if __name__ == "__main__":
    main()
