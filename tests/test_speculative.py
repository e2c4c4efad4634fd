"""Prompt lookup and assisted decoding (gpt2onnx/generation/speculative.py): the tokens of plain decoding, fewer runs.

Compared with transformers' own generate(prompt_lookup_num_tokens=N) and plain generate, with our plain loop
(itself tested against transformers in test_generation.py and test_parity.py), and with the invariants of
the cache (a multi-position run equals one-position runs; cutting the cache back is in place).
"""

import json
import shutil

import numpy as np
import pytest

import gpt2onnx
from gpt2onnx.errors import InvalidArgumentError
from gpt2onnx.tools.cli import main
from helpers import TRAINED_DATA, export

HELDOUT = (TRAINED_DATA / "heldout.txt").read_text(encoding="utf-8")
PASSAGE = HELDOUT[1000:1400]
PROMPTS = ["The :substitute command", "fs.readFile(path, options", PASSAGE + "\n\n" + PASSAGE[:120], "x"]
NEW = 40


def _speculated(results) -> int:
    """Draft tokens kept over all results: a test whose drafts were all rejected would test nothing."""
    return sum(r.speculation.accepted for r in results)


def test_prompt_lookup_greedy_equals_transformers_and_plain(trained, trained_reference):
    import torch

    model, tokenizer = trained_reference
    results = []
    for prompt, (n, ngram) in zip(PROMPTS, ((3, None), (10, 1), (10, None), (5, 3))):
        plain = trained.generate(prompt, max_new_tokens=NEW).token_ids
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=False, max_new_tokens=NEW, prompt_lookup_num_tokens=n,
                                 max_matching_ngram_size=ngram, pad_token_id=tokenizer.eos_token_id)
        ours = trained.generate(prompt, max_new_tokens=NEW, prompt_lookup_num_tokens=n,
                                max_matching_ngram_size=ngram)
        # transformers 4.57 can return up to n tokens past max_new_tokens here (its prompt lookup drafts
        # past the budget, and the stopping check comes after the run): its first NEW tokens are compared
        theirs = out[0, ids["input_ids"].shape[1]:].tolist()[:NEW]
        assert ours.token_ids == plain == theirs, (prompt, n, ngram)
        assert ours.speculation.accepted <= ours.speculation.drafted
        results.append(ours)
    assert _speculated(results) > 20


@pytest.mark.parametrize("options", [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=3),
                                     dict(min_new_tokens=30), dict(stop=["\n"]), dict(ignore_eos=True)])
def test_prompt_lookup_greedy_with_processors_and_stops(trained, options):
    results = []
    for prompt in PROMPTS:
        plain = trained.generate(prompt, max_new_tokens=NEW, **options)
        ours = trained.generate(prompt, max_new_tokens=NEW, prompt_lookup_num_tokens=5, **options)
        assert (ours.token_ids, ours.text, ours.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason)
        results.append(ours)
    # the processors saw drafts and kept some of them: fewer runs of the model than tokens after the first
    assert sum(r.speculation.drafted for r in results) > 0 and _speculated(results) > 0, options
    assert sum(r.speculation.runs for r in results) < sum(len(r.token_ids) - 1 for r in results), options


SAMPLING = [dict(), dict(top_k=0, top_p=0.9, temperature=0.8), dict(repetition_penalty=1.2, top_k=20),
            dict(sampler="numpy")]


@pytest.mark.parametrize("options", SAMPLING)
def test_seeded_sampling_gives_plain_sampling_tokens(trained, options):
    """Each picked token takes plain sampling's random draws, so a seed gives exactly plain sampling's tokens."""
    results = []
    for seed in range(5 if not options else 3):
        prompt = PROMPTS[seed % len(PROMPTS)]
        plain = trained.generate(prompt, max_new_tokens=NEW, do_sample=True, seed=seed, **options)
        ours = trained.generate(prompt, max_new_tokens=NEW, do_sample=True, seed=seed, prompt_lookup_num_tokens=4,
                                **options)
        assert ours.token_ids == plain.token_ids, (seed, options)
        results.append(ours)
    assert sum(r.speculation.drafted for r in results) > 0  # drafts were checked (and kept, or cut back)


