"""What the Ray layer costs and what a second replica buys: the same streaming load (serve_load.py's clients)
against `gpt2onnx serve` alone and `gpt2onnx serve --ray` with 1 and 2 replicas.

    python benchmarks/ray_load.py --model-dir /tmp/rg2-int4 [--clients 8,16] [--new-tokens 64]
                                  [--out bench-results/ray_load.json]

Setups (each a fresh `gpt2onnx serve` subprocess; the Ray ones start and stop their local cluster):
  plain, 2 threads       one engine, ONNX Runtime on 2 threads (the whole 2-core machine)
  plain, 1 thread        one engine on 1 thread: the same compute as one Ray replica, without Ray
  ray, 1 replica x 1     one replica (1 CPU, 1 thread) behind Ray's proxy
  ray, 2 replicas x 1    two replicas (1 CPU, 1 thread each): replicas x threads = the cores
For each client count N: N AsyncOpenAI clients stream one completion of --new-tokens tokens each, at once
(ignore_eos, seeded), --repeats times. Reported: aggregate tokens/s (all tokens / wall time; the median of
the rounds), and over all rounds' samples the p99 time to first token, p99 inter-token latency and p99
request latency (whole stream), and 429s. Prints the CPU model first; the clients run
on the same cores as the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import PROMPT, Server, cpu_description, percentile

SETUPS = (  # label, --threads, extra `gpt2onnx serve` arguments
    ("plain, 2 threads", 2, ()),
    ("plain, 1 thread", 1, ()),
    ("ray, 1 replica x 1 thread", 1, ("--ray", "--replicas", "1", "--cpus-per-replica", "1")),
    ("ray, 2 replicas x 1 thread", 1, ("--ray", "--replicas", "2", "--cpus-per-replica", "1")),
)


async def _round(url: str, clients: int, new_tokens: int) -> dict:
    """One round: `clients` streams at once; the raw samples."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=1800)
    samples = {"ttft": [], "gaps": [], "latency": [], "tokens": 0, "rejected": 0}

    async def one(seed: int) -> None:
        begin = time.perf_counter()
        try:
            stream = await client.completions.create(model="bench", prompt=PROMPT, max_tokens=new_tokens, seed=seed,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True})
        except openai.RateLimitError:
            samples["rejected"] += 1
            return
        last = None
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                samples["tokens"] += chunk.usage.completion_tokens
            if chunk.choices:  # one chunk per token (the usage chunk has none)
                samples["ttft" if last is None else "gaps"].append(now - (begin if last is None else last))
                last = now
        samples["latency"].append(time.perf_counter() - begin)

    start = time.perf_counter()
    await asyncio.gather(*[one(seed) for seed in range(clients)])
    samples["wall"] = time.perf_counter() - start
    await client.close()
    return samples


def summarize(label: str, clients: int, rounds: list[dict]) -> dict:
    """Median aggregate tok/s over the rounds; p99s over all rounds' samples."""

    def p99(key):
        value = percentile([v for r in rounds for v in r[key]], 99)
        return None if value is None else round(1000 * value, 1)

    return {"setup": label, "clients": clients, "rounds": len(rounds),
            "tok_per_s": round(statistics.median(r["tokens"] / r["wall"] for r in rounds), 1),
            "tok_per_s_each": [round(r["tokens"] / r["wall"], 1) for r in rounds],
            "ttft_p99_ms": p99("ttft"), "itl_p99_ms": p99("gaps"), "latency_p99_ms": p99("latency"),
            "rejected": sum(r["rejected"] for r in rounds)}


def measure(model_dir: Path, label: str, threads: int, extra: tuple, args) -> list[dict]:
    started = time.perf_counter()
    server = Server(model_dir, max_batch=args.max_batch, max_queue=args.max_queue, threads=threads, extra_args=extra)
    print(f"{label}: up in {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    try:
        asyncio.run(_round(server.url, 2, 8))  # warm-up (every replica's first requests)
        asyncio.run(_round(server.url, 4, 8))
        for clients in args.clients:
            row = summarize(label, clients, [asyncio.run(_round(server.url, clients, args.new_tokens))
                                             for _ in range(args.repeats)])
            rows.append(row)
            print(f"  N={clients:<3} {row['tok_per_s']:>7} tok/s {row['tok_per_s_each']}  p99 TTFT "
                  f"{row['ttft_p99_ms']} ms  p99 ITL {row['itl_p99_ms']} ms  p99 latency {row['latency_p99_ms']} ms  "
                  f"429s {row['rejected']}", flush=True)
    finally:
        server.stop()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| setup | clients | tok/s (aggregate, median) | p99 TTFT ms | p99 inter-token ms | p99 latency ms "
             "| 429s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['setup']} | {r['clients']} | {r['tok_per_s']} | {r['ttft_p99_ms']} | {r['itl_p99_ms']} | "
              f"{r['latency_p99_ms']} | {r['rejected']} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="an export (e.g. gpt2onnx export random:gpt2 DIR "
                                                            "--precision int4)")
    parser.add_argument("--clients", default="8,16", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per client count (median tok/s)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--setups", default=",".join(str(i) for i in range(len(SETUPS))),
                        help=f"which setups to run, by index: {', '.join(f'{i}={s[0]}' for i, s in enumerate(SETUPS))}")
    parser.add_argument("--out", default="bench-results/ray_load.json")
    args = parser.parse_args()

    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({cpu['cores']} logical cores), SIMD: {' '.join(cpu['simd']) or 'unknown'}",
          flush=True)
    rows = []
    for index in (int(i) for i in args.setups.split(",")):
        label, threads, extra = SETUPS[index]
        rows += measure(Path(args.model_dir), label, threads, extra, args)
    print()
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "model_dir": args.model_dir, "new_tokens": args.new_tokens,
                               "max_batch": args.max_batch, "command": " ".join(sys.argv), "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
