"""Same seed, same tokens as transformers: `set_seed(seed)` + `generate(do_sample=True)` and the pipeline."""

import pytest

import gpt2onnx
from gpt2onnx.generation.pipeline import pipeline
from helpers import transformers_generate

PROMPTS = ["Hello, I'm a language model,", "Vim: the :s command", "naïve café — 日本語 😀", "fs.readFile("]
SETTINGS = [
    dict(),  # transformers' defaults: top_k=50, temperature 1
    dict(top_k=0, top_p=0.9),
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.3, top_p=0.8, top_k=0),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=3),
    dict(num_return_sequences=5),
    dict(min_new_tokens=10, top_k=10),
]


def _ours(model, prompts, seed, options, max_new_tokens):
    results = model.generate(prompts, do_sample=True, seed=seed, max_new_tokens=max_new_tokens, **options)
    flat = [r for group in results for r in (group if isinstance(group, list) else [group])]
    return [r.token_ids for r in flat]


def _check_seeds(ours_model, reference, tokenizer, seeds, batch_sizes, max_new_tokens=24):
    checked = 0
    for seed in seeds:
        options = SETTINGS[seed % len(SETTINGS)]
        size = batch_sizes[seed % len(batch_sizes)]
        prompts = [PROMPTS[(seed + i) % len(PROMPTS)] for i in range(size)]
        expected = transformers_generate(reference, tokenizer, prompts, seed, options, max_new_tokens)
        assert _ours(ours_model, prompts, seed, options, max_new_tokens) == expected, (seed, options, prompts)
        checked += 1
    return checked


def test_seeded_sampling_equals_transformers_trained(trained_export, trained_reference):
    model, tokenizer = trained_reference
    ours = gpt2onnx.load(trained_export)
    assert _check_seeds(ours, model, tokenizer, range(28), batch_sizes=[1, 3, 5]) == 28


