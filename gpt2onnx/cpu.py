"""What this CPU can do, read once: /proc/cpuinfo's flags (the kernels ONNX Runtime and torch pick depend on them)."""

from __future__ import annotations

import functools
import platform


@functools.lru_cache(maxsize=None)
def flags() -> tuple[str, ...]:
    """The CPU's feature flags, sorted (x86 'flags', ARM 'Features'); empty when /proc/cpuinfo can't be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return tuple(sorted(line.partition(":")[2].split()))
    except OSError:
        pass
    return ()


def torch_lanes() -> int:
    """float32 lanes of torch's vectorised CPU sums here: 16 with AVX-512 (which torch uses when the CPU has these
    four extensions), else 8 (AVX2; ARM's are different again and not replicated)."""
    return 16 if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags()) else 8


def describe() -> str:
    """The flags as one string (a cache key), or the machine and processor names when there are none."""
    return " ".join(flags()) or f"{platform.machine()} {platform.processor()}"
