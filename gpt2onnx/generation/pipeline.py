"""transformers' `pipeline("text-generation")`, reproduced without torch: its options, defaults, quirks and output.

    from gpt2onnx import pipeline, set_seed          # was: from transformers import pipeline, set_seed
    generator = pipeline("text-generation", model="gpt2")
    set_seed(42)
    generator("Hello, I'm a language model,", max_length=30, num_return_sequences=5)

gives the `[{"generated_text": ...}, ...]` transformers 4.57's pipeline gives for the same weights. `model` is an
exported directory, or a name looked up in the export home (gpt2onnx/runtime/home.py). That includes what the pipeline
really does with that call: its own defaults (max_new_tokens=256, do_sample=True, temperature=0.7) fill in what
the model's generation_config.json leaves at transformers' defaults, and a default max_new_tokens=256 silently
beats the caller's max_length=30. `Model.generate` does not do that; this module exists so that migrating code
gets the very same texts. `seed=` (ours) stands for `set_seed(seed)` before the call.

The call takes transformers' pipeline options (return_full_text, return_tensors, prefix, stop_sequence,
handle_long_generation, truncation, batch_size, ...) and every generation option of gpt2onnx (settings.OPTIONS)
plus pad_token_id and eos_token_id; options that mean nothing without torch (device, dtype, ...) are accepted
with a warning; anything else is an error naming it.
"""

from __future__ import annotations

import enum
import json
import numbers
import warnings
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError
from ..runtime.home import resolve_model
from ..text.tokenizer import clean_up_tokenization
from .defaults import TRANSFORMERS_DEFAULTS
from .loader import load
from .seeding import rng_for
from .settings import OPTIONS, GenerationSettings, check_token_ids

if TYPE_CHECKING:
    from .model import Model

# TextGenerationPipeline._default_generation_config in transformers 4.57
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
_GLOBAL = {**TRANSFORMERS_DEFAULTS, "max_new_tokens": None}
_KEYS = set(_GLOBAL)
# what generate takes: every generation option of ours (settings.OPTIONS, derived, in its order) and the token ids
CALL_OPTIONS = tuple(OPTIONS)
TOKEN_OPTIONS = ("pad_token_id", "eos_token_id")
# the pipeline's own options: TextGenerationPipeline._sanitize_parameters and Pipeline.__call__ in transformers 4.57
PIPELINE_OPTIONS = ("return_full_text", "return_text", "return_tensors", "return_type", "clean_up_tokenization_spaces",
                    "skip_special_tokens", "prefix", "handle_long_generation", "stop_sequence", "truncation",
                    "batch_size")
# accepted for transformers' sake, with one warning line each: they cannot change anything here
IGNORED = {
    "device": "gpt2onnx runs on ONNX Runtime's CPU provider",
    "device_map": "gpt2onnx runs on ONNX Runtime's CPU provider",
    "dtype": "the weights' precision was fixed at export (gpt2onnx export --precision)",
    "torch_dtype": "the weights' precision was fixed at export (gpt2onnx export --precision)",
    "model_kwargs": "there is no PyTorch model to build",
    "trust_remote_code": "no code is ever run from a model directory",
    "revision": "the export holds one revision (chosen at export)",
    "token": "nothing is downloaded",
    "use_fast": "the tokenizer is always the fast one (tokenizers)",
    "framework": "there is no PyTorch or TensorFlow",
    "num_workers": "prompts are prepared in the calling thread",
    "add_special_tokens": "GPT-2's tokenizer adds no special tokens",
    "use_cache": "the KV cache is always used (the tokens are the same)",
}
_NO_LIMIT = int(1e30)  # transformers' VERY_LARGE_INTEGER: the model_max_length of a tokenizer that sets none


class ReturnType(enum.Enum):
    """transformers' text_generation.ReturnType (its members are accepted as return_type too, by name)."""

    TENSORS = 0
    NEW_TEXT = 1
    FULL_TEXT = 2


