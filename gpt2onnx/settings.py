"""Generation settings: one frozen dataclass, checked once, so the loop never sees a bad value."""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from .errors import InvalidArgumentError
from .limits import MAX_NEW_TOKENS, MAX_RETURN_SEQUENCES

SEED_MAX = 2**32 - 1  # transformers' set_seed(seed) accepts 0 .. 2**32 - 1 (numpy's limit)
SAMPLERS = ("torch", "numpy")


@dataclasses.dataclass(frozen=True)
class Option:
    """One generation option as it is explained to a user.

    help: the one line of `gpt2onnx generate --help` (Model.generate's docstring says it at more length).
    hint: how to fix a bad value, the hint of the error about it.
    flag: the argparse settings of its CLI flag that its type in GenerationSettings does not give
        (a bool becomes --name/--no-name, an int or float a typed value; "short" adds a one-letter flag).
    """

    help: str
    hint: str | None = None
    flag: dict = dataclasses.field(default_factory=dict)


def early_stopping(text: str) -> bool | str:
    """The CLI's --early-stopping value (true, false or never), named for argparse's error message."""
    value = {"true": True, "false": False, "never": "never"}.get(text.lower())
    if value is None:
        raise ValueError(text)
    return value


# Every generation option, once: GenerationSettings' fields plus max_length (turned into max_new_tokens).
# In this order they are Model.generate's keyword arguments and `gpt2onnx generate`'s flags; the CLI's flags,
# its options dict, the pipeline's accepted set and the parity checker's options are derived from this table.
OPTIONS = {
    "max_new_tokens": Option(
        "tokens to add after the prompt (wins over --max-length)",
        hint="the tokens to add after the prompt; the prompt plus them must fit in the model's n_positions"),
    "max_length": Option("prompt + new tokens", flag={"type": int},
                         hint="max_length counts the prompt and the new tokens; max_new_tokens counts only new ones"),
    "min_new_tokens": Option("forbid <|endoftext|> before this many new tokens",
                             hint="0 lets <|endoftext|> end a row at once"),
    "do_sample": Option(
        "sample (--do-sample) or take the most likely token (--no-do-sample); default: the model's",
        hint="pass True (sample) or False (greedy)"),
    "temperature": Option("divide logits by this before sampling; 0 = greedy",
                          hint="0 is greedy, 1 leaves the logits as they are; 0.7 is common"),
    "top_k": Option("sample among the k most likely tokens; 0 = all",
                    hint="0 keeps every token; transformers' default is 50"),
    "top_p": Option("sample among the fewest tokens reaching this probability",
                    hint="1 keeps every token; 0.9 keeps the most likely tokens holding 90% of the probability"),
    "repetition_penalty": Option("> 1 discourages repeating tokens",
                                 hint="1 means no penalty; 1.2 discourages repeating tokens"),
    "no_repeat_ngram_size": Option("never repeat an n-gram of this size",
                                   hint="0 turns it off; 3 forbids repeating any 3 tokens in a row"),
    "num_return_sequences": Option(
        "continuations (needs sampling, or beams: at most --num-beams)", flag={"short": "-n"},
        hint=f"continuations per prompt, 1 to {MAX_RETURN_SEQUENCES}; more than 1 needs do_sample=True or "
             "num_beams > 1 (then at most num_beams)"),
    # beam search (num_beams > 1): transformers' _beam_search, see gpt2onnx/beam.py
    "num_beams": Option("beam search over this many beams (1 = off)",
                        hint=f"1 turns beam search off; 2 to {MAX_RETURN_SEQUENCES} beams, 4 is common"),
    "length_penalty": Option("beam scores are divided by length ** this (> 0 favours longer ones)",
                             hint="1.0 averages the log-probabilities per token, 0 sums them; any finite number"),
    "early_stopping": Option("beam search ends: true (num_beams done), false (heuristic), never",
                             flag={"type": early_stopping, "metavar": "{true,false,never}"},
                             hint="True stops once num_beams sequences are done, False when the heuristic says no "
                                  "beam can do better, 'never' when no beam can in theory"),
    "stop": Option("end where the new text contains TEXT (repeatable; \\n is a newline)",
                   flag={"action": "append", "metavar": "TEXT"},
                   hint='pass a string or a list of non-empty strings, e.g. stop=["\\n\\n"]'),
    "seed": Option("same seed, same text (the tokens transformers gives after set_seed)",
                   hint=f"any integer from 0 to {SEED_MAX}; leave it unset to draw a fresh seed (reported in the "
                        "result)"),
    "sampler": Option("random stream: torch (transformers' tokens, the default) or numpy",
                      flag={"choices": list(SAMPLERS)},
                      hint="'torch' gives transformers' tokens for a seed; 'numpy' is faster"),
    "ignore_eos": Option("keep going after <|endoftext|>", flag={"action": "store_true"},
                         hint="pass True (keep going after <|endoftext|>) or False"),
}


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
    num_beams: int = 1  # > 1: beam search (beam sampling with do_sample), returning the best num_return_sequences
    length_penalty: float = 1.0  # a finished beam's score is its summed log-probability / new tokens ** this
    early_stopping: bool | str = False  # True, False or "never": when beam search stops (as transformers)
    stop: tuple[str, ...] = ()  # stop a row when its new text contains one of these (not returned)
    ignore_eos: bool = False  # keep going after <|endoftext|> (fixed-length runs, benchmarks)
    seed: int | None = None  # same seed, same tokens; None draws a fresh seed
    sampler: str = "torch"  # "torch": replays PyTorch's random stream (same tokens as transformers); "numpy"

    def __post_init__(self):
        # numpy numbers are accepted, and stored as Python int, float and bool
        self._set("max_new_tokens", _check_int("max_new_tokens", self.max_new_tokens, 0, MAX_NEW_TOKENS))
        self._set("min_new_tokens", _check_int("min_new_tokens", self.min_new_tokens, 0, MAX_NEW_TOKENS))
        self._set("top_k", _check_int("top_k", self.top_k, 0, None))
        self._set("no_repeat_ngram_size", _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, None))
        self._set("num_return_sequences",
                  _check_int("num_return_sequences", self.num_return_sequences, 1, MAX_RETURN_SEQUENCES))
        if self.seed is not None:
            self._set("seed", _check_int("seed", self.seed, 0, SEED_MAX))
        self._set("do_sample", _check_bool("do_sample", self.do_sample))
        self._set("ignore_eos", _check_bool("ignore_eos", self.ignore_eos))
        self._set("temperature", _check_real("temperature", self.temperature, "a finite number >= 0 (0 means greedy)",
                                             lambda t: math.isfinite(t) and t >= 0))
        self._set("top_p", _check_real("top_p", self.top_p, "a number in (0, 1]", lambda p: 0 < p <= 1))
        self._set("repetition_penalty", _check_real("repetition_penalty", self.repetition_penalty,
                                                    "a finite number > 0 (1 means none)",
                                                    lambda r: math.isfinite(r) and r > 0))
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidArgumentError(f"stop must be a list of non-empty strings, got {self.stop!r}",
                                       hint=OPTIONS["stop"].hint)
        self._set("stop", tuple(str(s) for s in self.stop))
        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise InvalidArgumentError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}",
                                       hint=OPTIONS["sampler"].hint)
        self._set("num_beams", _check_int("num_beams", self.num_beams, 1, MAX_RETURN_SEQUENCES))
        self._set("length_penalty", _check_real("length_penalty", self.length_penalty, "a finite number",
                                                math.isfinite))
        if not (isinstance(self.early_stopping, (bool, np.bool_)) or self.early_stopping == "never"):
            raise InvalidArgumentError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}",
                                       hint=OPTIONS["early_stopping"].hint)
        if self.early_stopping != "never":
            self._set("early_stopping", bool(self.early_stopping))
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise InvalidArgumentError(
                f"num_return_sequences={self.num_return_sequences} is more than num_beams={self.num_beams}",
                hint="beam search returns at most num_beams sequences per prompt: raise num_beams or lower "
                     "num_return_sequences")
        if self.num_return_sequences > 1 and self.greedy and self.num_beams == 1:
            raise InvalidArgumentError(
                f"num_return_sequences={self.num_return_sequences} with greedy decoding gives identical rows",
                hint="pass do_sample=True (with a temperature > 0), num_beams >= num_return_sequences, or "
                     "num_return_sequences=1")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # a frozen field normalised once, while it is built


def _check_int(name: str, value, low: int, high: int | None) -> int:
    """`value` as a Python int: any integer (numpy's too) but a bool, within [low, high]."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low
            or (high is not None and value > high)):
        allowed = f">= {low}" if high is None else f"from {low} to {high}"
        raise InvalidArgumentError(f"{name} must be an integer {allowed}, got {value!r}", hint=OPTIONS[name].hint)
    return int(value)


def _check_real(name: str, value, allowed: str, ok) -> float:
    """`value` as a Python float: any real number (numpy's too) but a bool, for which `ok` holds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not _holds(ok, value):
        raise InvalidArgumentError(f"{name} must be {allowed}, got {value!r}", hint=OPTIONS[name].hint)
    return float(value)


def _holds(ok, value) -> bool:
    try:
        return ok(float(value))
    except OverflowError:  # an int too large for a float
        return False


def _check_bool(name: str, value) -> bool:
    """`value` as a Python bool (numpy's bool too); 0 and 1 are not booleans."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}", hint=OPTIONS[name].hint)
    return bool(value)
