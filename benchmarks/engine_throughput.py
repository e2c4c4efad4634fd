"""Aggregate throughput of the continuous-batching engine (no HTTP) against one request at a time.

    python benchmarks/engine_throughput.py EXPORT_DIR [--clients 1,4,16] [--new-tokens 64] [--greedy]
                                                      [--threads 0] [--json FILE]

For each number of clients N: N requests (different seeds, OpenAI's default sampling: temperature 1, no
top-k, torch's random stream; ignore_eos so each makes exactly --new-tokens tokens) are submitted at once to
one Engine, and each is read by its own thread; aggregate tok/s = all new tokens / wall time from the first
submit to the last token. Also: time to first token and the gap between a request's tokens (median, p99),
the batch's mean rows per decode step, and as baselines `model.generate` alone (one request, batch 1;
measured again right before each N, so that a machine shared with other work compares like with like) and
N plain threads each calling `model.generate` at once (what a server without batching does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

PROMPT = "Hello, I'm a language model,"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def in_threads(clients: int, work) -> None:
    """work(0) .. work(clients - 1), each in its own thread, all started at once; returns when all are done."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_engine(model, clients: int, settings_for) -> dict:
    from gpt2onnx.generation.engine import Engine, EngineOptions

    rows = []
    engine = Engine(model, EngineOptions(max_batch=max(16, clients), max_queue=max(64, clients),
                                         on_step=rows.append))
    ids = model.encode_prompt(PROMPT)
    times: list[list[float]] = [[] for _ in range(clients)]
    start = time.perf_counter()
    requests = [engine.submit(ids, settings_for(i)) for i in range(clients)]

    def read(i):
        for event in requests[i].events():
            if event.token_id is not None:
                times[i].append(time.perf_counter())

    in_threads(clients, read)
    wall = time.perf_counter() - start
    engine.close()
    tokens = sum(len(t) for t in times)
    gaps = [b - a for t in times for a, b in zip(t, t[1:])]
    ttft = [t[0] - start for t in times]
    return {"clients": clients, "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttft), "ttft_p99_ms": 1000 * percentile(ttft, 0.99),
            "itl_p50_ms": 1000 * statistics.median(gaps), "itl_p99_ms": 1000 * percentile(gaps, 0.99),
            "mean_rows_per_step": statistics.mean(rows), "steps": len(rows)}


def run_threads(model, clients: int, options_for) -> dict:
    done = []
    start = time.perf_counter()

    def client(i):
        done.append(len(model.generate(PROMPT, **options_for(i)).token_ids))

    in_threads(clients, client)
    wall = time.perf_counter() - start
    return {"clients": clients, "tokens": sum(done), "seconds": wall, "tok_s": sum(done) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path, help="an exported model directory")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent requests")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: 0, one per core)")
    parser.add_argument("--no-thread-baseline", action="store_true", help="skip the N threads x generate baseline")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import gpt2onnx
    from gpt2onnx.generation.settings import GenerationSettings
    from gpt2onnx.runtime import cpu

    print(f"CPU: {cpu.summary()}; {os.cpu_count()} logical cores, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    model = gpt2onnx.load(args.model_dir, threads=args.threads, check_hashes=False)
    print(f"model: {args.model_dir} ({(model.manifest or {}).get('precision', '?')}), "
          f"{args.new_tokens} new tokens per request, {'greedy' if args.greedy else 'sampled (top_k=0, torch)'}")

    def options_for(i):
        sampling = {} if args.greedy else {"do_sample": True, "top_k": 0, "seed": 1000 + i}
        return {"max_new_tokens": args.new_tokens, "ignore_eos": True, **sampling}

    def settings_for(i):
        return GenerationSettings(**options_for(i))

    model.generate(PROMPT, max_new_tokens=4)  # warm up
    results = {"cpu": cpu.model_name(), "model": str(args.model_dir), "alone": [], "engine": [], "threads": []}
    print(f"\n{'clients':>7} {'alone tok/s':>11} {'engine tok/s':>12} {'x alone':>8} {'TTFT p50/p99 ms':>16} "
          f"{'ITL p50/p99 ms':>15} {'rows/step':>9} {'threads tok/s':>13}")
    for clients in (int(c) for c in args.clients.split(",")):
        alone = run_threads(model, 1, options_for)
        engine = run_engine(model, clients, settings_for)
        threads = None if args.no_thread_baseline else run_threads(model, clients, options_for)
        results["alone"].append(alone)
        results["engine"].append(engine)
        if threads:
            results["threads"].append(threads)
        speedup = engine["tok_s"] / alone["tok_s"]
        print(f"{clients:>7} {alone['tok_s']:>11.1f} {engine['tok_s']:>12.1f} {speedup:>7.2f}x "
              f"{engine['ttft_p50_ms']:>7.0f}/{engine['ttft_p99_ms']:<8.0f} "
              f"{engine['itl_p50_ms']:>6.0f}/{engine['itl_p99_ms']:<8.0f} {engine['mean_rows_per_step']:>9.1f} "
              f"{threads['tok_s'] if threads else float('nan'):>13.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
