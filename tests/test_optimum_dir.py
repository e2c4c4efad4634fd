"""GPT-2 directories Optimum exported (`--task text-generation-with-past`) run through gpt2onnx.load, without
torch: the same tokens as transformers, greedy and seeded, logprobs as torch's, served by the engine,
`gpt2onnx verify` passes, also in a Hub-style repository's onnx/ folder; a damaged layout is a one-line error."""

import logging
import shutil
import warnings

import numpy as np
import pytest

import gpt2onnx
from gpt2onnx.errors import ModelLoadError
from gpt2onnx.generation.engine import Engine, EngineOptions
from gpt2onnx.generation.settings import GenerationSettings
from gpt2onnx.runtime.kv_cache import KVCache
from gpt2onnx.runtime.optimum_layout import OPTIMUM, OptimumSession
from gpt2onnx.tools.cli import main
from helpers import one_error, run_cli, run_python, torch_logprobs, transformers_generate

PROMPTS = ["Use :set number to", "fs.readFile(path, options", "naïve café — 日本語 😀", "x"]
SAMPLING = [dict(), dict(top_k=0, top_p=0.9), dict(temperature=0.7, top_k=20),
            dict(repetition_penalty=1.3, no_repeat_ngram_size=3), dict(num_return_sequences=3),
            dict(min_new_tokens=10, top_k=10)]
TOL = 1e-4


@pytest.fixture(scope="module")
def optimum_dir(trained_dir, tmp_path_factory):
    """The trained test model exported by Optimum itself, fp32, as `optimum-cli export onnx` writes it."""
    exporters = pytest.importorskip("optimum.exporters.onnx",
                                    reason="optimum-onnx is not installed (pip install '.[test]')")
    out = tmp_path_factory.mktemp("optimum") / "gpt2-tiny-trained-optimum"
    with warnings.catch_warnings():  # the tracer's warnings are Optimum's concern
        warnings.simplefilter("ignore")
        exporters.main_export(str(trained_dir), output=str(out), task="text-generation-with-past", device="cpu",
                              dtype="fp32")
    assert not (out / "manifest.json").exists()
    return out


@pytest.fixture(scope="module")
def optimum(optimum_dir):
    return gpt2onnx.load(optimum_dir)


@pytest.fixture(scope="module")
def hub_repo(optimum_dir, trained_dir, tmp_path_factory):
    """A Hub-style repository: PyTorch weights, config and tokenizer at the top, the ONNX export in onnx/ (without
    its own tokenizer)."""
    repo = tmp_path_factory.mktemp("hub") / "repo"
    shutil.copytree(trained_dir, repo)
    (repo / "onnx").mkdir()
    for name in ("model.onnx", "config.json", "generation_config.json"):
        shutil.copyfile(optimum_dir / name, repo / "onnx" / name)
    return repo


def test_loads_with_one_line_saying_nothing_is_hash_checked(optimum_dir, caplog):
    with caplog.at_level(logging.WARNING):
        model = gpt2onnx.load(optimum_dir)
    assert isinstance(model.session, OptimumSession) and model.layout.kind == OPTIMUM and model.manifest is None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0] and "no file hashes" in lines[0] and "verify" in lines[0]


def test_greedy_equals_transformers(optimum, trained_reference):
    import torch

    reference, tokenizer = trained_reference
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = reference.generate(**ids, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                     pad_token_id=tokenizer.eos_token_id)
        expected = out[0, ids["input_ids"].shape[1]:].tolist()
        assert optimum.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids == expected, prompt


@pytest.mark.parametrize("size", [1, 3])
def test_seeded_sampling_equals_transformers(optimum, trained_reference, size):
    """Six seeds, each with its own settings; batches of 3 are left-padded prompts of different lengths."""
    reference, tokenizer = trained_reference
    for seed in range(6):
        options = SAMPLING[seed]
        prompts = [PROMPTS[(seed + i) % len(PROMPTS)] for i in range(size)]
        expected = transformers_generate(reference, tokenizer, prompts, seed, options, 20)
        results = optimum.generate(prompts, do_sample=True, seed=seed, max_new_tokens=20, **options)
        flat = [r for group in results for r in (group if isinstance(group, list) else [group])]
        assert [r.token_ids for r in flat] == expected, (seed, options, prompts)


