"""A loaded model directory, which generates: `gpt2onnx.load(dir)` (loading.py) checks it and builds the Model."""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, ModelLoadError
from ..runtime import limits
from ..runtime.loading import Loading, open_model, read_json, start
from ..runtime.optimum_layout import Layout
from ..runtime.session import SessionOptions
from ..text.stopping import (
    Deadline,
    ReleasedText,
    StopStrings,
    StopStringsKept,
    any_of,
    completes,
    cut_at_stop,
    ends_text,
    finish_reason,
    first_eos,
)
from ..text.tokenizer import ENDOFTEXT, Tokenizer
from . import speculative
from .beam import beam_search
from .defaults import model_defaults, resolve
from .generator import collect, generate_tokens
from .logprobs import Score, TopLogprobs, check_top, chosen, score
from .sampling import log_softmax
from .seeding import random_for
from .settings import OPTIONS, GenerationSettings, check_token_ids


@dataclass(frozen=True)
class Generation:
    """One continuation of one prompt."""

    text: str  # the new text (prompt + new text with return_full_text=True), cut before any stop string
    token_ids: list[int]  # the new token ids (ending with the end token when finish_reason is "eos")
    prompt: str
    prompt_token_ids: list[int]  # what the model saw (after an empty prompt became <|endoftext|>, truncation)
    finish_reason: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens)
    # the seed that reproduces this result (None for greedy); drawn from the set_seed stream: that seed, which
    # reproduces it as set_seed(seed) followed by the same calls in the same order
    seed: int | None
    # per new token (logprob, its top alternatives) of the RAW model distribution, when asked (logprobs=k)
    logprobs: list[tuple[float, TopLogprobs]] | None = None
    # per new token the log-probability of the PROCESSED distribution it was picked from (output_scores=True):
    # transformers' compute_transition_scores(sequences, scores, normalize_logits=True)
    scores: list[float] | None = None
    # beam search (num_beams > 1): the summed log-probability / new tokens ** length_penalty, transformers'
    # `sequences_scores` (None without beams)
    sequence_score: float | None = None
    # how the drafts fared, when prompt lookup or an assistant model ran (one row only; None otherwise)
    speculation: speculative.SpeculationStats | None = None

    def __str__(self) -> str:
        return self.text


