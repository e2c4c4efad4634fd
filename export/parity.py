"""Same seed, same tokens: seeded sampling side by side with transformers, and what explains a difference.

A case is one call — a seed, a left-padded batch of prompts, the sampling settings — made on both sides:

    ours    model.generate(prompts, do_sample=True, seed=seed, sampler="torch", ...)
    theirs  transformers.set_seed(seed); reference.generate(**tokenizer(prompts), do_sample=True, ...)

(left padding, pad = eos, every option passed explicitly to both) and the token ids must be equal row by row.
Greedy cases (do_sample=False, every prompt alone and all in one batch) are compared the same way.

ONNX Runtime and PyTorch add up the same numbers in different orders, so their logits differ by a few
1e-6. That flips a decision only at a near-tie, and then the row differs from that step on. For the first
step t where a row differs, `explain` decides whether float noise explains it. Both sides drew the same
exponentials q at that step (the stream moved by rows x vocab values per step on both; `replayed_draws`
replays it to row r of step t), so a sampled token is argmax(p / q) on each side, each with its own p:

  * the replay must give each side's own token from that side's logits (else the sampler or the random
    stream differs: a bug, whatever the logits);
  * the logits at that step must differ by no more than the verification tolerance (else the model
    differs: a bug);
  * the decision must flip within what that difference can move: the torch side's margin — the log gap
    between the two p/q that swapped places, the gap between the two largest logits when greedy, the
    distance to the top-k or top-p cut-off when a filter let a token in on one side only — is at most the
    largest change of the processed scores.

A flip that passes all three is an explained near-tie and is reported with its margin; anything else is
unexplained.

Beam cases (num_beams > 1) rank whole continuations, so a difference is traced to the first step where the
two sides picked different candidates. Our beam search is run a second time on PyTorch's logits (the
reference model behind the session's interface, `TorchSession`), recording every step on both runs:

  * on PyTorch's logits it must give transformers' tokens (else the beam search differs: a bug);
  * the raw logits at the first differing step must differ by no more than the tolerance;
  * the torch side's margin there — the gap between the two candidates that swapped places in the ranking
    (their summed log-probabilities, or log(p/q) with the replayed exponentials when sampling; the
    softmax normaliser cancels) — is at most the sum of how much each of the two scores moved between
    the sides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from gpt2onnx.generation.beam import beam_search
from gpt2onnx.generation.defaults import TRANSFORMERS_DEFAULTS
from gpt2onnx.generation.sampling import process, softmax
from gpt2onnx.generation.settings import GenerationSettings
from gpt2onnx.generation.torch_random import TorchGenerator
from gpt2onnx.runtime.kv_cache import KVCache
from gpt2onnx.runtime.session import StepRecord

from .reference import cache_layer
from .verify import first_difference

# Prompts of a case are taken round-robin from these (ASCII, code, Latin accents, CJK, emoji, Greek).
PROMPTS = ("Hello, I'm a language model,", "Vim: the :s command", "naïve café — 日本語 😀", "fs.readFile(",
           "The history of", "Ünïcödé, emoji 🎉 and Ελληνικά:")
# Every setting the sampler has; each seed runs all of them, with batch sizes 1, 3 and 5 in turn.
SETTINGS = (
    {},  # transformers' defaults when sampling: top_k=50, temperature 1
    {"top_k": 0},  # the whole vocabulary
    {"top_k": 0, "top_p": 0.9},
    {"temperature": 0.7, "top_k": 20},
    {"temperature": 1.3, "top_p": 0.8, "top_k": 0},
    {"repetition_penalty": 1.3},
    {"no_repeat_ngram_size": 2, "top_k": 0},
    {"num_return_sequences": 5},
    {"temperature": 0.5, "top_p": 0.95, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3},
    {"min_new_tokens": 10, "top_k": 10},
    # transformers' other warpers and processors (issue 13)
    {"min_p": 0.05, "top_k": 0, "temperature": 1.2},
    {"typical_p": 0.9, "top_k": 0},
    {"epsilon_cutoff": 3e-4, "eta_cutoff": 1e-3, "top_k": 0},
    {"bad_words_ids": [[11], [13, 198]], "suppress_tokens": [262], "sequence_bias": [[[198], -2.0]],
     "renormalize_logits": True, "top_p": 0.95},
)
BATCH_SIZES = (1, 3, 5)
# Beam search settings, each run once (batches 1 and 3 in turn), and beam sampling, run for the first seeds.
BEAM_SETTINGS = (
    {"num_beams": 4},
    {"num_beams": 2, "length_penalty": 0.5, "num_return_sequences": 2},
    {"num_beams": 5, "early_stopping": True, "no_repeat_ngram_size": 3},
    {"num_beams": 3, "early_stopping": "never", "length_penalty": 2.0, "repetition_penalty": 1.2},
)
BEAM_SAMPLING = {"num_beams": 4, "num_return_sequences": 2}
BEAM_SAMPLING_SEEDS = 3
MAX_NEW_TOKENS = 24
# Every option both sides have (transformers' GenerationConfig's, at its defaults) is passed to both, so neither
# side's defaults (generation_config.json, task_specific_params) can make them differ; a case sets the lengths
# and do_sample itself.
_OPTIONS = {k: v for k, v in TRANSFORMERS_DEFAULTS.items() if k not in ("max_length", "do_sample")}
_WORDS_PER_SKIP = 1 << 24  # raw words skipped per call when replaying the stream


@dataclass(frozen=True)
class Case:
    """One generate call, made on both sides."""

    seed: int
    prompts: tuple[str, ...]
    options: tuple[tuple[str, object], ...]  # every sampling option (name, value), none left to defaults
    max_new_tokens: int = MAX_NEW_TOKENS
    do_sample: bool = True  # False: greedy (the seed is not used)

    @property
    def kwargs(self) -> dict:
        return dict(self.options)

    def settings(self) -> GenerationSettings:
        return GenerationSettings(do_sample=self.do_sample, seed=self.seed, max_new_tokens=self.max_new_tokens,
                                  **self.kwargs)

    def label(self) -> str:
        if self.kwargs.get("num_beams", 1) > 1:
            changed = {k: v for k, v in self.options if _OPTIONS[k] != v}
            shown = ", ".join(f"{k}={v}" for k, v in changed.items())
            what = f"beam sampling, seed {self.seed}" if self.do_sample else "beam search"
            return f"{what}, batch {len(self.prompts)}, {shown}"
        if not self.do_sample:
            return f"greedy, batch {len(self.prompts)}" + (f" ({self.prompts[0]!r})" if len(self.prompts) == 1 else "")
        changed = {k: v for k, v in self.options if _OPTIONS[k] != v}
        shown = ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults (top_k=50)"
        return f"seed {self.seed}, batch {len(self.prompts)}, {shown}"


def greedy_cases(*, max_new_tokens: int = MAX_NEW_TOKENS) -> list[Case]:
    """Greedy decoding of every prompt alone, then of all of them as one left-padded batch."""
    options = tuple(_OPTIONS.items())
    return [Case(0, prompts, options, max_new_tokens, do_sample=False)
            for prompts in [(p,) for p in PROMPTS] + [PROMPTS]]


def beam_cases(seeds: Iterable[int], *, max_new_tokens: int = MAX_NEW_TOKENS) -> list[Case]:
    """Every beam search setting once, then beam sampling for the first BEAM_SAMPLING_SEEDS seeds."""
    out = []
    for j, setting in enumerate(BEAM_SETTINGS):
        prompts = tuple(PROMPTS[(j + i) % len(PROMPTS)] for i in range(1 + 2 * (j % 2)))
        out.append(Case(0, prompts, tuple({**_OPTIONS, **setting}.items()), max_new_tokens, do_sample=False))
    for seed in list(seeds)[:BEAM_SAMPLING_SEEDS]:
        prompts = tuple(PROMPTS[(seed + i) % len(PROMPTS)] for i in range(1 + 2 * (seed % 2)))
        out.append(Case(seed, prompts, tuple({**_OPTIONS, **BEAM_SAMPLING}.items()), max_new_tokens))
    return out


def cases(seeds: Iterable[int], *, max_new_tokens: int = MAX_NEW_TOKENS) -> list[Case]:
    """Every seed with every setting; batch sizes 1/3/5 and the prompts taken in turn."""
    out = []
    for seed in seeds:
        for j, setting in enumerate(SETTINGS):
            size = BATCH_SIZES[(seed + j) % len(BATCH_SIZES)]
            prompts = tuple(PROMPTS[(seed + j + i) % len(PROMPTS)] for i in range(size))
            out.append(Case(seed, prompts, tuple({**_OPTIONS, **setting}.items()), max_new_tokens))
    return out


@dataclass
class Divergence:
    """Where one row first differs from transformers', and whether float noise explains it."""

    row: int
    step: int  # index of the first differing new token
    kind: str  # "sampling", "greedy", "top-k boundary", "top-p boundary", "prompt" or "length"
    ours: int | None  # the token each side chose at that step
    theirs: int | None
    margin: float | None  # how close the torch side's decision was, in `margin_unit`
    margin_unit: str
    max_abs_diff: float | None  # largest |logit difference| of that row at that step
    explained: bool
    reason: str

    def describe(self) -> str:
        what = {"sampling": "sampled token", "greedy": "greedy token"}.get(self.kind, self.kind)
        parts = [f"row {self.row} step {self.step}: {what}"]
        if self.ours is not None:
            parts.append(f"transformers {self.theirs} vs ours {self.ours}")
        if self.margin is not None:
            parts.append(f"margin {self.margin:.2g} ({self.margin_unit})")
        if self.max_abs_diff is not None:
            parts.append(f"max |Δlogit| {self.max_abs_diff:.2g}")
        verdict = "explained near-tie" if self.explained else "UNEXPLAINED"
        return ", ".join(parts) + f": {verdict} — {self.reason}"


