"""Logprobs and scoring against PyTorch: torch's log_softmax of transformers' logits, within 1e-4."""

import math

import numpy as np
import pytest

from gpt2onnx.errors import InvalidArgumentError
from gpt2onnx.generation.logprobs import log_softmax, top
from helpers import torch_logprobs

TEXTS = ["The :substitute command replaces text", "fs.readFile(path, options", "x", "In Vim, to delete a line, type dd"]
TOL = 1e-4


def test_log_softmax_equals_torch():
    import torch

    logits = np.random.default_rng(0).normal(0, 8, (3, 1000)).astype(np.float32)
    expected = torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()
    assert np.abs(log_softmax(logits) - expected).max() < 1e-5
    assert top(log_softmax(logits)[0], 3) == sorted(
        [(int(t), float(log_softmax(logits)[0, t])) for t in np.argsort(-logits[0])[:3]], key=lambda p: -p[1])


@pytest.mark.parametrize("options", [dict(do_sample=False),
                                     dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=5,
                                          num_return_sequences=3, repetition_penalty=1.2)])
def test_generate_logprobs_equal_torch(trained, trained_reference, options):
    prompt = TEXTS[0]
    results = trained.generate(prompt, max_new_tokens=12, logprobs=3, **options)
    results = results if isinstance(results, list) else [results]
    worst = 0.0
    for result in results:
        assert len(result.logprobs) == len(result.token_ids)
        ids = result.prompt_token_ids + result.token_ids
        expected = torch_logprobs(trained_reference, ids)
        for i, (token, (logprob, alternatives)) in enumerate(zip(result.token_ids, result.logprobs)):
            row = expected[len(result.prompt_token_ids) - 1 + i]  # the raw distribution, whatever the settings
            worst = max(worst, abs(logprob - row[token]))
            assert [t for t, _ in alternatives] == np.argsort(-row, kind="stable")[:3].tolist()
            assert max(abs(v - row[t]) for t, v in alternatives) < TOL
    print(f"largest logprob difference from torch: {worst:.2e}")
    assert worst < TOL


def test_generate_without_logprobs_leaves_them_none(trained):
    assert trained.generate("x", max_new_tokens=3).logprobs is None
    assert all(lp[1] == [] for lp in trained.generate("x", max_new_tokens=3, logprobs=0).logprobs)
    with pytest.raises(InvalidArgumentError, match="logprobs"):
        trained.generate("x", logprobs=-1)


def test_score_equals_torch(trained, trained_reference):
    import torch

    model, _ = trained_reference
    scores = trained.score(TEXTS, top_logprobs=2)
    for text, result in zip(TEXTS, scores):
        ids = trained.tokenizer.encode(text)
        assert result.token_ids == ids and len(result.tokens) == len(ids) and "".join(result.tokens) == text
        assert result.token_logprobs[0] is None and result.top_logprobs[0] is None
        expected = torch_logprobs(trained_reference, ids)
        gathered = [float(expected[i, t]) for i, t in enumerate(ids[1:])]
        assert np.abs(np.array(result.token_logprobs[1:], dtype=np.float64) - gathered).max(initial=0) < TOL
        for i, alternatives in enumerate(result.top_logprobs[1:]):
            assert [t for t, _ in alternatives] == np.argsort(-expected[i], kind="stable")[:2].tolist()
        if len(ids) > 1:
            with torch.inference_mode():
                loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
            assert result.perplexity == pytest.approx(math.exp(loss), rel=TOL)
        else:
            assert result.perplexity is None


def test_batched_score_equals_one_at_a_time(trained):
    batch = trained.score(TEXTS)
    for text, result in zip(TEXTS, batch):
        alone = trained.score(text)
        assert alone.token_ids == result.token_ids and result.top_logprobs is None
        assert np.allclose(np.array(alone.token_logprobs[1:], dtype=float),
                           np.array(result.token_logprobs[1:], dtype=float), atol=1e-5, rtol=0)


def test_score_bad_input(trained):
    with pytest.raises(InvalidArgumentError, match="n_positions"):
        trained.score("a" * 20 * trained.config.n_positions)
    with pytest.raises(InvalidArgumentError, match="top_logprobs"):
        trained.score("x", top_logprobs=1.5)
    with pytest.raises(InvalidArgumentError):
        trained.score([])
    assert trained.score("").token_ids == [trained.eos_token_id]
