"""A loaded model directory: `gpt2onnx.load(dir)` checks the manifest, opens the session and generates."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import contract as c
from . import limits
from .config import ModelConfig
from .defaults import model_defaults, resolve
from .errors import InvalidArgumentError, ModelLoadError
from .generator import generate, generate_tokens
from .logprobs import Score, TopLogprobs, check_top, chosen, score
from .manifest import read_manifest
from .seeding import rng_for
from .session import OnnxSession, SessionOptions
from .settings import OPTIONS, GenerationSettings
from .stopping import EOS, LENGTH, STOP, StopStrings, cut_at_stop
from .tokenizer import ENDOFTEXT, Tokenizer


@dataclass(frozen=True)
class Generation:
    """One continuation of one prompt."""

    text: str  # the new text (prompt + new text with return_full_text=True), cut before any stop string
    token_ids: list[int]  # the new token ids (ending with <|endoftext|> when finish_reason is "eos")
    prompt: str
    prompt_token_ids: list[int]  # what the model saw (after an empty prompt became <|endoftext|>, truncation)
    finish_reason: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens)
    # the seed that reproduces this result (None for greedy); drawn from the set_seed stream: that seed, which
    # reproduces it as set_seed(seed) followed by the same calls in the same order
    seed: int | None
    # per new token (logprob, its top alternatives) of the RAW model distribution, when asked (logprobs=k)
    logprobs: list[tuple[float, TopLogprobs]] | None = None

    def __str__(self) -> str:
        return self.text


class Model:
    """An exported GPT-2, ready to generate. Build it with `gpt2onnx.load`. Safe to share between threads."""

    def __init__(self, directory: Path, *, manifest: dict | None, options: SessionOptions = SessionOptions(),
                 max_cache_bytes: int = limits.DEFAULT_MAX_CACHE_BYTES):
        self.directory = Path(directory)
        self.manifest = manifest
        self.max_cache_bytes = limits.check_cache_bytes(max_cache_bytes)
        self.raw_config, self.config = read_config(self.directory / c.CONFIG_FILE)
        self.tokenizer = Tokenizer(self.directory / c.TOKENIZER_FILE)
        self.session = OnnxSession(self.directory / c.MODEL_FILE, self.config, options)
        path = self.directory / c.GENERATION_CONFIG_FILE
        self.generation_config = _read_json(path) if path.is_file() else {}
        self.defaults = model_defaults(self.generation_config, self.raw_config)
        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        self.eos_token_id = eos if isinstance(eos, int) and not isinstance(eos, bool) else self.tokenizer.eos_token_id
        self._check_vocabulary()

    def _check_vocabulary(self) -> None:
        """Every id the tokenizer or <|endoftext|> can give must be a row of the model's embedding."""
        vocab = self.config.vocab_size
        if self.eos_token_id is None:
            raise ModelLoadError(f"{self.directory / c.TOKENIZER_FILE} has no {ENDOFTEXT} token and the model "
                                 "directory gives no eos_token_id", hint="export the model again")
        if not 0 <= self.eos_token_id < vocab:
            raise ModelLoadError(f"eos_token_id {self.eos_token_id} in {self.directory} is not a token of this model "
                                 f"(vocab_size={vocab})", hint="fix eos_token_id in generation_config.json / "
                                                                "config.json, or export the model again")
        if self.tokenizer.vocab_size > vocab:
            raise ModelLoadError(f"{self.directory / c.TOKENIZER_FILE} has {self.tokenizer.vocab_size} tokens but "
                                 f"the model has vocab_size={vocab}",
                                 hint="the tokenizer belongs to another model; export the model again")

    def generate(self, prompt: str | list[str], *, max_new_tokens: int | None = None, max_length: int | None = None,
                 min_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 no_repeat_ngram_size: int | None = None, num_return_sequences: int | None = None,
                 stop: str | list[str] | None = None, seed: int | None = None, sampler: str | None = None,
                 ignore_eos: bool | None = None, return_full_text: bool = False, truncate: str | None = None,
                 allow_special_tokens: bool = False, logprobs: int | None = None):
        """Continue `prompt` (a string, or a list of strings run as one left-padded batch).

        Returns a Generation for a string prompt, a list of num_return_sequences Generations when that is
        > 1, and a list of those for a list of prompts. Options left as None come from the model directory
        (generation_config.json, then config.json's task_specific_params['text-generation']), then from
        transformers' defaults (greedy, max_length 20, top_k 50 when sampling).

        max_new_tokens: tokens to add after the prompt (wins over max_length when both are given).
        max_length: prompt plus new tokens (the longest prompt of a batch counts).
        min_new_tokens: forbid <|endoftext|> before this many new tokens.
        do_sample: sample from the distribution instead of taking the most likely token.
        temperature: divide the logits by this before sampling; 0 means greedy.
        top_k: sample among the k most likely tokens (0: all).
        top_p: sample among the fewest tokens whose probabilities add up to top_p (1: all).
        repetition_penalty: > 1 makes tokens already in the sequence less likely (1: none).
        no_repeat_ngram_size: never repeat an n-gram of this size (0: off).
        num_return_sequences: continuations per prompt, sampled from one shared prefill (at most 64).
        stop: a string or list of strings; a row ends when its new text contains one (cut from the text).
        seed: 0 .. 2**32-1; the same seed and settings give the same tokens (None: after gpt2onnx.set_seed,
            the next draws of its stream, as transformers after set_seed; before it, a fresh seed, reported).
        sampler: "torch" replays PyTorch's random stream (the tokens of transformers after set_seed(seed));
            "numpy" uses numpy's generator (faster, different tokens).
        ignore_eos: keep generating after <|endoftext|> (fixed-length runs).
        return_full_text: put the prompt in front of the returned text.
        truncate: "left" drops the oldest prompt tokens when prompt + new tokens exceed the context;
            None (default) raises an error instead.
        allow_special_tokens: read "<|endoftext|>" typed in a prompt as the special token, not as text.
        logprobs: k >= 0 fills Generation.logprobs: per new token its log-probability and the k likeliest
            tokens, from the model's RAW logits (before repetition penalty, temperature, top-k, top-p), as
            OpenAI and vLLM report them; None (default) leaves it None.
        """
        given = locals()
        options = {name: given[name] for name in OPTIONS}  # the generation options, as settings.OPTIONS lists them
        prompts = [prompt] if isinstance(prompt, str) else prompt
        _check_flag("return_full_text", return_full_text)
        prompt_ids, settings = self._prepare(prompts, options, truncate=truncate, allow_special=allow_special_tokens)
        check_top("logprobs", logprobs, self.config.vocab_size)
        seed, rng = self._rng(settings)
        n = settings.num_return_sequences
        values = [[] for _ in range(len(prompts) * n)]

        def record(logits, next_ids, live):  # the raw distribution at each live row's chosen token
            rows = np.flatnonzero(live)
            for row, value in zip(rows.tolist(), chosen(logits[rows], next_ids[rows], logprobs)):
                values[row].append(value)

        rows = self.generate_rows(prompt_ids, settings, rng, watch=None if logprobs is None else record)
        results = []
        for index, new_ids in enumerate(rows):
            p = index // n
            result = self._result(prompts[p], prompt_ids[p], new_ids, settings, seed, return_full_text)
            if logprobs is not None:
                result = dataclasses.replace(result, logprobs=values[index])
            results.append(result)
        grouped = results if n == 1 else [results[i:i + n] for i in range(0, len(results), n)]
        return grouped[0] if isinstance(prompt, str) else grouped

    def stream(self, prompt: str, *, return_full_text: bool = False, truncate: str | None = None,
               allow_special_tokens: bool = False, **options) -> Iterator[str]:
        """Yield the new text piece by piece as tokens are produced; the pieces join to `generate`'s text.

        Takes one prompt and the options of `generate` (num_return_sequences must be 1). A piece never
        ends inside a multi-byte character or a possible stop string. To stop early, break out of the
        loop (or call `.close()` on the iterator): no further tokens are computed. Every option is checked
        when stream() is called, before the first piece is asked for.
        """
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"stream() takes one prompt string, got {type(prompt).__name__}",
                                       hint="use generate() for a batch of prompts")
        _check_flag("return_full_text", return_full_text)
        (prompt_ids,), settings = self._prepare([prompt], options, truncate=truncate,
                                                allow_special=allow_special_tokens)
        if settings.num_return_sequences != 1:
            raise InvalidArgumentError("stream() produces one sequence; num_return_sequences must be 1",
                                       hint="use generate() for several sequences")
        return self._stream(prompt, prompt_ids, settings, bool(return_full_text))

    def _stream(self, prompt: str, prompt_ids: list[int], settings: GenerationSettings,
                return_full_text: bool) -> Iterator[str]:
        _, rng = self._rng(settings)
        hold = max((len(s) for s in settings.stop), default=1) - 1  # a stop string may still be completing
        tokens, sent = [], 0
        if return_full_text:
            yield prompt
        for next_ids, live in generate_tokens(self.session, [prompt_ids], settings, eos_id=self.eos_token_id,
                                              rng=rng):
            token = int(next_ids[0])
            if token == self.eos_token_id and not settings.ignore_eos:
                break
            tokens.append(token)
            text, hit = cut_at_stop(self.tokenizer.decode(tokens), settings.stop)
            if hit:
                break
            ready = min(len(text.rstrip("\ufffd")), len(text) - hold)  # hold back a partial char or stop
            if ready > sent:
                yield text[sent:ready]
                sent = ready
        text, _ = cut_at_stop(self.tokenizer.decode(tokens), settings.stop)
        if len(text) > sent:
            yield text[sent:]

    def generate_rows(self, prompt_ids: list[list[int]], settings: GenerationSettings, rng, *,
                      watch=None) -> list[list[int]]:
        """New token ids of every row (prompt-major, then its return sequences) from prepared inputs.
        watch(logits, next_ids, live): called at every step (see generator.generate_tokens)."""
        stops = StopStrings(settings.stop, self.tokenizer.decode, len(prompt_ids) * settings.num_return_sequences)
        return generate(self.session, prompt_ids, settings, eos_id=self.eos_token_id, rng=rng,
                        stopped=stops.update if settings.stop else None, watch=watch)

    def score(self, texts: str | list[str], *, top_logprobs: int = 0, allow_special_tokens: bool = False
              ) -> Score | list[Score]:
        """How likely the model finds each text: every token's log-probability given the ones before it (the
        first token's is None) and the perplexity. Texts run as left-padded batches.

        Returns a Score for a string, a list of Scores for a list of strings. Logprobs are of the RAW model
        distribution (no sampling settings apply). An empty text scores <|endoftext|> alone.
        top_logprobs: also list the k likeliest tokens at every position (0: Score.top_logprobs is None).
        allow_special_tokens: read "<|endoftext|>" typed in a text as the special token, not as text.
        """
        items = [texts] if isinstance(texts, str) else texts
        if not isinstance(items, list) or not items:
            raise InvalidArgumentError("texts must be a string or a non-empty list of strings",
                                       hint='pass "text" or ["text", "more text"]')
        check_top("top_logprobs", top_logprobs, self.config.vocab_size)
        ids = [self.encode_prompt(t, allow_special=allow_special_tokens, index=i if len(items) > 1 else None)
               for i, t in enumerate(items)]
        for i, text_ids in enumerate(ids):
            if len(text_ids) > self.config.n_positions:
                name = "the text" if len(items) == 1 else f"text {i}"
                raise InvalidArgumentError(
                    f"{name} has {len(text_ids)} tokens; this model has n_positions={self.config.n_positions}",
                    hint="split the text into windows of at most n_positions tokens and score each")
        scores = score(self.session, ids, pad_id=self.eos_token_id, decode=self.tokenizer.decode,
                       top_logprobs=top_logprobs or None)
        return scores[0] if isinstance(texts, str) else scores

    def _prepare(self, prompts: list, options: dict, *, truncate: str | None,
                 allow_special: bool) -> tuple[list[list[int]], GenerationSettings]:
        """Prompts to token ids and options to settings, with every check made before anything runs."""
        if not isinstance(prompts, list) or not prompts:
            raise InvalidArgumentError("prompt must be a string or a non-empty list of strings",
                                       hint='pass "text" or ["text", "more text"]')
        if not isinstance(truncate, (str, type(None))) or truncate not in (None, "left"):
            raise InvalidArgumentError(f"truncate must be None or 'left', got {truncate!r}",
                                       hint="'left' drops the oldest prompt tokens when the prompt is too long; "
                                            "None raises an error instead")
        _check_flag("allow_special_tokens", allow_special)
        if len(prompts) > limits.MAX_ROWS:
            raise InvalidArgumentError(f"{len(prompts)} prompts in one call; the limit is {limits.MAX_ROWS} rows",
                                       hint="split the prompts over several calls")
        ids = [self.encode_prompt(p, allow_special=allow_special, index=i if len(prompts) > 1 else None)
               for i, p in enumerate(prompts)]
        settings = resolve(self.defaults, options, prompt_length=max(map(len, ids)))
        room = self.config.n_positions - settings.max_new_tokens
        longest = max(map(len, ids))
        if longest > room:
            if truncate != "left" or room < 1:
                raise InvalidArgumentError(
                    f"the prompt ({longest} tokens) plus max_new_tokens ({settings.max_new_tokens}) is "
                    f"{longest + settings.max_new_tokens} positions; this model has n_positions="
                    f"{self.config.n_positions}",
                    hint="shorten the prompt, ask for fewer new tokens, or pass truncate='left' "
                         "(--truncate left) to drop the oldest prompt tokens")
            ids = [p[-room:] for p in ids]
        self.check_budget(ids, settings)
        return ids, settings

    def check_budget(self, prompt_ids: list[list[int]], settings: GenerationSettings) -> None:
        """Refuse a call whose rows or KV cache exceed the limits (gpt2onnx/limits.py), before anything runs."""
        rows = len(prompt_ids) * settings.num_return_sequences
        if rows > limits.MAX_ROWS:
            raise InvalidArgumentError(
                f"{len(prompt_ids)} prompt(s) x num_return_sequences={settings.num_return_sequences} is {rows} rows; "
                f"one call may run at most {limits.MAX_ROWS}",
                hint="ask for fewer sequences, or split the prompts over several calls")
        config = self.config
        positions = min(max(map(len, prompt_ids)) + settings.max_new_tokens, config.n_positions)
        itemsize = np.dtype(self.session.cache_dtype).itemsize
        per_position = 2 * config.n_layer * config.n_head * config.head_dim * itemsize
        # the prefill's cache is still held while it is copied out to the return sequences
        held = rows + (len(prompt_ids) if settings.num_return_sequences > 1 else 0)
        need = held * positions * per_position
        if need > self.max_cache_bytes:
            raise InvalidArgumentError(
                f"this call needs {limits.format_bytes(need)} of KV cache ({held} rows x {positions} positions x "
                f"{per_position} bytes); the limit is {limits.format_bytes(self.max_cache_bytes)}",
                hint="ask for fewer rows or new tokens, or load the model with a larger "
                     "max_cache_bytes (gpt2onnx.load(dir, max_cache_bytes=...))")

    def encode_prompt(self, prompt: str, *, allow_special: bool = False, index: int | None = None) -> list[int]:
        """Token ids of a prompt; an empty prompt starts from <|endoftext|>, as GPT-2 was trained."""
        name = "prompt" if index is None else f"prompt {index}"
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"{name} must be a string, got {type(prompt).__name__}",
                                       hint="pass text; a list of strings runs as one batch")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InvalidArgumentError(
                f"{name} contains a lone surrogate ({prompt[error.start]!r} at index {error.start}); "
                "text must be valid Unicode",
                hint="decode your input with errors='replace', or remove the stray surrogate") from None
        ids = self.tokenizer.encode(prompt, allow_special=allow_special)
        return ids if ids else [self.eos_token_id]

    def _rng(self, settings: GenerationSettings):
        if settings.greedy:
            return None, None
        # seed=None: the set_seed stream when there is one (gpt2onnx/seeding.py), else a fresh seed
        return rng_for(settings.seed, settings.sampler)

    def _result(self, prompt: str, prompt_ids: list[int], new_ids: list[int], settings: GenerationSettings,
                seed: int | None, full: bool) -> Generation:
        ended_by_eos = bool(new_ids) and new_ids[-1] == self.eos_token_id and not settings.ignore_eos
        text, hit = cut_at_stop(self.tokenizer.decode(new_ids[:-1] if ended_by_eos else new_ids), settings.stop)
        reason = STOP if hit else EOS if ended_by_eos else LENGTH
        return Generation(text=prompt + text if full else text, token_ids=new_ids, prompt=prompt,
                          prompt_token_ids=prompt_ids, finish_reason=reason, seed=seed)


