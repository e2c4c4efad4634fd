"""Generation settings: one frozen dataclass, checked once, so the loop never sees a bad value."""

from __future__ import annotations

import dataclasses
import math

from .errors import InvalidArgumentError

MAX_RETURN_SEQUENCES = 64  # rows one prompt may fan out to (each row holds its own KV cache)
SEED_MAX = 2**32 - 1  # transformers' set_seed(seed) accepts 0 .. 2**32 - 1 (numpy's limit)
SAMPLERS = ("torch", "numpy")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """What to generate and how to pick each token (names and meanings as in transformers)."""

    max_new_tokens: int = 20  # tokens to generate after the prompt
    min_new_tokens: int = 0  # <|endoftext|> is forbidden before this many new tokens
    do_sample: bool = False  # False: greedy (argmax); True: sample from the processed distribution
    temperature: float = 1.0  # divides the logits before sampling; 0 means greedy
    top_k: int = 50  # sample among the k most likely tokens; 0 keeps all (transformers' default is 50)
    top_p: float = 1.0  # sample among the smallest set of tokens whose probability reaches top_p
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (prompt included)
    no_repeat_ngram_size: int = 0  # > 0 forbids repeating any n-gram of this size
    num_return_sequences: int = 1  # continuations per prompt (one prefill, the cache is shared out)
    stop: tuple[str, ...] = ()  # stop a row when its new text contains one of these (not returned)
    ignore_eos: bool = False  # keep going after <|endoftext|> (fixed-length runs, benchmarks)
    seed: int | None = None  # same seed, same tokens; None draws a fresh seed
    sampler: str = "torch"  # "torch": replays PyTorch's random stream (same tokens as transformers); "numpy"

    def __post_init__(self):
        _check_int("max_new_tokens", self.max_new_tokens, 0, 1_000_000)
        _check_int("min_new_tokens", self.min_new_tokens, 0, 1_000_000)
        _check_int("top_k", self.top_k, 0, None)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, None)
        _check_int("num_return_sequences", self.num_return_sequences, 1, MAX_RETURN_SEQUENCES)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, SEED_MAX)
        if not isinstance(self.do_sample, bool):
            raise InvalidArgumentError(f"do_sample must be True or False, got {self.do_sample!r}")
        _check_real("temperature", self.temperature, "a finite number >= 0 (0 means greedy)",
                    lambda t: math.isfinite(t) and t >= 0)
        _check_real("top_p", self.top_p, "a number in (0, 1]", lambda p: 0 < p <= 1)
        _check_real("repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 means none)",
                    lambda r: math.isfinite(r) and r > 0)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidArgumentError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.sampler not in SAMPLERS:
            raise InvalidArgumentError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.num_return_sequences > 1 and self.greedy:
            raise InvalidArgumentError(
                f"num_return_sequences={self.num_return_sequences} with greedy decoding gives identical rows",
                hint="pass do_sample=True (with a temperature > 0), or num_return_sequences=1")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def _check_int(name: str, value, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"from {low} to {high}"
        raise InvalidArgumentError(f"{name} must be an integer {allowed}, got {value!r}")


def _check_real(name: str, value, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise InvalidArgumentError(f"{name} must be {allowed}, got {value!r}")
