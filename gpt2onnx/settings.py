"""Generation settings: one frozen dataclass, checked once, so the loop never sees a bad value."""

from __future__ import annotations

import dataclasses
import math

from .errors import InvalidArgumentError

MAX_NEW_TOKENS_LIMIT = 1_000_000


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """What to generate and how to pick each token."""

    max_new_tokens: int = 20  # tokens to generate after the prompt
    do_sample: bool = False  # False: greedy (argmax); True: sample from the distribution
    temperature: float = 1.0  # divides the logits before sampling; 0 means greedy
    top_k: int = 0  # keep only the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    ignore_eos: bool = False  # keep going after <|endoftext|> (fixed-length runs, benchmarks)

    def __post_init__(self):
        _check_int("max_new_tokens", self.max_new_tokens, 0, MAX_NEW_TOKENS_LIMIT)
        _check_int("top_k", self.top_k, 0, None)
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgumentError(
                f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not (0 < self.top_p <= 1):
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"from {low} to {high}"
        raise InvalidArgumentError(f"{name} must be an integer {allowed}, got {value!r}")
