"""`gpt2onnx bench`'s figures: decode rates are timed inside one call, from its first new token to its last, so
they do not move with the prefill's cost; every runner reports when each of its new tokens was produced.

These assert how the figures are derived, not speed (the bench itself measures that)."""

import json
import os
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from gpt2onnx.runtime import cpu, user_cache
from gpt2onnx_export import bench

# small enough for random:tiny (256 positions) and for a fake clock
OPTIONS = bench.BenchOptions(runs=1, new_tokens=12, short_prompt=4, long_prompt=40, long_new_tokens=9, prefill=24,
                             batch=3)


# what run_bench hands its workers for OPTIONS (test_run_bench_hands_every_worker_the_workload checks it)
SPEC = {"prompts": bench.prompts(OPTIONS), "new_tokens": 12, "long_new_tokens": 9, "batch": 3}


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
        figures = bench._figures(bench._round(runner, SPEC), OPTIONS)
        assert figures["decode_short"] == pytest.approx(100.0)
        assert figures["decode_long"] == pytest.approx(40.0)


def test_whole_call_figures_keep_their_definitions(clock):
    """TTFT is the time of a whole 1-token call on the short prompt, prefill the prompt tokens over a whole
    1-token call, batch-5 all rows' tokens over the whole batched call."""
    runner = FakeRunner(clock, prompt_s=0.002, step_s=_step_s, long_prompt=OPTIONS.long_prompt, jitters=[1.0])
    figures = bench._figures(bench._round(runner, SPEC), OPTIONS)
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
        bench._round(runner, SPEC)


def test_prompts_are_seeded_prefixes_of_one_random_text():
    prompts = bench.prompts(OPTIONS)
    assert {name: len(ids) for name, ids in prompts.items()} == {"short": 4, "long": 40, "prefill": 24}
    assert prompts["short"] == prompts["long"][:4] and prompts["prefill"] == prompts["long"][:24]
    assert all(0 <= i < 50256 for i in prompts["long"])  # never <|endoftext|>, which would end a sequence
    assert len(set(prompts["long"])) > 30  # random ids, not a constant
    assert bench.prompts(OPTIONS) == prompts  # the same for every framework, run and round


def test_run_bench_hands_every_worker_the_workload(clock, tmp_path, monkeypatch):
    """run_bench's parent side with workers that run the fake runner in this process: every worker gets the
    options' workload, the same each time, and the report's figures are those of the fake costs."""
    workers, started = [], []

    class Worker:  # bench._Worker without its process; requests cross JSON as they do to a worker
        def __init__(self, framework, precision, directory, threads, logs):
            started.append(("worker", framework, directory))
            self.name, self.framework, self.precision = f"{framework} {precision}", framework, precision
            self.loaded, self.requests, self.rounds = {"load_s": 0.5, "size_bytes": 2**20}, [], []
            self.runner = FakeRunner(clock, prompt_s=0.002, step_s=_step_s, long_prompt=40, jitters=[1.0, 0.0])
            workers.append(self)

        def ask(self, request):
            request = json.loads(json.dumps(request))
            self.requests.append(request)
            if request["cmd"] == "round":
                return bench._round(self.runner, request["spec"])
            return {"ok": True} if request["cmd"] == "warmup" else {"peak_rss_bytes": 3 * 2**20}

        def close(self):
            pass

    monkeypatch.setattr(bench, "_Worker", Worker)
    monkeypatch.setattr(bench, "_installed", lambda module: True)
    monkeypatch.setattr(bench, "prepare", lambda options, configs, progress: {c: tmp_path / c[0] for c in configs})
    monkeypatch.setattr(bench, "_warm_user_cache", lambda directory: started.append(("warm", directory)))
    options = replace(OPTIONS, runs=2, frameworks=("torch", "gpt2onnx"), precisions=("fp32",), threads=1,
                      work_dir=tmp_path)
    report = bench.run_bench(options, progress=lambda message: None)
    assert [(w.framework, w.precision) for w in workers] == [("torch", "fp32"), ("gpt2onnx", "fp32")]
    # gpt2onnx's export is loaded once just before its worker loads it (the user cache warm), torch's is not
    assert started == [("worker", "torch", tmp_path / "torch"), ("warm", tmp_path / "gpt2onnx"),
                       ("worker", "gpt2onnx", tmp_path / "gpt2onnx")]
    for worker in workers:
        assert [r["cmd"] for r in worker.requests] == ["warmup", "round", "round", "exit"]
        for request in worker.requests[:3]:
            spec = request["spec"]
            assert {k: v for k, v in spec.items() if k != "prompts"} == {"new_tokens": 12, "long_new_tokens": 9,
                                                                         "batch": 3}
            assert {name: len(ids) for name, ids in spec["prompts"].items()} == {"short": 4, "long": 40,
                                                                                 "prefill": 24}
            assert spec["prompts"] == bench.prompts(OPTIONS)  # the seeded prompts, checked above
    batch_s = 0.002 * 4 + 0.010 * 11  # the short prompt's prefill, then 11 steps at a short past
    for result in report["results"]:
        assert result["decode_short"] == pytest.approx(100.0) and result["decode_long"] == pytest.approx(40.0)
        assert result["prefill"] == pytest.approx(500.0) and result["ttft_ms"] == pytest.approx(8.0)
        assert result["batch"] == pytest.approx(3 * 12 / batch_s)
        assert (result["load_s"], result["peak_rss_mb"], result["size_mb"]) == (0.5, 3.0, 1.0)
        assert len(result["rounds"]) == 2
    # the report says on what machine: the CPU model and its vector flags (a figure without them means little)
    footer = bench.format_table(report).splitlines()[-1]
    flags = report["machine"]["flags"]
    assert footer.startswith(f"{cpu.model_name()} (flags: {' '.join(flags)})")
    try:  # read here, not through gpt2onnx.runtime.cpu: the CPU's own flags line
        line = next(x for x in open("/proc/cpuinfo").read().splitlines() if x.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return
    present = set(line.split(":", 1)[1].split())
    assert set(flags) <= present and "fpu" not in flags  # real flags of this CPU, vector extensions only
    assert ("avx2" in flags) == ("avx2" in present) and ("fma" in flags) == ("fma" in present)


def test_warming_saves_what_the_next_load_uses(tiny_export, cache):
    """The throwaway load before a gpt2onnx worker's leaves the export's optimized graph and tokenizer tables in
    the user cache."""
    settled = max(os.stat(path).st_ctime for path in tiny_export.iterdir()) + user_cache.RACY_SECONDS + 0.1
    time.sleep(max(0.0, settled - time.time()))  # files are recorded as verified once their ctime has settled
    bench._warm_user_cache(tiny_export)
    assert len([p for p in (cache / "graphs").iterdir() if not p.name.startswith(".")]) == 1
    assert len(list((cache / "tokenizers").iterdir())) == 1


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
    figures = bench._figures(bench._round(runner, SPEC), OPTIONS)
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
