"""GPT-2's byte-level BPE in Python: what the `tokenizers` library does with GPT-2's tokenizer.json, for ASCII
text (encoding) and for any ids (decoding), without the library's build of the tokenizer.

Why our own: the library builds GPT-2's tokenizer in 0.12-0.25 s holding the GIL, the largest single part of a
cold start, while reading the same tables here takes about half of that and runs beside ONNX Runtime's session
initialization (which releases the GIL); from the tables an earlier load saved (`tables`, user_cache.py), less.
Text with a non-ASCII character goes to the library (Tokenizer in tokenizer.py builds it on first use): Unicode's
letter and number classes are where a second implementation could differ, and ASCII is where they cannot.
tests/test_tokenizer.py checks both against the library.
"""

from __future__ import annotations

import itertools
import json
import re

# GPT-2's pre-tokenizer, `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, on ASCII
# text: \p{L} is [A-Za-z], \p{N} is [0-9] and \s the six ASCII white-space characters (Python's own \s would
# also take \x1c-\x1f, which neither Unicode's White_Space nor the library's Oniguruma \s do)
_SPACE = r"\t\n\x0b\x0c\r "
ASCII_PIECES = re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_SPACE}A-Za-z0-9]+"
                          rf"|[{_SPACE}]+(?![^{_SPACE}])|[{_SPACE}]+")

_NO_MERGE = 2**62  # the rank of a pair that is no merge: after every merge's (the highest is below the merges' count)
_TABLES_FORMAT = 1  # tables(): bumped whenever its layout changes
_WORD_CACHE_SIZE = 65536  # words remembered with their ids (cleared when full: a server's memory stays bounded)


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte (its `bytes_to_unicode`): the printable Latin-1 bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = itertools.count(0x100)
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


_CHAR_BYTES = {char: byte for byte, char in enumerate(byte_chars())}


def token_bytes(token: str) -> bytes:
    """The bytes a token of the vocabulary stands for, as the library's ByteLevel decoder reads it: a token
    written in GPT-2's byte characters is those bytes, any other token its own UTF-8."""
    try:
        return bytes(_CHAR_BYTES[char] for char in token)
    except KeyError:
        return token.encode("utf-8")


def is_plain_gpt2(spec: dict) -> bool:
    """Whether a parsed tokenizer.json is GPT-2's kind, the one ByteLevelBpe reproduces: byte-level BPE with
    GPT-2's pattern and no prefix space, no normalizer, truncation, padding, dropout, affixes or byte fallback,
    and added tokens that are all special ones (non-special added tokens are split out of any text)."""
    model, pre, decoder = spec.get("model"), spec.get("pre_tokenizer"), spec.get("decoder")
    post = spec.get("post_processor")
    added = spec.get("added_tokens") or []
    # (a missing key means the library's default: older tokenizers versions wrote fewer of them)
    return (isinstance(model, dict) and model.get("type") == "BPE" and model.get("dropout") is None
            and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
            and model.get("byte_fallback", False) is False and model.get("ignore_merges", False) is False
            and isinstance(model.get("vocab"), dict) and isinstance(model.get("merges"), list)
            and spec.get("normalizer") is None and spec.get("truncation") is None and spec.get("padding") is None
            and isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("add_prefix_space") is False
            and pre.get("use_regex", True) is True
            and isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"
            and (post is None or isinstance(post, dict) and post.get("type") == "ByteLevel")
            and isinstance(added, list)
            and all(isinstance(token, dict) and token.get("special") is True and isinstance(token.get("id"), int)
                    and isinstance(token.get("content"), str) and token["content"]
                    and not (token.get("lstrip") or token.get("rstrip") or token.get("single_word"))
                    for token in added))


