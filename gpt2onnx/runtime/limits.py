"""How much one call may ask for: threads, rows, new tokens and KV-cache memory. Every limit is here, and
the errors name it.

A loaded model serves many callers; without these bounds one call (`--threads 1000`, 16 prompts x 64
sequences of gpt2-xl) could start a thousand threads or reserve more memory than the machine has.
"""

from __future__ import annotations

import numbers
import os

from ..errors import InvalidArgumentError

MAX_NEW_TOKENS = 1_000_000  # any model's context is far shorter; the real bound is n_positions
MAX_RETURN_SEQUENCES = 64  # rows one prompt may fan out to (each row holds its own KV cache)
MAX_ROWS = 256  # prompts x num_return_sequences of one call: one left-padded batch, one KV cache
# The KV cache one call may reserve, unless `load(dir, max_cache_bytes=...)` says otherwise. gpt2 124M fp32
# needs 36 MiB per row of 1024 positions (12 layers x 2 x 768 x 4 bytes x 1024), gpt2-xl 600 MiB.
DEFAULT_MAX_CACHE_BYTES = 4 * 2**30
THREADS_PER_CPU = 4  # ONNX Runtime threads beyond 4 per usable CPU only add contention


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_threads() -> int:
    return THREADS_PER_CPU * usable_cpus()


def check_threads(threads) -> int:
    """`threads` as a Python int, or an InvalidArgumentError naming the limit."""
    limit = max_threads()
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 0 <= threads <= limit:
        raise InvalidArgumentError(
            f"threads must be an integer from 0 to {limit} ({THREADS_PER_CPU} per usable CPU, {usable_cpus()} "
            f"here), got {threads!r}",
            hint="0 uses one thread per physical core, usually the fastest; more threads than cores only contend")
    return int(threads)


def check_cache_bytes(max_cache_bytes) -> int:
    """`max_cache_bytes` as a Python int (> 0), or an InvalidArgumentError."""
    if (isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, numbers.Integral)
            or max_cache_bytes < 1):
        raise InvalidArgumentError(f"max_cache_bytes must be an integer > 0, got {max_cache_bytes!r}",
                                   hint=f"the default is {DEFAULT_MAX_CACHE_BYTES} "
                                        f"({format_bytes(DEFAULT_MAX_CACHE_BYTES)})")
    return int(max_cache_bytes)


def format_bytes(n: int) -> str:
    """1536 -> "1.5 KiB" (powers of 1024; "512 bytes" below one KiB)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""
