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
ASSISTANT_SCHEDULES = ("constant", "heuristic", "heuristic_transient")  # transformers' names


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
        "continuations (needs sampling)", flag={"short": "-n"},
        hint=f"continuations per prompt, 1 to {MAX_RETURN_SEQUENCES}; more than 1 needs do_sample=True"),
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
    # speculative decoding (gpt2onnx/speculative.py): how many positions one run checks; never which tokens
    "prompt_lookup_num_tokens": Option(
        "draft up to N tokens by finding the last n-gram earlier in the text; same tokens, fewer runs",
        flag={"alias": "--prompt-lookup", "metavar": "N"},
        hint="unset (None) turns prompt lookup off; 10 is transformers' usual value"),
    "max_matching_ngram_size": Option("prompt lookup's longest n-gram to match (default 2)",
                                      hint="unset means 2, transformers' default; 1 matches single tokens too"),
    "num_assistant_tokens": Option("tokens the assistant model drafts per run (with --assistant-model)",
                                   hint="transformers' default is 20; fewer when the assistant often disagrees"),
    "num_assistant_tokens_schedule": Option(
        "constant, or heuristic: +2 drafts after a fully kept draft, -1 otherwise",
        flag={"choices": list(ASSISTANT_SCHEDULES)},
        hint="'constant' (transformers' default) or 'heuristic' ('heuristic_transient' is the same here)"),
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
    stop: tuple[str, ...] = ()  # stop a row when its new text contains one of these (not returned)
    ignore_eos: bool = False  # keep going after <|endoftext|> (fixed-length runs, benchmarks)
    seed: int | None = None  # same seed, same tokens; None draws a fresh seed
    sampler: str = "torch"  # "torch": replays PyTorch's random stream (same tokens as transformers); "numpy"
    # speculative decoding: the same tokens, with fewer runs of the model (gpt2onnx/speculative.py)
    prompt_lookup_num_tokens: int | None = None  # draft this many tokens by prompt lookup; None: off
    max_matching_ngram_size: int | None = None  # prompt lookup's longest n-gram; None: 2 (transformers')
    num_assistant_tokens: int = 20  # drafted per run by an assistant model (Model.generate's assistant_model)
    num_assistant_tokens_schedule: str = "constant"  # or "heuristic": +2 after a fully kept draft, else -1

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
        for name in ("prompt_lookup_num_tokens", "max_matching_ngram_size"):
            if getattr(self, name) is not None:
                self._set(name, _check_int(name, getattr(self, name), 1, None))
        self._set("num_assistant_tokens", _check_int("num_assistant_tokens", self.num_assistant_tokens, 1, None))
        if not isinstance(self.num_assistant_tokens_schedule, str) or \
                self.num_assistant_tokens_schedule not in ASSISTANT_SCHEDULES:
            raise InvalidArgumentError(f"num_assistant_tokens_schedule must be one of {', '.join(ASSISTANT_SCHEDULES)}"
                                       f", got {self.num_assistant_tokens_schedule!r}",
                                       hint=OPTIONS["num_assistant_tokens_schedule"].hint)
        if self.num_return_sequences > 1 and self.greedy:
            raise InvalidArgumentError(
                f"num_return_sequences={self.num_return_sequences} with greedy decoding gives identical rows",
                hint="pass do_sample=True (with a temperature > 0), or num_return_sequences=1")

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
