"""Beam search and beam sampling: token for token as transformers 4.57, scores as its `sequences_scores`."""

import numpy as np
import pytest

from gpt2onnx.errors import InvalidArgumentError
from gpt2onnx.generation.torch_random import TorchGenerator
from gpt2onnx.runtime.kv_cache import KVCache
from gpt2onnx.tools.cli import main

PROMPTS = ["Hello, I'm a language model,", "Vim: the :s command", "naïve café — 日本語 😀", "fs.readFile("]
CASES = [  # (options, prompts in the batch); every option family with batches of 1 and 3
    (dict(num_beams=2), 1), (dict(num_beams=5), 3),
    (dict(num_beams=4, num_return_sequences=3, length_penalty=0.5), 1),
    (dict(num_beams=4, num_return_sequences=2, length_penalty=2.0), 3),
    (dict(num_beams=3, length_penalty=0.0, early_stopping="never"), 3),
    (dict(num_beams=4, length_penalty=-1.0), 1),
    (dict(num_beams=4, early_stopping=True, num_return_sequences=4), 3),
    (dict(num_beams=2, early_stopping="never", length_penalty=1.5), 1),
    (dict(num_beams=4, no_repeat_ngram_size=2, repetition_penalty=1.3), 3),
    (dict(num_beams=3, min_new_tokens=16, max_new_tokens=20), 1),
]
SAMPLED = [  # beam sampling: (seed, options, prompts)
    (0, dict(num_beams=2), 1), (1, dict(num_beams=4, top_k=0, num_return_sequences=2), 3),
    (2, dict(num_beams=3, temperature=0.7, top_p=0.9, top_k=0), 1), (3, dict(num_beams=5, top_k=1), 3),
    (4, dict(num_beams=4, temperature=1.3, top_k=20, length_penalty=0.5), 1),
    (5, dict(num_beams=2, top_p=0.05, top_k=0, early_stopping=True), 3),
]


def _transformers_beams(model, tokenizer, prompts, options, *, seed=0, max_new_tokens=24):
    """transformers' beams (new token ids up to each sequence's own end) and sequences_scores."""
    import torch
    from transformers import set_seed

    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    set_seed(seed)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                             output_scores=True, return_dict_in_generate=True, **options)
    width = batch["input_ids"].shape[1]
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()  # a beam's new tokens, as transformers counts them
    rows = [row[width:width + n] for row, n in zip(out.sequences.tolist(), lengths)]
    return rows, out.sequences_scores.numpy()


def _ours(model, prompts, options, **given):
    results = model.generate(prompts, **options, **given)
    flat = [r for group in results for r in (group if isinstance(group, list) else [group])]
    return [r.token_ids for r in flat], np.array([r.sequence_score for r in flat]), flat


def _check(trained, reference, options, size, *, seed=0, do_sample=False):
    model, tokenizer = reference
    prompts = PROMPTS[:size] if size == 1 else PROMPTS[1:1 + size]
    options = dict(options)
    max_new_tokens = options.pop("max_new_tokens", 16)
    rows, scores = _transformers_beams(model, tokenizer, prompts, {**options, "do_sample": do_sample}, seed=seed,
                                       max_new_tokens=max_new_tokens)
    ours, our_scores, results = _ours(trained, prompts, options, do_sample=do_sample, seed=seed,
                                      max_new_tokens=max_new_tokens)
    assert ours == rows, (options, prompts)
    # the logits are PyTorch's within ~1e-5 and log_softmax is torch's own float32 arithmetic (beam.py)
    np.testing.assert_allclose(our_scores, scores, atol=1e-4, rtol=1e-5)
    return results


@pytest.mark.parametrize("options,size", CASES, ids=[f"{o}-batch{s}" for o, s in CASES])
def test_beam_search_equals_transformers(trained, trained_reference, options, size):
    results = _check(trained, trained_reference, options, size)
    eos = trained.eos_token_id
    for r in results:  # a beam ends at <|endoftext|> or at max_new_tokens
        assert r.finish_reason == ("eos" if r.token_ids[-1] == eos else "length") and r.seed is None


@pytest.mark.parametrize("seed,options,size", SAMPLED, ids=[f"seed{s}-{o}-batch{n}" for s, o, n in SAMPLED])
def test_beam_sampling_equals_transformers(trained, trained_reference, seed, options, size):
    results = _check(trained, trained_reference, options, size, seed=seed, do_sample=True)
    assert all(r.seed == seed for r in results)


def test_beams_end_at_eos_like_transformers(trained, trained_reference):
    """An empty prompt (<|endoftext|>) on the trained model finishes beams with <|endoftext|> early."""
    model, tokenizer = trained_reference
    rows, scores = _transformers_beams(model, tokenizer, [tokenizer.eos_token, "The"], {"num_beams": 4,
                                       "num_return_sequences": 4}, max_new_tokens=40)
    ours, our_scores, _ = _ours(trained, ["", "The"], {"num_beams": 4, "num_return_sequences": 4},
                                max_new_tokens=40)
    assert ours == rows
    np.testing.assert_allclose(our_scores, scores, atol=1e-4, rtol=1e-5)


def test_ignore_eos_gives_full_length_beams(trained):
    results = trained.generate(["", "The"], num_beams=3, num_return_sequences=3, max_new_tokens=12, ignore_eos=True)
    assert [len(r.token_ids) for group in results for r in group] == [12] * 6
    scores = [r.sequence_score for r in results[0]]
    assert scores == sorted(scores, reverse=True)


