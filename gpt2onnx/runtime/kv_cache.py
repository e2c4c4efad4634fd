"""The key/value cache between steps: per layer, keys and values [batch, n_head, length, head_dim].

The cache is preallocated: each tensor is a buffer [batch, n_head, capacity, head_dim] of which the first
`length` positions hold the past. The session binds every buffer as both the past input and the present
output of its layer, so a step writes its new keys and values in place after the old ones and nothing is
copied per step; the buffers grow (doubling, one copy) only when a step needs more than the capacity.
"""

from __future__ import annotations

import mmap

import numpy as np

from ..format.config import ModelConfig

_MIN_CAPACITY = 256  # positions reserved at first, so short generations never grow


class KVCache:
    """The past of every row, in the contract's order (layer 0 key, layer 0 value, layer 1 key, ...).

    `OnnxSession.run` updates the cache it is given in place and returns it; nothing outside the session
    looks inside it except through these methods and `tensors`.
    """

    def __init__(self, tensors: list[np.ndarray], length: int | None = None):
        self.buffers = tensors  # each [batch, n_head, capacity, head_dim]
        self.length = tensors[0].shape[2] if length is None else length  # positions of the past in use
        self.binding = None  # the session's binding of these buffers (see OnnxSession), rebuilt when they move
        self.logits = None  # the logits buffer bound to that binding's output, when the session reuses one

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, capacity: int = 0, *, dtype=np.float32) -> "KVCache":
        """The cache before the first step: length 0 (with room for `capacity` positions). dtype: float32, or
        int8 for an export whose cache is int8 (the session knows which)."""
        shape = (batch, config.n_head, capacity, config.head_dim)
        return cls([_allocate(shape, dtype) for _ in range(2 * config.n_layer)], length=0)

    @property
    def tensors(self) -> list[np.ndarray]:
        """The past itself: views [batch, n_head, length, head_dim] of the buffers (not copies; int8 for an
        int8 cache, whose float values are these times the export's kv scales)."""
        return [b[:, :, :self.length] for b in self.buffers]

    @property
    def batch(self) -> int:
        return self.buffers[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def reserve(self, total: int, limit: int) -> None:
        """Make room for `total` positions: at least double the capacity (up to `limit`) when it grows."""
        if total <= self.capacity:
            return
        capacity = max(total, min(limit, max(2 * self.capacity, _MIN_CAPACITY)))
        self.buffers = [self._moved(b, self.batch, capacity, lambda past: past) for b in self.buffers]
        self.binding = None

    def repeat_rows(self, times: int) -> "KVCache":
        """Each row repeated `times` times (row 0, row 0, ..., row 1, ...): one prefill, many samples."""
        buffers = [self._moved(b, self.batch * times, self.capacity, lambda past: np.repeat(past, times, axis=0))
                   for b in self.buffers]
        return KVCache(buffers, length=self.length)

    @classmethod
    def gather(cls, parts: list[tuple["KVCache", np.ndarray]], *, width: int, capacity: int = 0,
               rows: int = 0) -> "KVCache":
        """A new cache holding the given rows of several caches, right-aligned: `width` positions in use, the
        last positions of every part's past ending together at `width` (room for `capacity` in all, and for
        `rows` rows, so that more can join in place: see join).

        parts: (cache, row indices) pairs, rows in the order given, a row may repeat (one prefill shared by
        several samples). A part whose past is shorter than `width` gets zeros in front (left padding: the
        attention mask hides it, and zeros keep it finite); a longer one loses its first positions (the
        caller drops only columns that are padding in every one of its rows).
        """
        first = parts[0][0]
        batch = sum(len(r) for _, r in parts)
        rows, capacity = max(rows, batch), max(capacity, width)
        new = cls([_allocate((rows, b.shape[1], capacity, b.shape[3]), b.dtype)[:batch] for b in first.buffers],
                  length=width)
        new._write(0, parts)
        return new

    @property
    def free_rows(self) -> int:
        """Rows allocated after the batch's own (see gather's `rows`), where rows can join in place."""
        base = self.buffers[0].base
        return 0 if base is None else base.shape[0] - self.batch

    def join(self, parts: list[tuple["KVCache", np.ndarray]]) -> "KVCache":
        """This cache with the parts' rows added after its own, right-aligned, in place: only the new rows
        are copied. Needs that many free_rows and no part's past longer than this one's."""
        batch = self.batch + sum(len(r) for _, r in parts)
        new = KVCache([b.base[:batch] for b in self.buffers], length=self.length)
        new._write(self.batch, parts)
        return new

    def drop(self, rows) -> tuple["KVCache", np.ndarray]:
        """This cache without `rows`, in place: the last rows that stay move into the holes (only they are
        copied). Returns the cache and every old row's new index (-1 for a dropped row)."""
        gone = set(np.asarray(rows).tolist())
        batch = self.batch - len(gone)
        holes = sorted(r for r in gone if r < batch)
        movers = [r for r in range(batch, self.batch) if r not in gone]
        for buffer in self.buffers:
            for hole, mover in zip(holes, movers):
                buffer[hole, :, :self.length] = buffer[mover, :, :self.length]
        where = np.arange(self.batch)
        where[list(gone)] = -1
        where[movers] = holes
        return KVCache([b[:batch] for b in self.buffers], length=self.length), where

    def trim(self, columns: int) -> "KVCache":
        """This cache without its first `columns` positions (padding in every row), in place: every row's past
        moves to the front of its buffer, one row at a time (numpy's temporary for the overlap stays one row's
        size, in memory it has had before: no new pages to fault in). Returns the cache, `columns` shorter."""
        width = self.length
        for buffer in self.buffers:
            for row in range(self.batch):
                buffer[row, :, :width - columns] = buffer[row, :, columns:width]
        return KVCache(self.buffers, length=width - columns)

    def reorder(self, index) -> int:
        """Row i takes the past of row index[i], in place (beam search: each beam continues one of the last
        step's). Only rows whose source changes are copied, in an order that overwrites a row only after the
        rows reading it are done; a cycle of rows (1 <- 2 <- 1) saves one of them in a small temporary first.
        Returns the rows copied (temporaries included): 0 when every beam continues its own past, against
        a whole-cache gather's batch every step."""
        index = np.asarray(index, dtype=np.int64).tolist()
        pending = {row: source for row, source in enumerate(index) if source != row}
        readers = dict.fromkeys(range(self.batch), 0)
        for source in pending.values():
            readers[source] += 1
        ready = [row for row in pending if readers[row] == 0]
        order, saved = [], []
        while pending:
            if not ready:  # only cycles left: save one row, so that it can be overwritten
                row = next(iter(pending))
                saved.append(row)
                readers[row] = 0
                ready.append(row)
            row = ready.pop()
            source = pending.pop(row)
            order.append((row, source))
            if source not in saved:
                readers[source] -= 1
                if readers[source] == 0 and source in pending:
                    ready.append(source)
        slot = {row: i for i, row in enumerate(saved)}
        for buffer in self.buffers:
            past = buffer[:, :, :self.length]
            temporary = past[saved]  # a copy (fancy index) of the rows that cycles overwrite
            for row, source in order:
                past[row] = temporary[slot[source]] if source in slot else past[source]
        return len(order) + len(saved)

    def _write(self, at: int, parts: list[tuple["KVCache", np.ndarray]]) -> None:
        """Copy the parts' rows to rows at, at + 1, ..., right-aligned at self.length, zeros in front."""
        width = self.length
        for layer, new in enumerate(self.buffers):
            row_at = at
            for cache, rows in parts:
                keep = min(width, cache.length)
                new[row_at:row_at + len(rows), :, :width - keep] = 0
                for row in np.asarray(rows).tolist():  # one copy per row, straight from its buffer
                    new[row_at, :, width - keep:width] = cache.buffers[layer][row, :, cache.length - keep:cache.length]
                    row_at += 1

    def _moved(self, buffer: np.ndarray, batch: int, capacity: int, rows) -> np.ndarray:
        new = _allocate((batch, buffer.shape[1], capacity, buffer.shape[3]), buffer.dtype)
        new[:, :, :self.length] = rows(buffer[:, :, :self.length])
        return new


def _allocate(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed cache buffer in its own private anonymous memory map, which the kernel fills with 4 KiB pages
    as they are first touched. numpy asks for transparent huge pages for arrays of 4 MiB and more: then the
    first write anywhere in a 2 MiB region zeroes all of it, and the kernel may first compact memory to find
    one. A cache's rows are spread over the whole buffer (row, head, position), so building the 16-row cache
    the server gathers when a burst of clients joins touched every region at once: 60-240 ms, every other row
    waiting (benchmarks/results/2026-12-01-serving.md)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):  # nothing to map, or no POSIX mmap (Windows)
        return np.zeros(shape, dtype)
    return np.ndarray(shape, dtype, buffer=mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
