"""Load on `gpt2onnx serve`: N concurrent streaming clients against one server, next to N plain threads
calling the library (each its own batch-1 loop) on the same export.

    python benchmarks/serve_load.py [--model random:gpt2] [--precisions fp32,int4] [--clients 1,4,16,64]
                                    [--new-tokens 128] [--out bench-results/serve_load.json]

For each export (made once into --work-dir; or pass --model-dir DIR) and each client count N:
  server    `python -m gpt2onnx.tools.cli serve` in a subprocess; N AsyncOpenAI clients each stream one completion
            of --new-tokens tokens (ignore_eos, seeded, temperature 1) at once, or one every --arrival-gap
            seconds (time to first token counted from each request's own start);
  baseline  the same N requests as N threads of this process, each iterating `model.stream(...)`.
The two are interleaved per N (server round, then baseline round) so both see the same machine; the
baseline runs N in --baseline-clients only (default 1,4,16). Reported per run: aggregate tokens/s (all
tokens / wall time), p50/p99 time to first token, p50/p99 inter-token latency (gaps between consecutive
chunks of one stream: the server sends a chunk per token, its text "" while a character is held back, and
every chunk with a choice counts, as vLLM's benchmark counts them; the baseline's gaps are between text
pieces, which skip held-back tokens), rejections (429). Then one interference probe: the time to first
token of a short prompt idle, and while a --long-prompt-token prompt is being prefilled.

With --llamacpp DIR (or $GPT2ONNX_LLAMACPP), each export is also served by llama.cpp's `llama-server` on
the GGUF file of the same model at the matching type (fp32: F32, int8: Q8_0, int4: Q4_0), with as many slots
as --max-batch and the same threads, on loopback: the same clients (same prompt, temperature 1, top_p 1,
llama.cpp's top_k and min_p off so both sample the whole distribution, a seed per client, ignore_eos) go
to both, round after round alternated (--rounds), and the end prints tok/s and p99 inter-token gap side by
side with their ratios. llama-server streams a chunk per token too, but holds back the chunks of a token that
ends inside a UTF-8 character (ours sends them with empty text): its gaps skip those tokens.

Prints the CPU model and its SIMD flags first; writes --out (JSON) and a chart beside it (matplotlib).
The clients run in this process, on the same cores as the server: on a 2-core machine they take a share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = "Hello, I'm a language model,"


def cpu_description() -> dict:
    """The CPU model and its SIMD flags (gpt2onnx/runtime/cpu.py reads /proc/cpuinfo on Linux)."""
    from gpt2onnx.runtime import cpu

    return {"model": cpu.model_name(), "cores": os.cpu_count(), "simd": list(cpu.vector_flags()),
            "python": platform.python_version()}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(kind: str, clients: int, wall: float, tokens: int, ttft: list[float], gaps: list[float],
            rejected: int) -> dict:
    def ms(seconds):
        return None if seconds is None else round(1000 * seconds, 2)

    return {"kind": kind, "clients": clients, "tokens": tokens, "seconds": round(wall, 3),
            "tok_per_s": round(tokens / wall, 1) if wall else None,
            "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p99_ms": ms(percentile(gaps, 99)), "rejected": rejected}


# --- the server and its clients ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ServerProcess:
    """A server in a subprocess (self.process), its CPU time read from /proc, stopped by its PID."""

    process: subprocess.Popen

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used so far (user + system; None where /proc is missing)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Server(_ServerProcess):
    """`gpt2onnx serve` in a subprocess, up until stop()."""

    def __init__(self, model_dir: Path, *, max_batch: int, max_queue: int, threads: int, extra_args=()):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gpt2onnx", "serve", str(model_dir), "--port", str(self.port), "--model-name",
             "bench", "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--threads", str(threads),
             "--log-level", "warning", *extra_args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become healthy in 180 s")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)


# What each server is sent besides the prompt, max_tokens, seed and temperature 1: the whole distribution
# sampled (ours: OpenAI's top_p 1 and no top_k by default; llama-server's defaults are top_k 40, min_p 0.05).
REQUEST_EXTRAS = {"server": {"ignore_eos": True},
                  "llama-server": {"ignore_eos": True, "top_k": 0, "min_p": 0.0, "top_p": 1.0}}


class LlamaServer(_ServerProcess):
    """llama.cpp's `llama-server` on one GGUF file in a subprocess, on loopback, up until stop() (by its PID).
    `slots` parallel sequences (continuous batching, its default), each with room for `per_slot` tokens."""

    def __init__(self, program: Path, gguf: Path, *, slots: int, per_slot: int, threads: int, log: Path):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        # -c is the whole cache: llama-server gives each of its -np slots an equal share
        command = [str(program), "-m", str(gguf), "-np", str(slots), "-c", str(slots * per_slot), "-t", str(threads),
                   "--host", "127.0.0.1", "--port", str(self.port), "--no-webui"]
        with open(log, "w") as out:
            out.write("$ " + " ".join(command) + "\n")
        with open(log, "a") as err:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.process.returncode}); its log {log} ends with:\n"
                                   + log.read_text()[-2000:])
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"llama-server did not become healthy in 120 s (log: {log})")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:  # 503 while it loads
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)


def llama_pairs(folder: Path | None, labels: list[str]) -> tuple[Path, dict[str, Path]]:
    """llama-server and, for each export label (fp32, int8, int4, or a folder name ending in one), the GGUF
    file of the matching type found in folder (the bench's finder: bin/, build*/bin/, one level down)."""
    from gpt2onnx_export import bench

    bin_dir, gguf_dir = bench.llamacpp_folders(folder)
    program = bench.find_program("llama-server", bin_dir)
    ggufs = bench.find_ggufs(gguf_dir)
    pairs = {}
    for label in labels:
        ours = next((p for p in bench.LLAMACPP_TYPES if label == p or label.endswith(("-" + p, "_" + p))), None)
        if ours is not None and bench.LLAMACPP_TYPES[ours][0].lower() in ggufs:
            pairs[label] = ggufs[bench.LLAMACPP_TYPES[ours][0].lower()].path
    return program, pairs


async def _one_stream(client, prompt: str, new_tokens: int, seed: int, delay: float, ttft: list, gaps: list,
                      extra: dict):
    import openai

    await asyncio.sleep(delay)
    start = time.perf_counter()
    try:
        stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=new_tokens, seed=seed,
                                                 temperature=1.0, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=extra)
    except openai.RateLimitError:
        return 0, True
    last, tokens, chunks = None, None, 0
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices:  # one per token (the usage chunk has none)
            chunks += 1
            if last is None:
                ttft.append(now - start)
            else:
                gaps.append(now - last)
            last = now
    return (chunks if tokens is None else tokens), False


