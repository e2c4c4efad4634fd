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


class FakeWorker:
    """bench._Worker without its process, running FakeRunner in this process; requests cross JSON as they do to
    a worker."""

    def __init__(self, clock, started, workers, framework, precision, directory, threads, logs):
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

    def figures(self, timings, options):
        return bench._figures(timings, options)

    def traffic(self):
        return None

    def close(self):
        pass


@pytest.fixture
def fake_workers(clock, tmp_path, monkeypatch):
    """run_bench's workers replaced by FakeWorker; returns (the workers made, what was started in order)."""
    workers, started = [], []
    monkeypatch.setattr(bench, "_Worker", lambda *args: FakeWorker(clock, started, workers, *args))
    monkeypatch.setattr(bench, "_installed", lambda module: True)
    monkeypatch.setattr(bench, "prepare", lambda options, configs, progress: {c: tmp_path / c[0] for c in configs})
    monkeypatch.setattr(bench, "_warm_user_cache", lambda directory: started.append(("warm", directory)))
    monkeypatch.setattr(bench, "read_bandwidth", lambda threads: 20e9)  # not 1 GiB read per round in a test
    return workers, started


def test_run_bench_hands_every_worker_the_workload(fake_workers, tmp_path):
    """run_bench's parent side with workers that run the fake runner in this process: every worker gets the
    options' workload, the same each time, and the report's figures are those of the fake costs."""
    workers, started = fake_workers
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


# --- llama.cpp: its runner's plumbing, without llama.cpp --------------------------------------------------------

# `llama-bench -m gpt2-q8_0.gguf -t 2 -r 1 -o json -p 0 -n 128 -d 8,768` on the Xeon of
# benchmarks/results/2026-12-08-llamacpp.md (the first of its two tests, cut after the fields the bench reads)
# llama-bench -m gpt2-q8_0.gguf -t 2 -o json -p 0 -n 128 -d 8,768 -ub 1 on this project's machine (2026-12-08),
# its first test, trimmed to the fields the bench reads and a few more
LLAMA_BENCH_SAMPLE = '''[
 {
  "cpu_info": "Intel(R) Xeon(R) Processor",
  "model_type": "gpt2 0.1B Q8_0",
  "n_threads": 2,
  "n_prompt": 0,
  "n_gen": 128,
  "n_depth": 8,
  "test_time": "2026-12-08T02:06:44Z",
  "avg_ns": 843846125,
  "stddev_ns": 0,
  "avg_ts": 151.686423,
  "stddev_ts": 0.0
 }
]'''


def write_gguf(path, *, file_type: int, kind: int, layers: int = 2, width: int = 64, vocab: int = 100,
               positions: int = 32, norm=None, output: bool = False):
    """A small GGUF file of GPT-2's tensor names: `kind` (ggml type) for the matrices, F32 for the norms and
    the position table; `norm` the values of blk.0.attn_norm.weight (the rest of the data is zeros)."""
    import struct

    import numpy as np

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    blocks = {0: (1, 4), 8: (32, 34), 2: (32, 18)}  # F32, Q8_0, Q4_0: values and bytes per block
    tensors = [("token_embd.weight", (width, vocab), kind), ("position_embd.weight", (width, positions), 0)]
    for i in range(layers):
        tensors += [(f"blk.{i}.attn_norm.weight", (width,), 0), (f"blk.{i}.attn_qkv.weight", (width, 3 * width), kind)]
    tensors += [("output.weight", (width, vocab), kind)] if output else []
    keys = string("general.architecture") + struct.pack("<I", 8) + string("gpt2")
    keys += string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("b")  # skipped
    for key, value in (("general.file_type", file_type), ("gpt2.block_count", layers),
                       ("gpt2.embedding_length", width)):
        keys += string(key) + struct.pack("<II", 4, value)
    table, data = b"", b""
    for name, shape, ggml_type in tensors:
        per_block, block_bytes = blocks[ggml_type]
        size = int(np.prod(shape)) // per_block * block_bytes
        content = np.asarray(norm, "<f4").tobytes() if name == "blk.0.attn_norm.weight" and norm is not None else \
            bytes(size)
        table += string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        table += struct.pack("<IQ", ggml_type, len(data))
        data += content + bytes(-len(content) % 32)
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 5) + keys + table
    path.write_bytes(header + bytes(-len(header) % 32) + data)
    return path


