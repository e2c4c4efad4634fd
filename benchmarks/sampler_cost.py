"""What the exact torch sampler costs per token, next to the numpy sampler and to a decode step.

    python benchmarks/sampler_cost.py [--model random:gpt2] [--rounds 7] [--threads 1 --clock cpu] [--json FILE]

On a 124M model (exported once into --work-dir): the time of `gpt2onnx.generation.sampling.sample` for one token
of every row — processors, softmax and the draw — with `TorchGenerator` (sampler="torch", the default,
transformers' tokens) and with numpy's generator (sampler="numpy"), on the model's own logits, batch 1
and 5, for the default setting (top_k=50) and for the whole vocabulary (top_k=0); then a decode step of
the graph (one token per row through a 32-position cache) and the whole per-token time of
`model.generate(..., do_sample=True, ignore_eos=True)` with each sampler. Medians of round-robin rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np

SETTINGS = {"top_k=50": {"top_k": 50}, "top_k=0": {"top_k": 0}}
PROMPT = "Hello, I'm a language model,"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time(fn, repeat: int, clock) -> float:
    """Median milliseconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1000 * statistics.median(times)


def measure(model_dir: Path, *, rounds: int, threads: int, new_tokens: int, clock: str = "wall") -> list[dict]:
    import gpt2onnx
    from gpt2onnx.generation.generator import left_pad
    from gpt2onnx.generation.sampling import sample
    from gpt2onnx.generation.settings import GenerationSettings
    from gpt2onnx.generation.torch_random import TorchGenerator

    model = gpt2onnx.load(model_dir, threads=threads)
    session, eos = model.session, model.eos_token_id
    prompt = model.tokenizer.encode(PROMPT)
    rows = []
    for batch in (1, 5):
        # the model's own logits after a 32-token past, and the sequences the processors see
        ids, mask = left_pad([prompt] * batch, eos)
        ids = np.concatenate([ids, np.random.default_rng(0).integers(0, 50000, (batch, 32 - ids.shape[1]))], axis=1)
        mask = np.ones_like(ids)
        logits, cache = session.run(ids, mask, np.arange(32)[None].repeat(batch, 0), session.empty_cache(batch))
        logits = logits[:, -1, :]
        step_ids, step_mask, step_pos = ids[:, -1:], np.ones((batch, 33), np.int64), np.full((batch, 1), 32)

        def decode_step():
            cache.length = 32  # the same step again: the new position is written over in place
            session.run(step_ids, step_mask, step_pos, cache)

        figures = {name: {"torch": [], "numpy": [], "e2e_torch": [], "e2e_numpy": []} for name in SETTINGS}
        steps = []
        for _ in range(rounds):  # round-robin, so drift in the machine's load hits every figure alike
            steps.append(_time(decode_step, 20, CLOCKS[clock]))
            for name, options in SETTINGS.items():
                settings = GenerationSettings(do_sample=True, **options)
                for sampler, rng in (("torch", TorchGenerator(0)), ("numpy", np.random.default_rng(0))):
                    call = partial(sample, logits, ids, 0, settings, rng, eos_id=eos)
                    figures[name][sampler].append(_time(call, 20, CLOCKS[clock]))
                    generate = partial(model.generate, [PROMPT] * batch, max_new_tokens=new_tokens, do_sample=True,
                                       seed=0, sampler=sampler, ignore_eos=True, **options)
                    figures[name][f"e2e_{sampler}"].append(_time(generate, 1, CLOCKS[clock]) / new_tokens)
        step = statistics.median(steps)
        for name, f in figures.items():
            t, n = statistics.median(f["torch"]), statistics.median(f["numpy"])
            e2e_t, e2e_n = statistics.median(f["e2e_torch"]), statistics.median(f["e2e_numpy"])
            rows.append({"batch": batch, "setting": name, "decode_step_ms": step, "torch_sampler_ms": t,
                         "numpy_sampler_ms": n, "extra_ms": t - n, "torch_pct_of_step": 100 * t / step,
                         "numpy_pct_of_step": 100 * n / step, "extra_pct_of_step": 100 * (t - n) / step,
                         "generate_ms_per_token_torch": e2e_t, "generate_ms_per_token_numpy": e2e_n,
                         "generate_slowdown_pct": 100 * (e2e_t / e2e_n - 1)})
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'batch':>5} {'setting':<9} {'step ms':>8} {'torch ms':>9} {'numpy ms':>9} {'torch %':>8} {'numpy %':>8} "
            f"{'gen ms/tok torch':>16} {'numpy':>7} {'slower':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['setting']:<9} {r['decode_step_ms']:>8.2f} {r['torch_sampler_ms']:>9.2f} "
                     f"{r['numpy_sampler_ms']:>9.2f} {r['torch_pct_of_step']:>7.1f}% {r['numpy_pct_of_step']:>7.1f}% "
                     f"{r['generate_ms_per_token_torch']:>16.2f} {r['generate_ms_per_token_numpy']:>7.2f} "
                     f"{r['generate_slowdown_pct']:>6.1f}%")
    lines.append("(torch/numpy ms: one sampling call for every row; %: of one decode step of the graph; "
                 "gen ms/tok: model.generate per step)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:gpt2", help="MODEL to export and measure (124M: random:gpt2)")
    parser.add_argument("--rounds", type=int, default=7, help="round-robin rounds; figures are medians")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: physical cores)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per model.generate call")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or the process's CPU time (steadier on a shared machine; use --threads 1)")
    parser.add_argument("--work-dir", default="~/.cache/gpt2onnx/parity", help="where the export is kept")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON here")
    args = parser.parse_args()
    out = Path(args.work_dir).expanduser() / args.model.replace(":", "-").replace("/", "_").strip("_")
    if not (out / "manifest.json").is_file():
        from gpt2onnx_export import ExportOptions, export_model

        export_model(args.model, out, ExportOptions(force=True), progress=lambda message: None)
    rows = measure(out, rounds=args.rounds, threads=args.threads, new_tokens=args.new_tokens, clock=args.clock)
    print(table(rows))
    text = json.dumps({"model": args.model, "rounds": args.rounds, "threads": args.threads, "clock": args.clock,
                       "rows": rows}, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