def replayed_draws(seed: int, *, step: int, rows: int, row: int, vocab: int) -> np.ndarray:
    """The exponentials q of `row` at `step`: what torch.multinomial drew for it after set_seed(seed).

    Every step draws one value per element of the whole [rows, vocab] probability tensor, finished rows
    included, on both sides; each value takes two 32-bit words of the stream.
    """
    generator = TorchGenerator(seed)
    skip = 2 * (step * rows + row) * vocab
    while skip:
        n = min(skip, _WORDS_PER_SKIP)
        generator.bit_generator.random_raw(n, output=False)
        skip -= n
    return generator.exponential(vocab)


def explain(*, ours_logits: np.ndarray, theirs_logits: np.ndarray, ours_scores: np.ndarray,
            theirs_scores: np.ndarray, ours_token: int, theirs_token: int, settings: GenerationSettings,
            q: np.ndarray | None, atol: float, theirs_probs: np.ndarray | None = None,
            ours_unfiltered: np.ndarray | None = None, theirs_unfiltered: np.ndarray | None = None,
            row: int = 0, step: int = 0) -> Divergence:
    """Decide whether float differences explain one flipped decision (see the module docstring).

    ours_logits, theirs_logits: each side's raw logits of the row at that step [vocab].
    ours_scores, theirs_scores: the same after each side's processors and warpers [vocab].
    q: the replayed exponentials of the row at that step (None when greedy).
    theirs_probs: transformers' own softmax of theirs_scores (default: computed here in float32).
    ours_unfiltered, theirs_unfiltered: the scores before top-k and top-p (needed to measure the margin
        when a filter kept a token on one side only).
    """
    base = dict(row=row, step=step, ours=int(ours_token), theirs=int(theirs_token),
                max_abs_diff=_max_abs_diff(ours_logits, theirs_logits), explained=False, reason="")
    a, b = int(ours_token), int(theirs_token)
    if q is None:  # greedy: the largest processed score wins; the gap between the two moves by <= 2 max |Δ|
        reproduced = int(np.argmax(ours_scores)) == a and int(np.argmax(theirs_scores)) == b
        margin = float(theirs_scores[b]) - float(theirs_scores[a])
        return _verdict(Divergence(kind="greedy", margin=margin, margin_unit="logit gap", **base), reproduced,
                        atol, margin, 2 * _max_abs_diff(ours_scores, theirs_scores))
    theirs_probs = softmax(theirs_scores[None])[0] if theirs_probs is None else theirs_probs
    with np.errstate(divide="ignore", invalid="ignore"):  # float32 division, as torch.multinomial divides
        ours_ratio, theirs_ratio = softmax(ours_scores[None])[0] / q, theirs_probs / q
    reproduced = int(np.argmax(ours_ratio)) == a and int(np.argmax(theirs_ratio)) == b
    kept_ours, kept_theirs = np.isfinite(ours_scores), np.isfinite(theirs_scores)
    swapped = np.array([a, b])
    if reproduced and not np.array_equal(kept_ours[swapped], kept_theirs[swapped]):
        # a filter kept a token on one side only: the margin is the torch side's distance to its cut-off
        if ours_unfiltered is None or theirs_unfiltered is None:
            return _verdict(Divergence(kind="filter boundary", margin=None, margin_unit="", **base), reproduced,
                            atol, None, 0.0)
        flipped = swapped[kept_ours[swapped] != kept_theirs[swapped]]
        kind, margin, unit, bound = _filter_margin(ours_unfiltered, theirs_unfiltered, flipped, settings)
        return _verdict(Divergence(kind=kind, margin=margin, margin_unit=unit, **base), reproduced, atol, margin,
                        bound)
    # both tokens passed the filters on both sides: the log gap between their p/q moves by at most the
    # change of their two scores (the softmax normaliser cancels)
    with np.errstate(divide="ignore"):
        log_gap = float(np.log(theirs_ratio[b]) - np.log(theirs_ratio[a]))
    relative = float((theirs_ratio[b] - theirs_ratio[a]) / theirs_ratio[b]) if theirs_ratio[b] > 0 else None
    bound = abs(float(ours_scores[a]) - float(theirs_scores[a])) + abs(float(ours_scores[b]) - float(theirs_scores[b]))
    return _verdict(Divergence(kind="sampling", margin=relative, margin_unit="relative p/q gap", **base), reproduced,
                    atol, log_gap if reproduced else None, bound)