class Model:
    """An exported GPT-2, ready to generate. Build it with `gpt2onnx.load`. Safe to share between threads."""

    def __init__(self, directory: Path, *, manifest: dict | None, options: SessionOptions = SessionOptions(),
                 max_cache_bytes: int = limits.DEFAULT_MAX_CACHE_BYTES, layout: Layout | None = None,
                 loading: Loading | None = None):
        """loading: the session already being built (loading.start, as load() does); None starts it here."""
        self.directory = Path(directory)
        self.manifest = manifest  # None for an Optimum export (see optimum_layout)
        self.layout = layout or Layout.gpt2onnx(self.directory)  # where its files are, which session runs it
        self.session_options = options
        self.max_cache_bytes = limits.check_cache_bytes(max_cache_bytes)
        loading = loading or start(self.layout, manifest, options)
        self.raw_config, self.config = loading.raw_config, loading.config
        # the session loads beside the tokenizer: ONNX Runtime releases the GIL while it initializes the session
        # (reading the tokenizer's tables is Python, so it is the one on this thread)
        try:
            self.tokenizer = Tokenizer(self.layout.tokenizer_file)
        except BaseException:
            loading.session(errors=False)  # the tokenizer's error is the one reported
            raise
        self.session = loading.session()
        path = self.layout.generation_config_file
        self.generation_config = read_json(path) if path.is_file() else {}
        self.defaults = model_defaults(self.generation_config, self.raw_config)
        # every token that ends a row (generation_config.json's eos_token_id may list several, as transformers
        # reads it: any one ends a row); the first pads finished rows, as transformers' default pad_token_id
        self.eos_token_ids = _end_tokens(self.generation_config.get("eos_token_id", self.config.eos_token_id),
                                         self.tokenizer.eos_token_id)
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self._check_vocabulary()
        # a token's text alone, as transformers' stop_strings read each token
        self.token_text = functools.lru_cache(maxsize=None)(lambda token: self.tokenizer.decode([token]))
        self._same_vocabulary = weakref.WeakSet()  # assistant models checked to share this model's vocabulary

    @classmethod
    def opened(cls, loading: Loading, *, max_cache_bytes: int = limits.DEFAULT_MAX_CACHE_BYTES) -> Model:
        """The Model of a directory runtime.loading.open_model checked and whose session it started."""
        return cls(loading.layout.directory, manifest=loading.manifest, options=loading.options,
                   max_cache_bytes=max_cache_bytes, layout=loading.layout, loading=loading)

    @property
    def eos_id(self) -> int | tuple[int, ...]:
        """The end tokens as the generation loops take them (their `eos_id`): the one id, or a tuple of several."""
        return self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids

    def _check_vocabulary(self) -> None:
        """Every id the tokenizer or <|endoftext|> can give must be a row of the model's embedding."""
        vocab = self.config.vocab_size
        if self.eos_token_id is None:
            raise ModelLoadError(f"{self.layout.tokenizer_file} has no {ENDOFTEXT} token and the model "
                                 "directory gives no eos_token_id", hint="export the model again")
        for eos in self.eos_token_ids:
            if not 0 <= eos < vocab:
                raise ModelLoadError(f"eos_token_id {eos} in {self.directory} is not a token of this model "
                                     f"(vocab_size={vocab})", hint="fix eos_token_id in generation_config.json / "
                                                                    "config.json, or export the model again")
        if self.tokenizer.vocab_size > vocab:
            raise ModelLoadError(f"{self.layout.tokenizer_file} has {self.tokenizer.vocab_size} tokens but "
                                 f"the model has vocab_size={vocab}",
                                 hint="the tokenizer belongs to another model; export the model again")

    def generate(self, prompt: str | list[str], *, max_new_tokens: int | None = None, max_length: int | None = None,
                 min_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 no_repeat_ngram_size: int | None = None, num_return_sequences: int | None = None,
                 num_beams: int | None = None, length_penalty: float | None = None,
                 early_stopping: bool | str | None = None,
                 stop: str | list[str] | None = None, seed: int | None = None, sampler: str | None = None,
                 ignore_eos: bool | None = None, min_p: float | None = None, typical_p: float | None = None,
                 epsilon_cutoff: float | None = None, eta_cutoff: float | None = None,
                 bad_words_ids: list[list[int]] | None = None, suppress_tokens: list[int] | None = None,
                 begin_suppress_tokens: list[int] | None = None, sequence_bias: dict | list | None = None,
                 forced_bos_token_id: int | None = None, forced_eos_token_id: int | list[int] | None = None,
                 exponential_decay_length_penalty: tuple[int, float] | None = None,
                 renormalize_logits: bool | None = None, stop_strings: str | list[str] | None = None,
                 max_time: float | None = None, frequency_penalty: float | None = None,
                 presence_penalty: float | None = None, logit_bias: dict[int, float] | None = None,
                 prompt_lookup_num_tokens: int | None = None,
                 max_matching_ngram_size: int | None = None, num_assistant_tokens: int | None = None,
                 num_assistant_tokens_schedule: str | None = None, return_full_text: bool = False,
                 truncate: str | None = None, allow_special_tokens: bool = False, logprobs: int | None = None,
                 output_scores: bool = False, return_dict_in_generate: bool = False,
                 assistant_model: "Model | str | Path | None" = None):
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
        num_return_sequences: continuations per prompt, sampled from one shared prefill (at most 64); with
            num_beams > 1, the best num_return_sequences <= num_beams finished beams.
        num_beams: > 1 runs beam search over this many beams per prompt (beam sampling with do_sample=True),
            as transformers does, token for token; each prompt is prefilled once and its beams share that
            cache. Not with stop strings, logprobs or stream(). Generation.sequence_score holds the score.
        length_penalty: beam search ranks a finished sequence by its summed log-probability divided by
            new tokens ** length_penalty (1: the mean per token; 0: the sum; > 0 favours longer ones).
        early_stopping: when beam search stops: True once num_beams sequences are finished; False (the
            default) once transformers' heuristic finds no beam can beat the finished ones; "never" once no
            beam can in theory.
        stop: a string or list of strings; a row ends when its new text contains one (cut from the text).
        seed: 0 .. 2**32-1; the same seed and settings give the same tokens (None: after gpt2onnx.set_seed,
            the next draws of its stream, as transformers after set_seed; before it, a fresh seed, reported).
        sampler: "torch" replays PyTorch's random stream (the tokens of transformers after set_seed(seed));
            "numpy" uses numpy's generator (faster, different tokens).
        ignore_eos: keep generating after <|endoftext|> (fixed-length runs).
        min_p: sample only among tokens at least min_p times as likely as the likeliest (0..1; None: off).
        typical_p: typical sampling: the tokens whose surprise is closest to the entropy, up to this mass (1: off).
        epsilon_cutoff: sample only among tokens of probability >= this (0: off; 3e-4 .. 9e-4 suggested).
        eta_cutoff: epsilon scaled down by the entropy: min(eta, sqrt(eta) * exp(-entropy)) (0: off).
        bad_words_ids: token sequences never generated, e.g. [[257], [11, 290]]; a longer one bans its last
            token only right after the others ([<|endoftext|>] alone is never banned, as in transformers).
        suppress_tokens: token ids never generated.
        begin_suppress_tokens: token ids never generated as the first new token.
        sequence_bias: {(ids...): bias} or [[[ids...], bias], ...]: the bias is added to the last token's logit
            when the row ends with the others (a one-token sequence: always).
        forced_bos_token_id: this token first, when the (padded) prompt is a single token (transformers' rule).
        forced_eos_token_id: this token (or one of these) as the last one, at max_new_tokens.
        exponential_decay_length_penalty: (start_index, decay_factor): n tokens after start_index new tokens,
            <|endoftext|>'s logit grows by |logit| * (decay_factor**n - 1).
        renormalize_logits: log-softmax the scores after every other processor.
        stop_strings: a string or list of strings; a row ends at the token that completes one, which is kept
            in the text (transformers' StopStringCriteria; the prompt counts). `stop` instead cuts the text.
        max_time: seconds; every row ends (finish_reason "length") at the first step that finishes later.
        frequency_penalty: OpenAI's: each token's logit is lowered by this times the number of times the row
            generated it (-2 .. 2; 0: off). Applied to the raw logits before every other option.
        presence_penalty: OpenAI's: the logit of every token the row generated already is lowered by this (-2 .. 2).
        logit_bias: OpenAI's: {token id: bias} adds a bias from -100 to 100 to those tokens' logits.
        prompt_lookup_num_tokens: draft up to this many tokens by finding the text's last n-gram earlier in
            it, and check them in one run of the model: the same tokens, fewer runs (one prompt, one sequence;
            None: off). See gpt2onnx/generation/speculative.py.
        max_matching_ngram_size: prompt lookup's longest n-gram (None: 2, transformers' default).
        num_assistant_tokens: tokens an assistant_model drafts per run (default 20, transformers').
        num_assistant_tokens_schedule: "constant" (default) or "heuristic": 2 more drafts after a fully kept
            draft, 1 fewer otherwise ("heuristic_transient" is the same: nothing carries over between calls).
        return_full_text: put the prompt in front of the returned text.
        truncate: "left" drops the oldest prompt tokens when prompt + new tokens exceed the context;
            None (default) raises an error instead.
        allow_special_tokens: read "<|endoftext|>" typed in a prompt as the special token, not as text.
        logprobs: k >= 0 fills Generation.logprobs: per new token its log-probability and the k likeliest
            tokens, from the model's RAW logits (before repetition penalty, temperature, top-k, top-p), as
            OpenAI and vLLM report them; None (default) leaves it None.
        output_scores: fill Generation.scores: per new token its log-probability under the PROCESSED scores
            it was picked from (transformers' compute_transition_scores(..., normalize_logits=True)).
        return_dict_in_generate: accepted for transformers' code and ignored: a Generation always carries
            token_ids (transformers' sequences without the prompt) and, with output_scores, scores.
        assistant_model: a smaller model with the same vocabulary (a loaded Model, or an export directory,
            loaded per call) drafts num_assistant_tokens tokens greedily, checked in one run: the same tokens,
            fewer runs (one prompt, one sequence; Generation.speculation tells how many drafts were kept).
        """
        given = locals()
        options = {name: given[name] for name in OPTIONS}  # the generation options, as settings.OPTIONS lists them
        prompts = [prompt] if isinstance(prompt, str) else prompt
        _check_flag("return_dict_in_generate", return_dict_in_generate)
        prompt_ids, settings = self._prepare(prompts, options, truncate=truncate, allow_special=allow_special_tokens)
        results = self._complete(prompts, prompt_ids, settings, return_full_text=return_full_text, logprobs=logprobs,
                                 output_scores=output_scores, assistant_model=assistant_model)
        n = settings.num_return_sequences
        grouped = results if n == 1 else [results[i:i + n] for i in range(0, len(results), n)]
        return grouped[0] if isinstance(prompt, str) else grouped

    def complete(self, prompts: str | list[str], settings: GenerationSettings, *, return_full_text: bool = False,
                 truncate: str | None = None, allow_special_tokens: bool = False, logprobs: int | None = None,
                 output_scores: bool = False, assistant_model: "Model | str | Path | None" = None) -> list[Generation]:
        """generate()'s typed core: continue every prompt with `settings` as they are (the model directory's
        defaults are not applied; generate() applies them before it calls this). Returns one Generation per row,
        prompt-major (a prompt's num_return_sequences rows together). The keywords are generate()'s."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(settings, GenerationSettings):
            raise InvalidArgumentError(f"settings must be a GenerationSettings, got {type(settings).__name__}",
                                       hint="build one: GenerationSettings(max_new_tokens=20, do_sample=True)")
        ids = self._fit(self._encode(prompts, truncate=truncate, allow_special=allow_special_tokens), settings,
                        truncate=truncate)
        return self._complete(prompts, ids, settings, return_full_text=return_full_text, logprobs=logprobs,
                              output_scores=output_scores, assistant_model=assistant_model)

    def _complete(self, prompts: list[str], prompt_ids: list[list[int]], settings: GenerationSettings, *,
                  return_full_text: bool, logprobs: int | None, output_scores: bool,
                  assistant_model: "Model | str | Path | None") -> list[Generation]:
        """Every row's Generation from checked prompts and settings: beams or the token loop, then the text, the
        finish reason and what was asked for beside it (logprobs, scores, sequence scores, speculation)."""
        _check_flag("return_full_text", return_full_text)
        _check_flag("output_scores", output_scores)
        check_top("logprobs", logprobs, self.config.vocab_size)
        assistant = self._assistant(assistant_model, settings)
        seed, rng = random_for(settings)
        n = settings.num_return_sequences
        values = [[] for _ in range(len(prompts) * n)]
        processed = [[] for _ in range(len(prompts) * n)]

        def record(logits, next_ids, live, scores):  # each live row's chosen token: raw and processed
            rows = np.flatnonzero(live)
            if logprobs is not None:
                for row, value in zip(rows.tolist(), chosen(logits[rows], next_ids[rows], logprobs)):
                    values[row].append(value)
            if output_scores:
                picked = np.take_along_axis(log_softmax(scores[rows]), next_ids[rows, None], axis=1)[:, 0]
                for row, value in zip(rows.tolist(), picked.tolist()):
                    processed[row].append(value)

        stats = None  # how the drafts fared, when the call speculated
        if settings.num_beams > 1:  # each row with its sequence score
            found = self._beams(prompt_ids, settings, rng, eos_id=self.eos_id, logprobs=logprobs,
                                output_scores=output_scores, assistant=assistant is not None)
        else:
            watch = record if logprobs is not None or output_scores else None
            new_rows, stats = self.generate_rows(prompt_ids, settings, rng, watch=watch, assistant=assistant)
            found = [(new_ids, None) for new_ids in new_rows]
        results = []
        for index, (new_ids, sequence_score) in enumerate(found):
            p = index // n
            result = self._result(prompts[p], prompt_ids[p], new_ids, settings, seed, return_full_text)
            if sequence_score is not None:
                result = dataclasses.replace(result, sequence_score=sequence_score)
            if logprobs is not None:
                result = dataclasses.replace(result, logprobs=values[index])
            if output_scores:
                result = dataclasses.replace(result, scores=processed[index])
            if stats is not None:
                result = dataclasses.replace(result, speculation=stats)
            results.append(result)
        return results

    def stream(self, prompt: str, *, return_full_text: bool = False, truncate: str | None = None,
               allow_special_tokens: bool = False, assistant_model: "Model | str | Path | None" = None,
               **options) -> Iterator[str]:
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
        if settings.num_beams != 1:
            raise InvalidArgumentError(f"stream() cannot run beam search (num_beams={settings.num_beams}): the best "
                                       "beam is known only at the end", hint="use generate() for beam search, or "
                                                                             "num_beams=1 to stream")
        assistant = self._assistant(assistant_model, settings)
        return self._stream(prompt, prompt_ids, settings, bool(return_full_text), assistant)

    def _stream(self, prompt: str, prompt_ids: list[int], settings: GenerationSettings,
                return_full_text: bool, assistant: "Model | None") -> Iterator[str]:
        _, rng = random_for(settings)
        text = ReleasedText(settings.stop, self.tokenizer.decode)
        if return_full_text:
            yield prompt
        steps, _ = self._tokens([prompt_ids], settings, rng, assistant=assistant,
                                stopped=any_of(*self._criteria([prompt_ids], settings)))
        for next_ids, live in steps:
            token = int(next_ids[0])
            if ends_text(token, self.eos_id, ignore_eos=settings.ignore_eos):
                break
            piece = text.add(token)
            if piece:
                yield piece
            if text.hit:
                break
        rest = text.finish()
        if rest:
            yield rest

    def generate_rows(self, prompt_ids: list[list[int]], settings: GenerationSettings, rng, *,
                      watch=None, assistant: "Model | None" = None, eos_id: int | tuple[int, ...] | None = None,
                      pad_id: int | None = None) -> tuple[list[list[int]], speculative.SpeculationStats | None]:
        """New token ids of every row (prompt-major, then its return sequences) from prepared inputs: beam search
        when settings.num_beams > 1 (the best num_return_sequences per prompt), else the token loop; and how the
        drafts fared when the call speculated (else None).
        watch(logits, next_ids, live, scores): called at every step (see generator.generate_tokens).
        assistant: see _tokens. eos_id, pad_id: the end token, or a tuple of them (each ends a row, min_new_tokens
        holds back all), and the left padding's token (default the model's <|endoftext|>; the pipeline's
        eos_token_id / pad_token_id)."""
        if eos_id is None:
            eos_id = self.eos_id
        elif not isinstance(eos_id, (int, np.integer)):
            eos_id = tuple(int(t) for t in eos_id)  # a list of ids too (the loops tell a tuple from one id)
        if settings.num_beams > 1:
            found = self._beams(prompt_ids, settings, rng, eos_id=eos_id, assistant=assistant is not None,
                                pad_id=pad_id)
            return [new_ids for new_ids, _ in found], None
        rows = len(prompt_ids) * settings.num_return_sequences
        stops = StopStrings(settings.stop, self.tokenizer.decode, rows) if settings.stop else None
        stopped = any_of(stops, *self._criteria(prompt_ids, settings, pad_id))
        steps, stats = self._tokens(prompt_ids, settings, rng, stopped=stopped, watch=watch, assistant=assistant,
                                    eos_id=eos_id, pad_id=pad_id)
        return collect(steps, rows), stats

    def _beams(self, prompt_ids: list[list[int]], settings: GenerationSettings, rng, *,
               eos_id: int | tuple[int, ...], logprobs: int | None = None, output_scores: bool = False,
               assistant: bool = False, pad_id: int | None = None) -> list[tuple[list[int], float]]:
        """Beam search's rows (prompt-major, the best num_return_sequences of each): (new token ids, sequence
        score); what it does not support (the other arguments) is refused first."""
        _check_beams(settings, logprobs, output_scores=output_scores, assistant=assistant, pad_id=pad_id,
                     eos_id=eos_id)
        found = beam_search(self.session, prompt_ids, settings, eos_id=eos_id, rng=rng)
        return [row for rows in found for row in rows]

    def _criteria(self, prompt_ids: list[list[int]], settings: GenerationSettings, pad_id: int | None = None
                  ) -> list:
        """transformers' stopping criteria of these settings (stop_strings, max_time); the clock starts now.
        pad_id: the left padding's token (default <|endoftext|>), which transformers' StopStringCriteria sees."""
        criteria = []
        if settings.max_time is not None:
            criteria.append(Deadline(settings.max_time))
        if settings.stop_strings:
            width = max(map(len, prompt_ids))  # the rows as transformers sees them: left-padded
            pad = self.eos_token_id if pad_id is None else pad_id
            padded = [[pad] * (width - len(p)) + p for p in prompt_ids
                      for _ in range(settings.num_return_sequences)]
            criteria.append(StopStringsKept(settings.stop_strings, self.token_text, padded))
        return criteria

    # -- speculative decoding (gpt2onnx/generation/speculative.py) --------------------------------------------------

    def _tokens(self, prompt_ids: list[list[int]], settings: GenerationSettings, rng, *, stopped=None, watch=None,
                assistant: "Model | None" = None, eos_id: int | tuple[int, ...] | None = None,
                pad_id: int | None = None) -> tuple[Iterator, speculative.SpeculationStats | None]:
        """The token loop for these rows: speculative for one row with prompt lookup or an assistant (same
        tokens, fewer runs), the plain loop otherwise (batches share each weight read among their rows already).
        Returns its (next ids, live) steps and the stats the speculative loop fills in (None for the plain loop).
        eos_id, pad_id: see generate_rows."""
        eos_id = self.eos_id if eos_id is None else eos_id
        one_row = len(prompt_ids) == 1 and settings.num_return_sequences == 1
        if not (one_row and (assistant is not None or settings.prompt_lookup_num_tokens is not None)):
            return generate_tokens(self.session, prompt_ids, settings, eos_id=eos_id, rng=rng, stopped=stopped,
                                   watch=watch, pad_id=pad_id), None
        if assistant is not None:
            capacity = len(prompt_ids[0]) + settings.max_new_tokens
            drafter = speculative.Assistant(assistant.session, settings, eos_id=eos_id, capacity=capacity)
        else:
            drafter = speculative.PromptLookup(settings)
        stats = speculative.SpeculationStats()
        return speculative.generate_tokens(self.session, prompt_ids[0], settings, eos_id=eos_id, drafter=drafter,
                                           rng=rng, stopped=stopped, watch=watch, stats=stats), stats

    def _assistant(self, assistant_model, settings: GenerationSettings) -> "Model | None":
        """assistant_model as a loaded Model, checked to share this model's vocabulary (drafts are token ids)."""
        if assistant_model is None:
            return None
        if settings.prompt_lookup_num_tokens is not None:
            raise InvalidArgumentError("prompt_lookup_num_tokens and assistant_model both draft tokens; pass one",
                                       hint="use prompt lookup for text that repeats its prompt, an assistant "
                                            "model otherwise")
        if isinstance(assistant_model, (str, Path)):
            assistant_model = Model.opened(open_model(assistant_model, threads=self.session_options.threads))
        if not isinstance(assistant_model, Model):
            raise InvalidArgumentError(f"assistant_model must be a loaded gpt2onnx Model or an export directory, "
                                       f"got {type(assistant_model).__name__}",
                                       hint="pass gpt2onnx.load(DIR) or DIR of a smaller export with the same "
                                            "tokenizer")
        if assistant_model not in self._same_vocabulary:
            same = (assistant_model.config.vocab_size == self.config.vocab_size
                    and assistant_model.eos_token_id == self.eos_token_id
                    and assistant_model.tokenizer.vocabulary() == self.tokenizer.vocabulary())
            if not same:
                raise InvalidArgumentError(
                    f"assistant_model {assistant_model.directory} has another vocabulary than {self.directory} "
                    f"(vocab_size {assistant_model.config.vocab_size} vs {self.config.vocab_size})",
                    hint="the assistant must use the same tokenizer: a smaller or quantized export of a model "
                         "with this model's tokenizer")
            self._same_vocabulary.add(assistant_model)
        return assistant_model

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
        """Prompts to token ids and options (over the model's defaults) to settings, with every check made before
        anything runs."""
        ids = self._encode(prompts, truncate=truncate, allow_special=allow_special)
        settings = resolve(self.defaults, options, prompt_length=max(map(len, ids)))
        return self._fit(ids, settings, truncate=truncate), settings

    def _encode(self, prompts: list, *, truncate: str | None, allow_special: bool) -> list[list[int]]:
        """The prompts' token ids (the arguments checked first)."""
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
        return [self.encode_prompt(p, allow_special=allow_special, index=i if len(prompts) > 1 else None)
                for i, p in enumerate(prompts)]

    def _fit(self, ids: list[list[int]], settings: GenerationSettings, *, truncate: str | None) -> list[list[int]]:
        """The prompts' ids checked against the model: the options' token ids, the context (cut on the left with
        truncate='left') and the budget of rows and cache."""
        check_token_ids(settings, self.config.vocab_size)
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
        return ids

    def check_budget(self, prompt_ids: list[list[int]], settings: GenerationSettings) -> None:
        """Refuse a call whose rows or KV cache exceed the limits (gpt2onnx/runtime/limits.py), before anything runs."""
        fan_out = max(settings.num_return_sequences, settings.num_beams)  # rows per prompt (beams: num_beams)
        rows = len(prompt_ids) * fan_out
        if rows > limits.MAX_ROWS:
            name = "num_beams" if settings.num_beams > settings.num_return_sequences else "num_return_sequences"
            raise InvalidArgumentError(
                f"{len(prompt_ids)} prompt(s) x {name}={fan_out} is {rows} rows; "
                f"one call may run at most {limits.MAX_ROWS}",
                hint="ask for fewer sequences, or split the prompts over several calls")
        config = self.config
        positions = min(max(map(len, prompt_ids)) + settings.max_new_tokens, config.n_positions)
        itemsize = np.dtype(self.session.cache_dtype).itemsize
        per_position = 2 * config.n_layer * config.n_head * config.head_dim * itemsize
        # the prefill's cache is still held while it is copied out to the return sequences
        held = rows + (len(prompt_ids) if fan_out > 1 else 0)
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

    def _result(self, prompt: str, prompt_ids: list[int], new_ids: list[int], settings: GenerationSettings,
                seed: int | None, full: bool) -> Generation:
        by_eos = bool(new_ids) and ends_text(new_ids[-1], self.eos_id, ignore_eos=settings.ignore_eos)
        text, hit = cut_at_stop(self.tokenizer.decode(new_ids[:-1] if by_eos else new_ids), settings.stop)
        completed = bool(new_ids and settings.stop_strings) and completes(settings.stop_strings, self.token_text,
                                                                          prompt_ids + new_ids)
        reason = finish_reason(by_eos=by_eos, stop_cut=hit, stop_kept=completed)
        return Generation(text=prompt + text if full else text, token_ids=new_ids, prompt=prompt,
                          prompt_token_ids=prompt_ids, finish_reason=reason, seed=seed)


def _end_tokens(eos, fallback: int | None) -> tuple[int, ...]:
    """The end tokens from generation_config.json's (or config.json's) eos_token_id: one id or a list of them
    (duplicates dropped, order kept); anything else gives the tokenizer's <|endoftext|> (`fallback`)."""
    ids = eos if isinstance(eos, list) else [eos]
    if ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return tuple(dict.fromkeys(ids))
    return () if fallback is None else (fallback,)


def _check_beams(settings: GenerationSettings, logprobs: int | None, *, output_scores: bool = False,
                 assistant: bool = False, pad_id: int | None = None, eos_id: int | tuple[int, ...] | None = None
                 ) -> None:
    """What beam search does not support, refused before anything runs (rather than silently ignored)."""
    unsupported = [name for name, given in (
        ("stop_strings", bool(settings.stop_strings)), ("max_time", settings.max_time is not None),
        ("output_scores", output_scores), ("prompt_lookup_num_tokens", settings.prompt_lookup_num_tokens is not None),
        ("assistant_model", assistant),
        ("a pad_token_id other than eos_token_id", pad_id is not None and pad_id != first_eos(eos_id))) if given]
    if unsupported:
        raise InvalidArgumentError(f"beam search (num_beams={settings.num_beams}) does not support "
                                   f"{', '.join(unsupported)}",
                                   hint="leave them out with num_beams > 1, or use num_beams=1")
    if settings.stop:
        raise InvalidArgumentError("stop strings cannot end beams (num_beams > 1)",
                                   hint="cut the returned text at the stop string yourself, or use num_beams=1")
    if logprobs is not None:
        raise InvalidArgumentError("logprobs are not reported with beam search (num_beams > 1)",
                                   hint="Generation.sequence_score holds each beam's score; model.score(texts) "
                                        "gives every token's log-probability")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}", hint=f"pass {name}=True or False")