def test_multinomial_without_replacement_equals_torch():
    """TorchGenerator.multinomial(probs, k) draws what torch.multinomial(probs, k) draws, bit for bit, and leaves
    the stream where torch leaves it."""
    import torch

    for seed in range(12):
        rng = np.random.default_rng(seed)
        logits = (rng.normal(size=(3, 4 * 997)) * 3).astype(np.float32)
        if seed % 2:
            logits[:, rng.random(logits.shape[1]) < 0.95] = -np.inf  # mostly zeros, as after top-k
        probs = torch.softmax(torch.from_numpy(logits), dim=-1)
        k = 2 + seed % 9
        torch.manual_seed(seed)
        expected = [torch.multinomial(probs, k).numpy(), torch.multinomial(probs, 1)[:, 0].numpy()]
        ours = TorchGenerator(seed)
        assert np.array_equal(ours.multinomial(probs.numpy(), k), expected[0])
        assert np.array_equal(ours.multinomial_one(probs.numpy()), expected[1])


def test_reorder_equals_fancy_index_and_copies_only_changed_rows():
    rng = np.random.default_rng(0)
    for trial in range(40):
        batch, length = int(rng.integers(1, 9)), int(rng.integers(1, 6))
        buffers = [rng.normal(size=(batch, 2, 8, 3)).astype(np.float32) for _ in range(4)]
        cache = KVCache([b.copy() for b in buffers], length=length)
        index = rng.integers(0, batch, size=batch) if trial % 3 else rng.permutation(batch)
        if trial % 5 == 0:
            index = np.arange(batch)
        held = [b for b in cache.buffers]
        copied = cache.reorder(index)
        changed = int((index != np.arange(batch)).sum())
        assert changed <= copied <= changed + changed // 2  # the changed rows, and one temporary per cycle
        for before, after, same in zip(buffers, cache.buffers, held):
            assert after is same  # in place: the session's binding stays valid
            np.testing.assert_array_equal(after[:, :, :length], before[index, :, :length])
            np.testing.assert_array_equal(after[:, :, length:], before[:, :, length:])  # free room untouched


BAD = [
    (dict(num_beams=0), "num_beams"), (dict(num_beams=65), "num_beams"), (dict(num_beams=2.0), "num_beams"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(num_beams=2, early_stopping=1), "early_stopping"),
    (dict(num_beams=2, num_return_sequences=3), "more than num_beams"),
    (dict(num_beams=2, stop=["\n"]), "stop strings"), (dict(num_beams=2, logprobs=2), "logprobs"),
    (dict(num_return_sequences=2), "num_beams >= num_return_sequences"),
]


@pytest.mark.parametrize("options,words", BAD, ids=[w for _, w in BAD])
def test_bad_beam_options_are_refused_with_a_hint(tiny, options, words):
    with pytest.raises(InvalidArgumentError, match=words) as error:
        tiny.generate("Hello", max_new_tokens=4, **options)
    assert error.value.hint and "\n" not in error.value.message


def test_stream_engine_and_cli(tiny, tiny_export, capsys):
    with pytest.raises(InvalidArgumentError, match="beam search"):
        tiny.stream("Hello", num_beams=2)
    from gpt2onnx.generation.engine import Engine
    from gpt2onnx.generation.settings import GenerationSettings

    with Engine(tiny) as engine:
        with pytest.raises(InvalidArgumentError, match="beam search"):
            engine.submit([1, 2, 3], GenerationSettings(num_beams=2))
    expected = tiny.generate("Hello", max_new_tokens=6, num_beams=4, num_return_sequences=2, early_stopping=True,
                             length_penalty=0.5)
    args = ["generate", "Hello", "-m", str(tiny_export), "--max-new-tokens", "6", "--num-beams", "4", "-n", "2"]
    assert main(args + ["--early-stopping", "true", "--length-penalty", "0.5", "--json"]) == 0
    import json

    records = json.loads(capsys.readouterr().out)
    assert [r["token_ids"] for r in records] == [r.token_ids for r in expected]
    assert [r["sequence_score"] for r in records] == [r.sequence_score for r in expected]
    with pytest.raises(SystemExit) as exit_:  # argparse's own one-line error, exit 2
        main(args + ["--early-stopping", "maybe"])
    assert exit_.value.code == 2 and "invalid early_stopping value: 'maybe'" in capsys.readouterr().err


def test_parity_traces_beam_differences(trained, trained_reference):
    """verify's beam rule: our beam search re-run on PyTorch's logits (TorchSession) gives transformers' beams,
    so a row that really matches traces to no differing step, and a row changed by a bug is unexplained."""
    from gpt2onnx_export import parity

    model, tokenizer = trained_reference
    case = parity.beam_cases(range(1), max_new_tokens=12)[1]  # 2 beams, 2 sequences, batch of 3
    runner = parity.SideBySide(trained, model, tokenizer, atol=1e-4)
    assert runner.run(case)["divergences"] == []
    ours, prompt_ids = runner._ours(case)
    same = parity.explain_beams(trained, model, case, 3, ours[3], ours[3], prompt_ids, atol=1e-4)
    assert not same.explained and "same candidates at every step" in same.reason
    bug = parity.explain_beams(trained, model, case, 3, ours[3], ours[3][:-1] + [ours[3][-1] ^ 1], prompt_ids,
                               atol=1e-4)
    assert not bug.explained and "(a bug)" in bug.reason
