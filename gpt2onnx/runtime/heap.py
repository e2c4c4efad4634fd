"""The Python heap of a process that loads a model: the garbage collector kept off what is built to last.

A collection of the oldest generation walks every live object while holding the GIL; once numpy, ONNX Runtime
and a model are loaded there are ~120,000 of them (`gc.collect(2)`: ~0.1 s). Objects made to live as long as
the process (modules, a tokenizer's tables) gain nothing from being walked while they are made, and a server's
streams gain from their never being walked again.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def collector_paused():
    """No automatic collection inside the block (the collector's state is restored after it): for code that
    makes many long-lived objects at once (measured: benchmarks/results/2026-12-01-cold-start.md)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def freeze_startup_heap() -> None:
    """Put every object alive now (the model, tokenizer, app and libraries: ~120,000) out of the garbage
    collector's reach, as vLLM's server does once it has started. Otherwise each collection of the oldest
    generation, which serving's allocations trigger now and then, walks all of them while holding the GIL: a
    40-110 ms pause of every stream at once (measured on `gpt2onnx serve` under 16 clients: one such pause lengthens
    16 gaps, most of a round's top 1%). For a process that owns its heap only (a server's, a benchmark's client):
    what is frozen is never collected, should it become garbage later (the model and the app live until the
    process exits)."""
    gc.collect()
    gc.freeze()