class PipelineTokenizer:
    """`generator.tokenizer`: what transformers' pipeline reads from its tokenizer, settable as there, e.g.
    `generator.tokenizer.pad_token_id = generator.model.config.eos_token_id` and `.padding_side = "left"`
    before batch_size > 1. Starts from the export's tokenizer_config.json."""

    def __init__(self, model: Model):
        try:
            # beside the tokenizer: a Hub-style Optimum repo may keep it in onnx/ only (see optimum_layout)
            config = json.loads((model.layout.tokenizer_file.parent / "tokenizer_config.json").read_text(
                encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        config = config if isinstance(config, dict) else {}
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_token_id = model.tokenizer.token_id(pad) if isinstance(pad, str) else None
        self.eos_token_id = model.tokenizer.eos_token_id
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        limit = config.get("model_max_length")
        self.model_max_length = limit if isinstance(limit, int) and not isinstance(limit, bool) else _NO_LIMIT
        self._tokenizer = model.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids as transformers' tokenizer gives them (special tokens typed in the text are read)."""
        return self._tokenizer.encode(text, allow_special=True)

    def decode(self, ids, *, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = True) -> str:
        if skip_special_tokens:
            return self._tokenizer.decode_text(ids, clean_up=clean_up_tokenization_spaces)
        text = self._tokenizer.decode(ids)
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text


class TextGenerationPipeline:
    """Call it like transformers' text-generation pipeline; `seed=` stands for `set_seed(seed)` before the call."""

    def __init__(self, model: Model, **options):
        self.model = model
        self.tokenizer = PipelineTokenizer(model)
        generate_options, self._params = self._sanitize(options)
        self._batch_size = self._params.pop("batch_size", None)
        config = dict(_GLOBAL)
        config.update(PIPELINE_DEFAULTS)
        # the model's generation_config.json fills in only what is still at transformers' global default
        for key, value in model.generation_config.items():
            if key in _KEYS and config.get(key) == _GLOBAL.get(key) and value != _GLOBAL.get(key):
                config[key] = value
        config["eos_token_id"] = model.eos_token_id if len(model.eos_token_ids) == 1 else list(model.eos_token_ids)
        config["pad_token_id"] = model.generation_config.get("pad_token_id")
        config.update(generate_options)  # generate options given to pipeline() update its generation config
        # a max_length other than 20 is honoured over the pipeline's default max_new_tokens
        if config["max_new_tokens"] == PIPELINE_DEFAULTS["max_new_tokens"] and config["max_length"] != 20:
            config["max_new_tokens"] = None
        task = (model.raw_config.get("task_specific_params") or {}).get("text-generation") or {}
        config.update({k: v for k, v in task.items() if k in _KEYS})
        prefix = task.get("prefix", model.raw_config.get("prefix"))
        if prefix is not None and "prefix" not in self._params:
            self._params["prefix"] = prefix
        if config["pad_token_id"] is None:
            config["pad_token_id"] = self.tokenizer.pad_token_id
        self.generation_config = config

    def __call__(self, text_inputs: str | list[str], **options):
        """[{"generated_text": ...}] per prompt (a list of those for a list of prompts), as the pipeline."""
        call, params = self._sanitize(options)
        params = {**self._params, **params}
        batch_size = params.pop("batch_size", None)
        batch_size = batch_size if batch_size is not None else self._batch_size if self._batch_size is not None else 1
        single = isinstance(text_inputs, str)
        if not single and not (isinstance(text_inputs, list) and text_inputs):
            raise InvalidArgumentError(f"text_inputs must be a string or a non-empty list of strings, got "
                                       f"{type(text_inputs).__name__}", hint='pass "text" or ["text", "more text"]')
        _check_int("batch_size", batch_size, 1)
        if not single and batch_size > 1 and self.tokenizer.pad_token_id is None:
            raise InvalidArgumentError(
                f"batch_size={batch_size} needs a pad token, and this tokenizer has none (GPT-2's has none)",
                hint="set generator.tokenizer.pad_token_id = generator.model.config.eos_token_id and "
                     "generator.tokenizer.padding_side = 'left' first, as with transformers, or use batch_size=1")
        seed = call.pop("seed", self.generation_config.get("seed"))
        # the stream: seed= its own, else the set_seed stream, else a fresh seed (gpt2onnx/generation/seeding.py)
        _, rng = rng_for(seed, call.get("sampler", self.generation_config.get("sampler")) or "torch")
        prompts = [text_inputs] if single else text_inputs
        if not single:
            # a list goes through torch's DataLoader, whose iterator first draws an int64 base seed (2 words)
            rng.bit_generator.random_raw(2)
        results = []
        for start in range(0, len(prompts), batch_size):  # each batch is one generate call on the same stream
            results += self._batch(prompts[start:start + batch_size], call, params, rng)
        return results[0] if single else results

    def _sanitize(self, options: dict) -> tuple[dict, dict]:
        """(generate options, pipeline options) from pipeline() or call keywords, as _sanitize_parameters."""
        unknown = [k for k in options if k not in CALL_OPTIONS + TOKEN_OPTIONS + PIPELINE_OPTIONS and k not in IGNORED]
        if unknown:
            raise InvalidArgumentError(
                f"unsupported pipeline option(s) {', '.join(sorted(unknown))}",
                hint=f"generate options: {', '.join(CALL_OPTIONS + TOKEN_OPTIONS)}; pipeline options: "
                     f"{', '.join(PIPELINE_OPTIONS)}; accepted and ignored: {', '.join(IGNORED)}")
        for key in options:
            if key in IGNORED:
                warnings.warn(f"gpt2onnx pipeline: {key}={options[key]!r} has no effect: {IGNORED[key]}",
                              UserWarning, stacklevel=3)
        generate_options = {k: v for k, v in options.items() if k in CALL_OPTIONS + TOKEN_OPTIONS}
        params = {k: v for k, v in options.items() if k in PIPELINE_OPTIONS}
        full, tensors, text = (params.pop(k, None) for k in ("return_full_text", "return_tensors", "return_text"))
        return_type = params.pop("return_type", None)
        if return_type is not None:
            name = getattr(return_type, "name", return_type)
            if name not in ReturnType.__members__:
                raise InvalidArgumentError(f"return_type must be one of {', '.join(ReturnType.__members__)}, got "
                                           f"{return_type!r}", hint="or pass return_full_text / return_tensors")
            return_type = ReturnType[name]
        # transformers' rules, quirks included: return_tensors=False still returns tensors
        if full is not None and return_type is None:
            if text is not None or tensors is not None:
                other = "return_text" if text is not None else "return_tensors"
                raise InvalidArgumentError(f"`{other}` is mutually exclusive with `return_full_text`",
                                           hint="pass one of them")
            return_type = ReturnType.FULL_TEXT if full else ReturnType.NEW_TEXT
        if tensors is not None and return_type is None:
            if text is not None:
                raise InvalidArgumentError("`return_text` is mutually exclusive with `return_tensors`",
                                           hint="pass one of them")
            return_type = ReturnType.TENSORS
        if return_type is not None:
            params["return_type"] = return_type
        if params.get("handle_long_generation") not in (None, "hole"):
            raise InvalidArgumentError(f"handle_long_generation must be None or 'hole', got "
                                       f"{params['handle_long_generation']!r}",
                                       hint="'hole' drops the oldest prompt tokens to make room for the new ones")
        if params.get("stop_sequence") is not None:
            # transformers makes the stop sequence's token ids the eos_token_id: any one of them ends a row
            stop_ids = self.tokenizer.encode(str(params.pop("stop_sequence")))
            if not stop_ids:
                raise InvalidArgumentError("stop_sequence is empty", hint="pass a non-empty string")
            generate_options["eos_token_id"] = stop_ids
        return generate_options, params

    def _batch(self, prompts: list, call: dict, params: dict, rng) -> list[list[dict]]:
        """One generate call over some prompts (left-padded as transformers' DataLoader pads them)."""
        tokenizer, config = self.tokenizer, self.generation_config
        prefix = params.get("prefix") or ""
        rows = [self._preprocess(prompt, prefix, call, params, i if len(prompts) > 1 else None)
                for i, prompt in enumerate(prompts)]
        empty = [not ids for ids in rows]
        if any(empty) and len(rows) > 1:
            raise InvalidArgumentError("an empty prompt in a padded batch (batch_size > 1) is not supported",
                                       hint="give it batch_size=1, or a prompt of at least one token")
        rows = [ids or [self.model.eos_token_id] for ids in rows]  # generate starts an empty prompt from bos
        width = max(map(len, rows))
        if len({len(ids) for ids in rows}) > 1 and tokenizer.padding_side != "left":
            raise InvalidArgumentError(
                f"prompts of different lengths would be padded on the {tokenizer.padding_side!r} side, which "
                "transformers itself warns gives wrong results for GPT-2",
                hint="set generator.tokenizer.padding_side = 'left' (as with transformers) before batch_size > 1")
        call = dict(call)
        if prefix and "max_new_tokens" not in call:  # the prefix's tokens do not count in max_length
            call["max_length"] = (call.get("max_length") or config["max_length"]) + len(tokenizer.encode(prefix))
        options = {**config, **call}
        settings, eos_ids, pad_fill = self._settings(options, call, width)
        self.model.check_budget(rows, settings)
        # transformers' eos_token_id list is a set: any one ends a row, min_new_tokens holds back all
        eos_id = eos_ids[0] if len(eos_ids) == 1 else tuple(eos_ids)
        new_rows, _ = self.model.generate_rows(rows, settings, None if settings.greedy else rng, eos_id=eos_id,
                                               pad_id=tokenizer.pad_token_id if len(rows) > 1 else None)
        return self._postprocess(prompts, rows, empty, new_rows, settings.num_return_sequences, pad_fill, params)

    def _preprocess(self, prompt, prefix: str, call: dict, params: dict, index: int | None) -> list[int]:
        """The prompt's token ids, as TextGenerationPipeline.preprocess tokenizes, truncates and 'hole's them."""
        name = "prompt" if index is None else f"prompt {index}"
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"{name} must be a string, got {type(prompt).__name__}",
                                       hint="chat messages are not supported: GPT-2 has no chat template")
        ids = self.model.encode_prompt(prefix + prompt, allow_special=True, index=index) if prefix + prompt else []
        tokenizer = self.tokenizer
        if params.get("truncation") not in (None, False, "do_not_truncate"):
            limit = call.get("max_length") or tokenizer.model_max_length
            if len(ids) > limit:
                ids = ids[:limit] if tokenizer.truncation_side == "right" else ids[-limit:]
        if params.get("handle_long_generation") == "hole":
            if "max_new_tokens" in call:
                new_tokens = call["max_new_tokens"]
            else:  # transformers' preprocess never sees a call's max_length here (its tokenizer argument takes it)
                new_tokens = self.generation_config["max_length"] - len(ids)
                if new_tokens < 0:
                    raise InvalidArgumentError("handle_long_generation='hole' cannot infer how many new tokens are "
                                               "expected (max_length is shorter than the prompt)",
                                               hint="pass max_new_tokens")
            if len(ids) + new_tokens > tokenizer.model_max_length:
                keep = tokenizer.model_max_length - new_tokens
                if keep <= 0:
                    raise InvalidArgumentError(
                        f"handle_long_generation='hole' cannot make room for {new_tokens} new tokens: the model's "
                        f"max length is {tokenizer.model_max_length}", hint="ask for fewer new tokens")
                ids = ids[-keep:]
        return ids

    def _settings(self, options: dict, call: dict, width: int) -> tuple[GenerationSettings, list[int], int]:
        """GenerationSettings, eos token ids and the pad token of one generate call (lengths as generate reads
        them: a max_new_tokens anywhere wins; an untouched max_length=20 means 20 new tokens)."""
        n_positions = self.model.config.n_positions
        if options["max_new_tokens"] is not None:
            max_new_tokens = options["max_new_tokens"]
        elif "max_length" not in call and options["max_length"] == 20:
            max_new_tokens = min(20 + width, n_positions) - width
        else:
            max_new_tokens = options["max_length"] - width
        chosen = {k: v for k, v in options.items()
                  if k in OPTIONS and v is not None and k not in ("max_length", "seed")}
        if isinstance(chosen.get("stop"), (str, list)):
            chosen["stop"] = (chosen["stop"],) if isinstance(chosen["stop"], str) else tuple(chosen["stop"])
        settings = GenerationSettings(**{**chosen, "max_new_tokens": max_new_tokens, "sampler": chosen.get(
            "sampler", "torch")})
        check_token_ids(settings, self.model.config.vocab_size)  # suppress_tokens, bad_words_ids, ... in range
        if width + settings.max_new_tokens > n_positions:
            raise InvalidArgumentError(
                f"the prompt ({width} tokens) plus {settings.max_new_tokens} new tokens exceed n_positions="
                f"{n_positions}", hint="the pipeline's default is max_new_tokens=256; pass a smaller max_new_tokens, "
                                       "or handle_long_generation='hole'")
        eos = options["eos_token_id"]
        eos_ids = [eos] if isinstance(eos, numbers.Integral) and not isinstance(eos, bool) else eos
        vocab = self.model.config.vocab_size
        if (not isinstance(eos_ids, (list, tuple)) or not eos_ids
                or not all(_is_token(t, vocab) for t in eos_ids)):
            raise InvalidArgumentError(f"eos_token_id must be a token id or a list of them (0 to {vocab - 1}), "
                                       f"got {eos!r}", hint="GPT-2's <|endoftext|> is 50256")
        eos_ids = [int(t) for t in eos_ids]
        pad = options["pad_token_id"]
        if pad is not None and not _is_token(pad, vocab):
            raise InvalidArgumentError(f"pad_token_id must be a token id (0 to {vocab - 1}), got {pad!r}",
                                       hint="GPT-2 has no pad token; pad_token_id=50256 (<|endoftext|>) is usual")
        return settings, eos_ids, eos_ids[0] if pad is None else int(pad)

    def _postprocess(self, prompts, rows, empty, new_rows, n: int, pad_fill: int, params: dict) -> list[list[dict]]:
        """Records as TextGenerationPipeline.postprocess makes them from generate's padded [rows, length] output:
        left padding + prompt + new tokens + pad_fill after a row's end."""
        width, steps = max(map(len, rows)), max(map(len, new_rows), default=0)
        return_type = params.get("return_type", ReturnType.FULL_TEXT)
        skip, clean = params.get("skip_special_tokens", True), params.get("clean_up_tokenization_spaces", True)

        def decode(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)

        results = []
        for p, (prompt, ids) in enumerate(zip(prompts, rows)):
            padded = [self.tokenizer.pad_token_id] * (width - len(ids)) + ids
            prompt_length = 0 if empty[p] else len(decode(padded))
            records = []
            for new in new_rows[p * n:(p + 1) * n]:
                sequence = padded + new + [pad_fill] * (steps - len(new))
                if return_type == ReturnType.TENSORS:
                    records.append({"generated_token_ids": sequence})
                    continue
                text = decode(sequence)[prompt_length:]
                records.append({"generated_text": prompt + text if return_type == ReturnType.FULL_TEXT else text})
            results.append(records)
        return results


def pipeline(task: str | None = "text-generation", model: str | Model | None = None, *, tokenizer=None,
             threads: int = 0, check_hashes: bool = True, **options) -> TextGenerationPipeline:
    """Like transformers.pipeline for the text-generation task.

    model: an exported model directory, a loaded Model, or a name (e.g. "gpt2") exported into the export home
        ($GPT2ONNX_HOME, default ~/.local/share/gpt2onnx/models; the error says how to export it there).
    tokenizer: the model's own (None or the same name); another tokenizer is refused.
    threads, check_hashes: as gpt2onnx.load. Other keywords: the call's options, as defaults for every call.
    """
    if task not in (None, "text-generation"):
        raise InvalidArgumentError(f"task must be 'text-generation', got {task!r}",
                                   hint="gpt2onnx runs GPT-2 text generation only")
    if model is None:
        raise InvalidArgumentError("pipeline() needs model=DIR (an exported model directory) or a model name",
                                   hint="e.g. pipeline('text-generation', model='gpt2')")
    from .model import Model  # here: `import gpt2onnx` leaves model.py to the first load (gpt2onnx.load)

    if tokenizer is not None and (isinstance(model, Model) or str(tokenizer) != str(model)):
        raise InvalidArgumentError(f"tokenizer={tokenizer!r}: only the model's own tokenizer is supported",
                                   hint="leave tokenizer unset; the export carries its tokenizer")
    loaded = model if isinstance(model, Model) else load(resolve_model(model), threads=threads,
                                                          check_hashes=check_hashes)
    return TextGenerationPipeline(loaded, **options)


def _is_token(value, vocab: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < vocab


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise InvalidArgumentError(f"{name} must be an integer >= {low}, got {value!r}", hint=f"e.g. {name}=1")
