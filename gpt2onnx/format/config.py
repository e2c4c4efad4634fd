"""GPT-2 architecture settings, read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import ModelLoadError

# Activations GPT-2 checkpoints use, by their Hugging Face names.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
ACTIVATIONS = (*TANH_GELUS, "gelu", "relu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The numbers that define a GPT-2 (names as in transformers' GPT2Config)."""

    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    n_inner: int | None = None  # None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config.json") -> "ModelConfig":
        """Check and read a config.json dict; `source` names the file in error messages."""
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{source} must hold a JSON object, got a JSON {_json_kind(raw)}",
                                 hint="is this a Hugging Face config.json?")
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ModelLoadError(
                f"{source} has model_type {model_type!r}; gpt2onnx handles GPT-2 models only",
                hint="pass a GPT2LMHeadModel checkpoint (model_type 'gpt2')",
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        missing = [k for k in _REQUIRED if k not in values]
        if missing:
            raise ModelLoadError(f"{source} lacks {', '.join(missing)}", hint="is this a GPT-2 config.json?")
        for name, value in values.items():
            problem = _CHECKS[name](value)
            if problem:
                raise ModelLoadError(f"{source}: {name} must be {problem}, got {value!r}",
                                     hint=f"fix {name} in {source} (a GPT-2 checkpoint's config.json, as "
                                          "transformers writes it)")
        config = cls(**values)
        if config.n_embd % config.n_head:
            raise ModelLoadError(f"{source}: n_embd={config.n_embd} is not a multiple of n_head={config.n_head}",
                                 hint="a GPT-2's width splits evenly into its heads; is the config.json damaged?")
        if config.activation_function not in ACTIVATIONS:
            raise ModelLoadError(
                f"{source}: activation_function {config.activation_function!r} is not supported",
                hint=f"supported: {', '.join(ACTIVATIONS)}",
            )
        return config

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"cannot read {path}: {error}") from error
        return cls.from_dict(raw, source=str(path))


_REQUIRED = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value) -> str | None:
    return None if _is_int(value) and value > 0 else "a positive integer"


def _optional_positive_int(value) -> str | None:
    return None if value is None or (_is_int(value) and value > 0) else "a positive integer or null"


def _token_id(value) -> str | None:
    return None if value is None or (_is_int(value) and value >= 0) else "a token id (an integer >= 0) or null"


def _epsilon(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
    return None if ok else "a number between 0 and 1"


def _boolean(value) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _string(value) -> str | None:
    return None if isinstance(value, str) else "a string"


# What each config.json field read here may hold (a message saying what is allowed, or None if fine).
_CHECKS = {
    "n_layer": _positive_int, "n_head": _positive_int, "n_embd": _positive_int, "n_positions": _positive_int,
    "vocab_size": _positive_int, "n_inner": _optional_positive_int, "layer_norm_epsilon": _epsilon,
    "activation_function": _string, "scale_attn_weights": _boolean, "scale_attn_by_inverse_layer_idx": _boolean,
    "tie_word_embeddings": _boolean, "bos_token_id": _token_id, "eos_token_id": _token_id,
}