def load(directory: str | Path, *, threads: int = 0, check_hashes: bool = True,
         max_cache_bytes: int = limits.DEFAULT_MAX_CACHE_BYTES) -> Model:
    """Load an exported model directory after checking its manifest.

    threads: ONNX Runtime intra-op threads; 0 uses one per physical core (at most 4 per usable CPU).
    check_hashes: verify the sha256 of every file against the manifest (a few seconds for large models).
    max_cache_bytes: the most KV cache one generate/stream call may reserve (default 4 GiB); a call that
        needs more is refused before it runs.
    """
    options = SessionOptions(threads=threads)
    max_cache_bytes = limits.check_cache_bytes(max_cache_bytes)
    manifest = read_manifest(Path(directory), check_hashes=check_hashes)
    return Model(Path(directory), manifest=manifest, options=options, max_cache_bytes=max_cache_bytes)


def _read_json(path: Path) -> dict:
    """A JSON object from the model directory, or a ModelLoadError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: invalid JSON or UTF-8
        raise ModelLoadError(f"{path} is not valid JSON: {error}", hint="export the model again") from error
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(value).__name__}, not an object",
                             hint="export the model again")
    return value


def read_config(path: Path) -> tuple[dict, ModelConfig]:
    """config.json as read and as a ModelConfig; a value of the wrong type is a ModelLoadError, not a traceback."""
    raw = _read_json(path)
    return raw, ModelConfig.from_dict(raw, source=str(path))


def _check_flag(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}", hint=f"pass {name}=True or False")
