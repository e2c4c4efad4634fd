"""Generation as users expect it: batches, sampling, seeds, streaming, stopping, threads, bad input."""

import argparse
import concurrent.futures
import dataclasses
import inspect
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import gpt2onnx
from gpt2onnx.errors import GenerationError, InvalidArgumentError
from gpt2onnx.generation import generator
from gpt2onnx.generation.defaults import TRANSFORMERS_DEFAULTS, model_defaults, resolve
from gpt2onnx.generation.sampling import process
from gpt2onnx.generation.settings import OPTIONS, GenerationSettings
from gpt2onnx.text.stopping import ReleasedText, cut_at_stop
from gpt2onnx.tools.cli import build_parser, main

PROMPTS = ["The :substitute command", "fs.readFile(path, options", "In Vim, to", "x"]


def test_batch_equals_single_runs(trained):
    for options in (dict(max_new_tokens=24), dict(max_new_tokens=24, repetition_penalty=1.3, no_repeat_ngram_size=3)):
        batch = trained.generate(PROMPTS, **options)
        for prompt, result in zip(PROMPTS, batch):
            assert result.token_ids == trained.generate(prompt, **options).token_ids, (prompt, options)


def test_greedy_padded_batch_equals_transformers(trained, trained_reference):
    import torch

    model, tokenizer = trained_reference
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    for options in (dict(), dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2), dict(min_new_tokens=5)):
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=False, max_new_tokens=20, pad_token_id=tokenizer.eos_token_id,
                                 **options)
        width = batch["input_ids"].shape[1]
        ours = trained.generate(PROMPTS, max_new_tokens=20, **options)
        for row, result in zip(out[:, width:].tolist(), ours):
            eos = tokenizer.eos_token_id
            expected = row[: row.index(eos) + 1] if eos in row else row
            assert result.token_ids == expected, options
        for prompt in PROMPTS:  # single prompts too
            ids = tokenizer(prompt, return_tensors="pt")
            with torch.inference_mode():
                single = model.generate(**ids, do_sample=False, max_new_tokens=20, pad_token_id=50256, **options)
            assert trained.generate(prompt, max_new_tokens=20, **options).token_ids == \
                single[0, ids["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("options", [dict(do_sample=False), dict(do_sample=False, repetition_penalty=1.3),
                                     dict(do_sample=False, min_new_tokens=5), dict(do_sample=True),
                                     dict(do_sample=True, top_k=0, top_p=0.9), dict(do_sample=True, temperature=0.7)])
def test_sampling_leaves_the_callers_logits_untouched(options):
    from gpt2onnx.generation.sampling import sample
    from gpt2onnx.generation.settings import GenerationSettings
    from gpt2onnx.generation.torch_random import TorchGenerator

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 1000)).astype(np.float32)
    before = logits.copy()
    settings = GenerationSettings(max_new_tokens=8, **options)
    sample(logits, rng.integers(0, 1000, (3, 6)), 1, settings, TorchGenerator(0) if settings.do_sample else None,
           eos_id=7)
    np.testing.assert_array_equal(logits, before)


def test_processors_equal_transformers():
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    for trial in range(20):
        batch, vocab, length = 3, 500, 12
        logits = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)
        sequences = rng.integers(0, 40, (batch, length))  # small range: repeats and n-grams happen
        settings = gpt2onnx.GenerationSettings(do_sample=True, temperature=float(rng.uniform(0.3, 2)),
                                               top_k=int(rng.integers(0, 60)), top_p=float(rng.uniform(0.3, 1)),
                                               repetition_penalty=float(rng.uniform(0.5, 2)),
                                               no_repeat_ngram_size=int(rng.integers(0, 4)), min_new_tokens=3)
        processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)])
        if settings.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size))
        processors.append(MinNewTokensLengthLogitsProcessor(length - 2, 3, torch.tensor([7])))
        processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        processors.append(TopPLogitsWarper(settings.top_p))
        expected = processors(torch.from_numpy(sequences), torch.from_numpy(logits.copy())).numpy()
        ours = process(logits, sequences, 2, settings, eos_id=7)
        assert np.array_equal(np.isinf(ours), np.isinf(expected)), trial
        finite = np.isfinite(expected)
        np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6)


