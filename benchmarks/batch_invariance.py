"""How often a seeded request's tokens change with what else is batched: the engine and the library's batched generate.

    python benchmarks/batch_invariance.py EXPORT_DIR [--requests 24] [--new-tokens 64] [--modes default,invariant]
                                                     [--throughput-clients 16] [--repeats 3] [--json FILE]

Engine: N seeded sampled requests (distinct prompts of 3 to ~150 tokens, distinct seeds, OpenAI's default sampling:
temperature 1, no top-k; ignore_eos, so each makes exactly --new-tokens tokens) are submitted at once to one
Engine with the default EngineOptions (the plain server's), and each is compared with `model.generate(prompt,
seed=...)` alone: the rate of differing sequences, per engine mode (`default`, and `invariant` =
EngineOptions(batch_invariant=True) where this checkout has it).

Library: `model.generate([all N prompts])` greedy (one left-padded batch) against each prompt alone, greedy:
the rate of differing sequences, and the largest |logprob difference| of the first new token (how far a padded
batch moves the logits). Sampled batched generate is not compared: one call draws one random stream for all
its rows, row after row (as transformers does), so a row's draws depend on the other rows by design.

Causes (--causes): one prompt's logits under each choice the engine makes -- prefilled in a group of prompts
(left-padded or not), in chunks, with every position's logits, decoded beside other rows, with left padding --
against generate's run of it alone: the largest |logit difference|, 0 when bit for bit the same.

Throughput (--throughput-clients C > 0): C concurrent seeded requests (distinct prompts and seeds) through one
Engine per mode, aggregate tok/s = new tokens / wall time from the first submit to the last token; the modes
alternate --repeats times and the medians are printed (a shared machine's load moves single runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

# distinct prompts of different lengths: word windows of a fixed text, some longer than one prefill_chunk (64 tokens)
TEXT = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch of a small wooden "
        "house near the river. In the morning the fog lifts slowly, and the boats leave the harbour one by one, "
        "their engines humming across the water. A buffer is the in-memory text of a file; a window is a viewport "
        "on a buffer, and a tab page is a collection of windows. Numbers such as 3.14159, 2.71828 and 1.41421 "
        "appear in many proofs, and the students copy them into their notebooks before the bell rings.").split()


def prompts(count: int) -> list[str]:
    """`count` distinct prompts of 3 to about 110 words (3 to ~150 tokens)."""
    out = []
    for i in range(count):
        words = 3 + (i * 37) % 108
        start = (i * 11) % len(TEXT)
        out.append(f"{i}. " + " ".join((TEXT[start:] + TEXT)[:words]))
    return out


def cpu_lines() -> list[str]:
    """lscpu's model name and flags (the kernels ONNX Runtime picks depend on them)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        return [f"lscpu failed: {error}"]
    return [line.strip() for line in text.splitlines() if line.startswith(("Model name", "Flags"))]


def engine_options(invariant: bool, **options):
    from gpt2onnx.generation.engine import EngineOptions

    return EngineOptions(**options, batch_invariant=True) if invariant else EngineOptions(**options)


def has_mode() -> bool:
    from gpt2onnx.generation.engine import EngineOptions

    return any(f.name == "batch_invariant" for f in dataclasses.fields(EngineOptions))


def engine_together(model, texts: list[str], settings: list, invariant: bool) -> tuple[list[list[int]], float]:
    """Every request submitted at once to one Engine: each one's token ids, and the wall time."""
    from gpt2onnx.generation.engine import Engine

    with Engine(model, engine_options(invariant, max_queue=max(64, len(texts)))) as engine:
        start = time.perf_counter()
        requests = [engine.submit(model.encode_prompt(t), s) for t, s in zip(texts, settings)]
        results = [r.result(timeout=3600)[0].token_ids for r in requests]
        return results, time.perf_counter() - start


def generate_alone(model, text: str, settings, *, logprobs=None):
    options = dataclasses.asdict(settings) | {"stop": list(settings.stop)}
    return model.generate(text, logprobs=logprobs, **options)


def sampled(new_tokens: int, seed: int):
    from gpt2onnx.generation.settings import GenerationSettings

    return GenerationSettings(max_new_tokens=new_tokens, do_sample=True, top_k=0, seed=seed, ignore_eos=True)