def test_logprobs_and_score_equal_torch(optimum, trained_reference):
    result = optimum.generate(PROMPTS[0], max_new_tokens=10, do_sample=True, seed=3, top_k=20, logprobs=3)
    expected = torch_logprobs(trained_reference, result.prompt_token_ids + result.token_ids)
    for i, (token, (logprob, alternatives)) in enumerate(zip(result.token_ids, result.logprobs)):
        row = expected[len(result.prompt_token_ids) - 1 + i]
        assert abs(logprob - row[token]) < TOL
        assert [t for t, _ in alternatives] == np.argsort(-row, kind="stable")[:3].tolist()
    scores = optimum.score(PROMPTS)  # a left-padded batch
    for text, score in zip(PROMPTS, scores):
        ids = optimum.tokenizer.encode(text)
        expected = torch_logprobs(trained_reference, ids)
        got = np.array(score.token_logprobs[1:], np.float64)
        assert np.abs(got - [expected[i, t] for i, t in enumerate(ids[1:])]).max(initial=0) < TOL


def test_stream_joins_to_generate(optimum):
    for options in (dict(), dict(do_sample=True, seed=7, top_p=0.9), dict(stop="\n")):
        pieces = list(optimum.stream(PROMPTS[1], max_new_tokens=30, **options))
        assert "".join(pieces) == optimum.generate(PROMPTS[1], max_new_tokens=30, **options).text


def test_the_engine_serves_it(optimum):
    """Requests joining and leaving a running batch (the cache gathered, rows dropped and repeated) give what
    generate gives alone."""
    jobs = [(PROMPTS[i % len(PROMPTS)] * (1 + i % 2),
             GenerationSettings(max_new_tokens=6 + 4 * (i % 3), do_sample=i % 2 == 1, seed=50 + i,
                                num_return_sequences=1 + (i == 3) * 2)) for i in range(6)]
    with Engine(optimum, EngineOptions(max_batch=8, prefill_chunk=8)) as engine:
        requests = [engine.submit(optimum.encode_prompt(p), s) for p, s in jobs]
        results = [r.result(timeout=120) for r in requests]
        assert engine.stats().steps > 0
    for (prompt, settings), rows, request in zip(jobs, results, requests):
        alone = optimum.generate(prompt, max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                                 seed=request.seed, num_return_sequences=settings.num_return_sequences)
        alone = alone if isinstance(alone, list) else [alone]
        assert [r.token_ids for r in rows] == [g.token_ids for g in alone], (prompt, settings)


