"""EngineOptions(batch_invariant=True): a seeded request's tokens are `model.generate`'s alone, whatever runs beside
it, at fp32, int8 and int4. Without the mode int8's and int4's differ by chance (int8's activation scale spans a
run's rows, int4's kernel changes with their number): not asserted here; the measured rates are in
benchmarks/results/2026-12-08-batch-invariance.md."""

import dataclasses

import pytest

from gpt2onnx.errors import InvalidArgumentError
from gpt2onnx.generation.engine import Engine, EngineOptions
from gpt2onnx.generation.settings import GenerationSettings
from helpers import export

SHORT = ["The :substitute command", "fs.readFile(path, options", "In Vim, to", "x", "A window is a viewport"]
LONG = "A buffer is the in-memory text of a file. A window is a viewport on a buffer. " * 4  # ~75 tokens


@pytest.fixture(scope="module", params=["fp32", "int8", "int4"])
def model(request, trained_export, trained_dir, tmp_path_factory):
    """The trained test model at each precision (the quantized ones exported once for the module, their quality
    gate scored on 8 KB of the held-out text: a minute of CPU less each than all 350 KB of it)."""
    import gpt2onnx

    if request.param == "fp32":
        return gpt2onnx.load(trained_export)
    work = tmp_path_factory.mktemp(f"trained-{request.param}")
    sample = work / "heldout-8k.txt"
    sample.write_text((trained_dir / "heldout.txt").read_text(encoding="utf-8")[:8000], encoding="utf-8")
    return gpt2onnx.load(export(str(trained_dir), work / "model", precision=request.param, eval_text=str(sample)))


def jobs() -> list[tuple[str, GenerationSettings, int | None]]:
    """(prompt, settings, logprobs): mixed prompt lengths (one that a prefill_chunk of 16 would cut in five),
    seeds, sampling options, n > 1, a greedy one, and lengths that make requests leave at different steps."""
    out = [(LONG, GenerationSettings(max_new_tokens=12, do_sample=True, seed=1, top_k=0), 1)]
    for i in range(10):
        out.append((SHORT[i % len(SHORT)] * (1 + i % 2), GenerationSettings(
            max_new_tokens=6 + 3 * (i % 4), do_sample=i != 9, seed=100 + i, top_k=(0, 40)[i % 2],
            temperature=(1.0, 0.8)[i % 2], num_return_sequences=1 + 2 * (i % 3 == 1),
            repetition_penalty=1.2 if i % 4 == 3 else 1.0), 1 if i % 2 else None))
    return out


def alone(model, prompt: str, settings: GenerationSettings, logprobs) -> list:
    """model.generate with the same settings and seed: one Generation per row."""
    options = dataclasses.asdict(settings) | {"stop": list(settings.stop)}
    result = model.generate(prompt, logprobs=logprobs, **options)
    return result if isinstance(result, list) else [result]


def test_requests_together_equal_each_alone(model):
    """Every request submitted at once (more rows than max_batch: some join as others leave) gives generate's
    tokens alone, and the same raw logprobs, bit for bit: each ran as generate runs it."""
    rows_per_step = []
    options = EngineOptions(batch_invariant=True, max_batch=8, prefill_chunk=16, on_step=rows_per_step.append)
    with Engine(model, options) as engine:
        submitted = [(p, s, k, engine.submit(model.encode_prompt(p), s, logprobs=k)) for p, s, k in jobs()]
        results = [(p, s, k, r.result(timeout=60), r.rows) for p, s, k, r in submitted]
    for prompt, settings, logprobs, rows, n in results:
        expected = alone(model, prompt, settings, logprobs)
        assert len(rows) == n == len(expected)
        for row, generation in zip(rows, expected):
            assert row.token_ids == generation.token_ids, (prompt, settings)
            assert row.finish_reason == generation.finish_reason and row.text == generation.text
            if logprobs is not None:
                assert [lp for lp, _ in row.logprobs] == [lp for lp, _ in generation.logprobs]
    assert max(rows_per_step) > 3  # several requests ran at once


def test_echo_and_a_request_joining_mid_decode(model):
    """A request with echo_logprobs (its prompt's logprobs from a run of their own) and one that arrives while the
    others decode give generate's tokens; the prompt's logprobs are model.score's, also when only scoring."""
    first = GenerationSettings(max_new_tokens=16, do_sample=True, seed=5, top_k=0, ignore_eos=True)
    late = GenerationSettings(max_new_tokens=6, do_sample=True, seed=6, num_return_sequences=2)
    with Engine(model, EngineOptions(batch_invariant=True, prefill_chunk=16)) as engine:
        running = engine.submit(model.encode_prompt(SHORT[0]), first)
        echo = engine.submit(model.encode_prompt(LONG), first, echo_logprobs=True, logprobs=1)
        next(running.events(timeout=30))  # decoding
        joining = engine.submit(model.encode_prompt(SHORT[2]), late)
        scoring = engine.submit(model.encode_prompt(LONG), GenerationSettings(max_new_tokens=0), echo_logprobs=True,
                                logprobs=1)
        got = [(SHORT[0], first, running), (LONG, first, echo), (SHORT[2], late, joining)]
        results = [(p, s, r.result(timeout=60)) for p, s, r in got]
        assert [(r.token_ids, r.finish_reason) for r in scoring.result(timeout=60)] == [([], "length")]
    for prompt, settings, rows in results:
        assert [r.token_ids for r in rows] == [g.token_ids for g in alone(model, prompt, settings, None)]
    score = model.score(LONG, top_logprobs=1)
    assert echo.prompt_logprobs == scoring.prompt_logprobs and len(echo.prompt_logprobs) == len(score.token_logprobs)
    for (ours, top), expected, expected_top in zip(echo.prompt_logprobs[1:], score.token_logprobs[1:],
                                                   score.top_logprobs[1:]):
        assert abs(ours - expected) < 1e-5 and [t for t, _ in top] == [t for t, _ in expected_top]


def test_the_option_is_checked_and_reaches_ray_and_the_cli():
    from gpt2onnx.serving.options import RayServeOptions
    from gpt2onnx.tools.cli import build_parser

    assert EngineOptions().batch_invariant is False
    with pytest.raises(InvalidArgumentError, match="batch_invariant"):
        EngineOptions(batch_invariant="yes")
    assert RayServeOptions.from_dict({"model_dir": "m", "batch_invariant": True}).engine.batch_invariant is True
    parser = build_parser()
    assert parser.parse_args(["serve", "m", "--batch-invariant"]).batch_invariant is True
    assert parser.parse_args(["serve", "m"]).batch_invariant is False