def test_seeded_sampling_equals_transformers_plain_sampling(trained, trained_reference):
    import torch
    from transformers import set_seed

    model, tokenizer = trained_reference
    for seed in range(5):
        prompt = PROMPTS[seed % 2]
        ids = tokenizer(prompt, return_tensors="pt")
        set_seed(seed)
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=True, max_new_tokens=NEW, pad_token_id=tokenizer.eos_token_id)
        ours = trained.generate(prompt, max_new_tokens=NEW, do_sample=True, seed=seed, prompt_lookup_num_tokens=10)
        assert ours.token_ids == out[0, ids["input_ids"].shape[1]:].tolist(), seed


def test_assistant_models_give_plain_tokens(trained, trained_export, tiny):
    """A random assistant (mostly wrong, and only 256 positions) and the model itself as its own assistant
    (always right): both give plain decoding's tokens, greedy and seeded."""
    prompt = PROMPTS[2] + HELDOUT[5000:5400]  # past the tiny assistant's 256 positions on the way
    for options in (dict(), dict(do_sample=True, seed=4, top_p=0.9)):
        plain = trained.generate(prompt, max_new_tokens=NEW, **options).token_ids
        weak = trained.generate(prompt, max_new_tokens=NEW, assistant_model=tiny, num_assistant_tokens=3, **options)
        assert weak.token_ids == plain
        same = trained.generate(prompt, max_new_tokens=NEW, assistant_model=str(trained_export),
                                num_assistant_tokens=4, num_assistant_tokens_schedule="heuristic", **options)
        assert same.token_ids == plain
        if not options:
            assert same.speculation.acceptance_rate > 0.9 and same.speculation.runs < NEW / 3
    for prompt in PROMPTS[:2]:
        assert trained.generate(prompt, max_new_tokens=NEW, assistant_model=tiny).token_ids == \
            trained.generate(prompt, max_new_tokens=NEW).token_ids


def test_int8_cache_is_cut_back_in_place(tmp_path):
    """An int8 KV cache (int8 weights): drafts checked and rejected leave the same tokens as plain greedy."""
    model = gpt2onnx.load(export("random:tiny", tmp_path / "int8", precision="int8", kv_cache="int8"))
    assert model.session.cache_dtype == np.int8
    results = []
    for prompt in PROMPTS[:2] + ["Hello world, hello world, hello"]:
        plain = model.generate(prompt, max_new_tokens=60, ignore_eos=True).token_ids
        for n in (2, 5):  # random:tiny repeats itself: 3 drafts every token right, 2 and 5 miss some
            ours = model.generate(prompt, max_new_tokens=60, ignore_eos=True, prompt_lookup_num_tokens=n)
            assert ours.token_ids == plain
            results.append(ours)
    assert _speculated(results) > 20 and sum(r.speculation.drafted - r.speculation.accepted for r in results) > 0


def test_several_positions_equal_single_steps_and_cut_back(trained):
    """session.run(logits_for=k) keeps the last k positions' logits, equal to one-position steps; setting the
    cache's length back drops positions without moving the buffers."""
    session = trained.session
    ids = np.array([trained.tokenizer.encode(PASSAGE)[:30]])

    def prefill(n=20):
        cache = session.empty_cache(1, capacity=64)
        session.run(ids[:, :n], np.ones((1, n), np.int64), np.arange(n)[None], cache, logits_for="last")
        return cache

    cache, single = prefill(), []
    for t in range(20, 26):
        logits, cache = session.run(ids[:, t:t + 1], np.ones((1, t + 1), np.int64), np.array([[t]]), cache,
                                    logits_for="last")
        single.append(logits[0, -1].copy())
    cache = prefill()
    buffers = list(cache.buffers)
    logits, cache = session.run(ids[:, 20:26], np.ones((1, 26), np.int64), np.arange(20, 26)[None], cache,
                                logits_for=4)
    assert logits.shape == (1, 4, trained.config.vocab_size)
    np.testing.assert_allclose(logits[0], single[2:], atol=1e-4)
    cache.length = 22  # keep two of the six new positions
    logits, cache = session.run(ids[:, 22:23], np.ones((1, 23), np.int64), np.array([[22]]), cache, logits_for=1)
    np.testing.assert_allclose(logits[0, -1], single[2], atol=1e-4)
    assert all(a is b for a, b in zip(buffers, cache.buffers))
    for bad in (0, -1, 7, "first", True):
        with pytest.raises(InvalidArgumentError, match="logits_for"):
            session.run(ids[:, 23:24], np.ones((1, 24), np.int64), np.array([[23]]), cache, logits_for=bad)