def engine_rates(model, texts: list[str], new_tokens: int, modes: list[str]) -> dict:
    settings = [sampled(new_tokens, 1000 + i) for i in range(len(texts))]
    start = time.perf_counter()
    reference = [generate_alone(model, t, s).token_ids for t, s in zip(texts, settings)]
    print(f"  generate alone x{len(texts)}: {time.perf_counter() - start:.1f} s")
    rates = {}
    for mode in modes:
        together, seconds = engine_together(model, texts, settings, mode == "invariant")
        differing = [i for i, (a, b) in enumerate(zip(together, reference)) if a != b]
        rates[mode] = {"differing": len(differing), "of": len(texts), "rows": differing, "seconds": seconds}
        print(f"  engine {mode:<9}: {len(differing)}/{len(texts)} differ from generate alone "
              f"({seconds:.1f} s together){'; rows ' + str(differing) if differing else ''}")
    return rates


def library_rate(model, texts: list[str], new_tokens: int) -> dict:
    from gpt2onnx.generation.settings import GenerationSettings

    greedy = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)
    batched = model.generate(texts, max_new_tokens=new_tokens, ignore_eos=True, logprobs=0)
    alone = [generate_alone(model, t, greedy, logprobs=0) for t in texts]
    differing = [i for i, (a, b) in enumerate(zip(batched, alone)) if a.token_ids != b.token_ids]
    largest = max(abs(a.logprobs[0][0] - b.logprobs[0][0]) for a, b in zip(batched, alone))
    print(f"  library batched generate (greedy, one batch of {len(texts)}): {len(differing)}/{len(texts)} differ "
          f"from each alone; largest |first-token logprob difference| {largest:.2e}")
    return {"differing": len(differing), "of": len(texts), "rows": differing, "first_logprob_max_diff": largest}


def causes(model) -> dict:
    """Which batching choice moves a row's logits: one prompt's last logits under each choice the engine makes,
    against generate's run (batch 1, the whole prompt, room for 64 new tokens); max |difference| (0: bit for bit)."""
    import numpy as np

    from gpt2onnx.format.gpt2 import position_ids
    from gpt2onnx.generation.generator import left_pad
    from gpt2onnx.runtime.kv_cache import KVCache

    session, pad_id = model.session, model.eos_token_id
    a, b = model.encode_prompt(" ".join(TEXT[:60])), model.encode_prompt(" ".join(TEXT[20:26]))
    longer = model.encode_prompt(" ".join(TEXT[:70]))
    p = len(a)

    def prefill(prompts, capacity):
        ids, mask = left_pad(prompts, pad_id)
        logits, cache = session.run(ids, mask, position_ids(mask), session.empty_cache(len(prompts),
                                                                                       capacity=capacity),
                                    logits_for="last")
        return logits[:, -1].copy(), cache

    def decode(parts, tokens, pads, width):
        """One decode step of the parts' rows right-aligned in one cache of `width` past positions."""
        cache = KVCache.gather(parts, width=width, capacity=width + 64)
        mask = (np.arange(width + 1)[None, :] >= np.array(pads)[:, None]).astype(np.int64)
        logits, _ = session.run(np.array(tokens)[:, None], mask, (width - np.array(pads))[:, None], cache,
                                logits_for="last")
        return logits[0, -1]

    reference, cache_a = prefill([a], p + 64)
    reference = reference[0]
    chunked = session.empty_cache(1, capacity=p)
    for start in range(0, p, 32):  # the engine's prefill_chunk
        piece = a[start:start + 32]
        logits, chunked = session.run(np.array([piece]), np.ones((1, start + len(piece)), np.int64),
                                      np.arange(start, start + len(piece))[None], chunked, logits_for="last")
    every, _ = session.run(np.array([a]), np.ones((1, p), np.int64), np.arange(p)[None],
                           session.empty_cache(1, capacity=p), logits_for="all")
    token = int(reference.argmax())
    alone = decode([(cache_a, np.array([0]))], [token], [0], p)
    _, cache_b = prefill([b], len(b) + 64)
    found = {
        "prefill: grouped with a longer prompt (left-padded)": prefill([a, longer], len(longer) + 64)[0][0],
        "prefill: grouped with a shorter prompt": prefill([a, b], p + 64)[0][0],
        "prefill: in chunks of 32 tokens": logits[0, -1],
        "prefill: logits of every position (echo)": every[0, -1],
        "prefill: cache capacity 1024": prefill([a], 1024)[0][0],
    }
    found = {name: np.abs(x - reference).max() for name, x in found.items()}
    for rows in (2, 16):
        found[f"decode: {rows} rows (copies of this one)"] = np.abs(
            decode([(cache_a, np.zeros(rows, np.int64))], [token] * rows, [0] * rows, p) - alone).max()
    found["decode: beside another prompt (it left-padded)"] = np.abs(
        decode([(cache_a, np.array([0])), (cache_b, np.array([0]))], [token, 11], [0, p - len(b)], p) - alone).max()
    for columns in (1, 3, 4, 8, 9):
        found[f"decode: {columns} columns of left padding"] = np.abs(
            decode([(cache_a, np.array([0]))], [token], [columns], p + columns) - alone).max()
    for name, value in found.items():
        print(f"  {name:<52} {'bit for bit' if value == 0 else f'max |logit difference| {value:.1e}'}")
    return {name: float(value) for name, value in found.items()}


