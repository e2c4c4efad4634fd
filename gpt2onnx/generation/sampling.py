"""Choosing the next token: a pure function of (logits, the sequences so far, settings, random generator).

The logits are processed exactly in transformers' order and arithmetic (float32, its
`GenerationMixin._get_logits_processor`), after OpenAI's frequency and presence penalties and logit bias (on the
raw logits, first, as OpenAI and vLLM apply them): sequence bias, repetition penalty, no-repeat n-grams, bad words,
min_new_tokens, forced BOS / EOS, exponential decay length penalty, suppressed tokens, tokens suppressed at
the beginning; then, when sampling, temperature, top-k, top-p, min-p, typical-p, epsilon and eta cut-offs;
last the log-softmax of renormalize_logits. Softmax; one draw per row. Temperature 0 (or do_sample=False)
is greedy: argmax of the processed logits (the warpers do not apply, as in transformers).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from ..runtime import cpu
from ..text.stopping import eos_ids
from .settings import SCORE_LIMIT, GenerationSettings

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def sample(logits: np.ndarray, sequences: np.ndarray, new_tokens: int, settings: GenerationSettings, rng, *,
           eos_id: int | tuple[int, ...] | None) -> np.ndarray:
    """Next token id of every row.

    logits: [batch, vocab] for the last position. sequences: [batch, length] every token so far, left
    padding included (transformers' processors see it too). new_tokens: tokens generated so far.
    rng: None for greedy; a numpy Generator, or a gpt2onnx.generation.torch_random.TorchGenerator to replay
    PyTorch's stream. eos_id: the end-of-text token, or a tuple of several (transformers' eos_token_id list:
    min_new_tokens and the length penalty act on every one of them); None: no processor touches one.
    """
    return choose(process(logits, sequences, new_tokens, settings, eos_id=eos_id), settings, rng)


def choose(scores: np.ndarray, settings: GenerationSettings, rng) -> np.ndarray:
    """Next token id of every row from its processed scores: argmax when greedy, else one draw."""
    if settings.greedy:
        return scores.argmax(axis=-1)
    return draw(softmax(scores), rng)


def process(logits: np.ndarray, sequences: np.ndarray, new_tokens: int, settings: GenerationSettings, *,
            eos_id: int | tuple[int, ...] | None, min_tokens_to_keep: int = 1) -> np.ndarray:
    """The logits after transformers' processors and (when sampling) warpers, as float32.

    min_tokens_to_keep: every warper keeps at least this many tokens (transformers' beam sampling: 1 + eos ids).
    eos_id: see sample (an int or tuple indexes the vocabulary axis alike).

    The prompt width (left padding included), which transformers' position-dependent processors count from,
    is sequences.shape[1] - new_tokens."""
    s = settings
    length = sequences.shape[1]  # transformers' cur_len
    width = length - new_tokens  # its input_ids_seq_length: the padded prompt
    if s.greedy and not _changes(s, new_tokens, eos_id):
        # greedy decoding with no processor reads the logits as they are: a copy of the vocabulary per step saved
        return np.asarray(logits, dtype=np.float32)
    scores = np.array(logits, dtype=np.float32)  # a copy: every step below may write in place
    fixed = _prepare(s, eos_id, scores.shape[-1])  # the arrays the settings alone decide, built once
    if s.frequency_penalty or s.presence_penalty:  # OpenAI's, over the tokens each row generated so far
        _penalize(scores, sequences[:, length - new_tokens:], s)
    if fixed.logit_bias is not None:  # OpenAI's logit_bias
        ids, values = fixed.logit_bias
        scores[:, ids] += values
    if fixed.sequence_bias is not None:  # SequenceBiasLogitsProcessor
        scores = _sequence_bias(scores, sequences, fixed.sequence_bias)
    if s.repetition_penalty != 1.0:  # RepetitionPenaltyLogitsProcessor
        # tokens already in the row: negative scores are multiplied, positive ones divided
        seen = np.take_along_axis(scores, sequences, axis=1)
        penalty = np.float32(s.repetition_penalty)
        np.put_along_axis(scores, sequences, np.where(seen < 0, seen * penalty, seen / penalty), axis=1)
    if s.no_repeat_ngram_size > 0:  # NoRepeatNGramLogitsProcessor
        for row, banned in enumerate(_banned_ngram_tokens(sequences, s.no_repeat_ngram_size)):
            scores[row, banned] = -np.inf
    if fixed.bad_words is not None:  # NoBadWordsLogitsProcessor: a sequence bias of -inf; [eos] alone is never banned
        scores = _sequence_bias(scores, sequences, fixed.bad_words)
    if eos_id is not None and new_tokens < s.min_new_tokens:  # MinNewTokensLengthLogitsProcessor
        scores[:, eos_id] = -np.inf
    if s.forced_bos_token_id is not None and length == 1:  # ForcedBOSTokenLogitsProcessor
        scores = _only(scores, fixed.forced_bos)
    if s.forced_eos_token_id is not None and new_tokens == s.max_new_tokens - 1:  # ForcedEOSTokenLogitsProcessor
        scores = _only(scores, fixed.forced_eos)
    if s.exponential_decay_length_penalty and eos_id is not None:  # ExponentialDecayLengthPenalty
        start, factor = s.exponential_decay_length_penalty
        if new_tokens > start:  # transformers: cur_len > start + input_ids_seq_length
            try:
                growth = factor ** (new_tokens - start) - 1  # in Python floats, then float32, as torch
            except OverflowError:
                growth = math.inf
            eos = scores[:, eos_id]
            with np.errstate(over="ignore", invalid="ignore"):
                raised = eos + np.abs(eos) * np.float32(min(growth, _FLOAT32_MAX))
            # where transformers' float32 gives inf or NaN: a banned end token (-inf: min_new_tokens, n-grams) stays
            # banned, and one raised past the range gets the largest score the temperature keeps finite (certain)
            limit = np.float32(SCORE_LIMIT * (1.0 if s.greedy else min(s.temperature, 1.0)))
            scores[:, eos_id] = np.where(eos == -np.inf, eos, np.clip(raised, -limit, limit))
    if s.suppress_tokens:  # SuppressTokensLogitsProcessor
        scores[:, fixed.suppress] = -np.inf
    if s.begin_suppress_tokens:  # SuppressTokensAtBeginLogitsProcessor
        begin = width if width > 1 or s.forced_bos_token_id is None else width + 1
        if length == begin:
            scores[:, fixed.begin_suppress] = -np.inf
    if not s.greedy:
        _warp(scores, s, min_tokens_to_keep)
    if s.renormalize_logits:  # LogitNormalization, always the last
        scores = log_softmax(scores)
    return scores


def _warp(scores: np.ndarray, s: GenerationSettings, keep: int) -> None:
    """transformers' warpers, in its order, in place (sampling only). keep: min_tokens_to_keep, 1 without beams;
    with 1 each warper's own rule already keeps the top token."""
    if s.temperature != 1.0:  # TemperatureLogitsWarper
        scores /= np.float32(s.temperature)
    top_k = max(s.top_k, keep) if s.top_k else 0
    if top_k and top_k < scores.shape[-1]:  # TopKLogitsWarper
        kth = -np.partition(-scores, top_k - 1, axis=-1)[:, top_k - 1 : top_k]
        scores[scores < kth] = -np.inf  # ties with the k-th score stay, as with torch.topk
    if s.top_p < 1.0:  # TopPLogitsWarper
        # sort ascending; drop tokens while the cumulative probability is <= 1 - top_p (the top one stays)
        order = np.argsort(scores, axis=-1, kind="stable")
        cumulative = _cumsum(torch_softmax(np.take_along_axis(scores, order, axis=-1)))
        drop_sorted = cumulative <= np.float32(1 - s.top_p)
        drop_sorted[:, -keep:] = False
        _drop_sorted(scores, order, drop_sorted)
    if s.min_p is not None:  # MinPLogitsWarper: below min_p x the top probability (the top token always stays)
        probs = softmax(scores)
        scores[_kept(probs < np.float32(s.min_p) * probs.max(axis=-1, keepdims=True), scores, keep)] = -np.inf
    if s.typical_p < 1.0:  # TypicalLogitsWarper
        normalized = log_softmax(scores)
        with np.errstate(invalid="ignore"):  # -inf x 0 is NaN, left out of the sum as torch's nansum does
            entropy = -np.nansum(normalized * np.exp(normalized), axis=-1, keepdims=True, dtype=np.float32)
        shifted = np.abs(-normalized - entropy)  # how far each token's surprise is from the entropy
        order = np.argsort(shifted, axis=-1, kind="stable")
        distance = np.take_along_axis(shifted, order, axis=-1)
        cumulative = _cumsum(torch_softmax(np.take_along_axis(scores, order, axis=-1)))
        last = np.minimum((cumulative < np.float32(s.typical_p)).sum(axis=-1, keepdims=True), scores.shape[-1] - 1)
        drop_sorted = distance > np.take_along_axis(distance, last, axis=-1)
        drop_sorted[:, :keep] = False
        _drop_sorted(scores, order, drop_sorted)
    if 0 < s.epsilon_cutoff < 1:  # EpsilonLogitsWarper (the top token always stays)
        probs = torch_softmax(scores)
        drop = (probs < np.float32(s.epsilon_cutoff)) & (scores < scores.max(axis=-1, keepdims=True))
        scores[_kept(drop, scores, keep)] = -np.inf
    if 0 < s.eta_cutoff < 1:  # EtaLogitsWarper: epsilon scaled by the entropy (the top token always stays)
        probs = torch_softmax(scores)
        eta = np.float32(s.eta_cutoff)
        eta = np.minimum(eta, np.sqrt(eta) * np.exp(-_entropy(scores)))
        scores[_kept((probs < eta) & (scores < scores.max(axis=-1, keepdims=True)), scores, keep)] = -np.inf


def _penalize(scores: np.ndarray, generated: np.ndarray, s: GenerationSettings) -> None:
    """OpenAI's penalties in place: logit -= frequency x count + presence, for each token a row generated (count
    times); the other tokens are left as they are."""
    frequency, presence = np.float32(s.frequency_penalty), np.float32(s.presence_penalty)
    for row, tokens in enumerate(generated):
        if len(tokens):
            ids, times = np.unique(tokens, return_counts=True)
            scores[row, ids] -= frequency * times.astype(np.float32) + presence


def _kept(drop: np.ndarray, scores: np.ndarray, keep: int) -> np.ndarray:
    """`drop` [batch, vocab] with the `keep` highest scores of every row taken out of it (min_tokens_to_keep > 1)."""
    if keep > 1:
        top = np.argpartition(-scores, keep - 1, axis=-1)[:, :keep]
        np.put_along_axis(drop, top, False, axis=-1)
    return drop


def _changes(s: GenerationSettings, new_tokens: int, eos_id: int | tuple[int, ...] | None) -> bool:
    """Whether any processor that also applies when greedy is set (min_new_tokens: still in force)."""
    return bool(s.frequency_penalty or s.presence_penalty or s.logit_bias
                or s.sequence_bias or s.repetition_penalty != 1.0 or s.no_repeat_ngram_size > 0 or s.bad_words_ids
                or (eos_id is not None and new_tokens < s.min_new_tokens) or s.forced_bos_token_id is not None
                or s.forced_eos_token_id is not None or s.exponential_decay_length_penalty or s.suppress_tokens
                or s.begin_suppress_tokens or s.renormalize_logits)


@dataclasses.dataclass(frozen=True)
class _Bias:
    """A sequence bias ready to add: transformers' SequenceBiasLogitsProcessor, and bad words as a bias of -inf."""

    single: np.ndarray  # [vocab] float32: the one-token sequences' biases (a later pair overrides an earlier one)
    longer: tuple[tuple[np.ndarray, int, np.float32], ...]  # (every token but the last, the last, the bias), in order

    @classmethod
    def of(cls, pairs, vocab: int) -> _Bias:
        single = np.zeros(vocab, np.float32)
        for ids, value in pairs:
            if len(ids) == 1:
                single[ids[0]] = value
        single = np.float32(0) + single  # as transformers adds it to zeros (-0.0 becomes 0.0)
        single.flags.writeable = False
        longer = tuple((np.array(ids[:-1]), ids[-1], np.float32(value)) for ids, value in pairs if len(ids) > 1)
        return cls(single, longer)


@dataclasses.dataclass(frozen=True)
class _Fixed:
    """What `process` needs from the settings alone (token-id arrays, bias vectors), built once per settings."""

    logit_bias: tuple[np.ndarray, np.ndarray] | None  # (token ids, float32 biases)
    sequence_bias: _Bias | None
    bad_words: _Bias | None
    suppress: np.ndarray | None
    begin_suppress: np.ndarray | None
    forced_bos: np.ndarray | None
    forced_eos: np.ndarray | None


@functools.lru_cache(maxsize=32)
def _prepare(s: GenerationSettings, eos_id: int | tuple[int, ...] | None, vocab: int) -> _Fixed:
    """The arrays `process` uses at every step, from the settings (frozen, hence hashable): built on a
    generation's first step, reused by the others (and by later calls with equal settings)."""
    alone = [(e,) for e in eos_ids(eos_id)]  # an eos token alone: kept
    words = tuple((w, -math.inf) for w in s.bad_words_ids or () if w not in alone)
    ids = (s.suppress_tokens, s.begin_suppress_tokens,
           None if s.forced_bos_token_id is None else (s.forced_bos_token_id,), s.forced_eos_token_id)
    arrays = [None if i is None else np.array(i, dtype=np.int64) for i in ids]
    logit_bias = None if not s.logit_bias else (np.array([t for t, _ in s.logit_bias], np.int64),
                                                 np.array([b for _, b in s.logit_bias], np.float32))
    return _Fixed(logit_bias, _Bias.of(s.sequence_bias, vocab) if s.sequence_bias else None,
                  _Bias.of(words, vocab) if words else None, *arrays)


def _sequence_bias(scores: np.ndarray, sequences: np.ndarray, bias: _Bias) -> np.ndarray:
    """scores + the bias of every (token ids, bias) pair whose sequence the next token would complete: a one-token
    sequence always, a longer one where the row ends with all its tokens but the last (transformers' rule and
    order of additions, left padding included)."""
    length = sequences.shape[1]
    longer = [(prefix, last, value) for prefix, last, value in bias.longer if len(prefix) < length]
    if not longer:
        return scores + bias.single
    total = np.tile(bias.single, (len(scores), 1))
    for prefix, last, value in longer:
        matches = (sequences[:, length - len(prefix):] == prefix).all(axis=1)
        total[:, last] += np.where(matches, value, np.float32(0))
    return scores + total


def _only(scores: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Every score -inf but these tokens', which are 0 (the forced-token processors)."""
    forced = np.full_like(scores, -np.inf)
    forced[:, tokens] = 0
    return forced


def _drop_sorted(scores: np.ndarray, order: np.ndarray, drop_sorted: np.ndarray) -> None:
    """Set to -inf the tokens whose place in `order` is marked in drop_sorted."""
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    scores[drop] = -np.inf


def _cumsum(probs: np.ndarray) -> np.ndarray:
    """torch's float32 cumsum on CPU: the running sum kept in float64, each value rounded to float32."""
    return np.cumsum(probs, axis=-1, dtype=np.float64).astype(np.float32)


def _entropy(scores: np.ndarray) -> np.ndarray:
    """torch.distributions.Categorical(logits=scores).entropy(), [batch, 1] (float32)."""
    top = scores.max(axis=-1, keepdims=True)
    normalized = scores - (np.log(np.exp(scores - top).sum(axis=-1, keepdims=True)) + top)  # logits - logsumexp
    probs = softmax(normalized)
    clamped = np.maximum(normalized, np.finfo(np.float32).min)
    return -(clamped * probs).sum(axis=-1, keepdims=True)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def torch_softmax(scores: np.ndarray) -> np.ndarray:
    """torch's float32 softmax on CPU: exp(x - max), summed as its kernel sums (see _lane_sum), times 1 / sum.
    Where probabilities meet a fixed cut-off (top-p's and typical-p's cumulative sums, epsilon, eta), this
    matters: numpy's pairwise sum differs from torch's by up to ~6e-6 relative, which moves the cut-off across
    a token about once in 20 rows of typical_p on random logits; this one equals torch's to an ulp of exp.
    (A uniform scale does not change the draw or min-p: those use softmax.) Costs ~0.1 ms per row."""
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted * (np.float32(1) / _lane_sum(shifted))


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """torch's float32 log_softmax on CPU: (x - max) - log(sum(exp(x - max))), summed as torch (typical-p sorts
    tokens by distances an ulp apart)."""
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(_lane_sum(np.exp(shifted)))


def _lane_sum(values: np.ndarray) -> np.ndarray:
    """Sum over the last axis [..., 1] in float32 as torch's vectorised CPU kernels add up (8 lanes with AVX2, 16
    with AVX-512: cpu.torch_lanes): each lane sequentially, the tail into the first lanes, then the lanes in
    halves. (ARM's kernels are not replicated: a cut-off can then differ at a ~1e-6 near-tie, which
    `gpt2onnx verify` explains.)"""
    n = values.shape[-1]
    whole = n - n % _LANES
    lanes = np.zeros(values.shape[:-1] + (_LANES,), np.float32)
    if whole:
        lanes += values[..., :whole].reshape(values.shape[:-1] + (-1, _LANES)).sum(axis=-2, dtype=np.float32)
    lanes[..., :n - whole] += values[..., whole:]
    while lanes.shape[-1] > 1:
        half = lanes.shape[-1] // 2
        lanes = lanes[..., :half] + lanes[..., half:]
    return lanes


_LANES = cpu.torch_lanes()


def draw(probs: np.ndarray, rng) -> np.ndarray:
    """One token per row from `probs` [batch, vocab] (float32)."""
    if isinstance(rng, np.random.Generator):
        # inverse CDF with one uniform number per row
        cdf = np.cumsum(probs, axis=-1, dtype=np.float64)
        coins = rng.random(len(probs))[:, None] * cdf[:, -1:]
        return np.minimum((cdf <= coins).sum(axis=-1), probs.shape[-1] - 1)
    return rng.multinomial_one(probs)  # torch's algorithm on torch's stream


def _banned_ngram_tokens(sequences: np.ndarray, n: int) -> list[list[int]]:
    """Per row, the tokens that would complete an n-gram already present (transformers' rule)."""
    length = sequences.shape[1]
    if length + 1 < n:
        return [[] for _ in sequences]
    banned = []
    for row in sequences.tolist():
        prefix = tuple(row[length - n + 1:]) if n > 1 else ()
        banned.append([row[i + n - 1] for i in range(length - n + 1) if tuple(row[i:i + n - 1]) == prefix])
    return banned
