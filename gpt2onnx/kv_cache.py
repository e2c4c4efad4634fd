"""The key/value cache between steps: per layer, keys and values [batch, n_head, length, head_dim]."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig


class KVCache:
    """The past of every row, in the contract's order (layer 0 key, layer 0 value, layer 1 key, ...).

    The session returns a new cache each step; nothing outside the session looks inside it except
    through these methods.
    """

    def __init__(self, tensors: list[np.ndarray]):
        self.tensors = tensors

    @classmethod
    def empty(cls, config: ModelConfig, batch: int) -> "KVCache":
        """The cache before the first step: length 0."""
        shape = (batch, config.n_head, 0, config.head_dim)
        return cls([np.zeros(shape, np.float32) for _ in range(2 * config.n_layer)])

    @property
    def length(self) -> int:
        return self.tensors[0].shape[2]

    @property
    def batch(self) -> int:
        return self.tensors[0].shape[0]

    def repeat_rows(self, times: int) -> "KVCache":
        """Each row repeated `times` times in place (row 0, row 0, ..., row 1, ...): one prefill, many samples."""
        return KVCache([np.repeat(t, times, axis=0) for t in self.tensors])
