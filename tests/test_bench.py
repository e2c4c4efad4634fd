"""`gpt2onnx bench`'s figures: decode rates are timed inside one call, from its first new token to its last, so
they do not move with the prefill's cost; every runner reports when each of its new tokens was produced.

These assert how the figures are derived, not speed (the bench itself measures that)."""

import time
from types import SimpleNamespace

import pytest

from gpt2onnx_export import bench

# small enough for random:tiny (256 positions) and for a fake clock
OPTIONS = bench.BenchOptions(runs=1, new_tokens=12, short_prompt=4, long_prompt=40, long_new_tokens=9, prefill=24,
                             batch=3)


def spec(options: bench.BenchOptions) -> dict:
    return {"prompts": bench.prompts(options), "new_tokens": options.new_tokens,
            "long_new_tokens": options.long_new_tokens, "batch": options.batch}


class FakeClock:
    """time.perf_counter for the bench, advanced only by the fake runner's work."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRunner(bench._Runner):
    """Generates at known costs: a prefill of `prompt_s` per prompt token, plus (for the long prompt) a jitter
    that changes from call to call and is larger than the whole decode; then `step_s(past)` per new token."""

    def __init__(self, clock: FakeClock, *, prompt_s: float, step_s, long_prompt: int, jitters: list[float]):
        self.clock, self.prompt_s, self.step_s, self.long_prompt = clock, prompt_s, step_s, long_prompt
        self.jitters = iter(jitters * 10)

    def generate(self, prompt, new, rows=1):
        self.clock.now += self.prompt_s * len(prompt)
        if len(prompt) == self.long_prompt:
            self.clock.now += next(self.jitters)
        stamps = []
        for i in range(new):
            if i:
                self.clock.now += self.step_s(len(prompt) + i)
            stamps.append(self.clock())
        return [[7] * new for _ in range(rows)], stamps if rows == 1 else []


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=fake))
    return fake


def _step_s(past: int) -> float:
    return 0.010 if past < OPTIONS.long_prompt else 0.025  # 100 tok/s at a short past, 40 at a long one


def test_decode_figures_are_the_step_rate_whatever_the_prefill_costs(clock):
    """A long prefill whose cost jitters by more than the whole decode (what an int8 KV cache did to the old
    difference between two calls) leaves decode@long exactly the rate of the steps."""
    for jitters in ([0.0, 3.0], [3.0, 0.0], [0.5, 0.5, 2.0]):
        runner = FakeRunner(clock, prompt_s=0.001, step_s=_step_s, long_prompt=OPTIONS.long_prompt, jitters=jitters)
        figures = bench._figures(bench._round(runner, spec(OPTIONS)), OPTIONS)
        assert figures["decode_short"] == pytest.approx(100.0)
        assert figures["decode_long"] == pytest.approx(40.0)


def test_whole_call_figures_keep_their_definitions(clock):
    """TTFT is the time of a whole 1-token call on the short prompt, prefill the prompt tokens over a whole
    1-token call, batch-5 all rows' tokens over the whole batched call."""
    runner = FakeRunner(clock, prompt_s=0.002, step_s=_step_s, long_prompt=OPTIONS.long_prompt, jitters=[1.0])
    figures = bench._figures(bench._round(runner, spec(OPTIONS)), OPTIONS)
    assert figures["ttft_ms"] == pytest.approx(1000 * 0.002 * OPTIONS.short_prompt)
    assert figures["prefill"] == pytest.approx(1 / 0.002)
    batch_s = 0.002 * OPTIONS.short_prompt + 0.010 * (OPTIONS.new_tokens - 1)
    assert figures["batch"] == pytest.approx(OPTIONS.batch * OPTIONS.new_tokens / batch_s)


@pytest.mark.parametrize("broken", ["missing", "unordered"])
def test_a_runner_must_time_every_new_token_in_order(clock, broken):
    class Broken(FakeRunner):
        def generate(self, prompt, new, rows=1):
            out, stamps = super().generate(prompt, new, rows)
            return out, stamps[1:] if broken == "missing" else stamps[::-1]

    runner = Broken(clock, prompt_s=0.001, step_s=_step_s, long_prompt=OPTIONS.long_prompt, jitters=[0.0])
    with pytest.raises(bench.GenerationError, match="token times"):
        bench._round(runner, spec(OPTIONS))


def _check_stamps(runner, prompt, new):
    """The call's tokens, after checking it gave one time per new token, increasing, inside the call."""
    before = time.perf_counter()
    out, stamps = runner.generate(prompt, new)
    after = time.perf_counter()
    assert [len(row) for row in out] == [new]
    assert len(stamps) == new
    assert before < stamps[0] and stamps[-1] < after
    assert all(a < b for a, b in zip(stamps, stamps[1:]))
    return out


def test_gpt2onnx_runner_times_each_token_and_keeps_the_ort_share(tiny_export):
    runner = bench._Gpt2OnnxRunner(tiny_export, "fp32", 1)
    prompt = bench.prompts(OPTIONS)["long"]
    _check_stamps(runner, prompt, 6)
    _check_stamps(runner, prompt[:3], 2)  # stamps of one call only
    out, stamps = runner.generate(prompt[:4], 5, 3)
    assert [len(row) for row in out] == [5] * 3 and stamps == []
    figures = bench._figures(bench._round(runner, spec(OPTIONS)), OPTIONS)
    assert 0 < figures["outside_ort"] < 1
    assert all(figures[k] > 0 for k in ("decode_short", "decode_long", "prefill", "ttft_ms", "batch"))


def test_torch_runner_streamer_times_each_new_token(trained_dir):
    runner = bench._TorchRunner(trained_dir, "fp32", 1)
    prompt = bench.prompts(OPTIONS)["short"]
    out = _check_stamps(runner, prompt, 5)
    # the streamer only watches: the tokens are those of generate without it
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        plain = runner.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                                      do_sample=False, pad_token_id=bench._EOS)
    assert out == plain[:, len(prompt):].tolist()


def test_ctranslate2_runner_callback_times_each_new_token(trained_dir, tmp_path):
    pytest.importorskip("ctranslate2")
    directory = tmp_path / "ct2"
    bench._convert("ctranslate2", "fp32", str(trained_dir), trained_dir, directory)
    runner = bench._CTranslate2Runner(directory, "fp32", 1)
    prompt = bench.prompts(OPTIONS)["short"]
    out = _check_stamps(runner, prompt, 5)
    tokens = [runner.tokenizer.id_to_token(i) for i in prompt]
    plain = runner.generator.generate_batch([tokens], max_length=5, min_length=5, beam_size=1, sampling_topk=1,
                                            include_prompt_in_result=False)
    assert out == [plain[0].sequences_ids[0]]