async def _server_round(url: str, clients: int, new_tokens: int, prompt: str, arrival_gap: float = 0.0,
                        kind: str = "server") -> dict:
    """`clients` streams, the i-th sent i * arrival_gap seconds after the first (0: all at once)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=1800)
    ttft, gaps = [], []
    start = time.perf_counter()
    results = await asyncio.gather(*[_one_stream(client, prompt, new_tokens, seed, seed * arrival_gap, ttft, gaps,
                                                 REQUEST_EXTRAS[kind]) for seed in range(clients)])
    wall = time.perf_counter() - start
    await client.close()
    return summary(kind, clients, wall, sum(t for t, _ in results), ttft, gaps, sum(r for _, r in results))


async def _interference(url: str, long_tokens: int, repeats: int = 5) -> dict:
    """TTFT of a short prompt alone, and while a long prompt is being prefilled (median of `repeats`)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=1800)

    async def short_ttft() -> float:
        start = time.perf_counter()
        stream = await client.completions.create(model="bench", prompt=PROMPT, max_tokens=4, seed=0, stream=True)
        first = None
        async for chunk in stream:
            if first is None and chunk.choices:
                first = time.perf_counter() - start
        return first

    idle, loaded = [], []
    long_prompt = [464 + i % 1000 for i in range(long_tokens)]  # token ids: exactly long_tokens positions
    for _ in range(repeats):
        idle.append(await short_ttft())
        long = asyncio.create_task(client.completions.create(model="bench", prompt=long_prompt, max_tokens=1))
        await asyncio.sleep(0.005)  # the long prompt is queued first and starts its prefill
        loaded.append(await short_ttft())
        await long
    await client.close()
    return {"long_prompt_tokens": long_tokens, "ttft_idle_ms": round(1000 * statistics.median(idle), 1),
            "ttft_during_long_prefill_ms": round(1000 * statistics.median(loaded), 1),
            "ratio": round(statistics.median(loaded) / statistics.median(idle), 2)}


