"""Generation defaults the way transformers builds them: its GenerationConfig defaults, then the model's
generation_config.json, then config.json's task_specific_params['text-generation'] (what its
text-generation pipeline applies), then what the caller passed. The caller always wins.

Lengths: `max_new_tokens` counts only new tokens, `max_length` counts the prompt too (except that
transformers reads its own default, max_length=20, as 20 new tokens; so do we). A caller's
`max_length` beats a `max_new_tokens` that came from the model directory (transformers' pipeline lets its own
default max_new_tokens=256 silently override a user's max_length; we don't); when the caller passes both,
max_new_tokens wins, as in transformers.
"""

from __future__ import annotations

import numbers

from ..errors import InvalidArgumentError, ModelLoadError
from .settings import OPTIONS, GenerationSettings

# transformers.GenerationConfig() defaults for the options we support (a test checks them against transformers);
# an option transformers has is also one a model directory may set, and one the pipeline takes
TRANSFORMERS_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                         "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_return_sequences": 1,
                         "min_new_tokens": 0, "num_beams": 1, "length_penalty": 1.0, "early_stopping": False,
                         # transformers' other processors, warpers and stopping criteria (None or 0: off)
                         "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                         "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                         "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                         "exponential_decay_length_penalty": None, "renormalize_logits": False,
                         "stop_strings": None, "max_time": None,
                         # speculative decoding
                         "prompt_lookup_num_tokens": None, "max_matching_ngram_size": None,
                         "num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant"}
_FROM_MODEL = set(TRANSFORMERS_DEFAULTS) | {"max_new_tokens"}


def model_defaults(generation_config: dict, config: dict) -> dict:
    """The defaults an exported model directory asks for, merged over transformers' own.

    Each value is checked here, at load: a bad default is the model directory's fault (ModelLoadError),
    not an argument error of every later call."""
    merged = dict(TRANSFORMERS_DEFAULTS)
    params = config.get("task_specific_params") or {}
    task = (params.get("text-generation") or {}) if isinstance(params, dict) else params
    for where, source in (("generation_config.json", generation_config),
                          ("config.json task_specific_params['text-generation']", task)):
        if not isinstance(source, dict):
            raise ModelLoadError(f"{where} must be a JSON object, got {type(source).__name__}",
                                 hint="fix it, or export the model again")
        for key, value in source.items():
            if key in _FROM_MODEL and value is not None:
                _check_default(key, value, where)
        for key, value in source.items():
            if key in _FROM_MODEL and value is not None:
                if key == "max_length":
                    merged.pop("max_new_tokens", None)
                if key == "max_new_tokens":
                    merged.pop("max_length", None)
                merged[key] = value
    if merged.get("max_length") == TRANSFORMERS_DEFAULTS["max_length"]:
        # transformers reads its untouched default max_length=20 as 20 *new* tokens
        merged["max_new_tokens"] = merged.pop("max_length")
    return merged


def _check_default(key: str, value, where: str) -> None:
    """One option from the model directory, checked alone (sampling on, so no rule spans two options)."""
    try:
        if key == "max_length":
            _check_max_length(value)
        else:
            GenerationSettings(**{"do_sample": True, key: value})
    except InvalidArgumentError as error:
        raise ModelLoadError(f"the model directory's {where} is invalid: {error.message}",
                             hint=f"fix or remove {key} there, or export the model again") from None


def _check_max_length(max_length) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 1:
        raise InvalidArgumentError(f"max_length must be an integer >= 1, got {max_length!r}",
                                   hint=OPTIONS["max_length"].hint)
    return int(max_length)


def resolve(defaults: dict, user: dict, *, prompt_length: int) -> GenerationSettings:
    """Settings for one call: user options over the model's defaults, lengths turned into max_new_tokens."""
    unknown = sorted(set(user) - set(OPTIONS))
    if unknown:
        raise InvalidArgumentError(f"unknown generation option(s) {', '.join(unknown)}",
                                   hint=f"allowed: {', '.join(sorted(OPTIONS))}")
    options = {**defaults, **{k: v for k, v in user.items() if v is not None}}
    if user.get("max_new_tokens") is not None:
        options.pop("max_length", None)
    elif user.get("max_length") is not None:
        options.pop("max_new_tokens", None)
    if "max_new_tokens" not in options:
        max_length = _check_max_length(options.pop("max_length"))
        if max_length <= prompt_length:
            raise InvalidArgumentError(
                f"max_length={max_length} counts the prompt, which is already {prompt_length} tokens",
                hint="raise max_length, or pass max_new_tokens (which counts only new tokens)")
        options["max_new_tokens"] = max_length - prompt_length
    options.pop("max_length", None)
    if isinstance(options.get("stop"), str):
        options["stop"] = (options["stop"],)
    elif isinstance(options.get("stop"), list):
        options["stop"] = tuple(options["stop"])
    return GenerationSettings(**options)