class ByteLevelBpe:
    """Encoding of ASCII text and decoding of ids, as the library does for a tokenizer.json that
    `is_plain_gpt2`. Safe to share between threads.

    Built from the parsed file (`from_spec`) or from `tables()` saved by an earlier load (`from_tables`): the
    vocabulary in id order, the merges in rank order and the added tokens. Building from those takes about half
    the time of parsing tokenizer.json and building from that (json.loads of GPT-2's 3.5 MB alone is 60-80 ms,
    one call that holds the GIL), which a cold start waits for."""

    def __init__(self, tokens: list[str], merges: list[str], added: dict[str, int]):
        """tokens: every token of the vocabulary, token i having id i; merges: "first second" by rank; added:
        the special tokens' contents and ids."""
        if any(" " in token for token in tokens):  # a merge is keyed "first second" below
            raise ValueError("a token with a space")
        self.vocab: dict[str, int] = dict(zip(tokens, itertools.count()))
        if len(self.vocab) != len(tokens):
            raise ValueError("a token twice")
        # a pair "first second" and its place in the merge order. String keys: a dict of strings and ints is
        # one the garbage collector never walks (tuple keys would add 50,000 objects to every collection)
        # (a merge listed twice takes its later place, as in the library)
        self._ranks: dict[str, int] = dict(zip(merges, itertools.count()))
        self.added = dict(added)
        self.special_ids = frozenset(self.added.values())
        self._tokens = dict(enumerate(tokens))  # id -> token (added tokens win)
        self._tokens.update((i, content) for content, i in self.added.items())
        self._ascii = dict(enumerate(byte_chars()[:128]))  # str.translate table: ASCII text to GPT-2's characters
        self._bytes: dict[int, bytes] = {}  # id -> its bytes, filled as ids are decoded
        self._words: dict[str, list[int]] = {}
        specials = sorted(self.added, key=len, reverse=True)  # the longest first where one starts another
        self._special_split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    @classmethod
    def from_spec(cls, spec: dict) -> ByteLevelBpe:
        """From a parsed tokenizer.json that `is_plain_gpt2`. ValueError when its vocabulary is not the ids
        0..n-1 (or another table cannot be read this way): the library's to read."""
        model = spec["model"]
        vocab = model["vocab"]
        tokens = sorted(vocab, key=vocab.__getitem__)
        if [vocab[token] for token in tokens] != list(range(len(tokens))):
            raise ValueError("the vocabulary's ids are not 0..n-1")
        merges = model["merges"]  # ["a b", ...] (tokenizers < 0.20) or [["a", "b"], ...]
        keys = list(map(" ".join, merges)) if merges and isinstance(merges[0], list) else merges
        if not all(isinstance(key, str) for key in keys):
            raise ValueError("a merge that is not a pair")
        return cls(tokens, keys, {token["content"]: token["id"] for token in spec.get("added_tokens") or []})

    def tables(self) -> str:
        """The tables as one text for `from_tables`: a JSON header line (counts, added tokens), then the tokens
        and the merges separated by NUL characters. ValueError when a token or merge holds a NUL (then there is
        nothing to save)."""
        merges = sorted(self._ranks, key=self._ranks.__getitem__)  # their order, each once
        items = [*self.vocab, *merges]  # the vocabulary's insertion order is its ids' (__init__)
        if any("\0" in item for item in items):
            raise ValueError("a token with a NUL character")
        header = json.dumps({"format": _TABLES_FORMAT, "tokens": len(self.vocab), "merges": len(merges),
                             "added": sorted(self.added.items(), key=lambda item: item[1])})
        return header + "\n" + "\0".join(items)

    @classmethod
    def from_tables(cls, text: str) -> ByteLevelBpe:
        """The tokenizer `tables()` wrote; ValueError (or KeyError, TypeError) for a text it did not write."""
        header, body = text.split("\n", 1)
        meta = json.loads(header)
        items = body.split("\0")
        count = meta["tokens"]
        if meta["format"] != _TABLES_FORMAT or len(items) != count + meta["merges"]:
            raise ValueError("not our tables")
        return cls(items[:count], items[count:], {content: i for content, i in meta["added"]})

    def encode(self, text: str, *, allow_special: bool = False) -> list[int] | None:
        """The ids of ASCII text; None for any other text (or a piece the vocabulary cannot spell), which is the
        library's to encode. allow_special: "<|endoftext|>" in the text is that token, not its 13 characters."""
        if not text.isascii():
            return None
        if allow_special and self._special_split is not None:
            ids = []
            for n, part in enumerate(self._special_split.split(text)):  # odd parts are the special tokens
                part_ids = [self.added[part]] if n % 2 else self.encode(part)
                if part_ids is None:
                    return None
                ids += part_ids
            return ids
        ids = []
        for piece in ASCII_PIECES.findall(text):
            word = self._words.get(piece)
            if word is None:
                word = self._word(piece)
                if word is None:
                    return None
            ids += word
        return ids

    def _word(self, piece: str) -> list[int] | None:
        """One pre-tokenized piece through the merges: the pair that comes first in the merge order is merged
        everywhere in the word, left to right, until no pair of the word is a merge."""
        ranks, word, never = self._ranks, list(piece.translate(self._ascii)), _NO_MERGE
        while len(word) > 1:
            rank, i = min((ranks.get(word[j] + " " + word[j + 1], never), j) for j in range(len(word) - 1))
            if rank == never:
                break
            first, second = word[i], word[i + 1]
            merged, i = [], 0
            while i < len(word):
                if word[i] == first and i + 1 < len(word) and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        try:
            ids = [self.vocab[token] for token in word]
        except KeyError:
            return None
        if len(self._words) >= _WORD_CACHE_SIZE:
            self._words.clear()
        self._words[piece] = ids
        return ids

    def token(self, token_id: int) -> str | None:
        """The token of an id (an added token's content); None for an id that is no token."""
        return self._tokens.get(token_id)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token stands for, added tokens too; None for an id that is no token (the library's
        decode skips those)."""
        found = self._bytes.get(token_id)
        if found is None:
            token = self._tokens.get(token_id)
            if token is None:
                return None
            found = self._bytes[token_id] = token_bytes(token)
        return found

    def decode(self, ids, *, skip_special: bool = False) -> str:
        """The text of ids, invalid UTF-8 replaced by U+FFFD (as the library's `from_utf8_lossy`)."""
        skip = self.special_ids if skip_special else ()
        pieces = (self.token_bytes(i) for i in map(int, ids) if i not in skip)
        return b"".join(piece for piece in pieces if piece is not None).decode("utf-8", "replace")