# --- the baseline: threads calling the library --------------------------------------------------------------


def baseline_round(model, clients: int, new_tokens: int, prompt: str) -> dict:
    ttft, gaps, tokens, lock = [], [], [], threading.Lock()
    start = time.perf_counter()

    def run(seed: int) -> None:
        last, count, mine_ttft, mine_gaps = None, 0, None, []
        for piece in model.stream(prompt, max_new_tokens=new_tokens, do_sample=True, top_k=0, seed=seed,
                                  ignore_eos=True):
            now = time.perf_counter()
            if last is None:
                mine_ttft = now - start
            else:
                mine_gaps.append(now - last)
            last, count = now, count + 1
        with lock:
            ttft.append(mine_ttft)
            gaps.extend(mine_gaps)
            tokens.append(new_tokens)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summary("threads", clients, time.perf_counter() - start, sum(tokens), ttft, gaps, 0)


# --- driver ----------------------------------------------------------------------------------------------


def exported(model: str, precision: str, work_dir: Path) -> Path:
    out = work_dir / f"{model.replace(':', '-').replace('/', '_')}-{precision}"
    if not (out / "manifest.json").is_file():
        from gpt2onnx_export import ExportOptions, export_model

        print(f"exporting {model} ({precision}) to {out} ...", flush=True)
        export_model(model, out, ExportOptions(precision=precision, force=True), progress=lambda message: None)
    return out