def throughput(model, clients: int, new_tokens: int, repeats: int, modes: list[str]) -> dict:
    texts = prompts(clients)
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(repeats):
        order = modes if repeat % 2 == 0 else modes[::-1]  # alternate which mode goes first
        for mode in order:
            settings = [sampled(new_tokens, 2000 + 100 * repeat + i) for i in range(clients)]
            results, seconds = engine_together(model, texts, settings, mode == "invariant")
            runs[mode].append(sum(map(len, results)) / seconds)
            print(f"  run {repeat + 1} {mode:<9}: {runs[mode][-1]:.1f} tok/s")
    medians = {mode: statistics.median(values) for mode, values in runs.items()}
    print(f"  {clients} concurrent requests x {new_tokens} tokens, median tok/s of {repeats}: "
          + ", ".join(f"{mode} {value:.1f}" for mode, value in medians.items()))
    return {"clients": clients, "runs": runs, "median_tok_s": medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="an exported model directory")
    parser.add_argument("--requests", type=int, default=24,
                        help="seeded requests sent together, then each alone (0: skip the rates)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--modes", default="default,invariant",
                        help="engine modes to measure: default, invariant (EngineOptions(batch_invariant=True))")
    parser.add_argument("--no-library", action="store_true", help="skip the library's batched generate")
    parser.add_argument("--causes", action="store_true",
                        help="also show which batching choice (grouping, chunks, rows, padding) moves a row's logits")
    parser.add_argument("--throughput-clients", type=int, default=0,
                        help="also measure aggregate tok/s of this many concurrent requests per mode (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated throughput runs per mode (medians)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per core)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import gpt2onnx

    for line in cpu_lines():
        print(line)
    print(f"{os.cpu_count()} logical cores, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    modes = [m for m in args.modes.split(",") if m]
    if "invariant" in modes and not has_mode():
        print("EngineOptions has no batch_invariant in this checkout: measuring the default mode only")
        modes.remove("invariant")
    model = gpt2onnx.load(args.model_dir, threads=args.threads, check_hashes=False)
    precision = (model.manifest or {}).get("precision", "?")
    print(f"model: {args.model_dir} ({precision}); seeded sampled requests of {args.new_tokens} new tokens "
          f"(temperature 1, top_k 0, ignore_eos)")
    results = {"cpu": cpu_lines(), "model": str(args.model_dir), "precision": precision}
    if args.requests:
        texts = prompts(args.requests)
        lengths = [len(model.encode_prompt(t)) for t in texts]
        print(f"{args.requests} requests, prompt tokens {min(lengths)} .. {max(lengths)} "
              f"(median {statistics.median(lengths):.0f})")
        results["engine"] = engine_rates(model, texts, args.new_tokens, modes)
        if not args.no_library:
            results["library"] = library_rate(model, texts, args.new_tokens)
    if args.causes:
        print("what moves one prompt's logits, against generate's run of it alone:")
        results["causes"] = causes(model)
    if args.throughput_clients:
        results["throughput"] = throughput(model, args.throughput_clients, args.new_tokens, args.repeats, modes)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
