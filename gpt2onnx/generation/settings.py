"""Generation settings: one frozen dataclass, checked once, so the loop never sees a bad value."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers

import numpy as np

from ..errors import InvalidArgumentError
from ..runtime.limits import MAX_NEW_TOKENS, MAX_RETURN_SEQUENCES

SEED_MAX = 2**32 - 1  # transformers' set_seed(seed) accepts 0 .. 2**32 - 1 (numpy's limit)
PENALTY_LIMIT = 2  # OpenAI's frequency_penalty and presence_penalty: -2 .. 2
BIAS_LIMIT = 100  # OpenAI's logit_bias values: -100 .. 100
SAMPLERS = ("torch", "numpy")
ASSISTANT_SCHEDULES = ("constant", "heuristic", "heuristic_transient")  # transformers' names
# Limits that keep every float32 score finite (issue 28), checked when the settings are built, before any work.
# float32 holds up to 3.4e38 and the softmax subtracts two scores, so a score must stay within +-SCORE_LIMIT. The
# model's scores are taken to be below LOGIT_LIMIT in magnitude: GPT-2's logits are far below 1e4 (the trained test
# model's lie within +-16), and beam search's log-probabilities span at most twice the logits' range. The options
# add their biases and penalties, the repetition penalty multiplies by up to max(r, 1 / r) and the temperature
# divides: a combination whose worst case passes SCORE_LIMIT is refused, even where each value is within its limit.
SCORE_LIMIT = 1e38
LOGIT_LIMIT = 1e5
# temperature: LOGIT_LIMIT / 1e-30 = 1e35 leaves a factor 1e3 under SCORE_LIMIT for biases and penalties; at 1e-30
# the likeliest token already holds all the probability (sampling gives the greedy tokens), so lower adds nothing.
# Above 1e30 float32 nears its end (3.4e38 is inf), and from about 1e10 on the distribution is uniform already.
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-30, 1e30
# repetition_penalty: alone, LOGIT_LIMIT x max(r, 1 / r) stays below 1e35 (np.float32(1e-300) is 0, a division by 0)
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 1e-30, 1e30
# beam search divides the summed log-probabilities (beyond -1e9 with its masks) by new_tokens ** length_penalty;
# kept within 1e-20 .. 1e20 that stays far inside float32 (Python's float raised OverflowError from 1e308 on)
LENGTH_FACTOR_LIMIT = 1e20


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


def _ids_arg(text: str) -> list[int]:
    """--suppress-tokens 1,2,3 (argparse reports a ValueError as an invalid value, exit 2)."""
    return [int(t) for t in text.split(",")]


def _json_arg(text: str):
    """--bad-words-ids '[[1], [2, 3]]'."""
    return json.loads(text)


def _decay_arg(text: str) -> tuple[int, float]:
    """--exponential-decay-length-penalty 10,1.2."""
    start, factor = text.split(",")
    return int(start), float(factor)


_ids_arg.__name__, _json_arg.__name__, _decay_arg.__name__ = "comma-separated token ids", "JSON", "START,FACTOR"

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
                          hint=f"0 is greedy, 1 leaves the logits as they are, 0.7 is common; from {TEMPERATURE_MIN:g} "
                               f"to {TEMPERATURE_MAX:g} the float32 scores stay finite"),
    "top_k": Option("sample among the k most likely tokens; 0 = all",
                    hint="0 keeps every token; transformers' default is 50"),
    "top_p": Option("sample among the fewest tokens reaching this probability",
                    hint="1 keeps every token; 0.9 keeps the most likely tokens holding 90% of the probability"),
    "repetition_penalty": Option("> 1 discourages repeating tokens",
                                 hint=f"1 means no penalty, 1.2 discourages repeating tokens; from "
                                      f"{REPETITION_PENALTY_MIN:g} to {REPETITION_PENALTY_MAX:g} the float32 scores "
                                      "stay finite"),
    "no_repeat_ngram_size": Option("never repeat an n-gram of this size",
                                   hint="0 turns it off; 3 forbids repeating any 3 tokens in a row"),
    "num_return_sequences": Option(
        "continuations (needs sampling, or beams: at most --num-beams)", flag={"short": "-n"},
        hint=f"continuations per prompt, 1 to {MAX_RETURN_SEQUENCES}; more than 1 needs do_sample=True or "
             "num_beams > 1 (then at most num_beams)"),
    # beam search (num_beams > 1): transformers' _beam_search, see gpt2onnx/generation/beam.py
    "num_beams": Option("beam search over this many beams (1 = off)",
                        hint=f"1 turns beam search off; 2 to {MAX_RETURN_SEQUENCES} beams, 4 is common"),
    "length_penalty": Option("beam scores are divided by length ** this (> 0 favours longer ones)",
                             hint="1.0 averages the log-probabilities per token, 0 sums them; with beams, "
                                  f"max_new_tokens ** |length_penalty| must stay below {LENGTH_FACTOR_LIMIT:g}"),
    "early_stopping": Option("beam search ends: true (num_beams done), false (heuristic), never",
                             flag={"type": early_stopping, "metavar": "{true,false,never}"},
                             hint="True stops once num_beams sequences are done, False when the heuristic says no "
                                  "beam can do better, 'never' when no beam can in theory"),
    "stop": Option("end where the new text contains TEXT (repeatable; \\n is a newline)",
                   flag={"action": "append", "metavar": "TEXT"},
                   hint='pass a string or a list of non-empty strings, e.g. stop=["\\n\\n"]'),
    "seed": Option("same seed, same text (the tokens transformers gives after set_seed)",
                   hint=f"any integer from 0 to {SEED_MAX}; leave it unset to draw a fresh seed (reported in the "
                        "result), or to continue gpt2onnx.set_seed's stream after set_seed"),
    "sampler": Option("random stream: torch (transformers' tokens, the default) or numpy",
                      flag={"choices": list(SAMPLERS)},
                      hint="'torch' gives transformers' tokens for a seed; 'numpy' is faster"),
    "ignore_eos": Option("keep going after <|endoftext|>", flag={"action": "store_true"},
                         hint="pass True (keep going after <|endoftext|>) or False"),
    # transformers' other logits processors, warpers and stopping criteria (issue 13; sampling.process applies them
    # in transformers' order)
    "min_p": Option("drop tokens less likely than min_p x the likeliest one's probability",
                    hint="0 keeps every token; 0.05 to 0.1 is common"),
    "typical_p": Option("typical sampling: keep the tokens closest to the entropy, up to this probability",
                        hint="1 turns it off; 0.9 or 0.95 is common"),
    "epsilon_cutoff": Option("drop tokens with probability below this",
                             hint="0 turns it off; the paper suggests 3e-4 to 9e-4"),
    "eta_cutoff": Option("eta sampling: drop tokens below min(eta, sqrt(eta) x exp(-entropy))",
                         hint="0 turns it off; the paper suggests 3e-4 to 2e-3"),
    "bad_words_ids": Option(
        "never generate these token sequences (JSON, e.g. [[257], [11, 290]])", flag={"type": _json_arg,
                                                                                     "metavar": "JSON"},
        hint="a list of non-empty lists of token ids, e.g. [[257], [11, 290]]; a sequence of several tokens bans its "
             "last token only right after the others"),
    "suppress_tokens": Option("never generate these token ids (comma-separated)",
                              flag={"type": _ids_arg, "metavar": "IDS"},
                              hint="a list of token ids, e.g. [257, 290] (--suppress-tokens 257,290)"),
    "begin_suppress_tokens": Option("never generate these token ids as the first new token (comma-separated)",
                                    flag={"type": _ids_arg, "metavar": "IDS"},
                                    hint="a list of token ids, e.g. [198] (--begin-suppress-tokens 198)"),
    "sequence_bias": Option(
        "add a bias to token sequences (JSON [[[ids], bias], ...])", flag={"type": _json_arg, "metavar": "JSON"},
        hint="a dict {(ids...): bias} or a list [[[ids...], bias], ...], e.g. [[[11, 290], -5.0]]; a bias is a finite "
             "number, or -inf to ban the sequence"),
    "forced_bos_token_id": Option("force this token first when the prompt is one token",
                                  hint="a token id of this model; it applies only when the (padded) prompt is 1 token"),
    "forced_eos_token_id": Option("force this token (or one of these, comma-separated) last, at max_new_tokens",
                                  flag={"type": _ids_arg, "metavar": "IDS"},
                                  hint="a token id or a list of token ids of this model, e.g. 50256"),
    "exponential_decay_length_penalty": Option(
        "START,FACTOR: after START new tokens, raise <|endoftext|>'s logit by |logit| x (FACTOR^n - 1)",
        flag={"type": _decay_arg, "metavar": "START,FACTOR"},
        hint="a pair (start_index, decay_factor): an integer >= 0 and a number > 0, e.g. (10, 1.2)"),
    "renormalize_logits": Option("log-softmax the scores after every processor (as transformers' option)",
                                 hint="pass True or False"),
    "stop_strings": Option("end where TEXT is completed, keeping it (transformers' stop_strings; repeatable)",
                           flag={"action": "append", "metavar": "TEXT"},
                           hint='pass a string or a list of non-empty strings, e.g. stop_strings=["\\n\\n"]'),
    "max_time": Option("end every row after this many seconds (finish_reason length)",
                       hint="seconds, a number > 0; the row keeps the tokens made so far"),
    # OpenAI's penalties and logit bias (the server's options; here for generate and the CLI too): sampling.process
    # applies them to the raw logits before transformers' processors
    "frequency_penalty": Option("lower a token's logit by this x the times the row generated it (OpenAI's; -2 to 2)",
                                hint=f"a number from -{PENALTY_LIMIT} to {PENALTY_LIMIT}; 0 turns it off"),
    "presence_penalty": Option("lower the logit of every token the row generated already by this (OpenAI's; -2 to 2)",
                               hint=f"a number from -{PENALTY_LIMIT} to {PENALTY_LIMIT}; 0 turns it off"),
    "logit_bias": Option("add a bias to token ids' logits (OpenAI's; JSON {\"50256\": -100})",
                         flag={"type": _json_arg, "metavar": "JSON"},
                         hint=f"a dict {{token id: bias}} with biases from -{BIAS_LIMIT} to {BIAS_LIMIT}, e.g. "
                              "{50256: -100}"),
    # speculative decoding (gpt2onnx/generation/speculative.py): how many positions one run checks; never which tokens
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
    num_beams: int = 1  # > 1: beam search (beam sampling with do_sample), returning the best num_return_sequences
    length_penalty: float = 1.0  # a finished beam's score is its summed log-probability / new tokens ** this
    early_stopping: bool | str = False  # True, False or "never": when beam search stops (as transformers)
    stop: tuple[str, ...] = ()  # stop a row when its new text contains one of these (not returned)
    ignore_eos: bool = False  # keep going after <|endoftext|> (fixed-length runs, benchmarks)
    seed: int | None = None  # same seed, same tokens; None draws a fresh seed
    sampler: str = "torch"  # "torch": replays PyTorch's random stream (same tokens as transformers); "numpy"
    # transformers' other processors, warpers and stopping criteria (same names, defaults and meanings)
    min_p: float | None = None  # drop tokens with probability < min_p x the top token's (None: off)
    typical_p: float = 1.0  # typical sampling: the tokens closest to the entropy, up to this mass (1: off)
    epsilon_cutoff: float = 0.0  # drop tokens with probability < epsilon_cutoff (0: off)
    eta_cutoff: float = 0.0  # drop tokens with probability < min(eta, sqrt(eta) exp(-entropy)) (0: off)
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None  # token sequences never generated
    suppress_tokens: tuple[int, ...] | None = None  # tokens never generated
    begin_suppress_tokens: tuple[int, ...] | None = None  # tokens never generated first
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] | None = None  # ((token ids), bias) pairs, in order
    forced_bos_token_id: int | None = None  # the first token when the (padded) prompt is one token
    forced_eos_token_id: tuple[int, ...] | None = None  # the last token (one of these) at max_new_tokens
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start_index, decay_factor)
    renormalize_logits: bool = False  # log-softmax after every processor
    stop_strings: tuple[str, ...] | None = None  # end a row at the token completing one (kept, unlike stop)
    max_time: float | None = None  # seconds; every row ends once a step finishes after this
    # OpenAI's, over the tokens the row generated so far: logit -= frequency x count + presence x (count > 0)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] | None = None  # (token id, bias) pairs: logit += bias
    # speculative decoding: the same tokens, with fewer runs of the model (gpt2onnx/generation/speculative.py)
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
        self._set("temperature", _check_real(
            "temperature", self.temperature, f"0 (greedy) or a number from {TEMPERATURE_MIN:g} to {TEMPERATURE_MAX:g}",
            lambda t: t == 0 or TEMPERATURE_MIN <= t <= TEMPERATURE_MAX))
        self._set("top_p", _check_real("top_p", self.top_p, "a number in (0, 1]", lambda p: 0 < p <= 1))
        self._set("repetition_penalty", _check_real(
            "repetition_penalty", self.repetition_penalty,
            f"a number from {REPETITION_PENALTY_MIN:g} to {REPETITION_PENALTY_MAX:g} (1 means none)",
            lambda r: REPETITION_PENALTY_MIN <= r <= REPETITION_PENALTY_MAX))
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidArgumentError(f"stop must be a list of non-empty strings, got {self.stop!r}",
                                       hint=OPTIONS["stop"].hint)
        self._set("stop", tuple(str(s) for s in self.stop))
        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise InvalidArgumentError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}",
                                       hint=OPTIONS["sampler"].hint)
        self._check_processors()
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
        for name in ("prompt_lookup_num_tokens", "max_matching_ngram_size"):
            if getattr(self, name) is not None:
                self._set(name, _check_int(name, getattr(self, name), 1, None))
        self._set("num_assistant_tokens", _check_int("num_assistant_tokens", self.num_assistant_tokens, 1, None))
        if not isinstance(self.num_assistant_tokens_schedule, str) or \
                self.num_assistant_tokens_schedule not in ASSISTANT_SCHEDULES:
            raise InvalidArgumentError(f"num_assistant_tokens_schedule must be one of {', '.join(ASSISTANT_SCHEDULES)}"
                                       f", got {self.num_assistant_tokens_schedule!r}",
                                       hint=OPTIONS["num_assistant_tokens_schedule"].hint)
        if self.num_return_sequences > 1 and self.greedy and self.num_beams == 1:
            raise InvalidArgumentError(
                f"num_return_sequences={self.num_return_sequences} with greedy decoding gives identical rows",
                hint="pass do_sample=True (with a temperature > 0), num_beams >= num_return_sequences, or "
                     "num_return_sequences=1")
        self._check_finite_scores()

    def _check_finite_scores(self) -> None:
        """Refuse options that can take a float32 score past SCORE_LIMIT, for logits below LOGIT_LIMIT: their
        biases and penalties add, the repetition penalty multiplies by up to max(r, 1 / r), the temperature divides
        when sampling; with beams, new_tokens ** length_penalty divides the summed log-probabilities."""
        added = abs(self.frequency_penalty) * self.max_new_tokens + abs(self.presence_penalty)
        added += max((abs(b) for _, b in self.logit_bias or ()), default=0)
        added += sum(abs(b) for _, b in self.sequence_bias or () if b != -math.inf)  # those ending in one token add up
        r, t = self.repetition_penalty, 1.0 if self.greedy else self.temperature
        worst = (LOGIT_LIMIT + added) * max(r, 1 / r) / t
        if worst > SCORE_LIMIT:
            named = [f"{name}={value:g}" for name, value, default in (
                ("temperature", t, 1), ("repetition_penalty", r, 1), ("frequency_penalty", self.frequency_penalty, 0),
                ("presence_penalty", self.presence_penalty, 0)) if value != default]
            named += [name for name in ("logit_bias", "sequence_bias") if getattr(self, name)]
            raise InvalidArgumentError(
                f"{', '.join(named)} can take a score to {worst:.1e}, past float32's range",
                hint=f"(logits up to {LOGIT_LIMIT:g} + biases and penalties) x max(repetition_penalty, "
                     f"1 / repetition_penalty) / temperature must stay below {SCORE_LIMIT:g}: raise the temperature, "
                     "bring repetition_penalty nearer 1 or lower the biases")
        if self.num_beams > 1 and abs(self.length_penalty) * math.log10(max(self.max_new_tokens, 1)) > math.log10(
                LENGTH_FACTOR_LIMIT):
            raise InvalidArgumentError(
                f"length_penalty={self.length_penalty:g} with max_new_tokens={self.max_new_tokens} makes "
                f"new_tokens ** length_penalty leave {1 / LENGTH_FACTOR_LIMIT:g} .. {LENGTH_FACTOR_LIMIT:g}",
                hint=OPTIONS["length_penalty"].hint)

    def _check_processors(self) -> None:
        """The options of transformers' other processors, warpers and stopping criteria, normalised to tuples."""
        if self.min_p is not None:
            self._set("min_p", _check_real("min_p", self.min_p, "a number from 0 to 1", lambda p: 0 <= p <= 1))
        self._set("typical_p", _check_real("typical_p", self.typical_p, "a number in (0, 1]", lambda p: 0 < p <= 1))
        for name in ("epsilon_cutoff", "eta_cutoff"):
            self._set(name, _check_real(name, getattr(self, name), "a number in [0, 1) (0 turns it off)",
                                        lambda e: 0 <= e < 1))
        self._set("renormalize_logits", _check_bool("renormalize_logits", self.renormalize_logits))
        if self.bad_words_ids is not None:
            words = self.bad_words_ids
            if not isinstance(words, (list, tuple)) or not words or not all(
                    isinstance(w, (list, tuple)) and w for w in words):
                raise InvalidArgumentError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, "
                                           f"got {words!r}", hint=OPTIONS["bad_words_ids"].hint)
            self._set("bad_words_ids", tuple(_check_ids("bad_words_ids", w) for w in words))
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            if getattr(self, name) is not None:
                self._set(name, _check_ids(name, getattr(self, name)))
        if self.sequence_bias is not None:
            self._set("sequence_bias", _check_sequence_bias(self.sequence_bias))
        if self.forced_bos_token_id is not None:
            self._set("forced_bos_token_id", _check_int("forced_bos_token_id", self.forced_bos_token_id, 0, None))
        if self.forced_eos_token_id is not None:
            eos = self.forced_eos_token_id
            ids = _check_ids("forced_eos_token_id", [eos] if isinstance(eos, numbers.Integral) else eos)
            if not ids:
                raise InvalidArgumentError("forced_eos_token_id must be a token id or a non-empty list of them, got []",
                                           hint=OPTIONS["forced_eos_token_id"].hint)
            self._set("forced_eos_token_id", ids)
        if self.exponential_decay_length_penalty is not None:
            self._set("exponential_decay_length_penalty", _check_decay(self.exponential_decay_length_penalty))
        if self.stop_strings is not None:
            strings = (self.stop_strings,) if isinstance(self.stop_strings, str) else self.stop_strings
            if not isinstance(strings, (list, tuple)) or not strings or not all(
                    isinstance(s, str) and s for s in strings):
                raise InvalidArgumentError(f"stop_strings must be a string or a non-empty list of non-empty strings, "
                                           f"got {self.stop_strings!r}", hint=OPTIONS["stop_strings"].hint)
            self._set("stop_strings", tuple(str(s) for s in strings))
        if self.max_time is not None:
            self._set("max_time", _check_real("max_time", self.max_time, "a number of seconds > 0",
                                              lambda t: t > 0 and not math.isnan(t)))
        for name in ("frequency_penalty", "presence_penalty"):
            self._set(name, _check_real(name, getattr(self, name), f"a number from -{PENALTY_LIMIT} to {PENALTY_LIMIT}",
                                        lambda v: -PENALTY_LIMIT <= v <= PENALTY_LIMIT))
        if self.logit_bias is not None:
            self._set("logit_bias", _check_logit_bias(self.logit_bias))

    def token_ids(self) -> set[int]:
        """Every token id the options name (to be checked against the model's vocabulary)."""
        ids = set(self.suppress_tokens or ()) | set(self.begin_suppress_tokens or ())
        ids |= set(self.forced_eos_token_id or ())
        ids |= {t for word in self.bad_words_ids or () for t in word}
        ids |= {t for sequence, _ in self.sequence_bias or () for t in sequence}
        ids |= {t for t, _ in self.logit_bias or ()}
        return ids | ({self.forced_bos_token_id} if self.forced_bos_token_id is not None else set())

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


