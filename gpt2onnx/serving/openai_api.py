"""The OpenAI legacy Completions API as typed models: requests checked once, the mapping to our
GenerationSettings, and the response and stream-chunk shapes the official `openai` client parses.

Nothing here does HTTP or runs the model: `server.py` reads a body, calls `parse_completion_request` and
`prepare`, submits the prepared prompts to the engine and folds its events into `ChoiceText`s.

The mapping (OpenAI's defaults, not transformers'):

    temperature (default 1)     -> do_sample = temperature > 0, temperature (0 means greedy)
    top_p (default 1)           -> top_p
    extra top_k (default 0)     -> top_k (0: all tokens; transformers' default of 50 is NOT applied)
    max_tokens (default 16)     -> max_new_tokens
    n (default 1)               -> num_return_sequences (greedy n > 1: one row, copied n times)
    stop (<= 4 strings)         -> stop
    seed                        -> seed (one seed for every prompt of the request; none: drawn and
                                   reported in the x-gpt2onnx-seed header)
    extra repetition_penalty, min_tokens (-> min_new_tokens), no_repeat_ngram_size, ignore_eos -> same
    logit_bias, frequency_penalty, presence_penalty -> the same settings (sampling.process applies them to
                                   the raw logits first: logit -= frequency * count + presence * (count > 0);
                                   logit += bias)
    sampler                     -> "torch" (the tokens transformers gives after set_seed(seed))

so a seeded request gives the text of `model.generate(prompt, seed=s, do_sample=temperature > 0,
temperature=t, top_p=p, top_k=0, max_new_tokens=max_tokens, num_return_sequences=n, stop=stop,
allow_special_tokens=True)`. "<|endoftext|>" typed in a prompt string is the special token, as in
OpenAI's API and vLLM.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ..errors import InvalidArgumentError
from ..generation.settings import MAX_RETURN_SEQUENCES, SEED_MAX, GenerationSettings
from .options import MAX_LOGPROBS

DEFAULT_MAX_TOKENS = 16
MAX_STOP = 4
LOGIT_BIAS_LIMIT = 100.0
PENALTY_LIMIT = 2.0

# Fields whose limit is the server's (in the validation context): field -> (context key, default, what is allowed)
_SERVER_LIMITS = {"n": ("max_n", MAX_RETURN_SEQUENCES, "n must be at most {limit} on this server (its --max-batch)"),
                  "logprobs": ("max_logprobs", MAX_LOGPROBS, "logprobs must be from 0 to {limit}")}

# Our own options, sent by the openai client through extra_body (merged into the top level of the body).
EXTRAS = ("top_k", "repetition_penalty", "min_tokens", "no_repeat_ngram_size", "ignore_eos")


# --- errors --------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def validation_error(error: ValidationError) -> ApiError:
    """pydantic's first complaint as one OpenAI 400, `param` naming the field (dotted for nested ones)."""
    first = error.errors(include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    param = ".".join(loc) if loc else None
    kind, message = first["type"], first["msg"].removeprefix("Value error, ")
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {message}", None, "invalid_json")
    if kind.endswith("_type") and not loc:  # the body itself (a nested object of the wrong type names its field)
        return bad_request("the request body must be a JSON object", None, "invalid_json")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}. Supported extras (extra_body): "
                           f"{', '.join(EXTRAS)}", param, "unknown_parameter")
    if kind == "missing":
        return bad_request(f"you must provide a {param} parameter", param, "missing_required_parameter")
    if kind == "value_error":  # our own validators: the message already names the field and what is allowed
        return bad_request(message, param)
    got = first.get("input")
    shown = json.dumps(got)[:80] if _jsonable(got) else repr(got)[:80]
    return bad_request(f"{param}: {message[0].lower() + message[1:]}, got {shown}", param,
                       "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value")


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# --- requests ------------------------------------------------------------------------------------------

# The shapes the validators below accept, as JSON schema (for /openapi.json and the fuzzer; validation is theirs)
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}, _IDS,
                           {"type": "array", "items": _IDS, "minItems": 1}]}
STOP_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"},
                         {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP}]}
LOGIT_BIAS_SCHEMA = {"anyOf": [{"type": "null"}, {
    "type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
    "additionalProperties": {"type": "number", "minimum": -LOGIT_BIAS_LIMIT, "maximum": LOGIT_BIAS_LIMIT}}]}


class _Strict(BaseModel):
    # JSON types as written (1.0 is not an integer, "1" is not a number), no NaN/Infinity, unknown keys refused
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    include_usage: bool | None = None  # one last chunk, choices [], with the usage of the whole request
    include_obfuscation: bool | None = None  # accepted and ignored (no obfuscation field is sent)