def test_same_seed_same_text_across_calls_and_processes(trained):
    for sampler in ("numpy", "torch"):
        options = dict(do_sample=True, top_p=0.9, max_new_tokens=24, seed=1234, sampler=sampler)
        first = trained.generate(PROMPTS[0], **options)
        assert first.seed == 1234
        assert trained.generate(PROMPTS[0], **options).token_ids == first.token_ids
        other = trained.generate(PROMPTS[0], **{**options, "seed": 1235})
        assert other.token_ids != first.token_ids
        code = (f"import gpt2onnx, json; m = gpt2onnx.load({str(trained.directory)!r}); "
                f"print(json.dumps(m.generate({PROMPTS[0]!r}, **{options!r}).token_ids))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert json.loads(done.stdout) == first.token_ids
    unseeded = trained.generate(PROMPTS[0], do_sample=True, max_new_tokens=8, sampler="numpy")
    again = trained.generate(PROMPTS[0], do_sample=True, max_new_tokens=8, sampler="numpy", seed=unseeded.seed)
    assert again.token_ids == unseeded.token_ids  # the reported seed reproduces an unseeded call


def test_num_return_sequences_prefills_once(trained, monkeypatch):
    calls = []
    real_run = trained.session.run

    def spy(ids, mask, positions, cache, **kwargs):
        calls.append((ids.shape, kwargs))
        return real_run(ids, mask, positions, cache, **kwargs)

    monkeypatch.setattr(trained.session, "run", spy)
    results = trained.generate(PROMPTS[:2], do_sample=True, num_return_sequences=3, max_new_tokens=6,
                               ignore_eos=True, seed=0, sampler="numpy")
    assert calls[0][0] == (2, max(len(trained.encode_prompt(p)) for p in PROMPTS[:2]))
    assert all(shape == (6, 1) for shape, _ in calls[1:]) and len(calls) == 6
    # the head runs for the last position only, in the prefill too
    assert all(kwargs == {"logits_for": "last", "reuse_logits": True} for _, kwargs in calls)
    assert [len(group) for group in results] == [3, 3]
    assert len({tuple(r.token_ids) for r in results[0]}) > 1  # the copies sample independently


def test_stream_joins_to_generate(trained):
    for options in (dict(max_new_tokens=40), dict(max_new_tokens=40, do_sample=True, seed=5),
                    dict(max_new_tokens=60, stop=["\n\n", "*E"])):
        pieces = list(trained.stream(PROMPTS[0], **options))
        assert "".join(pieces) == trained.generate(PROMPTS[0], **options).text
        assert len(pieces) > 3


def test_stream_never_splits_a_character(trained, monkeypatch):
    text = " naïve 😀 日本語 ok"
    forced = trained.tokenizer.encode(text)
    assert any("\ufffd" in trained.tokenizer.decode([t]) for t in forced)  # some tokens are partial bytes
    steps = iter(forced)
    monkeypatch.setattr(generator, "choose", lambda *a, **k: np.array([next(steps)]))
    pieces = list(trained.stream("x", max_new_tokens=len(forced)))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_released_text_joins_to_the_whole_decode(trained):
    """ReleasedText decodes only the tail since the last character boundary: its pieces still join to the
    decode of all the tokens, cut before the first stop string, at the first token whose text holds one;
    no piece holds a partial character or the start of a possible stop string."""
    decode = trained.tokenizer.decode
    rng = np.random.default_rng(0)
    text = " naïve 😀 日本語 ok, the end.\n\n" * 3
    pieces_of = trained.tokenizer.encode(text)
    for trial in range(40):
        tokens = pieces_of if trial % 2 else rng.integers(0, trained.config.vocab_size, 60).tolist()
        full = decode(tokens)
        stop = () if trial % 4 == 1 else (full[rng.integers(5, len(full) - 3):][:2 + trial % 3], "never")
        release = ReleasedText(stop, decode)
        pieces, used = [], 0
        for token in tokens:
            pieces.append(release.add(token))
            used += 1
            assert release.hit == (cut_at_stop(decode(tokens[:used]), stop)[1] if stop else False)
            if release.hit:
                break
        pieces.append(release.finish())
        assert "".join(pieces) == cut_at_stop(decode(tokens[:used]), stop)[0] == release.text, trial
        if trial % 2:
            assert not any("\ufffd" in p for p in pieces)


def test_stream_can_stop_early(trained, monkeypatch):
    calls = []
    real_run = trained.session.run
    monkeypatch.setattr(trained.session, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    stream = trained.stream(PROMPTS[1], max_new_tokens=200, ignore_eos=True)
    next(stream)
    stream.close()
    assert len(calls) <= 3


def test_eos_per_row_and_ignore_eos(trained, monkeypatch):
    eos = trained.eos_token_id
    real_choose, step = generator.choose, [0]
    # row 0 says <|endoftext|> at its third step; row 1 never does (choose runs once a step)
    def scripted(*args, **kwargs):
        chosen = real_choose(*args, **kwargs)
        chosen[chosen == eos] = 13
        if step[0] == 2:
            chosen[0] = eos
        step[0] += 1
        return chosen

    monkeypatch.setattr(generator, "choose", scripted)
    first, second = trained.generate(PROMPTS[:2], max_new_tokens=10)
    assert first.token_ids[-1] == eos and len(first.token_ids) == 3 and first.finish_reason == "eos"
    assert "<|endoftext|>" not in first.text
    assert len(second.token_ids) == 10 and second.finish_reason == "length"
    step[0] = 0
    fixed = trained.generate(PROMPTS[:2], max_new_tokens=10, ignore_eos=True)
    assert [len(r.token_ids) for r in fixed] == [10, 10] and fixed[0].token_ids[2] == eos


def test_multi_token_stop_string(trained):
    full = trained.generate(PROMPTS[1], max_new_tokens=60)
    start = len(full.text) // 2
    stop = full.text[start:start + 6]
    assert len(trained.tokenizer.encode(stop)) > 1
    cut = trained.generate(PROMPTS[1], max_new_tokens=60, stop=["never appears here", stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids
    assert stop in trained.tokenizer.decode(cut.token_ids) and stop not in trained.tokenizer.decode(cut.token_ids[:-1])


def test_threads_give_serial_results(tiny):
    jobs = [(PROMPTS[i % 4], dict(max_new_tokens=12, do_sample=i % 2 == 0, seed=i, sampler="numpy"))
            for i in range(200)]
    serial = [tiny.generate(p, **o).token_ids for p, o in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        threaded = list(pool.map(lambda job: tiny.generate(job[0], **job[1]).token_ids, jobs))
    assert threaded == serial


def test_defaults_follow_the_model_directory():
    gpt2_config = {"task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}}
    defaults = model_defaults({"bos_token_id": 50256, "eos_token_id": 50256}, gpt2_config)
    settings = resolve(defaults, {}, prompt_length=10)
    assert settings.do_sample and settings.top_k == 50 and settings.max_new_tokens == 40
    # the caller's max_length beats a max_new_tokens that came from the model directory
    defaults = model_defaults({"max_new_tokens": 256}, {})
    assert resolve(defaults, {"max_length": 30}, prompt_length=10).max_new_tokens == 20
    # both from the caller: max_new_tokens wins
    assert resolve(defaults, {"max_length": 30, "max_new_tokens": 5}, prompt_length=10).max_new_tokens == 5
    assert resolve(model_defaults({}, {}), {}, prompt_length=3).max_new_tokens == 20  # transformers' default


def test_no_options_equals_transformers_generate_without_options(trained, trained_reference):
    import torch

    model, tokenizer = trained_reference
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, pad_token_id=tokenizer.eos_token_id)
        assert trained.generate(prompt).token_ids == out[0, ids["input_ids"].shape[1]:].tolist()


def test_model_directory_defaults_apply(tiny_export, tmp_path):
    import shutil

    model_dir = shutil.copytree(tiny_export, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["task_specific_params"] = {"text-generation": {"do_sample": True, "max_length": 12}}
    (model_dir / "config.json").write_text(json.dumps(config))
    model = gpt2onnx.load(model_dir, check_hashes=False)
    result = model.generate("Hello", seed=3, ignore_eos=True)
    assert len(result.token_ids) == 11 and result.seed == 3  # sampled (seeded), max_length counted the prompt
    assert result.token_ids == model.generate("Hello", seed=3, ignore_eos=True, do_sample=True, top_k=50,
                                              max_new_tokens=11).token_ids


def test_every_generation_option_is_written_in_one_table():
    """settings.OPTIONS, GenerationSettings, Model.generate's signature and docstring and the CLI's flags agree, so
    an option written in one place only fails here."""
    fields = [f.name for f in dataclasses.fields(GenerationSettings)]
    assert set(OPTIONS) == set(fields) | {"max_length"}  # max_length is resolved into max_new_tokens
    assert all(option.help and option.hint for option in OPTIONS.values())
    parameters = inspect.signature(gpt2onnx.Model.generate).parameters
    keywords = [name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY]
    # how to run and what to return, not what to generate
    calls = ["return_full_text", "truncate", "allow_special_tokens", "logprobs", "output_scores",
             "return_dict_in_generate", "assistant_model"]
    assert keywords == list(OPTIONS) + calls
    assert [name for name in OPTIONS if parameters[name].default is not None] == []  # None: the model's default
    undocumented = [name for name in keywords if f"\n        {name}: " not in gpt2onnx.Model.generate.__doc__]
    assert undocumented == []
    commands = next(a for a in build_parser(["generate"])._actions if isinstance(a, argparse._SubParsersAction))
    flags = {action.dest: action for action in commands.choices["generate"]._actions}
    for name, option in OPTIONS.items():
        assert "--" + name.replace("_", "-") in flags[name].option_strings and flags[name].help == option.help
    assert flags["do_sample"].default is None and flags["seed"].type is int and flags["top_p"].type is float


def test_transformers_defaults_are_transformers_own():
    """TRANSFORMERS_DEFAULTS (what a model directory may set, the pipeline's options, parity's) holds transformers'
    GenerationConfig defaults, for every option of ours that transformers has; ours are the same."""
    from transformers import GenerationConfig

    config = GenerationConfig()
    theirs = {name: getattr(config, name) for name in OPTIONS if hasattr(config, name)}
    assert theirs.pop("max_new_tokens") is None and theirs.pop("min_new_tokens") is None  # None: 0 new tokens
    assert theirs == {k: v for k, v in TRANSFORMERS_DEFAULTS.items() if k != "min_new_tokens"}
    assert TRANSFORMERS_DEFAULTS["min_new_tokens"] == 0
    ours = {f.name: f.default for f in dataclasses.fields(GenerationSettings)}
    assert {k: ours[k] for k in TRANSFORMERS_DEFAULTS if k in ours} == {k: v for k, v in TRANSFORMERS_DEFAULTS.items()
                                                                     if k != "max_length"}


BAD = [
    (dict(temperature=-1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=10**9), "max_new_tokens"),
    (dict(max_length=0), "max_length"), (dict(num_return_sequences=0, do_sample=True), "num_return_sequences"),
    (dict(num_return_sequences=65, do_sample=True), "num_return_sequences"),
    (dict(num_return_sequences=2), "greedy"), (dict(seed=-1, do_sample=True), "seed"),
    (dict(seed=2**32, do_sample=True), "seed"), (dict(stop=[""]), "stop"), (dict(sampler="mt"), "sampler"),
    (dict(max_new_tokens=300), "n_positions"), (dict(truncate="right"), "truncate"), (dict(max_length=2), "max_length"),
]


@pytest.mark.parametrize("options,name", BAD, ids=[name for _, name in BAD])
def test_bad_options_name_the_parameter(tiny, options, name):
    with pytest.raises(InvalidArgumentError, match=name):
        tiny.generate("Hello there", **options)


def test_bad_prompts(tiny):
    for prompt, message in ((42, "prompt must be a string"), (["ok", None], "prompt 1 must be a string"),
                            ([], "non-empty list"), ("bad \ud800 text", "lone surrogate")):
        with pytest.raises(InvalidArgumentError, match=message):
            tiny.generate(prompt)
    assert tiny.generate("", max_new_tokens=3, ignore_eos=True).prompt_token_ids == [tiny.eos_token_id]
    typed = tiny.generate("a<|endoftext|>b", max_new_tokens=1).prompt_token_ids
    assert tiny.eos_token_id not in typed
    assert tiny.eos_token_id in tiny.generate("a<|endoftext|>b", max_new_tokens=1,
                                              allow_special_tokens=True).prompt_token_ids


def test_truncate_left(tiny):
    prompt = " a" * 250
    with pytest.raises(InvalidArgumentError, match="truncate='left'"):
        tiny.generate(prompt, max_new_tokens=20)
    result = tiny.generate(prompt, max_new_tokens=20, truncate="left", ignore_eos=True)
    assert len(result.prompt_token_ids) == 256 - 20 and len(result.token_ids) == 20


@pytest.mark.parametrize("damage", ["all nan", "one nan", "one inf"])
@pytest.mark.parametrize("options", [dict(), dict(do_sample=True, seed=3), dict(repetition_penalty=1.2)])
def test_non_finite_logits_name_the_step(tiny, monkeypatch, damage, options):
    real_run = tiny.session.run
    count = []

    def broken(*args, **kwargs):
        logits, cache = real_run(*args, **kwargs)
        count.append(1)
        if len(count) == 3:
            logits = logits * np.nan if damage == "all nan" else logits.copy()
            logits[0, -1, 1234] = np.nan if damage == "one nan" else logits[0, -1, 1234]
            logits[0, -1, 4321] = np.inf if damage == "one inf" else logits[0, -1, 4321]
        return logits, cache

    monkeypatch.setattr(tiny.session, "run", broken)
    with pytest.raises(GenerationError, match="non-finite logits at step 2"):
        tiny.generate("Hello", max_new_tokens=5, ignore_eos=True, **options)


def test_cli_options_stream_json_stdin(trained_export, capsys, monkeypatch):
    model = gpt2onnx.load(trained_export)
    expected = model.generate(PROMPTS[0], max_new_tokens=16, do_sample=True, seed=9, top_p=0.8)
    args = ["generate", PROMPTS[0], "-m", str(trained_export), "--max-new-tokens", "16", "--do-sample", "--seed", "9",
            "--top-p", "0.8"]
    assert main(args) == 0
    assert capsys.readouterr().out == PROMPTS[0] + expected.text + "\n"
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == PROMPTS[0] + expected.text + "\n"
    assert main(args + ["--json"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert record["token_ids"] == expected.token_ids and record["seed"] == 9
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPTS[0]))
    assert main(["generate", "-", *args[2:]]) == 0
    assert capsys.readouterr().out == PROMPTS[0] + expected.text + "\n"
    for bad in (["--temperature", "nan"], ["--top-k", "-3"], ["-n", "0", "--do-sample"]):
        assert main(args + bad) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err


def test_complete_is_generates_typed_core(trained):
    """Model.complete takes GenerationSettings as they are; generate() with the same options (the model's
    defaults then change nothing) gives the same rows, seeded sampling and a batch included."""
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=40, seed=11,
                                  num_return_sequences=2, frequency_penalty=0.5)
    prompts = ["The quick brown", "Vim is"]
    rows = trained.complete(prompts, settings)
    grouped = trained.generate(prompts, max_new_tokens=12, do_sample=True, temperature=0.9, top_k=40, seed=11,
                               num_return_sequences=2, frequency_penalty=0.5)
    assert [r.token_ids for r in rows] == [g.token_ids for pair in grouped for g in pair]
    assert [r.text for r in rows] == [g.text for pair in grouped for g in pair]
    assert len({tuple(r.token_ids) for r in rows}) > 1  # sampled rows, not copies
    with pytest.raises(InvalidArgumentError, match="GenerationSettings"):
        trained.complete("hi", {"max_new_tokens": 3})


def test_one_finish_rule():
    """stopping.finish_reason and ended_by_eos: the rule every loop and the engine follow."""
    from gpt2onnx.text.stopping import EOS, LENGTH, STOP, ended_by_eos, ends_text, finish_reason

    assert finish_reason(by_eos=True, stop_cut=False, stop_kept=False) == EOS
    assert finish_reason(by_eos=True, stop_cut=False, stop_kept=True) == EOS  # the end token is not a kept stop
    assert finish_reason(by_eos=True, stop_cut=True, stop_kept=False) == STOP  # a stop found before the end token
    assert finish_reason(by_eos=False, stop_cut=False, stop_kept=True) == STOP
    assert finish_reason(by_eos=False, stop_cut=False, stop_kept=False) == LENGTH
    tokens = np.array([5, 7, 50256])
    assert ended_by_eos(tokens, (7, 50256), ignore_eos=False).tolist() == [False, True, True]
    assert ended_by_eos(tokens, 50256, ignore_eos=True) is None
    assert ends_text(7, (7, 50256), ignore_eos=False) and not ends_text(7, 50256, ignore_eos=False)
    assert not ends_text(50256, 50256, ignore_eos=True)