def check_token_ids(settings: GenerationSettings, vocab_size: int) -> None:
    """Every token id the options name must be a token of the model (checked when a call runs)."""
    outside = sorted(t for t in settings.token_ids() if t >= vocab_size)
    if outside:
        raise InvalidArgumentError(f"token id(s) {', '.join(map(str, outside[:5]))} in the generation options are "
                                   f"not tokens of this model (vocab_size={vocab_size})",
                                   hint=f"token ids run from 0 to {vocab_size - 1}; the tokenizer gives them")


def _check_ids(name: str, ids) -> tuple[int, ...]:
    """A list of token ids (integers >= 0; the model's vocabulary is checked when a call runs) as a tuple."""
    if not isinstance(ids, (list, tuple)) or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, (bool, np.bool_)) and t >= 0 for t in ids):
        raise InvalidArgumentError(f"{name} must be a list of token ids (integers >= 0), got {ids!r}",
                                   hint=OPTIONS[name].hint)
    return tuple(int(t) for t in ids)


def _check_sequence_bias(bias) -> tuple[tuple[tuple[int, ...], float], ...]:
    """transformers' two forms, {(ids...): bias} and [[[ids...], bias], ...], as ((ids...), bias) pairs in the
    dict's order (a list is turned into a dict first, as transformers does: a later duplicate wins)."""
    pairs = list(bias.items()) if isinstance(bias, dict) else bias
    if not isinstance(pairs, (list, tuple)) or not pairs or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], (list, tuple)) and p[0] for p in pairs):
        raise InvalidArgumentError(f"sequence_bias must be a non-empty dict or list of (token ids, bias) pairs, "
                                   f"got {bias!r}", hint=OPTIONS["sequence_bias"].hint)
    merged = {}
    for ids, value in pairs:
        merged[_check_ids("sequence_bias", ids)] = _check_real(
            "sequence_bias", value, "(token ids, bias) pairs with finite numbers or -inf as biases",
            lambda b: math.isfinite(b) or b == -math.inf)
    return tuple(merged.items())