def test_batches_stream_and_logprobs(trained):
    """Batches and num_return_sequences run the plain loop (same tokens, no stats); stream() and logprobs work."""
    batch = trained.generate(PROMPTS, max_new_tokens=20, prompt_lookup_num_tokens=5)
    assert [r.token_ids for r in batch] == [r.token_ids for r in trained.generate(PROMPTS, max_new_tokens=20)]
    assert all(r.speculation is None for r in batch)
    several = trained.generate(PROMPTS[0], max_new_tokens=20, do_sample=True, seed=1, num_return_sequences=2,
                               prompt_lookup_num_tokens=5)
    assert [r.token_ids for r in several] == [r.token_ids for r in trained.generate(
        PROMPTS[0], max_new_tokens=20, do_sample=True, seed=1, num_return_sequences=2)]
    for prompt in PROMPTS:
        assert "".join(trained.stream(prompt, max_new_tokens=NEW, prompt_lookup_num_tokens=5)) == \
            trained.generate(prompt, max_new_tokens=NEW).text
    plain = trained.generate(PROMPTS[0], max_new_tokens=NEW, logprobs=2)
    ours = trained.generate(PROMPTS[0], max_new_tokens=NEW, logprobs=2, prompt_lookup_num_tokens=5)
    assert ours.speculation.accepted > 0
    for (a, top_a), (b, top_b) in zip(plain.logprobs, ours.logprobs):
        assert abs(a - b) < 1e-4 and [t for t, _ in top_a] == [t for t, _ in top_b]
        np.testing.assert_allclose([v for _, v in top_a], [v for _, v in top_b], atol=1e-4)


def test_bad_options(trained, tiny_export, tmp_path):
    for options, name in ((dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens"),
                          (dict(prompt_lookup_num_tokens=2.5), "prompt_lookup_num_tokens"),
                          (dict(max_matching_ngram_size=0), "max_matching_ngram_size"),
                          (dict(num_assistant_tokens=0), "num_assistant_tokens"),
                          (dict(num_assistant_tokens_schedule="fast"), "num_assistant_tokens_schedule"),
                          (dict(assistant_model=42), "assistant_model"),
                          (dict(assistant_model=tiny_export, prompt_lookup_num_tokens=3), "both draft")):
        with pytest.raises(InvalidArgumentError, match=name):
            trained.generate("Hello", **options)
    other = shutil.copytree(tiny_export, tmp_path / "other")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["hello"], tokenizer["model"]["vocab"]["Hello"] = \
        tokenizer["model"]["vocab"]["Hello"], tokenizer["model"]["vocab"]["hello"]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(InvalidArgumentError, match="another vocabulary") as error:
        trained.generate("Hello", assistant_model=gpt2onnx.load(other, check_hashes=False))
    assert "same tokenizer" in error.value.hint
    with pytest.raises(InvalidArgumentError, match="assistant_model"):
        trained.stream("Hello", assistant_model=42)


def test_cli_prompt_lookup_and_assistant(trained_export, capsys):
    base = ["generate", "The :substitute command", "-m", str(trained_export), "--max-new-tokens", "30"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--prompt-lookup", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "drafted tokens kept" in captured.err
    assert main(base + ["--assistant-model", str(trained_export), "--num-assistant-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "drafted tokens kept" in captured.err  # the assistant did draft