def test_seeded_sampling_equals_transformers_tiny(tiny_export):
    from transformers import AutoTokenizer

    from gpt2onnx_export.reference import torch_model
    from gpt2onnx_export.sources import random_source

    source = random_source("tiny", seed=0, workdir=tiny_export.parent / "work")
    reference = torch_model(source.config_dict, source.weights, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(tiny_export)
    ours = gpt2onnx.load(tiny_export)
    assert _check_seeds(ours, reference, tokenizer, range(100, 121), batch_sizes=[1, 3, 5]) == 21


def test_pipeline_generated_text_equals_transformers(trained_export, trained_dir):
    from transformers import pipeline as hf_pipeline
    from transformers import set_seed

    theirs = hf_pipeline("text-generation", model=str(trained_dir), device="cpu")
    ours = pipeline("text-generation", model=trained_export)
    # the seed article's call: transformers really generates 256 new tokens at temperature 0.7 here
    set_seed(42)
    expected = theirs("Hello, I'm a language model,", max_length=30, num_return_sequences=5)
    got = ours("Hello, I'm a language model,", max_length=30, num_return_sequences=5, seed=42)
    assert got == expected
    assert len(expected) == 5 and any(len(r["generated_text"]) > 400 for r in expected)
    for seed, call in ((7, dict(max_new_tokens=20, return_full_text=False)),
                       (8, dict(max_new_tokens=15, do_sample=False)),
                       (9, dict(max_new_tokens=12, top_p=0.9, clean_up_tokenization_spaces=False))):
        set_seed(seed)
        prompts = ["Hello , world !", "I 'm sure it 's fine", ""]
        assert ours(prompts, seed=seed, **call) == theirs(prompts, **call), call


@pytest.mark.heavy
def test_seeded_sampling_equals_transformers_random_gpt2(tmp_path):
    from transformers import AutoTokenizer

    from gpt2onnx_export.reference import torch_model
    from gpt2onnx_export.sources import random_source
    from helpers import export

    out = export("random:gpt2", tmp_path / "gpt2")
    source = random_source("gpt2", seed=0, workdir=tmp_path / "work")
    reference = torch_model(source.config_dict, source.weights, attn_implementation="sdpa")
    ours = gpt2onnx.load(out)
    assert _check_seeds(ours, reference, AutoTokenizer.from_pretrained(out), range(20), batch_sizes=[1, 3, 5],
                        max_new_tokens=16) == 20


ENDS = [50256, 13, 11]  # <|endoftext|>, "." and ",": a generation_config.json that lists several end tokens


@pytest.fixture(scope="module")
def several_ends(tmp_path_factory, trained_dir):
    """The trained model with generation_config.json's eos_token_id a list (as some fine-tuned checkpoints have):
    its export, and transformers' model and tokenizer read from the same directory."""
    import json
    import shutil

    import torch
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    from helpers import export

    source = tmp_path_factory.mktemp("several-ends") / "source"
    shutil.copytree(trained_dir, source)
    config = json.loads((source / "generation_config.json").read_text())
    (source / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": ENDS}))
    out = export(str(source), source.parent / "model")
    reference = GPT2LMHeadModel.from_pretrained(source, dtype=torch.float32).eval()
    assert reference.generation_config.eos_token_id == ENDS
    return source, out, reference, GPT2TokenizerFast.from_pretrained(source)


def _cut_at_end(row: list[int]) -> list[int]:
    """A row up to and including its first end token (transformers pads the rest)."""
    ends = [i for i, token in enumerate(row) if token in ENDS]
    return row[:ends[0] + 1] if ends else row


def test_every_end_token_of_the_generation_config_ends_a_row(several_ends):
    """Any id of generation_config.json's eos_token_id list ends a row, as transformers reads it: same tokens
    with the same seed (batches padded with the first id), greedy too; the end token is not part of the text."""
    import torch
    from transformers import set_seed

    _, out, reference, tokenizer = several_ends
    model = gpt2onnx.load(out)
    assert model.eos_token_ids == tuple(ENDS) and model.eos_token_id == ENDS[0]
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token
    ended = 0
    for seed in range(6):
        prompts = [PROMPTS[(seed + i) % len(PROMPTS)] for i in range(1 + seed % 3)]
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        set_seed(seed)
        with torch.inference_mode():
            generated = reference.generate(**batch, do_sample=True, max_new_tokens=40, top_k=0, pad_token_id=ENDS[0])
        expected = [_cut_at_end(row) for row in generated[:, batch["input_ids"].shape[1]:].tolist()]
        got = model.generate(prompts, do_sample=True, top_k=0, seed=seed, max_new_tokens=40)
        assert [g.token_ids for g in got] == expected, (seed, prompts)
        for generation in got:
            if generation.token_ids[-1] in ENDS[1:]:
                ended += 1
                assert generation.finish_reason == "eos"
                assert generation.text == tokenizer.decode(generation.token_ids[:-1])  # transformers' decode
    assert ended >= 3  # the test exercises the listed ids, not only running out of tokens
    greedy = model.generate(PROMPTS[0], max_new_tokens=40)
    with torch.inference_mode():
        ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
        theirs = reference.generate(ids, do_sample=False, max_new_tokens=40, pad_token_id=ENDS[0])
    assert greedy.token_ids == _cut_at_end(theirs[0, ids.shape[1]:].tolist())
    assert "".join(model.stream(PROMPTS[0], max_new_tokens=40)) == greedy.text


def test_every_end_token_ends_a_row_in_the_engine_and_the_pipeline(several_ends):
    """The engine (the server's) stops where model.generate stops, and reports the end token; the pipeline gives
    transformers' pipeline output for the same directory."""
    from transformers import pipeline as hf_pipeline
    from transformers import set_seed

    from gpt2onnx.generation.engine import Engine
    from gpt2onnx.generation.settings import GenerationSettings

    source, out, _, _ = several_ends
    model = gpt2onnx.load(out)
    ended = 0
    with Engine(model) as engine:
        for seed in range(4):
            settings = GenerationSettings(do_sample=True, top_k=0, seed=seed, max_new_tokens=40)
            request = engine.submit(model.tokenizer.encode(PROMPTS[seed]), settings)
            (row,) = request.result(timeout=60)
            alone = model.generate(PROMPTS[seed], do_sample=True, top_k=0, seed=seed, max_new_tokens=40)
            assert (row.token_ids, row.text, row.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
            ended += row.finish_reason == "eos" and row.token_ids[-1] in ENDS[1:]
    assert ended >= 1  # a row ended at a listed id other than <|endoftext|>: the engine's check of them ran
    theirs = hf_pipeline("text-generation", model=str(source), device="cpu")
    ours = pipeline("text-generation", model=out)
    for seed in (3, 4):
        set_seed(seed)
        expected = theirs(PROMPTS[:2], max_new_tokens=30, top_k=0)
        assert ours(PROMPTS[:2], max_new_tokens=30, top_k=0, seed=seed) == expected
