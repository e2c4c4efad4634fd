"""GPT-2 architecture settings, read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import ModelLoadError

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
    def from_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ModelLoadError(
                f"config.json has model_type {model_type!r}; gpt2onnx handles GPT-2 models only",
                hint="pass a GPT2LMHeadModel checkpoint (model_type 'gpt2')",
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in values]
        if missing:
            raise ModelLoadError(f"config.json lacks {', '.join(missing)}", hint="is this a GPT-2 config.json?")
        config = cls(**values)
        if config.n_embd % config.n_head:
            raise ModelLoadError(f"n_embd={config.n_embd} is not a multiple of n_head={config.n_head}")
        if config.activation_function not in ACTIVATIONS:
            raise ModelLoadError(
                f"activation_function {config.activation_function!r} is not supported",
                hint=f"supported: {', '.join(ACTIVATIONS)}",
            )
        return config

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"cannot read {path}: {error}") from error
        return cls.from_dict(raw)