def _verdict(divergence: Divergence, reproduced: bool, atol: float, margin: float | None, bound: float) -> Divergence:
    """The three conditions of an explained near-tie, in order; the first that fails is the reason."""
    slack = 1e-6 * max(1.0, abs(margin or 0.0))  # float32 rounding of the scores and ratios themselves
    diff = divergence.max_abs_diff
    if not reproduced:
        divergence.reason = ("replaying the random draws on each side's logits does not give each side's token: "
                             "the sampler or the random stream differs (a bug)")
    elif not diff <= atol:
        divergence.reason = f"the logits differ by {diff:.3g} > atol {atol:g}: not float noise (a bug)"
    elif margin is None or not margin <= bound + slack:
        divergence.reason = f"the margin ({margin}) is larger than the logit difference can move ({bound:.3g})"
    else:
        divergence.explained = True
        divergence.reason = f"the logit difference moves the margin by up to {bound:.2g}: the decision can flip"
    return divergence


def _filter_margin(ours_unfiltered: np.ndarray, theirs_unfiltered: np.ndarray, flipped: np.ndarray,
                   settings: GenerationSettings) -> tuple[str, float, str, float]:
    """(kind, margin, unit, bound) when a filter (top-k, top-p, min-p, typical-p, epsilon or eta) kept the
    `flipped` tokens on one side only: the first filter, in transformers' order, whose choice differs, with the
    torch side's distance to its cut-off and how far the score difference can move it."""
    ours, theirs = ours_unfiltered, theirs_unfiltered
    for name, only in _filters(settings):
        ours_next, theirs_next = _apply(ours, only), _apply(theirs, only)
        if not np.array_equal(np.isfinite(ours_next[flipped]), np.isfinite(theirs_next[flipped])):
            return _margin(name, ours, theirs, flipped, settings)
        ours, theirs = ours_next, theirs_next
    return "filter boundary", None, "", 0.0


