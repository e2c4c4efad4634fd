"""Text <-> token ids with the model's own tokenizer.json: GPT-2's byte-level BPE in Python (bpe.py) where
that reproduces it, the `tokenizers` library (no transformers) for the rest."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from ..errors import ModelLoadError
from ..runtime import user_cache
from ..runtime.heap import collector_paused
from .bpe import ByteLevelBpe, is_plain_gpt2, token_bytes

ENDOFTEXT = "<|endoftext|>"


class Tokenizer:
    """GPT-2's byte-level BPE. Special tokens typed in text stay text unless `allow_special=True`.

    A tokenizer.json of GPT-2's kind (`bpe.is_plain_gpt2`) is read into ByteLevelBpe, which encodes ASCII text
    and decodes ids; the library's tokenizer is built only for text with another character (0.12-0.25 s, once:
    `prepare_library()` does it ahead, as a server does). Any other tokenizer.json is the library's alone."""

    def __init__(self, path: Path):
        self._path = Path(path)
        try:
            self._bytes = self._path.read_bytes()  # kept: the library is built from what load verified
        except OSError as error:
            raise ModelLoadError(f"cannot read the tokenizer {path}: {error.strerror}",
                                 hint="check the file's permissions, or export the model again") from error
        # ~150,000 objects, the tables among them kept as long as the model: read with the collector paused
        # (heap.py), 0.09-0.15 s against 0.16-0.19 s with it on, beside a cold start's heap; from the tables an
        # earlier load saved in the user cache (user_cache.py) when there are some: about half of that
        with collector_paused():
            self._bpe = self._read_tables()
        self._readers = {}  # allow_special -> the library's tokenizer, built on first use
        self._lock = threading.Lock()
        if self._bpe is None:
            plain = self._library(allow_special=False)
            self.eos_token_id = plain.token_to_id(ENDOFTEXT)
            # ids up to the largest of the model's and the added tokens' (get_vocab_size() builds the whole vocab
            # to count it: 20 ms of a cold start)
            self.vocab_size = max([plain.get_vocab_size(with_added_tokens=False)]
                                  + [i + 1 for i in plain.get_added_tokens_decoder()])
        else:
            self.eos_token_id = self.token_id(ENDOFTEXT)
            self.vocab_size = max([len(self._bpe.vocab)] + [i + 1 for i in self._bpe.special_ids])

    def _read_tables(self) -> ByteLevelBpe | None:
        """Our tokenizer of the file (None: the library's alone), from the user cache or else from the JSON
        (then saved there for the next load)."""
        digest = hashlib.sha256(self._bytes).hexdigest()
        saved = user_cache.tokenizer_tables(digest)
        if saved is not None:
            try:
                return ByteLevelBpe.from_tables(saved)
            except (ValueError, KeyError, TypeError):  # damaged: parsed and written again below
                pass
        bpe = _byte_level_bpe(self._parse())
        if bpe is not None:
            try:
                user_cache.save_tokenizer_tables(digest, bpe.tables())
            except ValueError:  # a token these tables cannot hold: parsed at every load
                pass
        return bpe

    def _parse(self):
        try:
            return json.loads(self._bytes)
        except ValueError as error:  # invalid JSON or UTF-8
            raise ModelLoadError(f"cannot read the tokenizer {self._path}: {error}",
                                 hint="export the model again; the file may be damaged") from error

    def _library(self, *, allow_special: bool):
        """The `tokenizers` library's tokenizer of this file; with allow_special=False "<|endoftext|>" typed by a
        user is just text. Built on first use (each build is 0.12-0.25 s holding the GIL)."""
        reader = self._readers.get(allow_special)
        if reader is None:
            with self._lock:
                reader = self._readers.get(allow_special)
                if reader is None:
                    import tokenizers  # here: a load that never needs it does not import it (20-90 ms)

                    try:
                        reader = tokenizers.Tokenizer.from_buffer(self._bytes)
                    except Exception as error:
                        raise ModelLoadError(f"cannot read the tokenizer {self._path}: {error}",
                                             hint="export the model again; the file may be damaged") from error
                    reader.encode_special_tokens = not allow_special
                    self._readers[allow_special] = reader
        return reader

    def prepare_library(self) -> None:
        """Build the library's tokenizer now rather than at the first non-ASCII text (a server does this at
        start, so that no request waits for it while holding the GIL)."""
        self._library(allow_special=False)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        ids = self._bpe.encode(text, allow_special=allow_special) if self._bpe is not None else None
        if ids is None:
            ids = self._library(allow_special=allow_special).encode(text, add_special_tokens=False).ids
        return ids

    def vocabulary(self) -> dict[str, int]:
        """Every token and its id (special tokens included)."""
        if self._bpe is not None:
            return {**self._bpe.vocab, **self._bpe.added}
        return self._library(allow_special=False).get_vocab(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        """The id of one token of the vocabulary (e.g. a special token), None if there is none."""
        if self._bpe is not None:
            return self._bpe.added.get(token, self._bpe.vocab.get(token))
        return self._library(allow_special=False).token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes | None:
        """What one token stands for: a special token's text (UTF-8), any other token's bytes (a part of a
        character, for some); None for an id that is no token."""
        if self._bpe is not None:
            token, special = self._bpe.token(token_id), token_id in self._bpe.special_ids
        else:
            library = self._library(allow_special=False)
            token, special = library.id_to_token(token_id), token_id in library.get_added_tokens_decoder()
        if token is None:
            return None
        return token.encode("utf-8") if special else token_bytes(token)

    def decode(self, ids) -> str:
        if self._bpe is not None:
            return self._bpe.decode(ids)
        return self._library(allow_special=False).decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_text(self, ids, *, clean_up: bool = False) -> str:
        """Text without special tokens, optionally with transformers' clean_up_tokenization_spaces."""
        if self._bpe is not None:
            text = self._bpe.decode(ids, skip_special=True)
        else:
            text = self._library(allow_special=False).decode([int(i) for i in ids], skip_special_tokens=True)
        return clean_up_tokenization(text) if clean_up else text


def _byte_level_bpe(spec) -> ByteLevelBpe | None:
    """ByteLevelBpe of a parsed tokenizer.json of GPT-2's kind; None for any other (the library reads it, and
    reports it if it is damaged)."""
    if not (isinstance(spec, dict) and is_plain_gpt2(spec)):
        return None
    try:
        return ByteLevelBpe.from_spec(spec)
    except (TypeError, ValueError, AttributeError):  # e.g. ids not 0..n-1, a merge not a pair: the library's
        return None


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of spaces before punctuation and contractions (its pipeline's default)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