def test_llama_bench_json_gives_the_bench_figures():
    """The recorded llama-bench output parses, and its tests are found by (prompt, new tokens, depth)."""
    tests = bench.parse_llama_bench(LLAMA_BENCH_SAMPLE)
    assert tests[0]["n_gen"] == 128 and tests[0]["n_depth"] == 8 and tests[0]["avg_ts"] > 0
    spec = {"prompts": {"short": [1] * 8, "long": [1] * 768, "prefill": [1] * 512}, "new_tokens": 128,
            "long_new_tokens": 128}
    pp = [{"n_prompt": 8, "n_gen": 0, "n_depth": 0, "avg_ns": 4e6, "avg_ts": 2000.0},
          {"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ns": 5e8, "avg_ts": 1024.0}]
    tg768 = {**tests[0], "n_depth": 768, "avg_ts": 50.0}
    figures = bench.llama_bench_figures(tests[:1] + [tg768] + pp, spec)
    assert figures == {"decode_short": tests[0]["avg_ts"], "decode_long": 50.0, "prefill": 1024.0, "ttft_ms": 4.0}
    # the same test with other settings (-fa on,off): the faster one counts
    slower = {**tg768, "flash_attn": 1 - tg768.get("flash_attn", 0), "avg_ns": 2 * tg768["avg_ns"], "avg_ts": 25.0}
    assert bench.llama_bench_figures(tests[:1] + [slower, tg768] + pp, spec)["decode_long"] == 50.0
    with pytest.raises(bench.GenerationError, match="depth 768"):
        bench.llama_bench_figures(tests[:1] + pp, spec)
    with pytest.raises(bench.GenerationError, match="JSON list"):
        bench.parse_llama_bench('{"avg_ts": 1}')


def test_llamacpp_absent_is_one_line_and_the_rest_runs(fake_workers, tmp_path, monkeypatch):
    """Without --llamacpp, $GPT2ONNX_LLAMACPP or llama-bench on PATH, the bench says so in one line (with how to
    get it) and measures the rest."""
    workers, _ = fake_workers
    monkeypatch.delenv(bench.LLAMACPP_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    messages = []
    options = replace(OPTIONS, frameworks=("gpt2onnx", "llamacpp"), precisions=("fp32",), threads=1,
                      work_dir=tmp_path)
    report = bench.run_bench(options, progress=messages.append)
    assert [r["framework"] for r in report["results"]] == ["gpt2onnx"]
    [note] = report["skipped"]
    assert note.startswith("llama.cpp: llama-bench not found") and "\n" not in note
    assert "convert_hf_to_gguf.py" in note and "benchmarks/README.md" in note
    assert f"skipping {note}" in messages and f"skipped: {note}" in bench.format_table(report).splitlines()
    # a folder without GGUF files of the asked types is the same single line (by the variable, or by the flags)
    (tmp_path / "bin").mkdir()
    program = tmp_path / "bin" / "llama-bench"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv(bench.LLAMACPP_ENV, str(tmp_path))
    [note] = bench.run_bench(options, progress=messages.append)["skipped"]
    assert note.startswith(f"llama.cpp: no GGUF file of type f32 in {tmp_path}") and "\n" not in note
    monkeypatch.delenv(bench.LLAMACPP_ENV)
    report = bench.run_bench(replace(options, llamacpp_bin=tmp_path / "bin", llamacpp_gguf=tmp_path),
                             progress=messages.append)
    assert report["skipped"] == [note]
    json.dumps(report)  # the report is written as JSON, the folders in it too


def test_ggufs_are_found_by_their_file_type_and_counted(tmp_path):
    """GGUF files are recognised by general.file_type, not by name; a decode step reads every tensor once but one
    row of the position table, and the whole token table when it is the head (GPT-2's is tied)."""
    write_gguf(tmp_path / "a.gguf", file_type=7, kind=8)  # Q8_0
    write_gguf(tmp_path / "b.gguf", file_type=2, kind=2)  # Q4_0
    (tmp_path / "notes.gguf").write_text("not a gguf")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "a.gguf").read_bytes()[:40])  # ends inside its header
    found = bench.find_ggufs(tmp_path)
    assert {name: g.path.name for name, g in found.items()} == {"q8_0": "a.gguf", "q4_0": "b.gguf"}
    q8 = found["q8_0"]
    assert (q8.architecture, q8.get("block_count"), q8.get("embedding_length")) == ("gpt2", 2, 64)
    weights, per_position = bench.gguf_decode_traffic(q8)
    row = 64 // 32 * 34  # one Q8_0 row of 64 values
    # the tied token table whole (100 rows), one row of positions (F32), per layer its norm and qkv (3 x 64 rows)
    assert weights == 100 * row + 64 * 4 + 2 * (64 * 4 + 3 * 64 * row)
    assert per_position == 2 * 2 * 64 * 2  # keys and values of 2 layers, f16
    untied = bench.read_gguf(write_gguf(tmp_path / "c.gguf", file_type=7, kind=8, output=True))
    assert bench.gguf_decode_traffic(untied)[0] == weights + row  # the head's own table, one row of the tokens'