class CompletionRequest(_Strict):
    """POST /v1/completions. Validate with `parse_completion_request` (it passes the limits as context)."""

    model: str | None = None  # must be the served model's name when given
    prompt: Annotated[Any, WithJsonSchema(PROMPT_SCHEMA)]  # str | list[str] | list[int] | list[list[int]] (required)
    max_tokens: int | None = Field(None, ge=0)  # None: 16; 0 only with echo (scores the prompt)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    best_of: int | None = Field(None, ge=1)  # accepted only when equal to n
    stop: Annotated[Any, WithJsonSchema(STOP_SCHEMA)] = None  # str | list[str], at most 4, not empty
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0)
    echo: bool | None = None
    logit_bias: Annotated[dict[str, float] | None, WithJsonSchema(LOGIT_BIAS_SCHEMA)] = None  # {"token id": -100..100}
    frequency_penalty: float | None = Field(None, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)
    presence_penalty: float | None = Field(None, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)
    suffix: str | None = None  # not supported (GPT-2 does not infill)
    user: str | None = None
    # ours (extra_body)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value, info: ValidationInfo):
        shape = ("prompt must be a string, a list of strings, a list of token ids or a list of lists of token "
                 "ids")
        vocab = (info.context or {}).get("vocab_size")
        if value is None:
            raise ValueError("you must provide a prompt")
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(f"{shape}, got {_kind(value)}")
        if all(isinstance(p, str) for p in value):
            return value
        if all(_is_id(t) for t in value):
            _check_ids(value, vocab, "prompt")
            return value
        if all(isinstance(p, list) for p in value):
            for i, ids in enumerate(value):
                if not ids or not all(_is_id(t) for t in ids):
                    raise ValueError(f"prompt[{i}] must be a non-empty list of token ids (integers)")
                _check_ids(ids, vocab, f"prompt[{i}]")
            return value
        raise ValueError(f"{shape}; got a list mixing {', '.join(sorted({_kind(p) for p in value}))}")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"stop must be a string or a list of up to {MAX_STOP} strings, got {_kind(value)}")
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop takes at most {MAX_STOP} sequences, got {len(stops)}")
        if not all(stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value, info: ValidationInfo):
        if value is None:
            return None
        vocab = (info.context or {}).get("vocab_size")
        bias = {}
        for key, number in value.items():
            if not (key.isascii() and key.isdigit()):  # str.isdigit alone takes "²" and Arabic-Indic digits
                raise ValueError(f"logit_bias keys must be token ids (strings of digits 0-9), got {key[:40]!r}")
            if len(key.lstrip("0")) > 9:  # past any vocabulary (and int() refuses over 4,300 digits)
                raise ValueError(f"logit_bias holds token id {key[:12]}...; ids go from 0 to "
                                 f"{vocab - 1 if vocab else '...'}")
            token = int(key)
            _check_ids([token], vocab, "logit_bias")
            if not -LOGIT_BIAS_LIMIT <= number <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"logit_bias values must be from -100 to 100, got {number} for token {token}")
            bias[token] = float(number)
        return bias

    @field_validator("n", "logprobs")
    @classmethod
    def _server_limit(cls, value, info: ValidationInfo):
        key, default, allowed = _SERVER_LIMITS[info.field_name]
        limit = (info.context or {}).get(key, default)
        if value is not None and value > limit:
            raise ValueError(f"{allowed.format(limit=limit)}, got {value}")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value):
        if value:
            raise ValueError("suffix is not supported: GPT-2 only continues text (no insertion)")
        return value

    @model_validator(mode="after")
    def _together(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise _FieldError("best_of", f"best_of must equal n ({self.n or 1}) or be left out: this server "
                                          f"returns every sequence it samples, got best_of={self.best_of}")
        if self.max_tokens == 0 and not self.echo:
            raise _FieldError("max_tokens", "max_tokens=0 is only allowed with echo=true (scoring the prompt); "
                                             "ask for at least 1 token")
        if self.stream_options is not None and not self.stream:
            raise _FieldError("stream_options", "stream_options is only allowed when stream is true")
        if self.min_tokens is not None and self.min_tokens > self.new_tokens:
            raise _FieldError("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens "
                                             f"({self.new_tokens})")
        return self

    # resolved values (OpenAI's defaults)
    @property
    def prompts_are_ids(self) -> bool:
        return isinstance(self.prompt, list) and not isinstance(self.prompt[0], str)

    @property
    def new_tokens(self) -> int:
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class _FieldError(ValueError):
    """A check of several fields at once, naming the field to blame (pydantic would report none)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _kind(value) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ids(ids: list[int], vocab: int | None, name: str) -> None:
    for token in ids:
        if token < 0 or (vocab is not None and token >= vocab):
            raise ValueError(f"{name} holds token id {token}; ids go from 0 to {vocab - 1 if vocab else '...'}")


def parse_completion_request(body: bytes, *, vocab_size: int, max_n: int,
                             max_logprobs: int = MAX_LOGPROBS) -> CompletionRequest:
    """The request in `body` (JSON), or an ApiError 400 naming the first bad field."""
    context = {"vocab_size": vocab_size, "max_n": max_n, "max_logprobs": max_logprobs}
    try:
        return CompletionRequest.model_validate_json(body or b"null", context=context)
    except ValidationError as error:
        cause = _field_cause(error)
        raise (validation_error(error) if cause is None else bad_request(str(cause), cause.param)) from None


def _field_cause(error: ValidationError) -> _FieldError | None:
    """A model-level check raised inside pydantic keeps its field name (pydantic would report loc ())."""
    for item in error.errors(include_url=False):
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):
            return cause
    return None


def parse_model(model_class: type[BaseModel], body: bytes) -> BaseModel:
    """Any other request body (tokenize, detokenize) through the same 400 envelope."""
    try:
        return model_class.model_validate_json(body or b"null")
    except ValidationError as error:
        raise validation_error(error) from None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = None  # accepted for vLLM compatibility; GPT-2 adds none
    return_token_strs: bool | None = None  # also return each token's text


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# --- the mapping -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A checked request, ready for the engine: one engine request per prompt."""

    prompts: list[str]  # the prompt texts (decoded token ids for id prompts): what echo returns
    prompt_ids: list[list[int]]
    settings: GenerationSettings
    copies: int  # choices made from each engine row: n for greedy n > 1 (one row, copied), else 1
    submit_options: dict  # the engine's submit() keywords (logprobs, echo_logprobs)
    seed: int | None  # the seed every prompt uses (drawn when the request had none and samples)


def prepare(request: CompletionRequest, *, encode, decode, n_positions: int) -> Prepared:
    """Token ids of every prompt, the context-length check and the GenerationSettings of the mapping."""
    if isinstance(request.prompt, str):
        texts = [request.prompt]
    elif request.prompts_are_ids:
        texts = None
    else:
        texts = list(request.prompt)
    if texts is not None:
        prompt_ids = [encode(text) for text in texts]
    else:
        prompt_ids = [list(request.prompt)] if isinstance(request.prompt[0], int) else [list(p) for p in request.prompt]
        texts = [decode(ids) for ids in prompt_ids]
    new_tokens = request.new_tokens
    longest = max(map(len, prompt_ids))
    if longest + new_tokens > n_positions:
        raise ApiError(400, f"This model's maximum context length is {n_positions} tokens, however you requested "
                            f"{longest + new_tokens} tokens ({longest} in your prompt; {new_tokens} for the "
                            "completion). Please reduce your prompt; or completion length.",
                       param="prompt" if longest >= n_positions or new_tokens == 0 else "max_tokens",
                       code="context_length_exceeded")
    n = request.choices_per_prompt
    greedy = request.greedy
    seed = request.seed
    if seed is None and not greedy:
        seed = secrets.randbelow(SEED_MAX + 1)  # one seed for all prompts: the request can be replayed
    temperature = 1.0 if request.temperature is None else request.temperature
    try:
        settings = GenerationSettings(
            max_new_tokens=new_tokens, min_new_tokens=request.min_tokens or 0, do_sample=temperature > 0,
            temperature=temperature, top_k=request.top_k or 0, top_p=1.0 if request.top_p is None else request.top_p,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            no_repeat_ngram_size=request.no_repeat_ngram_size or 0, num_return_sequences=1 if greedy else n,
            stop=tuple(request.stop or ()), ignore_eos=bool(request.ignore_eos), seed=None if greedy else seed,
            sampler="torch", frequency_penalty=request.frequency_penalty or 0.0,
            presence_penalty=request.presence_penalty or 0.0, logit_bias=request.logit_bias or None)
    except InvalidArgumentError as error:  # the settings' own limits, e.g. options that take a score past float32
        raise _settings_error(error) from None
    submit = {"logprobs": request.logprobs, "echo_logprobs": bool(request.echo and request.logprobs is not None)}
    return Prepared(prompts=texts, prompt_ids=prompt_ids, settings=settings, copies=n if greedy else 1,
                    submit_options=submit, seed=None if greedy else seed)


# GenerationSettings' names of the request's fields, where they differ
_SETTING_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "num_return_sequences": "n"}


