"""benchmarks/soak.py, small enough for CI: 500 mixed requests (normal, streamed, streamed and cancelled, invalid)
against one `gpt2onnx serve` process, with the soak's own invariants: RSS after the last 300 within 5% of RSS
after the first 200, no descriptor growth, no answer but the expected ones, no traceback in the server's log.

The tolerance: the full soak (5,000 requests, benchmarks/results/2026-12-08-soak.md) moved the RSS of this
~310 MiB process by under 2% after its warm-up, and 5% of it over 300 requests is ~50 KiB a request: a leak of
anything per-request sized (one request's KV cache of the test model is ~300 KiB, a response a few KiB x 300)
fails it; smaller leaks are the full soak's to find (5% over 4,500 requests: ~3.5 KiB a request).
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_small_soak_holds_the_invariants(trained_export, tmp_path):
    figures = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), "--model-dir", str(trained_export),
                           "--requests", "500", "--warm-up", "200", "--sample-every", "300", "--json", str(figures)],
                          capture_output=True, text=True, timeout=300)
    assert figures.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(figures.read_text())
    assert done.returncode == 0 and result["passed"], done.stdout[-3000:]
    kinds = {name.split(" -> ")[0].split(":")[0] for name in result["counts"]}
    assert kinds == {"normal", "stream", "cancelled", "invalid"}, result["counts"]
    assert sum(result["counts"].values()) == 500