def _filters(settings: GenerationSettings) -> list[tuple[str, GenerationSettings]]:
    """The filters these settings use, in transformers' order, each as settings that apply it alone."""
    plain = dict(do_sample=True, top_k=0)
    filters = [("top-k boundary", dict(top_k=settings.top_k)) if 0 < settings.top_k else None,
               ("top-p boundary", dict(top_p=settings.top_p)) if settings.top_p < 1 else None,
               ("min-p boundary", dict(min_p=settings.min_p)) if settings.min_p is not None else None,
               ("typical-p boundary", dict(typical_p=settings.typical_p)) if settings.typical_p < 1 else None,
               ("epsilon boundary", dict(epsilon_cutoff=settings.epsilon_cutoff)) if settings.epsilon_cutoff else None,
               ("eta boundary", dict(eta_cutoff=settings.eta_cutoff)) if settings.eta_cutoff else None]
    return [(name, GenerationSettings(**{**plain, **only})) for name, only in filter(None, filters)]


def _apply(scores: np.ndarray, only: GenerationSettings) -> np.ndarray:
    return process(scores[None], np.zeros((1, 1), np.int64), 0, only, eos_id=None)[0]


def _margin(name: str, ours: np.ndarray, theirs: np.ndarray, flipped: np.ndarray,
            settings: GenerationSettings) -> tuple[str, float, str, float]:
    """The torch side's distance from the cut-off of filter `name` (scores before it: ours, theirs) and the bound
    of how much the score difference moves it. A change of every score by at most d moves a log-probability by
    at most 2 d and a cumulative probability by at most about 2 d."""
    d = _max_abs_diff(ours, theirs)
    log_p = {side: x - _logsumexp(x) for side, x in (("ours", ours), ("theirs", theirs))}
    if name == "top-k boundary":  # the k-th and the (k+1)-th score swapped places
        k = settings.top_k
        ranked = -np.sort(-theirs)
        return name, float(ranked[k - 1] - ranked[k]), "logit gap at the k-th token", 2 * d
    if name == "top-p boundary":  # ascending order; a token is dropped while the cumulative probability <= 1 - top_p
        cumulative = _cumulative(theirs, np.argsort(theirs, kind="stable"))
        distance = float(np.min(np.abs(cumulative[flipped] - np.float32(1 - settings.top_p))))
        return name, distance, "probability from the top-p cut-off", 2 * d + 1e-6
    if name == "min-p boundary":  # dropped when log p < log(min_p) + the top log p
        gap = np.abs(theirs[flipped] - theirs.max() - np.log(settings.min_p))
        return name, float(gap.min()), "log-probability from the min-p cut-off", 2 * d + 1e-6
    if name == "epsilon boundary":  # dropped when log p < log(epsilon)
        gap = np.abs(log_p["theirs"][flipped] - np.log(settings.epsilon_cutoff))
        return name, float(gap.min()), "log-probability from the epsilon cut-off", 2 * d + 1e-6
    entropy = {side: -np.sum(np.where(np.isfinite(x), np.exp(x) * x, 0.0)) for side, x in log_p.items()}
    moved = abs(entropy["ours"] - entropy["theirs"])  # measured, not bounded
    if name == "eta boundary":  # dropped when log p < log(min(eta, sqrt(eta) exp(-entropy)))
        eta = settings.eta_cutoff
        cut = min(np.log(eta), 0.5 * np.log(eta) - entropy["theirs"])
        gap = np.abs(log_p["theirs"][flipped] - cut)
        return name, float(gap.min()), "log-probability from the eta cut-off", 2 * d + moved + 1e-6
    # typical-p: tokens in order of |-log p - entropy|; kept up to the first whose cumulative probability
    # reaches typical_p. Either the flipped token's distance is at the last kept one's, or the cumulative
    # probability is at typical_p.
    ends = {}
    for side, x in log_p.items():
        distance = np.abs(-x - entropy[side])
        order = np.argsort(distance, kind="stable")
        cumulative = _cumulative(x, order)[order]
        last = min(int((cumulative < np.float32(settings.typical_p)).sum()), len(x) - 1)
        ends[side] = (distance, cumulative, order, last)
    distance, cumulative, order, last = ends["theirs"]
    if order[last] != ends["ours"][2][ends["ours"][3]]:  # the cumulative probability crossed typical_p elsewhere
        low, high = sorted((last, int(np.flatnonzero(order == ends["ours"][2][ends["ours"][3]])[0])))
        gap = np.abs(cumulative[low:high + 1] - np.float32(settings.typical_p))
        return "typical-p mass boundary", float(gap.min()), "probability from typical_p", 2 * d + 1e-6
    gap = np.abs(distance[flipped] - distance[order[last]])
    return name, float(gap.min()), "entropy distance from the typical-p cut-off", 2 * (2 * d + moved) + 1e-6


