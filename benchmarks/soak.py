"""A soak of `gpt2onnx serve`: thousands of mixed requests against one server process, to show that it neither
grows nor leaks while it answers them.

    python benchmarks/soak.py                          # 5,000 requests, 16 at a time, the trained test model
    python benchmarks/soak.py --requests 500 --model-dir DIR --json soak.json

It starts `python -m gpt2onnx serve MODEL_DIR` on a free 127.0.0.1 port (with an API key), then sends, from
--concurrency asyncio workers in this process, a fixed mix (the same sequence every run):

    normal     a completion (a text prompt, token ids, n=2 with logprobs, echo): 200
    stream     a streamed completion read to its end ([DONE]): 200
    cancelled  a streamed completion whose client hangs up after its first chunk: 200, then the hang-up
    invalid    a bad request from a fixed list (broken JSON, unknown field, wrong type, a temperature whose
               scores leave float32, a wrong model, no key, a wrong method, text/plain): its 4xx

in parts: the first --warm-up requests, then --sample-every at a time. After each part it waits until nothing is
in flight and its client's connections are closed, and reads the server's RSS (VmRSS in /proc/PID/status) and
open descriptors (/proc/PID/fd). It passes when the RSS at the end is within --rss-tolerance of the RSS after the
first part, the descriptors did not grow, every answer had its kind's status, and the server's log holds no
traceback. The exit code is 0 when it passes, 1 when not. Logs: benchmarks/results/*-soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINED = REPO / "tests" / "data" / "gpt2-tiny-trained"  # the small trained test model (ships its tokenizer)
KEY = "soak-key"
NAME = "soak"
PROMPTS = ["In Vim, to delete a line,", "The quick brown fox", "def parse(path):", "Once upon a time"]


# --- the mix ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request of the mix and the statuses that answer it correctly."""

    kind: str  # normal, stream, cancelled, invalid
    method: str
    path: str
    body: bytes
    expected: tuple[int, ...]
    headers: dict = field(default_factory=lambda: {"Authorization": f"Bearer {KEY}",
                                                   "Content-Type": "application/json"})
    label: str = ""  # which invalid request


def _json(**fields) -> bytes:
    return json.dumps({"model": NAME, **fields}).encode()


INVALID = [  # (label, method, body, statuses, headers or None)
    ("broken JSON", "POST", b'{"prompt": "a"', (400,), None),
    ("unknown field", "POST", _json(prompt="a", foo=1), (400,), None),
    ("max_tokens a string", "POST", _json(prompt="a", max_tokens="8"), (400,), None),
    ("temperature 1e-300", "POST", _json(prompt="a", temperature=1e-300), (400,), None),
    ("a wrong model", "POST", json.dumps({"model": "gpt-3.5-turbo-instruct", "prompt": "a"}).encode(), (404,), None),
    ("no key", "POST", _json(prompt="a"), (401,), {"Content-Type": "application/json"}),
    ("past the context", "POST", _json(prompt="a", max_tokens=5000), (400,), None),
    ("GET a POST route", "GET", b"", (405,), None),
    ("text/plain", "POST", _json(prompt="a"), (415,), {"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"}),
]


