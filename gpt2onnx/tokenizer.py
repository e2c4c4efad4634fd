"""Text <-> token ids with the model's own tokenizer.json (the `tokenizers` library, no transformers)."""

from __future__ import annotations

from pathlib import Path

import tokenizers

from .errors import ModelLoadError

ENDOFTEXT = "<|endoftext|>"


class Tokenizer:
    """GPT-2's byte-level BPE. Special tokens typed in text stay text unless `allow_special=True`."""

    def __init__(self, path: Path):
        try:
            self._special = tokenizers.Tokenizer.from_file(str(path))
            self._plain = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:
            raise ModelLoadError(f"cannot read the tokenizer {path}: {error}",
                                 hint="export the model again; the file may be damaged") from error
        self._plain.encode_special_tokens = True  # "<|endoftext|>" typed by a user is just text
        self.eos_token_id = self._special.token_to_id(ENDOFTEXT)
        self.vocab_size = self._special.get_vocab_size()

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        tokenizer = self._special if allow_special else self._plain
        return tokenizer.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int | None:
        """The id of one token of the vocabulary (e.g. a special token), None if there is none."""
        return self._special.token_to_id(token)

    def decode(self, ids) -> str:
        return self._special.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_text(self, ids, *, clean_up: bool = False) -> str:
        """Text without special tokens, optionally with transformers' clean_up_tokenization_spaces."""
        text = self._special.decode([int(i) for i in ids], skip_special_tokens=True)
        return clean_up_tokenization(text) if clean_up else text


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of spaces before punctuation and contractions (its pipeline's default)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
