"""When a row is done: <|endoftext|>, a stop string in its new text, a stop string completed by a token
(transformers' stop_strings), max_time, or max_new_tokens."""

from __future__ import annotations

import time

import numpy as np

EOS, STOP, LENGTH = "eos", "stop", "length"


class StopStrings:
    """Watches each row's new text for stop strings, decoding only the tail that could hold one."""

    def __init__(self, stop: tuple[str, ...], decode, rows: int):
        self.stop = stop
        self.decode = decode
        # a stop string of L characters lies within the last 4 L + 1 tokens (a token is >= 1 byte)
        self.window = 4 * max((len(s) for s in stop), default=0) + 1
        self.tokens: list[list[int]] = [[] for _ in range(rows)]

    def update(self, next_ids: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Record one token per active row; True where a row's new text now contains a stop string."""
        hit = np.zeros(len(next_ids), dtype=bool)
        if not self.stop:
            return hit
        for row in np.flatnonzero(active):
            self.tokens[row].append(int(next_ids[row]))
            tail = self.decode(self.tokens[row][-self.window:])
            hit[row] = any(s in tail for s in self.stop)
        return hit


class ReleasedText:
    """One row's new text as its tokens arrive, released the way Model.stream and the engine send it: never a
    partial character, never the start of a possible stop string, so the released pieces join to the final
    text (cut before the first stop string).

    Each token costs a decode of the tokens since the last character boundary only (a byte-level BPE's text is
    the concatenation of its tokens' texts wherever the bytes so far end a character), and a search for stop
    strings in the text that could hold a new one.
    """

    def __init__(self, stop: tuple[str, ...], decode):
        self.stop, self.decode = stop, decode
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be completing
        self.tokens: list[int] = []
        self.text = ""  # the whole text so far, cut before the first stop string
        self.hit = False  # a stop string was found (the row is done: add no more tokens)
        self._fixed, self._fixed_tokens = "", 0  # text of tokens[:_fixed_tokens], ending on a character boundary
        self._sent = 0  # characters released so far

    def add(self, token: int) -> str:
        """Record one token; the text it releases ("" while a partial character or possible stop is held back)."""
        self.tokens.append(token)
        tail = self.decode(self.tokens[self._fixed_tokens:])
        text = self._fixed + tail
        searched = max(0, len(self._fixed) - self.hold)  # text before this holds no stop string (searched already)
        if not tail.endswith("\ufffd"):  # a partial character decodes to U+FFFD: cut after whole characters only
            self._fixed, self._fixed_tokens = text, len(self.tokens)
        if self.stop:
            cut, self.hit = cut_at_stop(text[searched:], self.stop)
            text = text[:searched] + cut
        self.text = text
        ready = min(len(text.rstrip("\ufffd")), len(text) - self.hold)
        if ready <= self._sent:
            return ""
        piece, self._sent = text[self._sent:ready], ready
        return piece

    def finish(self) -> str:
        """The text not released yet (all of it is final now)."""
        rest, self._sent = self.text[self._sent:], len(self.text)
        return rest


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class StopStringsKept:
    """transformers' stop_strings (StopStringCriteria): a row ends at the token that completes a stop string,
    and keeps it — unlike `stop`, which is matched on the decoded new text and cut from it.

    As transformers does, each token stands for its own text (decoded alone: a piece of a multi-byte character
    is "\ufffd"), the prompt counts (left padding included), and a string matches only where it ends inside
    the newest token: the last L tokens are read, L the longest string's length (a token is >= 1 character).
    """

    def __init__(self, strings: tuple[str, ...], token_text, sequences: list[list[int]]):
        self.strings = strings
        self.token_text = token_text  # token id -> its text alone
        self.longest = max(len(s) for s in strings)
        self.tails = [list(row[-self.longest:]) for row in sequences]  # each row's last tokens so far

    def update(self, next_ids: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Record one token per active row; True where it completed a stop string."""
        hit = np.zeros(len(next_ids), dtype=bool)
        for row in np.flatnonzero(active):
            tail = self.tails[row]
            tail.append(int(next_ids[row]))
            del tail[:-self.longest]
            hit[row] = completes(self.strings, self.token_text, tail)
        return hit


def completes(strings: tuple[str, ...], token_text, tokens: list[int]) -> bool:
    """Whether one of `strings` ends inside the text of the last of `tokens` (StopStringCriteria's match)."""
    texts = [token_text(t) for t in tokens[-max(len(s) for s in strings):]]
    joined = "".join(texts)
    newest = len(joined) - len(texts[-1])  # where the last token's text starts
    return any(joined.find(s, max(0, newest - len(s) + 1)) >= 0 for s in strings)


class Deadline:
    """transformers' max_time (MaxTimeCriteria): every row ends once a step finishes after max_time seconds."""

    def __init__(self, max_time: float):
        self.end = time.monotonic() + max_time

    def update(self, next_ids: np.ndarray, active: np.ndarray) -> np.ndarray:
        return np.full(len(next_ids), time.monotonic() > self.end)


def eos_ids(eos_id: int | tuple[int, ...]) -> tuple[int, ...]:
    """The end-of-text tokens as a tuple: eos_id is one id, or a tuple of several (transformers' eos_token_id
    list, whose every id ends a row)."""
    return eos_id if isinstance(eos_id, tuple) else (eos_id,)


def is_eos(tokens: np.ndarray, eos_id: int | tuple[int, ...]) -> np.ndarray:
    """Where `tokens` are an end-of-text token: eos_id, or any of a tuple of them (transformers' eos_token_id list,
    whose every id ends a row)."""
    return np.isin(tokens, eos_id) if isinstance(eos_id, tuple) else tokens == eos_id


def ended_by_eos(tokens: np.ndarray, eos_id: int | tuple[int, ...] | None, *, ignore_eos: bool) -> np.ndarray | None:
    """Where `tokens` end their rows as end of text: any end token (eos_id, or a tuple of them), unless ignore_eos;
    None when no token can (ignore_eos, or no end token). The rule generate, stream, beams, speculation and the
    engine all follow; `ends_text` is the same for one token."""
    return None if ignore_eos or eos_id is None else is_eos(tokens, eos_id)


def ends_text(token: int, eos_id: int | tuple[int, ...], *, ignore_eos: bool) -> bool:
    """Whether one new token ends its row as end of text (ended_by_eos for one token, without numpy)."""
    return not ignore_eos and token in eos_ids(eos_id)


def finish_reason(*, by_eos: bool, stop_cut: bool, stop_kept: bool) -> str:
    """Why a finished row ended: a stop string found in its text (cut) or completed by its last token (kept,
    unless that token was an end token) is STOP; else an end token is EOS; else LENGTH (max_new_tokens or
    max_time)."""
    return STOP if stop_cut or (stop_kept and not by_eos) else EOS if by_eos else LENGTH


def first_eos(eos_id: int | tuple[int, ...]) -> int:
    """The token finished rows are padded with: the end-of-text token, the first of several (transformers' default
    pad_token_id)."""
    return eos_ids(eos_id)[0]


def any_of(*criteria):
    """One `stopped(next_ids, live)` callback from several (None ones left out); None when there are none."""
    criteria = [c for c in criteria if c is not None]
    if not criteria:
        return None

    def stopped(next_ids: np.ndarray, active: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(next_ids), dtype=bool)
        for criterion in criteria:
            hit |= criterion.update(next_ids, active)
        return hit

    return stopped