def mix(count: int, max_tokens: int) -> list[Call]:
    """The fixed sequence: of every 20 requests 8 normal, 5 streamed, 3 streamed and cancelled, 4 invalid."""
    pattern = ["normal", "stream", "normal", "invalid", "cancelled", "normal", "stream", "normal", "invalid",
               "stream", "normal", "cancelled", "normal", "invalid", "stream", "normal", "cancelled", "normal",
               "stream", "invalid"]
    calls = []
    for i in range(count):
        kind = pattern[i % len(pattern)]
        prompt = PROMPTS[i % len(PROMPTS)]
        if kind == "normal":
            variant = [dict(prompt=prompt), dict(prompt=[464, 2068, 7586, 21831]),
                       dict(prompt=prompt, n=2, logprobs=2), dict(prompt=prompt, echo=True, temperature=0)][i // 20 % 4]
            calls.append(Call(kind, "POST", "/v1/completions", _json(max_tokens=max_tokens, seed=i, **variant), (200,)))
        elif kind in ("stream", "cancelled"):
            tokens = max_tokens if kind == "stream" else 4 * max_tokens  # a cancelled one would run on
            body = _json(prompt=prompt, max_tokens=tokens, seed=i, stream=True, ignore_eos=kind == "cancelled",
                         stream_options={"include_usage": True})
            calls.append(Call(kind, "POST", "/v1/completions", body, (200,)))
        else:
            label, method, body, expected, headers = INVALID[i // 20 % len(INVALID)]
            extra = {} if headers is None else {"headers": headers}
            calls.append(Call(kind, method, "/v1/completions", body, expected, label=label, **extra))
    return calls


# --- sending ----------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What came back: counts by (kind, status), and every answer that was not its kind's."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    unexpected: list[str] = field(default_factory=list)

    def record(self, call: Call, status: int | str, problem: str = "") -> None:
        self.counts[(call.kind + (f": {call.label}" if call.label else ""), status)] += 1
        if status not in call.expected or problem:
            self.unexpected.append(f"{call.kind} {call.label} -> {status} {problem}".strip())


async def send(client, call: Call, tally: Tally) -> None:
    import httpx

    try:
        if call.kind in ("stream", "cancelled"):
            async with client.stream(call.method, call.path, content=call.body, headers=call.headers) as response:
                problem = await read_stream(response, cancel=call.kind == "cancelled")
                tally.record(call, response.status_code, problem)
        else:
            response = await client.request(call.method, call.path, content=call.body, headers=call.headers)
            problem = "" if response.status_code != 200 or "choices" in response.json() else "no choices"
            tally.record(call, response.status_code, problem)
    except httpx.HTTPError as error:
        tally.record(call, type(error).__name__, str(error)[:200])


async def read_stream(response, *, cancel: bool) -> str:
    """Read an SSE answer: to its [DONE] (a problem if it ends otherwise), or only its first chunk (cancel)."""
    if response.status_code != 200:
        await response.aread()
        return ""
    last = None
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        last = line[6:]
        if cancel:
            return ""  # leaving the `async with` closes the connection mid-stream
        if last != "[DONE]":
            json.loads(last)
    return "" if last == "[DONE]" else f"the stream ended with {last!r:.200}"


async def run_part(url: str, calls: list[Call], concurrency: int, tally: Tally) -> float:
    """Send `calls` from `concurrency` workers; return the seconds it took. The client (and so every connection
    it opened) is closed before this returns."""
    import httpx

    pending = collections.deque(calls)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def worker():
            while pending:
                await send(client, pending.popleft(), tally)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


# --- the server and its process ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir: Path, work: Path, port: int, args: list[str]) -> subprocess.Popen:
    keys = work / "keys"
    keys.write_text(KEY + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with (work / "server.log").open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "gpt2onnx", "serve", str(model_dir), "--host", "127.0.0.1",
                                 "--port", str(port), "--model-name", NAME, "--api-key-file", str(keys),
                                 "--log-level", "warning", *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(process: subprocess.Popen, url: str, log: Path, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not become healthy in time")
        time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def sample(pid: int) -> dict:
    """The process's resident memory (MiB) and open descriptors now."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1))
    return {"rss_mib": round(rss_kib / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def settle(pid: int, seconds: float = 2.0) -> dict:
    """A sample once the server is quiet: the descriptors of closed connections gone (within `seconds`)."""
    time.sleep(0.5)
    first = sample(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = sample(pid)
        if now["fds"] >= first["fds"]:
            return now
        first = now
    return sample(pid)


# --- the machine ------------------------------------------------------------------------------------------------


def cpu_lines() -> list[str]:
    """lscpu's CPU model and flags (or /proc/cpuinfo's, without lscpu)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        pairs = [line.split(":", 1) for line in text.splitlines() if ":" in line]
        found = {key.strip(): value.strip() for key, value in pairs}
        return [f"CPU: {found.get('Model name', '?')} ({found.get('CPU(s)', '?')} CPUs)",
                f"flags: {found.get('Flags', '?')}"]
    except (OSError, subprocess.CalledProcessError):
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
        flags = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
        return [f"CPU: {model.group(1) if model else '?'} ({os.cpu_count()} CPUs)",
                f"flags: {flags.group(1) if flags else '?'}"]


def trained_export(work_dir: Path) -> Path:
    """The trained test model, exported once into work_dir (needs the export extra)."""
    out = work_dir / "gpt2-tiny-trained"
    if not (out / "manifest.json").exists():
        print(f"exporting {TRAINED} to {out} (once)")
        subprocess.run([sys.executable, "-m", "gpt2onnx", "export", str(TRAINED), str(out), "--force"], check=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    return out


# --- the soak ---------------------------------------------------------------------------------------------------


def soak(args) -> dict:
    model_dir = args.model_dir or trained_export(args.work_dir)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(model_dir, work, port, ["--max-batch", str(args.max_batch), "--max-queue", "64"])
    try:
        wait_healthy(process, url, work / "server.log")
        calls = mix(args.requests, args.max_tokens)
        tally = Tally()
        samples = [{"requests": 0, "seconds": 0.0, **sample(process.pid)}]
        bounds = [0, *range(args.warm_up, args.requests, args.sample_every), args.requests]
        seconds = 0.0
        for start, stop in zip(bounds, bounds[1:]):
            seconds += asyncio.run(run_part(url, calls[start:stop], args.concurrency, tally))
            samples.append({"requests": stop, "seconds": round(seconds, 1), **settle(process.pid)})
            print(f"after {stop:6,} requests ({seconds:5.0f} s): RSS {samples[-1]['rss_mib']:6.1f} MiB, "
                  f"{samples[-1]['fds']} descriptors", flush=True)
        alive = process.poll() is None
    finally:
        stop_server(process)
    log = (work / "server.log").read_text()
    shutil.rmtree(work, ignore_errors=True)
    after_warm_up, end = samples[1], samples[-1]
    growth = (end["rss_mib"] - after_warm_up["rss_mib"]) / after_warm_up["rss_mib"]
    within = f"RSS at the end within {args.rss_tolerance:.0%} of RSS after {args.warm_up:,}"
    checks = {
        within: abs(growth) <= args.rss_tolerance,
        "no descriptor growth": end["fds"] <= after_warm_up["fds"],
        "no error but the expected ones": not tally.unexpected,
        "no traceback in the server's log": "Traceback" not in log,
        "the server was up at the end": alive,
    }
    return {"requests": args.requests, "warm_up": args.warm_up, "concurrency": args.concurrency,
            "max_tokens": args.max_tokens, "seconds": round(seconds, 1), "samples": samples,
            "after_warm_up": after_warm_up, "end": end, "rss_growth": round(growth, 4),
            "counts": {f"{kind} -> {status}": n for (kind, status), n in sorted(tally.counts.items(), key=str)},
            "unexpected": tally.unexpected[:50], "log": log.splitlines()[-20:], "log_lines": len(log.splitlines()),
            "checks": checks, "passed": all(checks.values())}


def report(result: dict) -> None:
    print(f"\n{result['requests']:,} requests, {result['concurrency']} at a time, in {result['seconds']:.0f} s "
          f"({result['requests'] / result['seconds']:.1f} requests/s)")
    print(f"  RSS {result['after_warm_up']['rss_mib']} MiB after {result['warm_up']:,}, {result['end']['rss_mib']} "
          f"MiB at the end ({result['rss_growth']:+.2%}); descriptors {result['after_warm_up']['fds']} -> "
          f"{result['end']['fds']}; the server's log: {result['log_lines']} lines")
    print("answers:")
    for name, count in result["counts"].items():
        print(f"  {name:40} {count:6,}")
    for line in result["log"]:
        print(f"  log: {line}")
    for problem in result["unexpected"]:
        print(f"  UNEXPECTED {problem}")
    for check, passed in result["checks"].items():
        print(f"{'PASS' if passed else 'FAIL'}  {check}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="an exported model (default: the trained test model, "
                                                       "exported once into --work-dir)")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "gpt2onnx" / "soak",
                        help="where the default model's export is kept")
    parser.add_argument("--requests", type=int, default=5000, help="requests in all")
    parser.add_argument("--warm-up", type=int, default=500, help="requests before the first sample")
    parser.add_argument("--sample-every", type=int, default=500, help="requests between samples after the warm-up")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per completion (x4 for the cancelled)")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--rss-tolerance", type=float, default=0.05, help="allowed RSS change after the warm-up")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not 0 < args.warm_up < args.requests:
        parser.error("--warm-up must be between 0 and --requests")
    for line in cpu_lines():
        print(line)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores", flush=True)
    result = soak(args)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