def _logsumexp(x: np.ndarray) -> float:
    top = np.max(x)
    return float(top + np.log(np.sum(np.exp(x.astype(np.float64) - top))))


def _cumulative(scores: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per token, the probability of the tokens up to it in `order` (itself included), as torch sums it."""
    cumulative = np.empty_like(scores)
    cumulative[order] = np.cumsum(softmax(scores[order][None])[0], dtype=np.float64)
    return cumulative


def _max_abs_diff(x: np.ndarray, y: np.ndarray) -> float:
    both = np.isfinite(x) & np.isfinite(y)
    return float(np.max(np.abs(x[both].astype(np.float64) - y[both]), initial=0.0))


class _Recorder:
    """Observes a session (`with session.observe(recorder)`): keeps the last-position logits of every step,
    what the sampler saw."""

    def __init__(self):
        self.steps: list[np.ndarray] = []

    def __call__(self, record: StepRecord) -> None:
        self.steps.append(record.logits[:, -1, :].copy())


class SideBySide:
    """A gpt2onnx model and its transformers reference (same weights), run case by case."""

    def __init__(self, model, reference, tokenizer, *, atol: float):
        """model: a gpt2onnx.Model (its session is observed to record logits); reference: GPT2LMHeadModel;
        tokenizer: transformers' tokenizer of the model directory."""
        self.model, self.reference, self.tokenizer, self.atol = model, reference, tokenizer, atol
        self.recorder = _Recorder()
        tokenizer.padding_side = "left"
        tokenizer.pad_token = tokenizer.eos_token

    def run(self, case: Case) -> dict:
        """Both sides on one case; every differing row with its divergence."""
        ours, prompt_ids = self._ours(case)
        theirs, batch, outputs = self._theirs(case)
        divergences = []
        their_prompts = [ids[m == 1].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        if their_prompts != prompt_ids:
            bad = next(i for i, (x, y) in enumerate(zip(their_prompts, prompt_ids)) if x != y)
            divergences.append(Divergence(bad, 0, "prompt", None, None, None, "", None, False,
                                          f"prompt {bad} is tokenized differently: {prompt_ids[bad][:8]}... vs "
                                          f"transformers' {their_prompts[bad][:8]}..."))
        else:
            for row, (mine, yours) in enumerate(zip(ours, theirs)):
                step = first_difference(mine, yours)
                if step is not None:
                    divergences.append(self._explain(case, row, step, mine, yours, prompt_ids, outputs))
        return {"case": case.label(), "seed": case.seed, "prompts": list(case.prompts), "options": case.kwargs,
                "rows": len(theirs), "equal_rows": len(theirs) - len(divergences),
                "divergences": [dataclasses.asdict(d) | {"text": d.describe()} for d in divergences]}

    def _ours(self, case: Case) -> tuple[list[list[int]], list[list[int]]]:
        self.recorder.steps = []
        with self.model.session.observe(self.recorder):
            results = self.model.generate(list(case.prompts), do_sample=case.do_sample, seed=case.seed,
                                          sampler="torch", max_new_tokens=case.max_new_tokens, **case.kwargs)
        flat = [r for group in results for r in (group if isinstance(group, list) else [group])]
        per_prompt = flat[::case.kwargs["num_return_sequences"]]
        return [r.token_ids for r in flat], [list(r.prompt_token_ids) for r in per_prompt]

    def _theirs(self, case: Case):
        import torch
        from transformers import set_seed

        batch = self.tokenizer(list(case.prompts), return_tensors="pt", padding=True)
        eos = self.model.eos_token_id
        set_seed(case.seed)
        with torch.inference_mode():
            out = self.reference.generate(**batch, do_sample=case.do_sample, max_new_tokens=case.max_new_tokens,
                                          pad_token_id=eos, eos_token_id=eos, output_logits=True, output_scores=True,
                                          return_dict_in_generate=True, tokenizer=self.tokenizer, **case.kwargs)
        width = batch["input_ids"].shape[1]
        rows = out.sequences[:, width:].tolist()
        ends = [row.index(eos) + 1 if eos in row else len(row) for row in rows]
        if case.kwargs.get("stop_strings"):  # a row also ends at the token that completes a stop string
            from transformers.generation.stopping_criteria import StopStringCriteria

            criterion = StopStringCriteria(self.tokenizer, case.kwargs["stop_strings"])
            for step in range(out.sequences.shape[1] - width):
                done = criterion(out.sequences[:, :width + step + 1], None).tolist()
                ends = [min(end, step + 1) if hit else end for end, hit in zip(ends, done)]
        return [row[:end] for row, end in zip(rows, ends)], batch, out

    def _explain(self, case: Case, row: int, step: int, mine: list[int], yours: list[int],
                 prompt_ids: list[list[int]], outputs) -> Divergence:
        import torch

        if case.kwargs.get("num_beams", 1) > 1:
            return explain_beams(self.model, self.reference, case, row, mine, yours, prompt_ids, atol=self.atol)

        if step >= len(mine) or step >= len(yours) or step >= len(outputs.logits) or step >= len(self.recorder.steps):
            return Divergence(row, step, "length", None, None, None, "", None, False,
                              f"one side ended after {step} tokens while the other went on (a bug)")
        settings = case.settings()
        n = settings.num_return_sequences
        rows = len(prompt_ids) * n
        ours_step = self.recorder.steps[step]
        if len(ours_step) != rows:  # the prefill ran each prompt once; its logits were shared out
            ours_step = np.repeat(ours_step, n, axis=0)
        # the row as the processors saw it at that step: left padding, prompt, the tokens both sides share
        eos, width, prompt = self.model.eos_token_id, max(map(len, prompt_ids)), prompt_ids[row // n]
        sequence = np.array([[eos] * (width - len(prompt)) + prompt + mine[:step]], np.int64)
        ours_logits = ours_step[row]
        ours_scores = process(ours_logits[None], sequence, step, settings, eos_id=eos)[0]
        theirs_scores_all = outputs.scores[step].float()
        theirs_probs, q = None, None  # greedy
        if case.do_sample:
            theirs_probs = torch.softmax(theirs_scores_all, dim=-1)[row].numpy()  # as transformers computes it
            q = replayed_draws(case.seed, step=step, rows=rows, row=row, vocab=ours_logits.shape[-1])
        unfiltered = dataclasses.replace(settings, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0,
                                         eta_cutoff=0.0, renormalize_logits=False)  # processors and temperature
        theirs_logits = outputs.logits[step][row].float().numpy()
        return explain(ours_logits=ours_logits, theirs_logits=theirs_logits, ours_scores=ours_scores,
                       theirs_scores=theirs_scores_all[row].numpy(), theirs_probs=theirs_probs,
                       ours_unfiltered=process(ours_logits[None], sequence, step, unfiltered, eos_id=eos)[0],
                       theirs_unfiltered=process(theirs_logits[None], sequence, step, unfiltered, eos_id=eos)[0],
                       ours_token=mine[step], theirs_token=yours[step], settings=settings, q=q, atol=self.atol,
                       row=row, step=step)


def explain_greedy(session, reference, prompt: list[int], tokens: int, *, eos_id: int,
                   atol: float) -> Divergence | None:
    """Greedy (EOS ignored) on both sides, recording the logits; the first flip explained, or None if equal."""
    import torch
    from transformers import GenerationConfig

    from gpt2onnx.generation.generator import generate

    recorder = _Recorder()
    settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True)
    with session.observe(recorder):
        ours = generate(session, [prompt], settings, eos_id=eos_id)[0]
    config = GenerationConfig(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, eos_token_id=None,
                              pad_token_id=eos_id, output_logits=True, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                                 generation_config=config)
    theirs = out.sequences[0, len(prompt):].tolist()
    step = first_difference(ours, theirs)
    if step is None:
        return None
    if step >= min(len(ours), len(theirs)):
        return Divergence(0, step, "length", None, None, None, "", None, False, "one side stopped early (a bug)")
    sequence = np.array([prompt + ours[:step]], np.int64)
    ours_logits = recorder.steps[step][0]
    ours_scores = process(ours_logits[None], sequence, step, settings, eos_id=eos_id)[0]
    return explain(ours_logits=ours_logits, theirs_logits=out.logits[step][0].float().numpy(), ours_scores=ours_scores,
                   theirs_scores=out.scores[step][0].float().numpy(), ours_token=ours[step],
                   theirs_token=theirs[step], settings=settings, q=None, atol=atol, step=step)


def summarize(results: list[dict]) -> dict:
    """Counts over many cases: rows compared, rows equal, divergences explained and unexplained."""
    divergences = [d | {"case": r["case"]} for r in results for d in r["divergences"]]
    explained = [d for d in divergences if d["explained"]]
    margins = [d["margin"] for d in explained if d["margin"] is not None]
    return {"cases": len(results), "rows": sum(r["rows"] for r in results),
            "equal_rows": sum(r["equal_rows"] for r in results),
            "cases_with_mismatch": sum(bool(r["divergences"]) for r in results),
            "mismatched_rows": len(divergences), "explained": len(explained),
            "unexplained": len(divergences) - len(explained),
            "largest_explained_margin": max(margins, default=None), "divergences": divergences}


class TorchSession:
    """The reference model behind OnnxSession's `empty_cache` / `run` interface, so that our own generation
    code (beam.py) can run on PyTorch's logits. The KV cache stays in a KVCache (float32), handed to the
    model as its past each step.

    expand: run the prefill on every row `expand` times over, as transformers' beam search does (its batch of
    prompts x beams), and keep one copy: PyTorch's float rounding can depend on the batch size, and a
    near-tie then breaks as in transformers."""

    cache_dtype = np.float32

    def __init__(self, reference, config, *, expand: int = 1):
        self.reference, self.config, self.expand = reference, config, expand

    def empty_cache(self, batch: int, *, capacity: int = 0) -> KVCache:
        return KVCache.empty(self.config, batch, capacity)

    def run(self, input_ids, attention_mask, position_ids, cache: KVCache, *, logits_for: str = "all",
            reuse_logits: bool = False):
        import torch
        from transformers import DynamicCache

        total = attention_mask.shape[1]
        cache.reserve(total, self.config.n_positions)
        past, expand = None, self.expand if cache.length == 0 else 1
        if expand > 1:
            input_ids, position_ids, attention_mask = (np.repeat(a, expand, axis=0)
                                                       for a in (input_ids, position_ids, attention_mask))
        if cache.length:
            tensors = [torch.from_numpy(np.ascontiguousarray(t)) for t in cache.tensors]
            past = DynamicCache(ddp_cache_data=list(zip(tensors[0::2], tensors[1::2])))
        with torch.inference_mode():
            out = self.reference(input_ids=torch.from_numpy(input_ids), position_ids=torch.from_numpy(position_ids),
                                 attention_mask=torch.from_numpy(np.ascontiguousarray(attention_mask)),
                                 past_key_values=past, use_cache=True)
        for layer in range(self.config.n_layer):
            key, value = cache_layer(out.past_key_values, layer)
            cache.buffers[2 * layer][:, :, :total] = key.numpy()[::expand]
            cache.buffers[2 * layer + 1][:, :, :total] = value.numpy()[::expand]
        cache.length = total
        logits = out.logits.float().numpy()[::expand]
        return (logits[:, -1:] if logits_for == "last" else logits), cache


def explain_beams(model, reference, case: Case, row: int, mine: list[int], yours: list[int],
                  prompt_ids: list[list[int]], *, atol: float) -> Divergence:
    """A beam case's differing row, traced to the first step where the two sides picked different candidates
    (see the module docstring)."""
    settings = case.settings()
    runs = {}
    torch_session = TorchSession(reference, model.config, expand=settings.num_beams)
    for side, session in (("ours", model.session), ("torch", torch_session)):
        steps = []
        rng = TorchGenerator(case.seed) if case.do_sample else None
        found = beam_search(session, prompt_ids, settings, eos_id=model.eos_token_id, rng=rng,
                            watch=lambda step, logits, total, picked, steps=steps: steps.append(
                                (logits.copy(), total.copy(), picked.copy())))
        runs[side] = ([ids for rows in found for ids, _ in rows], steps)
    n, prompt = settings.num_return_sequences, row // settings.num_return_sequences
    replay, (ours, theirs) = runs["torch"][0][prompt * n:(prompt + 1) * n], (runs["ours"][1], runs["torch"][1])
    step = next((t for t, (a, b) in enumerate(zip(ours, theirs)) if not np.array_equal(a[2][prompt], b[2][prompt])),
                None)
    base = dict(row=row, step=-1 if step is None else step, kind="beam", margin_unit="candidate score gap")
    reproduced = replay[row % n] == yours and runs["ours"][0][row] == mine
    tie = _first_tie(theirs, prompt, settings.num_beams)
    if not reproduced and runs["ours"][0][row] == mine and tie is not None and (step is None or tie <= step):
        # equal scores: torch.topk orders them its own way (a heap), ours lowest index first
        logits = slice(prompt * settings.num_beams, (prompt + 1) * settings.num_beams)
        diff = _max_abs_diff(ours[tie][0][logits], theirs[tie][0][logits])
        divergence = Divergence(row=row, step=tie, kind="beam tie", ours=None, theirs=None, margin=0.0,
                                margin_unit="candidate score gap", max_abs_diff=diff, explained=diff <= atol,
                                reason="two candidates had exactly equal scores, which torch.topk orders in its "
                                       "own way: an exact tie")
        if not divergence.explained:
            divergence.reason = f"the logits differ by {diff:.3g} > atol {atol:g}: not float noise (a bug)"
        return divergence
    if step is None:
        return _beam_reason(_verdict(Divergence(ours=None, theirs=None, margin=None, max_abs_diff=0.0,
                                                explained=False, reason="", **base), reproduced, atol, None, 0.0),
                            reproduced)
    (our_logits, our_total, our_picked), (their_logits, their_total, their_picked) = ours[step], theirs[step]
    beams = settings.num_beams
    rows = slice(prompt * beams, (prompt + 1) * beams)
    at = int(np.flatnonzero(our_picked[prompt] != their_picked[prompt])[0])
    a, b = int(our_picked[prompt, at]), int(their_picked[prompt, at])  # ours ranked a there, torch b
    gap_ours, gap_theirs = our_total[prompt], their_total[prompt]
    if case.do_sample:  # ranked by p / q: log(p_b / q_b) - log(p_a / q_a), the softmax normaliser cancels
        q = replayed_draws(case.seed, step=step, rows=len(prompt_ids), row=prompt, vocab=gap_theirs.size)
        with np.errstate(divide="ignore"):
            margin = float(gap_theirs[b] - gap_theirs[a] - np.log(q[b]) + np.log(q[a]))
    else:
        margin = float(gap_theirs[b] - gap_theirs[a])
    bound = abs(float(gap_ours[a]) - float(gap_theirs[a])) + abs(float(gap_ours[b]) - float(gap_theirs[b]))
    vocab = our_logits.shape[-1]
    divergence = Divergence(ours=a % vocab, theirs=b % vocab, margin=margin,
                            max_abs_diff=_max_abs_diff(our_logits[rows], their_logits[rows]), explained=False,
                            reason="", **base)
    return _beam_reason(_verdict(divergence, reproduced, atol, margin, bound), reproduced)


def _first_tie(steps: list, prompt: int, beams: int) -> int | None:
    """The first step where two of a prompt's candidates (or the last one and the best left out) scored
    exactly the same, in a run recorded by explain_beams."""
    for step, (_, total, picked) in enumerate(steps):
        scores = total[prompt][picked[prompt]]
        if len(np.unique(scores)) < len(scores) or np.count_nonzero(total[prompt] >= scores.min()) > len(scores):
            return step
    return None


def _beam_reason(divergence: Divergence, reproduced: bool) -> Divergence:
    if not reproduced:
        divergence.reason = ("our beam search on PyTorch's logits does not give transformers' tokens: the beam search "
                             "or the random stream differs (a bug)")
    elif divergence.margin is None:
        divergence.reason = "the two sides picked the same candidates at every step but returned different beams"
    return divergence
