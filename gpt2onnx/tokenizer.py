"""Text <-> token ids with the model's own tokenizer.json (the `tokenizers` library, no transformers)."""

from __future__ import annotations

import threading
from pathlib import Path

import tokenizers

from .errors import ModelLoadError

ENDOFTEXT = "<|endoftext|>"


class Tokenizer:
    """GPT-2's byte-level BPE. Special tokens typed in text stay text unless `allow_special=True`."""

    def __init__(self, path: Path):
        self._path = Path(path)
        try:
            self._bytes = self._path.read_bytes()  # kept: the special reader is made from what load verified
        except OSError as error:
            raise ModelLoadError(f"cannot read the tokenizer {path}: {error.strerror}",
                                 hint="check the file's permissions, or export the model again") from error
        self._plain = self._read()
        self._plain.encode_special_tokens = True  # "<|endoftext|>" typed by a user is just text
        self._special_reader = None  # the same tokenizer reading special tokens: built when first asked for
        self._lock = threading.Lock()
        self.eos_token_id = self._plain.token_to_id(ENDOFTEXT)
        # ids up to the largest of the model's and the added tokens' (get_vocab_size() builds the whole vocab
        # to count it: 20 ms of a cold start)
        self.vocab_size = max([self._plain.get_vocab_size(with_added_tokens=False)]
                              + [i + 1 for i in self._plain.get_added_tokens_decoder()])

    def _read(self) -> tokenizers.Tokenizer:
        try:
            return tokenizers.Tokenizer.from_buffer(self._bytes)
        except Exception as error:
            raise ModelLoadError(f"cannot read the tokenizer {self._path}: {error}",
                                 hint="export the model again; the file may be damaged") from error

    @property
    def _special(self) -> tokenizers.Tokenizer:
        """The reader of "<|endoftext|>" as the token: made on first use, not at load (building GPT-2's
        tokenizer a second time is 0.1 s of a cold start that most runs do not need)."""
        if self._special_reader is None:
            with self._lock:
                if self._special_reader is None:
                    self._special_reader = self._read()
        return self._special_reader

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        tokenizer = self._special if allow_special else self._plain
        return tokenizer.encode(text, add_special_tokens=False).ids

    def vocabulary(self) -> dict[str, int]:
        """Every token and its id (special tokens included)."""
        return self._plain.get_vocab(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        """The id of one token of the vocabulary (e.g. a special token), None if there is none."""
        return self._plain.token_to_id(token)

    def decode(self, ids) -> str:  # (encode_special_tokens changes encoding only)
        return self._plain.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_text(self, ids, *, clean_up: bool = False) -> str:
        """Text without special tokens, optionally with transformers' clean_up_tokenization_spaces."""
        text = self._plain.decode([int(i) for i in ids], skip_special_tokens=True)
        return clean_up_tokenization(text) if clean_up else text


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of spaces before punctuation and contractions (its pipeline's default)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
