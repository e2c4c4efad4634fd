"""What this CPU can do, read once: /proc/cpuinfo's flags (the kernels ONNX Runtime and torch pick depend on them)."""

from __future__ import annotations

import functools
import platform

_VECTOR = ("avx", "fma", "f16c", "amx", "vnni", "sse4", "asimd", "sve")  # flags naming vector extensions (x86, ARM)


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo; empty when it can't be read."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, colon, value = line.partition(":")
                if colon:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def flags() -> tuple[str, ...]:
    """The CPU's feature flags, sorted (x86 'flags', ARM 'Features'); empty when /proc/cpuinfo can't be read."""
    info = _cpuinfo()
    return tuple(sorted(info.get("flags", info.get("Features", "")).split()))


def torch_lanes() -> int:
    """float32 lanes of torch's vectorised CPU sums here: 16 with AVX-512 (which torch uses when the CPU has these
    four extensions), else 8 (AVX2; ARM's are different again and not replicated)."""
    return 16 if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags()) else 8


def describe() -> str:
    """The flags as one string (a cache key), or the machine and processor names when there are none."""
    return " ".join(flags()) or f"{platform.machine()} {platform.processor()}"


def model_name() -> str:
    """The CPU's model name (x86 'model name', ARM 'Model'), else the processor or machine name Python knows."""
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine()


def vector_flags() -> tuple[str, ...]:
    """The flags that name vector extensions (AVX2, FMA, F16C, AVX-512, VNNI, AMX, SSE4; ARM ASIMD, SVE): what
    benchmarks print."""
    return tuple(f for f in flags() if f.startswith(_VECTOR))


def summary() -> str:
    """For people (benchmark reports): the CPU's model name and its vector extensions."""
    return f"{model_name()}; flags: {' '.join(vector_flags())}"
