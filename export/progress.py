"""Progress of a long command, one line per step on stderr, stamped with the time since it began:

    [   0.0s] loading random:gpt2
    [  12.3s] verifying against PyTorch
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stopwatch(progress: Callable[[str], None] = stderr) -> Callable[[str], None]:
    """A `step(message)` that passes each message to `progress` after the seconds since this call."""
    start = time.perf_counter()

    def step(message: str) -> None:
        progress(f"[{time.perf_counter() - start:6.1f}s] {message}")

    return step