def _check_logit_bias(bias) -> tuple[tuple[int, float], ...] | None:
    """OpenAI's logit_bias, {token id: bias} (ids as integers, or as strings of digits as in its JSON), as (id, bias)
    pairs in the dict's order; an empty dict is no bias (None)."""
    pairs = list(bias.items()) if isinstance(bias, dict) else bias
    if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise InvalidArgumentError(f"logit_bias must be a dict of token id -> bias, got {bias!r}",
                                   hint=OPTIONS["logit_bias"].hint)
    checked = {}
    for token, value in pairs:
        if isinstance(token, str) and token.isdigit():
            token = int(token)
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, numbers.Integral) or token < 0:
            raise InvalidArgumentError(f"logit_bias keys must be token ids (integers >= 0, or strings of digits), "
                                       f"got {token!r}", hint=OPTIONS["logit_bias"].hint)
        checked[int(token)] = _check_real(
            "logit_bias", value, f"a dict of token id -> a bias from -{BIAS_LIMIT} to {BIAS_LIMIT}",
            lambda b: -BIAS_LIMIT <= b <= BIAS_LIMIT)
    return tuple(checked.items()) or None


def _check_decay(pair) -> tuple[int, float]:
    ok = isinstance(pair, (list, tuple)) and len(pair) == 2
    if not ok or isinstance(pair[0], (bool, np.bool_)) or not isinstance(pair[0], numbers.Integral) or pair[0] < 0:
        raise InvalidArgumentError(f"exponential_decay_length_penalty must be a pair (start_index, decay_factor), "
                                   f"got {pair!r}", hint=OPTIONS["exponential_decay_length_penalty"].hint)
    factor = _check_real("exponential_decay_length_penalty", pair[1], "a pair (start_index, decay_factor) with a "
                         "finite decay_factor > 0", lambda f: math.isfinite(f) and f > 0)
    return int(pair[0]), factor


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