def test_a_gguf_of_other_weights_is_refused(tmp_path):
    """check_gguf: the GGUF's shape and its first layer norm must be the checkpoint's."""
    import numpy as np
    from safetensors.numpy import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"n_layer": 2, "n_embd": 64}))
    norm = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    save_file({"transformer.h.0.ln_1.weight": norm}, str(hf / "model.safetensors"))
    bench.check_gguf(bench.read_gguf(write_gguf(tmp_path / "same.gguf", file_type=0, kind=0, norm=norm)), hf)
    with pytest.raises(bench.InvalidArgumentError, match="other weights"):
        bench.check_gguf(bench.read_gguf(write_gguf(tmp_path / "other.gguf", file_type=0, kind=0, norm=norm + 1)), hf)
    with pytest.raises(bench.InvalidArgumentError, match="3 layers"):
        bench.check_gguf(bench.read_gguf(write_gguf(tmp_path / "deeper.gguf", file_type=0, kind=0, layers=3)), hf)


def test_onnx_decode_traffic_counts_each_weight_once_and_a_gathered_table_by_the_row(tmp_path):
    """A table read only by Gather counts one row; a tied table read by Gather and the head's Gemm counts once,
    whole; initializers of an If's branches count; the cache's bytes per position come from the past inputs."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def init(name, shape, dtype=np.float32):
        return numpy_helper.from_array(np.zeros(shape, dtype), name)

    branch = helper.make_graph([helper.make_node("Identity", ["b"], ["y"])], "branch", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [init("b", [2])])
    nodes = [helper.make_node("Gather", ["positions", "ids"], ["p"]),
             helper.make_node("Gather", ["tied", "ids"], ["e"]),
             helper.make_node("Gemm", ["e2", "tied"], ["logits"], transB=1),
             helper.make_node("MatMul", ["e", "w8"], ["h"]),
             helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch)]
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.INT8,
                                         ["batch_size", 3, "past_sequence_length", 4])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1]), past],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [init("positions", [16, 4]), init("tied", [10, 4]), init("w8", [4, 3], np.uint8)])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    weights, per_position = bench.onnx_decode_traffic(tmp_path / "model.onnx")
    assert weights == 4 * 4 + 10 * 4 * 4 + 12 + 2 * 4  # a row of positions, all of tied, w8, the branch's b
    assert per_position == 3 * 4  # int8, 3 heads x 4


def test_an_export_reads_its_parameters_per_token(tiny_export):
    """The fp32 tiny export: every parameter of GPT-2 once (the tied embedding too) but one row of the position
    table; its float32 cache 2 x layers x width x 4 bytes per position."""
    config = json.loads((tiny_export / "config.json").read_text())
    layers, width, vocab = config["n_layer"], config["n_embd"], config["vocab_size"]
    block = 4 * width + (3 * width * width + 3 * width) + (width * width + width) + 2 * (4 * width * width) + 5 * width
    parameters = vocab * width + width + layers * block + 2 * width
    weights, per_position = bench.onnx_decode_traffic(tiny_export / "model.onnx")
    assert weights == pytest.approx(4 * parameters, abs=1024)  # and a few constants of the graph's own
    assert per_position == 2 * layers * width * 4


def test_bandwidth_share_is_rate_times_bytes_over_bandwidth():
    median = {"decode_short": 100.0, "decode_long": 50.0}
    share = bench.bandwidth_share(median, (400e6, 1e5), 50e9, OPTIONS)  # mean pasts 4 + 12/2 and 40 + 9/2
    assert share["bytes_short"] == 400e6 + 1e5 * 10 and share["bytes_long"] == 400e6 + 1e5 * 44.5
    assert share["read_share_short"] == pytest.approx(100 * (400e6 + 1e6) / 50e9)
    assert share["read_share_long"] == pytest.approx(50 * (400e6 + 4.45e6) / 50e9)
    assert bench.read_bandwidth(2, size=2**22, passes=2) > 1e8  # 4 MB read faster than 0.1 GB/s, anywhere


def test_the_table_sets_ours_beside_llama_cpp_per_precision(tmp_path):
    def result(framework, precision, decode, ttft, share):
        return {"name": f"{framework} {precision}", "framework": framework, "precision": precision,
                "decode_short": decode, "decode_long": decode / 2, "prefill": 1000.0, "ttft_ms": ttft,
                "bytes_short": 125e6, "read_share_short": share}

    report = {"workload": {"short_prompt": 8, "long_prompt": 768, "prefill": 512, "batch": 5, "model": "random:gpt2",
                           "runs": 3},
              "machine": {"cpu": "a CPU", "flags": ["avx2"], "physical_cores": 2, "threads": 2, "versions": {}},
              "results": [result("gpt2onnx", "int8", 200.0, 10.0, 0.8), result("gpt2onnx", "int4+kv32", 300.0, 9, .5),
                          result("llamacpp", "q8_0", 160.0, 20.0, 0.7)],
              "read_bandwidth": {"best": 30e9, "rounds": [29e9, 30e9], "method": "numpy"}}
    lines = bench.format_table(report).splitlines()
    assert "| gpt2onnx int8 |" in lines[2] and "| 125 | 80% |" in lines[2]  # MB read/token and its share
    peer = lines[lines.index(next(x for x in lines if x.startswith("| gpt2onnx / llama.cpp"))) + 2:]
    assert peer[0] == ("| int8 / Q8_0 | 200.0 / 160.0 = 1.25× | 100.0 / 80.0 = 1.25× | 1000 / 1000 = 1.00× | "
                       "10.0 / 20.0 = 2.00× | 80% / 70% |")
    assert not peer[1].startswith("|")  # int4+kv32 has no Q4_0 to face
    assert any(x.startswith("read bandwidth 30.0 GB/s (numpy; rounds: 29.0, 30.0)") for x in lines)
    bench.write_chart(report, tmp_path / "bench.png")  # llama.cpp has no batch-5 figure, and may lack prefill


FAKE_LLAMA_BENCH = '''
import json, os, signal, sys, time
args, tests = sys.argv[1:], []
if args[args.index("-n") + 1] == "0" and os.path.exists(os.path.join(os.path.dirname(sys.argv[0]), "crash-on-batches")):
    os.kill(os.getpid(), signal.SIGSEGV)  # what ggml's AMX path did on batches in VMs
value = lambda flag, default: [int(x) for x in args[args.index(flag) + 1].split(",")] if flag in args else default
for depth in value("-d", [0]):
    tests += [{"n_prompt": p, "n_gen": 0, "n_depth": depth, "avg_ns": p * 1e6, "avg_ts": 1000.0}
              for p in value("-p", [512]) if p]
    tests += [{"n_prompt": 0, "n_gen": n, "n_depth": depth, "avg_ns": n / (100.0 if depth < 20 else 40.0) * 1e9,
               "avg_ts": 100.0 if depth < 20 else 40.0} for n in value("-n", [128]) if n]
time.sleep(0.1)  # long enough to have its memory read
print(json.dumps([{"build_commit": "abc", "build_number": 1, **t} for t in tests]))
'''


def test_the_llama_cpp_worker_runs_llama_bench_on_the_workload(tmp_path):
    """_LlamaCppWorker with a stand-in llama-bench: the commands carry the threads and the workload's lengths
    (decodes after a cache filled to the short and long prompts), and the figures are read from its JSON."""
    import sys

    program = tmp_path / "llama-bench"
    program.write_text(f"#!{sys.executable}\n{FAKE_LLAMA_BENCH}")
    program.chmod(0o755)
    gguf = bench.read_gguf(write_gguf(tmp_path / "m.gguf", file_type=7, kind=8))
    worker = bench._LlamaCppWorker("q8_0", gguf, program, 3, tmp_path / "logs")
    assert worker.ask({"cmd": "warmup", "spec": SPEC}) == {"ok": True}
    assert worker.loaded["load_s"] >= 0 and worker.version == "1 (abc)"
    figures = worker.figures(worker.ask({"cmd": "round", "spec": SPEC}), OPTIONS)
    assert figures == {"decode_short": 100.0, "decode_long": 40.0, "prefill": 1000.0, "ttft_ms": 4.0}
    log = worker.log.read_text()
    assert "-t 3 -r 1 -o json -fa on,off -p 4,24 -n 0\n" in log
    assert "-p 0 -n 12 -d 4 -ub 1\n" in log and "-p 0 -n 9 -d 40 -ub 1\n" in log
    assert worker.ask({"cmd": "exit"})["peak_rss_bytes"] > 0
    # a build that crashes on batches: the decodes are measured (their cache filled a token at a time), prefill
    # and TTFT are left out with one line saying why, and not tried again
    (tmp_path / "crash-on-batches").touch()
    assert worker.figures(worker.ask({"cmd": "round", "spec": SPEC}), OPTIONS) == {"decode_short": 100.0,
                                                                                  "decode_long": 40.0}
    assert worker.note.startswith("llama.cpp q8_0 prefill and TTFT: llama-bench was killed by SIGSEGV")
    runs = worker.log.read_text().count("$ ")
    worker.ask({"cmd": "round", "spec": SPEC})
    assert worker.log.read_text().count("$ ") == runs + 2  # the two decode runs only
    program.write_text("#!/bin/sh\necho crashed >&2\nexit 3\n")
    with pytest.raises(bench.GenerationError, match="exit code 3"):
        worker.ask({"cmd": "round", "spec": SPEC})


def test_the_export_code_hash_reads_files_that_exist():
    """_maker hashes the export's code and the runtime modules it writes by (their paths moved once, with the
    runtime's floors, and every gpt2onnx configuration failed to prepare)."""
    assert bench._maker("gpt2onnx").startswith("gpt2onnx export code ")
