"""`set_seed`: one process-wide random stream, as `transformers.set_seed` seeds torch's default generator.

    from gpt2onnx import pipeline, set_seed
    set_seed(42)
    generator("Hello", ...); generator("Hello", ...)   # the texts transformers' two calls give after set_seed(42)

After `set_seed(s)`, every sampling call that is not given a seed of its own (`pipeline(...)(...)`,
`Model.generate(seed=None)`, `Model.stream(seed=None)`, with the default sampler "torch") draws from one
TorchGenerator seeded with `s` and leaves it where it stopped, so successive calls continue the stream exactly
as successive transformers calls continue torch's. Before any `set_seed`, such a call draws a fresh seed of its
own (reported in `Generation.seed`), as before. A call given `seed=` uses a stream of its own and leaves the
global one untouched.

Threads: each draw (one token for every row of a step, or the DataLoader's seed of a pipeline call) holds a
lock, like torch's generator mutex, so concurrent calls interleave their draws in whatever order they come:
each call's tokens then depend on the others, as with torch. Give each thread its own `seed=` to stay
reproducible.

The sampler stays a pure function: this module only chooses which generator a call passes in as its rng.
"""

from __future__ import annotations

import random
import secrets
import threading

import numpy as np

from .torch_random import TorchGenerator

_LOCK = threading.Lock()
_GLOBAL: list[SharedStream] = []  # the stream set_seed made (at most one)


class SharedStream:
    """The set_seed stream as a call's rng: a TorchGenerator whose every draw holds the module lock."""

    def __init__(self, seed: int):
        self._generator = TorchGenerator(seed)
        self.seed = self._generator.seed
        self.bit_generator = _LockedWords(self._generator.bit_generator)

    def multinomial_one(self, probs: np.ndarray) -> np.ndarray:
        with _LOCK:  # one torch.multinomial call holds torch's generator for all its rows
            return self._generator.multinomial_one(probs)

    def multinomial(self, probs: np.ndarray, k: int) -> np.ndarray:
        with _LOCK:  # beam sampling: k draws without replacement per row, as one torch.multinomial call
            return self._generator.multinomial(probs, k)

    def exponential(self, shape) -> np.ndarray:
        with _LOCK:
            return self._generator.exponential(shape)


class _LockedWords:
    """`bit_generator.random_raw(n)` under the module lock (what a pipeline call draws for its DataLoader)."""

    def __init__(self, bit_generator):
        self._bit_generator = bit_generator

    def random_raw(self, size: int):
        with _LOCK:
            return self._bit_generator.random_raw(size)


def set_seed(seed: int, deterministic: bool = False) -> None:
    """What `transformers.set_seed(seed)` does for generation: seed the stream later sampling calls draw from.

    seed: 0 .. 2**32-1 (transformers' range). Python's `random` and numpy's global generator are seeded too,
    as transformers does. deterministic: accepted for transformers' signature; ONNX Runtime on the CPU is
    deterministic already.
    """
    stream = SharedStream(seed)  # checks the range
    random.seed(seed)
    np.random.seed(seed)
    with _LOCK:
        _GLOBAL[:] = [stream]


def global_stream() -> SharedStream | None:
    """The stream of the last set_seed, or None before any."""
    with _LOCK:
        return _GLOBAL[0] if _GLOBAL else None


def rng_for(seed: int | None, sampler: str = "torch") -> tuple[int, object]:
    """(the seed to report, the rng) of one sampling call.

    A seed given: a stream of its own. None: the set_seed stream (sampler "torch" only: it replays torch's
    generator, which is what transformers.set_seed seeds), else a fresh seed.
    """
    if seed is None and sampler == "torch":
        shared = global_stream()
        if shared is not None:
            return shared.seed, shared
    seed = secrets.randbelow(2**32) if seed is None else seed
    if sampler == "numpy":
        return seed, np.random.default_rng(seed)
    return seed, TorchGenerator(seed)


def random_for(settings) -> tuple[int | None, object]:
    """(the seed to report, the rng) of one call with these GenerationSettings: (None, None) when greedy."""
    if settings.greedy:
        return None, None
    return rng_for(settings.seed, settings.sampler)


def _reset() -> None:
    """Forget set_seed (tests)."""
    with _LOCK:
        _GLOBAL.clear()