def _settings_error(error: InvalidArgumentError) -> ApiError:
    """A GenerationSettings refusal as a 400 in the request's own names, `param` the field it names first."""
    message = error.message
    for setting, field in _SETTING_NAMES.items():
        message = message.replace(setting, field)
    first = message.split("=", 1)[0].split(" ", 1)[0]
    return bad_request(message, first if first in CompletionRequest.model_fields else None)


# --- responses -------------------------------------------------------------------------------------------


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """A response, and (with one choice, finish_reason null until the last) a stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2onnx"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# Our finish reasons -> OpenAI's ("eos" and a stop string are both a natural stop)
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class TokenText:
    """Each token id as OpenAI shows it in logprobs: its text, or "bytes:\\xNN..." when it is part of a
    multi-byte character (so that distinct tokens never share a name in a top_logprobs object)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer  # the model's (tokenizer.Tokenizer)
        self._names: dict[int, str] = {}  # filled as tokens are named

    def __call__(self, token_id: int) -> str:
        name = self._names.get(token_id)
        if name is None:
            name = self._names[token_id] = self._name(token_id)
        return name

    def _name(self, token_id: int) -> str:
        raw = self._tokenizer.token_bytes(token_id)
        if raw is None:
            return f"<token {token_id}>"
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class ChoiceText:
    """One choice being built from engine events: its text, its tokens' logprobs and text offsets.

    `add_*` return the chunk piece (text, logprobs or None) to stream; `text` and `logprobs` hold the whole.
    Offsets count characters of the returned text (prompt first with echo); a token inside a multi-byte
    character points at the character's start.
    """

    def __init__(self, index: int, *, decode, token_text: TokenText, logprobs: int | None):
        self.index = index
        self.decode = decode
        self.token_text = token_text
        self.k = logprobs
        self.text = ""
        self.tokens = 0  # generated tokens (usage)
        self.finish_reason: str | None = None
        self.logprobs = Logprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]) \
            if logprobs is not None else None
        self._ids: list[int] = []  # the tokens whose text is not yet all known (a character still open)
        self._closed = 0  # characters of the text before them

    def add_echo(self, prompt: str, prompt_ids: list[int], prompt_logprobs) -> tuple[str, Logprobs | None]:
        """The prompt first (echo); with logprobs, each prompt token's (the first token's is null)."""
        piece = self._piece()
        if self.logprobs is not None:
            pairs = prompt_logprobs if prompt_logprobs is not None else [(None, None)] * len(prompt_ids)
            for token, (logprob, top) in zip(prompt_ids, pairs):
                self._log(piece, token, logprob, top)
        self.text += prompt
        self._ids, self._closed = [], len(self.text)
        return prompt, piece

    def add_event(self, event) -> tuple[str, Logprobs | None]:
        piece = self._piece()
        if event.token_id is not None and event.token_id >= 0:
            self.tokens += 1
            if piece is not None:
                self._log(piece, event.token_id, event.logprob, event.top_logprobs)
        self.text += event.text
        if event.finish_reason is not None:
            self.finish_reason = FINISH_REASONS.get(event.finish_reason, event.finish_reason)
        return event.text, piece

    def _piece(self) -> Logprobs | None:
        return Logprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]) if self.k is not None else None

    def _log(self, piece: Logprobs, token: int, logprob, top) -> None:
        offset = self._offset_of_next(token)
        name = self.token_text(token)
        alternatives = None
        if logprob is not None:
            alternatives = {self.token_text(t): _finite(lp) for t, lp in (top or [])[:self.k]}
            alternatives.setdefault(name, _finite(logprob))
        for target in (piece, self.logprobs):
            target.tokens.append(name)
            target.token_logprobs.append(None if logprob is None else _finite(logprob))
            target.top_logprobs.append(alternatives)
            target.text_offset.append(offset)

    def _offset_of_next(self, token: int) -> int:
        """Characters before `token`: the closed text plus what the open tokens decode to (whole characters)."""
        offset = self._closed + len(self.decode(self._ids).rstrip("\ufffd")) if self._ids else self._closed
        self._ids.append(token)
        text = self.decode(self._ids)
        if not text.endswith("\ufffd"):  # every character is complete: close them
            self._closed += len(text)
            self._ids = []
        return offset

    def choice(self) -> CompletionChoice:
        return CompletionChoice(index=self.index, text=self.text, finish_reason=self.finish_reason,
                                logprobs=self.logprobs)


def _finite(value: float) -> float:
    """JSON has no -Infinity: a token the model can never produce gets float32's lowest value instead."""
    value = float(value)
    return value if math.isfinite(value) else (-3.4e38 if value < 0 else 3.4e38)
