"""Slow clients beside real ones: do 1,000 connections that send nothing, or half a request, move the
inter-token gaps of 16 streaming clients, or exhaust the server's descriptors?

    python benchmarks/slow_clients.py --model-dir DIR [--slow 1000] [--streams 16] [--new-tokens 128]
                                      [--rounds 3] [--read-timeout 30] [--out bench-results/slow_clients.json]

One `gpt2onnx serve` (loopback only, a free port) runs the whole time. Each round measures twice, in turn:
  without   --streams clients each stream one completion of --new-tokens tokens (ignore_eos, seeded) at once;
  with      the same, while a separate process holds --slow connections to the server: a third connect and
            send nothing, a third send half of a request's headers, a third send whole headers (Content-Length
            1000) and ten bytes of body; each then sends one more byte every 5 s, and a connection the server
            closes is opened again at once, so --slow stay open (or waiting to) until the round ends.
Reported per measurement: the streams' tokens/s, p50/p99 inter-token gap (between consecutive chunks of one
stream), time to first token, refusals; the server's CPU time per generated token (/proc/PID/stat: what the
slow connections cost it, which other jobs on a shared machine do not inflate as they do the gaps) and the load
average; its open descriptors (/proc/PID/fd: before, the most while the slow connections were held, after they
went) and how many slow connections it closed (its read timeout).
All traffic stays on 127.0.0.1, and everything stops by itself: each round lasts as long as its streams, and
the slow process ends with its round (and after --max-seconds at the latest).

Prints the CPU model and its SIMD flags first; writes --out (JSON). The clients run on the same cores as the
server: on a 2-core machine they take a share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Hello, I'm a language model,"
HALF_HEADERS = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
PARTIAL_BODY = HALF_HEADERS + b"Content-Length: 1000\r\n\r\n{\"prompt\": "


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def raise_open_files() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time (/proc/PID/stat), which other jobs on the machine do not inflate."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(url: str, server: subprocess.Popen, args, round_: int) -> dict:
    """One run of the streams, with the server's CPU time per generated token and the machine's load."""
    cpu, load = cpu_seconds(server.pid), os.getloadavg()[0]
    result = asyncio.run(streams(url, args.streams, args.new_tokens, round_))
    spent = cpu_seconds(server.pid) - cpu
    return {**result, "server_cpu_ms_per_token": round(1000 * spent / max(1, result["tokens"]), 2),
            "load_average": round((load + os.getloadavg()[0]) / 2, 1)}


# --- the slow clients (a process of their own) --------------------------------------------------------------


async def hold(port: int, count: int, seconds: float, report: Path) -> None:
    """Hold `count` slow connections for `seconds` or until SIGTERM; then write to `report` how many were opened
    and how many the server closed (by its read timeout)."""
    closed, opened, stop = [0], [0], asyncio.Event()
    writers: set[asyncio.StreamWriter] = set()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.call_later(seconds, stop.set)

    async def one(kind: int):
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.5)
                continue
            opened[0] += 1
            writers.add(writer)
            writer.write([b"", HALF_HEADERS, PARTIAL_BODY][kind])
            try:
                while not stop.is_set():
                    try:
                        data = await asyncio.wait_for(reader.read(65536), timeout=5)
                    except asyncio.TimeoutError:
                        if kind:
                            writer.write(b"x" if kind == 2 else b"X")  # one more byte, slowly
                        continue
                    if not data:  # the server closed it (after a 408, for a body that does not come)
                        closed[0] += 0 if stop.is_set() else 1
                        break
            except (ConnectionError, OSError):
                closed[0] += 0 if stop.is_set() else 1
            finally:
                writers.discard(writer)
                writer.close()

    async def paced(i: int):
        await asyncio.sleep(i * 0.002)  # 1,000 connections over 2 s, not in one burst
        await one(i % 3)

    tasks = [asyncio.create_task(paced(i)) for i in range(count)]
    await stop.wait()
    for writer in list(writers):
        writer.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    report.write_text(json.dumps({"opened": opened[0], "closed_by_server": closed[0]}))


# --- the streams ----------------------------------------------------------------------------------------------


async def streams(url: str, count: int, new_tokens: int, round_: int) -> dict:
    import httpx

    gaps, ttft, refused, tokens = [], [], [0], [0]

    async def one(client, i: int):
        body = {"prompt": PROMPT, "max_tokens": new_tokens, "seed": 1000 * round_ + i, "stream": True,
                "ignore_eos": True}
        started = time.perf_counter()
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                refused[0] += 1
                await response.aread()
                return
            last = None
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - started)
                else:
                    gaps.append(now - last)
                last = now
                tokens[0] += 1

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=count)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(count)))
        wall = time.perf_counter() - started

    def ms(value):
        return None if value is None else round(1000 * value, 1)

    return {"streams": count, "tokens": tokens[0], "seconds": round(wall, 2), "tok_per_s": round(tokens[0] / wall, 1),
            "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p99_ms": ms(percentile(gaps, 99)),
            "itl_max_ms": ms(max(gaps) if gaps else None), "ttft_p50_ms": ms(percentile(ttft, 50)),
            "ttft_p99_ms": ms(percentile(ttft, 99)), "refused": refused[0]}


# --- a round ----------------------------------------------------------------------------------------------------


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become healthy")


def measure_with_slow(args, url: str, port: int, server: subprocess.Popen, round_: int) -> dict:
    report = Path(args.out).with_suffix(f".slow-{round_}.json")
    before = descriptors(server.pid)
    slow = subprocess.Popen([sys.executable, __file__, "--role", "slow", "--port", str(port), "--slow",
                             str(args.slow), "--max-seconds", str(args.max_seconds), "--report", str(report)])
    try:
        deadline = time.monotonic() + 10  # (a short --read-timeout closes some while the others open)
        while descriptors(server.pid) < before + 0.9 * args.slow and time.monotonic() < deadline:
            time.sleep(0.2)
        held = descriptors(server.pid)
        most = [held]
        sampling = True

        async def sample():
            while sampling:
                most.append(descriptors(server.pid))
                await asyncio.sleep(0.5)

        async def run():
            nonlocal sampling
            sampler = asyncio.create_task(sample())
            try:
                return await streams(url, args.streams, args.new_tokens, round_)
            finally:
                sampling = False
                await sampler

        cpu, load = cpu_seconds(server.pid), os.getloadavg()[0]
        result = asyncio.run(run())
        spent = cpu_seconds(server.pid) - cpu
        result |= {"server_cpu_ms_per_token": round(1000 * spent / max(1, result["tokens"]), 2),
                   "load_average": round((load + os.getloadavg()[0]) / 2, 1)}
    finally:
        slow.send_signal(signal.SIGTERM)
        try:
            slow.wait(30)
        except subprocess.TimeoutExpired:
            slow.kill()
            slow.wait()
    deadline = time.monotonic() + 60
    while descriptors(server.pid) > before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    stats = json.loads(report.read_text()) if report.exists() else {}
    report.unlink(missing_ok=True)
    return {**result, "fds_before": before, "fds_held": held, "fds_most": max(most),
            "fds_after": descriptors(server.pid), **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="the export to serve (`gpt2onnx export random:gpt2 DIR`: GPT-2 124M)")
    parser.add_argument("--slow", type=int, default=1000, help="slow connections held beside the streams")
    parser.add_argument("--streams", type=int, default=16, help="streaming clients")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens each stream asks for")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (without, with)")
    parser.add_argument("--read-timeout", type=float, default=None,
                        help="the server's --read-timeout (default: its own, 30 s)")
    parser.add_argument("--max-seconds", type=float, default=600,
                        help="the slow process stops after this at the latest")
    parser.add_argument("--out", default="bench-results/slow_clients.json", help="JSON results")
    parser.add_argument("--role", choices=["main", "slow"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_open_files()
    if args.role == "slow":
        asyncio.run(hold(args.port, args.slow, args.max_seconds, Path(args.report)))
        return
    if not args.model_dir:
        parser.error("--model-dir is required")
    from gpt2onnx.runtime import cpu

    machine = {"cpu": cpu.model_name(), "cores": os.cpu_count(), "simd": list(cpu.vector_flags()),
               "python": platform.python_version()}
    print(json.dumps(machine))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gpt2onnx", "serve", args.model_dir, "--port", str(port), "--max-batch",
               str(args.streams), "--log-level", "warning"]
    if args.read_timeout is not None:
        command += ["--read-timeout", str(args.read_timeout)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows = []
    try:
        wait_healthy(url, server)
        asyncio.run(streams(url, args.streams, 8, 0))  # warm up
        for round_ in range(1, args.rounds + 1):
            rows.append({"round": round_, "slow": 0, **measured(url, server, args, round_),
                         "fds": descriptors(server.pid)})
            print(json.dumps(rows[-1]), flush=True)
            rows.append({"round": round_, "slow": args.slow, **measure_with_slow(args, url, port, server, round_)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    summary = {}
    for slow in (0, args.slow):
        mine = [row for row in rows if row["slow"] == slow]
        summary[f"slow={slow}"] = {key: statistics.median(row[key] for row in mine)
                                   for key in ("tok_per_s", "itl_p50_ms", "itl_p99_ms", "ttft_p99_ms",
                                               "server_cpu_ms_per_token")}
    print(json.dumps(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "command": sys.argv, "rows": rows, "summary": summary},
                                         indent=2))


if __name__ == "__main__":
    main()
