"""A loaded model directory: `gpt2onnx.load(dir)` checks the manifest, opens the session and generates."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import contract as c
from .config import ModelConfig
from .errors import InvalidArgumentError
from .generator import generate
from .manifest import read_manifest
from .session import OnnxSession, SessionOptions
from .settings import GenerationSettings
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Generation:
    """One generated continuation."""

    text: str  # the new text (without the prompt)
    token_ids: list[int]  # the new token ids
    prompt_token_ids: list[int]


class Model:
    """An exported GPT-2, ready to generate. Build it with `gpt2onnx.load`."""

    def __init__(self, directory: Path, *, manifest: dict | None, options: SessionOptions = SessionOptions()):
        self.directory = Path(directory)
        self.manifest = manifest
        self.config = ModelConfig.from_file(self.directory / c.CONFIG_FILE)
        self.tokenizer = Tokenizer(self.directory / c.TOKENIZER_FILE)
        self.session = OnnxSession(self.directory / c.MODEL_FILE, self.config, options)
        path = self.directory / c.GENERATION_CONFIG_FILE
        self.generation_config = json.loads(path.read_text()) if path.is_file() else {}
        eos = self.config.eos_token_id
        self.eos_token_id = eos if eos is not None else self.tokenizer.eos_token_id

    def encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt)
        return ids if ids else [self.eos_token_id]  # an empty prompt starts from <|endoftext|>, as GPT-2 does

    def generate_ids(self, prompt_ids: list[list[int]], settings: GenerationSettings, *,
                     rng: np.random.Generator | None = None) -> list[list[int]]:
        """New token ids for each prompt (lists of ids), after checking they fit the context."""
        longest = max(len(p) for p in prompt_ids)
        if longest + settings.max_new_tokens > self.config.n_positions:
            raise InvalidArgumentError(
                f"the prompt ({longest} tokens) plus max_new_tokens ({settings.max_new_tokens}) is "
                f"{longest + settings.max_new_tokens} positions; this model has n_positions="
                f"{self.config.n_positions}",
                hint="shorten the prompt or ask for fewer new tokens")
        return generate(self.session, prompt_ids, settings, eos_id=self.eos_token_id, rng=rng)

    def generate(self, prompt: str, *, max_new_tokens: int = 20, ignore_eos: bool = False) -> Generation:
        """Greedy continuation of `prompt`.

        max_new_tokens: how many tokens to add after the prompt.
        ignore_eos: keep generating after <|endoftext|> (for fixed-length runs).
        """
        settings = GenerationSettings(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
        prompt_ids = self.encode_prompt(prompt)
        new_ids = self.generate_ids([prompt_ids], settings)[0]
        return Generation(text=self.tokenizer.decode(new_ids), token_ids=new_ids, prompt_token_ids=prompt_ids)


def load(directory: str | Path, *, threads: int = 0, check_hashes: bool = True) -> Model:
    """Load an exported model directory after checking its manifest.

    threads: ONNX Runtime intra-op threads; 0 uses one per physical core.
    check_hashes: verify the sha256 of every file against the manifest (a few seconds for large models).
    """
    manifest = read_manifest(Path(directory), check_hashes=check_hashes)
    return Model(Path(directory), manifest=manifest, options=SessionOptions(threads=threads))
