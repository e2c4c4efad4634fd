"""PyTorch's CPU random stream, replayed with numpy: the draws transformers' sampling makes.

After `transformers.set_seed(seed)`, `model.generate(do_sample=True)` picks every token with
`torch.multinomial(probs, num_samples=1)`, and nothing else draws from torch's generator. On the CPU that
call is (ATen `multinomial`, the one-sample path):

    q = torch.empty_like(probs).exponential_(1)   # one value per element of the whole [batch, vocab] tensor
    tokens = argmax(probs / q, dim=-1)            # float32 division; the first maximum wins, NaN beats all

`exponential_` fills the tensor element after element, row-major, from the default generator: an MT19937
seeded with the classic `init_genrand(seed mod 2**32)`. Each element takes two 32-bit words:

    u = ((first << 32 | second) mod 2**53) * 2**-53   # float64 in [0, 1)
    q = float32(-log1p(-u))                          # the C library's log1p, in float64

`TorchGenerator` replays exactly that with numpy's MT19937, so a seed gives the same tokens as in
transformers without importing torch. Checked bit for bit against torch 2.13.0 (CPU wheel, x86-64, MKL
build, 1 and 2 threads) and transformers 4.57 by tests/test_torch_random.py; run them again after upgrading
either. Not replicated: CUDA/MPS generators (other algorithms), probabilities in dtypes other than float32.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from ..errors import InvalidArgumentError

_LOW_21 = np.uint64(2**21 - 1)  # the bits of the first word that reach the 53-bit uniform number
# a float64 lies on the rounding edge between two float32 values when its low 29 mantissa bits are ~2**28
_LOW_29, _HALF_29, _EDGE = np.int64(2**29 - 1), np.int64(2**28), 64
_BLOCK = 2**16  # exponentials drawn per block


class TorchGenerator:
    """torch's default CPU generator after `torch.manual_seed(seed)`, as far as sampling uses it.

    seed: 0 .. 2**32-1, the values `transformers.set_seed` accepts (torch alone also takes other integers
    and keeps their low 32 bits). Successive calls continue the stream as successive torch calls would.
    """

    def __init__(self, seed: int):
        self.seed = _checked_seed(seed)
        # RandomState seeds an int with init_genrand, as torch does (and NEP 19 freezes that seeding)
        key = np.random.RandomState(self.seed).get_state()[1]
        self.bit_generator = np.random.MT19937(0)
        self.bit_generator.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}

    def exponential(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """`torch.empty(shape).exponential_(1)`: float32 values, two words of the stream each."""
        out = np.empty(int(np.prod(shape)), np.float32)
        for start in range(0, out.size, _BLOCK):  # in blocks: numpy's temporary arrays stay small
            block = out[start:start + _BLOCK]
            block[:] = _exponential(self.bit_generator.random_raw(2 * block.size))
        return out.reshape(shape)

    def multinomial_one(self, probs: np.ndarray) -> np.ndarray:
        """`torch.multinomial(probs, 1)[:, 0]`: one token id (int64) per row of float32 `probs` [batch, vocab].

        The stream moves on by one exponential per element, whatever the probabilities, so rows whose
        token the caller ignores (finished sequences) must still be passed, as transformers does.
        """
        probs = _checked_probs(probs)
        # torch draws q for the whole tensor, row after row; one row at a time keeps numpy's arrays small
        return np.array([self._argmax_ratio(row) for row in probs], np.int64)

    def multinomial(self, probs: np.ndarray, k: int) -> np.ndarray:
        """`torch.multinomial(probs, k)` (without replacement): k token ids (int64) per row of float32 `probs`
        [batch, vocab], as beam sampling draws them.

        ATen's CPU path for it is the one-sample path's q (one exponential per element, row after row) and
        `torch.topk(probs / q, k)`: the k largest ratios, largest first. Equal ratios (only zeros in practice,
        when fewer than k tokens have a probability) come lowest index first; torch leaves their order to its
        sort. A NaN ratio (p = 0 and q = 0, odds 2**-53 per element) counts as the largest, as in torch.
        """
        probs = _checked_probs(probs)
        if not 1 <= k <= probs.shape[-1]:
            raise InvalidArgumentError(f"k must be from 1 to {probs.shape[-1]}, got {k!r}",
                                       hint="torch cannot draw more samples than categories without replacement")
        out = np.empty((len(probs), k), np.int64)
        for row, p in enumerate(probs):
            ratios = self._ratios(p)
            ratios[np.isnan(ratios)] = np.inf
            top = np.argpartition(-ratios, k - 1)[:k] if k < p.size else np.arange(p.size)
            out[row] = top[np.lexsort((top, -ratios[top]))]
        return out

    def _argmax_ratio(self, p: np.ndarray) -> int:
        """argmax(p / q) for one row, drawing its q from the stream."""
        return _argmax_ratio(p, self.bit_generator.random_raw(2 * p.size))

    def _ratios(self, p: np.ndarray) -> np.ndarray:
        """p / q (float32) for one row, drawing its q from the stream."""
        words = self.bit_generator.random_raw(2 * p.size)
        with np.errstate(divide="ignore", invalid="ignore"):  # p / 0 and 0 / 0 pass silently, as in torch
            nonzero = p != 0
            if np.count_nonzero(nonzero) > p.size // 4:
                return p / _exponential(words)
            # Mostly zeros (after top-k or top-p). Where p = 0 and the second word isn't 0, u > 0 so q > 0 and
            # p / q is exactly 0: no q needed there. (When u = 0, odds 2**-53, q = 0 and a zero probability
            # gives 0 / 0 = NaN, which wins, as in torch.)
            live = nonzero | (words[1::2] == 0)
            ratios = np.zeros(p.size, np.float32)
            ratios[live] = p[live] / _exponential(words.reshape(-1, 2)[live].ravel())
        return ratios



def _argmax_ratio(p: np.ndarray, words: np.ndarray) -> int:
    """argmax(float32(p / q)) for one row, q the exponentials of the word pairs, computing q only where it can win.

    Computing q for every entry (MT19937 words -> float64 -> log1p -> float32) is most of the cost of a draw
    over the whole vocabulary, yet only the few entries whose ratio could reach the maximum matter. The first
    word alone bounds q from below: with a = first & (2**21 - 1), u = (a * 2**32 + second) * 2**-53 >= a * 2**-21,
    and q = float32(-log1p(-u)) >= u (1 - 2**-24) (-log1p(-u) >= u; rounding to float32 loses at most 2**-24
    relatively, the C library's log1p far less; q is never subnormal: u > 0 gives q > 1e-16).
    So for the candidates  {a <= float32(p * c)},  c = 2**21 k (1 + 2**-20), k a power of two, every other entry
    has a > p c (1 - 2**-24) (a float32 product is within 2**-24 of the real one, or below 2**-126 when a >= 1
    is larger anyway), hence q > p k (1 + 2**-20)(1 - 2**-24)**2 >= p k: its real ratio p / q is below 1 / k and,
    rounding being monotone and 1 / k a float32, its float32 ratio at most 1 / k. If the best candidate's exact
    ratio beats 1 / k (or is NaN: 0 / 0, which torch lets win), no other entry can reach it, and the candidates
    in index order keep torch's rule that the first maximum wins. Entries with q = 0 (u = 0, odds 2**-53 each)
    have a = 0 and are always candidates. The expected number of candidates is about k + vocab * 2**-21, and the
    maximum of p / q stays at or below 1 / k with probability exp(-k) (P(max <= x) = exp(-sum(p) / x)): k = 8
    keeps ~8 candidates and fails 1 time in 3,000; then k = 2**10, 2**40, then every q. Same integer as the
    full computation, bit for bit (tests/test_torch_random.py).
    """
    first = (words[0::2] & _LOW_21).astype(np.float32)  # a: exact in float32 (21 bits)
    pairs = words.reshape(-1, 2)
    with np.errstate(divide="ignore", invalid="ignore"):  # p / 0 and 0 / 0 pass silently, as in torch
        for k in (8.0, 2.0**10, 2.0**40):
            candidates = np.flatnonzero(first <= p * np.float32(2**21 * k * (1 + 2**-20)))
            ratios = p[candidates] / _exponential(pairs[candidates].ravel())
            best = int(ratios.argmax()) if candidates.size else 0
            if candidates.size and not ratios[best] <= np.float32(1 / k):
                return int(candidates[best])
        return int(np.argmax(p / _exponential(words)))  # all ratios tiny (subnormal probabilities): every q


def _exponential(words: np.ndarray) -> np.ndarray:
    """float32 Exp(1) values from pairs of raw 32-bit words, as ATen's CPU `exponential_` computes them."""
    first, second = words[0::2], words[1::2]
    minus_u = (((first & _LOW_21) << np.uint64(32)) | second).astype(np.float64) * -(2.0**-53)
    logs = np.log1p(minus_u)
    # numpy's vectorised log1p can be 1 ulp off the C library's, which torch calls. That changes the float32
    # result only near a rounding edge, so redo the values within 64 ulps of one (1 in 4 million) with math.log1p.
    edge = np.flatnonzero(abs((logs.view(np.int64) & _LOW_29) - _HALF_29) <= _EDGE)
    logs[edge] = [math.log1p(x) for x in minus_u[edge]]
    return -logs.astype(np.float32)


def _checked_seed(seed: int) -> int:
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or not 0 <= value < 2**32:
        raise InvalidArgumentError(f"seed must be an integer from 0 to 2**32-1, got {seed!r}",
                                   hint="transformers.set_seed accepts the same range; use seed % 2**32")
    return value


def _checked_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.dtype != np.float32 or probs.ndim != 2:
        raise InvalidArgumentError(f"probs must be float32 [batch, vocab], got {probs.dtype} {list(probs.shape)}",
                                   hint="pass the float32 softmax of the scores, as transformers does")
    # torch's own checks, with its reasons
    if not (probs.min() >= 0 and probs.max() < np.inf):
        raise InvalidArgumentError("probability tensor contains either `inf`, `nan` or element < 0",
                                   hint="check the scores for NaN before the softmax")
    if not probs.sum(axis=-1).all():
        raise InvalidArgumentError("invalid multinomial distribution (sum of probabilities <= 0)",
                                   hint="every row needs at least one token left after filtering")
    return probs