def test_kv_cache_surgery_on_its_presents(optimum):
    """gather, join, drop and repeat_rows on the caches Optimum's graph returns: a decode step of the regrouped
    rows gives each row's logits alone."""
    session = optimum.session
    prompts = [optimum.encode_prompt(p) for p in PROMPTS[:3]]

    def prefill(ids):
        _, cache = session.run(np.array([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None],
                               session.empty_cache(1))
        return cache

    def step(cache, lengths, token=13):
        """One decode step of every row (right-aligned, `lengths` positions of past each)."""
        width = cache.length
        pad = np.array([width - n for n in lengths])
        mask = (np.arange(width + 1)[None, :] >= pad[:, None]).astype(np.int64)
        logits, _ = session.run(np.full((len(lengths), 1), token), mask, np.array(lengths)[:, None], cache)
        return logits[:, -1]

    alone = [step(prefill(p), [len(p)])[0] for p in prompts]
    caches = [prefill(p) for p in prompts]
    a, b, c = (len(p) for p in prompts)
    width = max(a, b, c)
    batch = KVCache.gather([(caches[0], [0]), (caches[1], [0])], width=width, capacity=width + 4, rows=4)
    assert np.abs(step(batch, [a, b]) - alone[:2]).max() < 1e-4
    batch = batch.join([(caches[2], [0])])
    assert np.abs(step(batch, [a, b, c]) - alone).max() < 1e-4
    batch, where = batch.drop([0])
    assert where.tolist() == [-1, 1, 0]  # the last row moved into the hole
    assert np.abs(step(batch, [c, b]) - [alone[2], alone[1]]).max() < 1e-4
    twice = caches[1].repeat_rows(2)
    assert np.abs(step(twice, [b, b]) - [alone[1], alone[1]]).max() < 1e-4


def test_the_runtime_needs_no_torch_nor_optimum(optimum_dir):
    done = run_python(f"""
import gpt2onnx
print(gpt2onnx.load({str(optimum_dir)!r}).generate("Use :set", max_new_tokens=4).token_ids)
""", blocked=("torch", "transformers", "optimum"))
    assert done.returncode == 0, done.stderr


def test_hub_repository_with_an_onnx_folder(hub_repo, optimum, trained_dir):
    model = gpt2onnx.load(hub_repo)
    assert model.layout.model_file == hub_repo / "onnx" / "model.onnx"
    assert model.layout.tokenizer_file == hub_repo / "tokenizer.json"  # the onnx/ folder has none
    for prompt in PROMPTS[:2]:
        assert model.generate(prompt, max_new_tokens=12).token_ids == optimum.generate(prompt, max_new_tokens=12
                                                                                        ).token_ids


def test_verify_passes_on_an_optimum_export(optimum_dir, trained_dir, capsys):
    code = main(["verify", str(optimum_dir), "--reference", str(trained_dir), "--seeds", "2", "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "an Optimum export: no manifest" in out and "PASSED" in out


def test_verify_takes_the_repository_itself_as_reference(hub_repo, capsys):
    """A Hub-style repository with PyTorch weights at the top is its own reference; without weights, the
    reference must be named (exit 2, a hint)."""
    assert main(["verify", str(hub_repo), "--seeds", "0", "--max-new-tokens", "8"]) == 0, capsys.readouterr().out
    assert f"reference: {hub_repo}," in capsys.readouterr().out


def test_verify_without_reference_or_weights_is_refused(optimum_dir, capsys):
    assert main(["verify", str(optimum_dir)]) == 2
    err = capsys.readouterr().err
    assert "no gpt2onnx manifest" in err and "hint: pass --reference" in err


def _cli_error(directory, capsys) -> str:
    """`gpt2onnx generate` on a directory that cannot load: exit 1 and a one-line error (and its hint)."""
    code, _, err = run_cli(capsys, "generate", "x", "--model", directory, "--max-new-tokens", "2")
    assert code == 1
    return one_error(err)


def test_damaged_or_unsupported_layouts(optimum_dir, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    def copy(name):
        directory = tmp_path / name
        shutil.copytree(optimum_dir, directory, ignore=shutil.ignore_patterns("model.onnx"))
        return directory

    truncated = copy("truncated")
    (truncated / "model.onnx").write_bytes((optimum_dir / "model.onnx").read_bytes()[:5000])
    assert "model.onnx" in _cli_error(truncated, capsys)

    no_cache = copy("no-cache")  # an export without past_key_values (task text-generation)
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"]) for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g", ids,
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])])
    onnx.save(helper.make_model(graph), no_cache / "model.onnx")
    assert "no past_key_values inputs" in _cli_error(no_cache, capsys)

    other_model = copy("other-config")  # config.json of a model with more layers than the graph
    shutil.copyfile(optimum_dir / "model.onnx", other_model / "model.onnx")
    config = (optimum_dir / "config.json").read_text().replace('"n_layer": 4', '"n_layer": 6')
    (other_model / "config.json").write_text(config)
    assert "past_key_values.4" in _cli_error(other_model, capsys)

    older = copy("older-layout")  # optimum < 1.14 wrote decoder_model.onnx, decoder_model_merged.onnx, ...
    shutil.copyfile(optimum_dir / "model.onnx", older / "decoder_model_merged.onnx")
    assert "decoder_model_merged.onnx but no model.onnx" in _cli_error(older, capsys)

    no_tokenizer = copy("no-tokenizer")
    shutil.copyfile(optimum_dir / "model.onnx", no_tokenizer / "model.onnx")
    (no_tokenizer / "tokenizer.json").unlink()
    assert "no tokenizer.json" in _cli_error(no_tokenizer, capsys)
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        gpt2onnx.load(no_tokenizer)


def test_prompt_lookup_on_an_optimum_export_gives_plain_greedy_tokens(optimum):
    """Drafts are checked in one run of several positions: the Optimum session keeps the last k logits too."""
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat"
    plain = optimum.generate(prompt, max_new_tokens=16)
    looked_up = optimum.generate(prompt, max_new_tokens=16, prompt_lookup_num_tokens=4)
    assert looked_up.token_ids == plain.token_ids
    assert looked_up.speculation is not None and looked_up.speculation.accepted > 0  # drafts were kept
