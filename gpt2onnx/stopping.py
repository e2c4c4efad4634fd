"""When a row is done: <|endoftext|>, a stop string in its new text, or max_new_tokens."""

from __future__ import annotations

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


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)