def measure(model_dir: Path, label: str, args, peer: tuple[Path, Path] | None = None) -> dict:
    """Server and baseline rounds interleaved per client count (the idle server waits on a condition), so
    that both see the same machine even when its load changes over the run; with `peer` (llama-server's
    program, a GGUF file), llama-server's round right after each of ours, both servers up throughout."""
    import gpt2onnx
    from gpt2onnx.runtime import heap
    from gpt2onnx_export.bench import physical_cores

    rows, probe, llama = [], None, None
    server = Server(model_dir, max_batch=args.max_batch, max_queue=args.max_queue, threads=args.threads)
    try:
        if peer is not None:
            per_slot = min(1024, 64 * -(-(32 + args.new_tokens) // 64))  # the prompt (< 32 tokens) and the new ones
            llama = LlamaServer(*peer, slots=args.max_batch, per_slot=per_slot,
                                threads=args.threads or physical_cores(),
                                log=Path(args.work_dir).expanduser() / "logs" / f"llama-server-{label}.log")
        model = None if args.no_baseline else gpt2onnx.load(model_dir, threads=args.threads)
        asyncio.run(_server_round(server.url, 2, 8, PROMPT))  # warm-up
        if llama is not None:
            asyncio.run(_server_round(llama.url, 2, 8, PROMPT, kind="llama-server"))
        if model is not None:
            baseline_round(model, 1, 8, PROMPT)
        for clients in args.clients:
            for _ in range(args.rounds):
                for kind, target in (("server", server), ("llama-server", llama)):
                    if target is None:
                        continue
                    # this process's own heap out of its collector's reach (as the server does with its own): a
                    # 40-110 ms collection here would stall every client's stream and count as the server's latency
                    heap.freeze_startup_heap()
                    cpu = target.cpu_seconds(), os.times()
                    row = asyncio.run(_server_round(target.url, clients, args.new_tokens, PROMPT, args.arrival_gap,
                                                    kind=kind))
                    row.update(_cores_used(target, cpu, row["seconds"]))
                    rows.append(row)
                    print(f"{label:>6} {kind:<12} N={clients:<3} {row['tok_per_s']:>7} tok/s  TTFT p50/p99 "
                          f"{row['ttft_p50_ms']}/{row['ttft_p99_ms']} ms  ITL p50/p99 {row['itl_p50_ms']}/"
                          f"{row['itl_p99_ms']} ms  rejected {row['rejected']}  cores: server "
                          f"{row.get('server_cores')}, clients {row['client_cores']}", flush=True)
            if model is not None and clients in args.baseline_clients:
                row = baseline_round(model, clients, args.new_tokens, PROMPT)
                rows.append(row)
                print(f"{label:>6} {'threads':<12} N={clients:<3} {row['tok_per_s']:>7} tok/s  TTFT p50/p99 "
                      f"{row['ttft_p50_ms']}/{row['ttft_p99_ms']} ms  ITL p50/p99 {row['itl_p50_ms']}/"
                      f"{row['itl_p99_ms']} ms", flush=True)
        if args.long_prompt:
            probe = asyncio.run(_interference(server.url, args.long_prompt))
            print(f"{label:>6} short-prompt TTFT idle {probe['ttft_idle_ms']} ms, during a {args.long_prompt}-token "
                  f"prefill {probe['ttft_during_long_prefill_ms']} ms ({probe['ratio']}x)", flush=True)
    finally:
        server.stop()
        if llama is not None:
            llama.stop()
    return {"export": label, "model_dir": str(model_dir), "rows": rows, "interference": probe,
            **({"llama_server": {"program": str(peer[0]), "gguf": str(peer[1]), "log": str(llama.log)}}
               if llama is not None else {})}


def side_by_side(report: dict) -> str:
    """Ours against llama-server per export and client count: medians over the rounds of aggregate tok/s and
    p99 inter-token gap, and their ratios (tok/s ours over theirs: above 1 we lead; p99 theirs over ours:
    above 1 our gaps are shorter)."""
    lines = ["| export | clients | tok/s, ours / llama-server | p99 inter-token gap ms, ours / llama-server |"
             " rounds |", "|---|---|---|---|---|"]
    for run in report["runs"]:
        for clients in report["clients"]:
            ours = [r for r in run["rows"] if r["kind"] == "server" and r["clients"] == clients]
            theirs = [r for r in run["rows"] if r["kind"] == "llama-server" and r["clients"] == clients]
            if not ours or not theirs:
                continue
            tok = [statistics.median(r["tok_per_s"] for r in rows) for rows in (ours, theirs)]
            p99 = [statistics.median(r["itl_p99_ms"] for r in rows) for rows in (ours, theirs)]
            lines.append(f"| {run['export']} | {clients} | {tok[0]:.1f} / {tok[1]:.1f} = {tok[0] / tok[1]:.2f}× | "
                         f"{p99[0]:.1f} / {p99[1]:.1f} ({p99[1] / p99[0]:.2f}×) | {len(ours)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def chart(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in report["runs"]:
        for kind, style in (("server", "-o"), ("threads", "--s"), ("llama-server", ":^")):
            rows = [r for r in run["rows"] if r["kind"] == kind]
            if not rows:
                continue
            label = f"{run['export']} {({'threads': 'threads + generate'}).get(kind, kind)}"
            clients = sorted({r["clients"] for r in rows})  # the median of the rounds at each count
            for axis, key in ((left, "tok_per_s"), (right, "itl_p99_ms")):
                axis.plot(clients, [statistics.median(r[key] for r in rows if r["clients"] == n) for n in clients],
                          style, label=label)
    for axis, title, unit in ((left, "aggregate throughput", "tokens / s"),
                              (right, "p99 inter-token latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(report["clients"], [str(c) for c in report["clients"]])
        axis.set_xlabel("concurrent streaming clients")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"gpt2onnx serve: {report['new_tokens']} new tokens per client — {report['cpu']['model']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _cores_used(server: Server, before: tuple, wall: float) -> dict:
    """The cores the server process and this process (the clients) kept busy over a round, on average: on a
    machine with few cores the clients' share is taken from the server."""
    server_before, clients_before = before
    server_after, clients_after = server.cpu_seconds(), os.times()
    clients = (clients_after.user + clients_after.system - clients_before.user - clients_before.system) / wall
    used = {"client_cores": round(clients, 2)}
    if server_before is not None and server_after is not None:
        used["server_cores"] = round((server_after - server_before) / wall, 2)
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:gpt2", help="what to export and serve (124M: random:gpt2)")
    parser.add_argument("--precisions", default="fp32,int4", help="exports to measure")
    parser.add_argument("--model-dir", action="append", default=[], help="measure this export instead (repeatable)")
    parser.add_argument("--clients", default="1,4,16,64", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--arrival-gap", type=float, default=0.0,
                        help="seconds between the server clients' requests (0: all at once; e.g. 0.5: a client "
                             "joins the running batch every half second)")
    parser.add_argument("--long-prompt", type=int, default=1000,
                        help="prompt tokens of the interference probe (0: skip)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per physical core)")
    parser.add_argument("--baseline-clients", default="1,4,16", type=lambda s: [int(c) for c in s.split(",")],
                        help="client counts of the threads baseline (64 threads of batch-1 loops take many minutes "
                             "on 2 cores; add 64 to measure it)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the threads + generate baseline")
    parser.add_argument("--llamacpp", metavar="DIR", default=os.environ.get("GPT2ONNX_LLAMACPP"),
                        help="also serve the same model with llama.cpp's llama-server (found in DIR, its bin/, "
                             "build*/bin/ or one level down) on the GGUF file of each export's type in DIR "
                             "(default: $GPT2ONNX_LLAMACPP; benchmarks/README.md says how to make them)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds per client count (with --llamacpp: ours and llama-server's alternated)")
    parser.add_argument("--work-dir", default="~/.cache/gpt2onnx/serve-bench", help="where exports are kept")
    parser.add_argument("--out", default="bench-results/serve_load.json")
    args = parser.parse_args()

    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({cpu['cores']} logical cores), SIMD: {' '.join(cpu['simd']) or 'unknown'}",
          flush=True)
    work = Path(args.work_dir).expanduser()
    targets = [(Path(d), Path(d).name) for d in args.model_dir] or \
              [(exported(args.model, p, work), p) for p in args.precisions.split(",")]
    program, peers = None, {}
    if args.llamacpp:
        program, peers = llama_pairs(Path(args.llamacpp).expanduser(), [label for _, label in targets])
        for _, label in targets:
            print(f"{label}: llama-server {program} -m {peers[label]}" if label in peers else
                  f"{label}: no GGUF file of the matching type in {args.llamacpp}, ours alone", flush=True)
    report = {"cpu": cpu, "clients": args.clients, "new_tokens": args.new_tokens, "arrival_gap": args.arrival_gap,
              "max_batch": args.max_batch, "max_queue": args.max_queue, "threads": args.threads,
              "rounds": args.rounds, "command": " ".join(sys.argv),
              "runs": [measure(directory, label, args, (program, peers[label]) if label in peers else None)
                       for directory, label in targets]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    picture = chart(report, out.with_suffix(".png"))
    table = side_by_side(report)
    if table:
        print("\n" + table + "\n")
    print(f"wrote {out}" + (f" and {picture}" if picture else " (no chart: pip install matplotlib)"))


if __name__ == "__main__":
    main()
