"""The fast paths keep their promises: quantized exports, the in-place KV cache, last-position logits.

These assert behaviour, not speed (speed is `gpt2onnx bench`'s job).
"""

import json

import numpy as np
import onnx
import pytest

import gpt2onnx
from gpt2onnx.errors import VerificationError
from gpt2onnx.format import contract as c
from gpt2onnx.format import precisions
from gpt2onnx.format.gpt2 import position_ids
from gpt2onnx.generation.generator import left_pad
from gpt2onnx.tools.inspection import inspect_model
from helpers import assert_within_half_a_step, export, run_dynamic_quantize_matmul, run_matmul_nbits


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory):
    """random:tiny exported at (precision, kv_cache) on first use, kept for the module."""
    made = {}

    def get(precision, kv_cache=None):
        if (precision, kv_cache) not in made:
            out = tmp_path_factory.mktemp(f"{precision}-{kv_cache}") / "model"
            made[precision, kv_cache] = export("random:tiny", out, precision=precision, kv_cache=kv_cache)
        return made[precision, kv_cache]

    return get


@pytest.fixture(scope="module", params=[("int8", None), ("int4", None), ("int4", "float32")],
                ids=["int8", "int4", "int4-kv32"])
def quantized_export(request, tiny_quantized):
    """(precision, export directory, kv_cache asked for)"""
    precision, kv_cache = request.param
    return precision, tiny_quantized(precision, kv_cache), kv_cache


def test_quantized_export_loads_generates_and_names_its_weights(quantized_export):
    import onnx

    precision, directory, kv_cache = quantized_export
    manifest = json.loads((directory / c.MANIFEST_FILE).read_text())
    assert manifest[c.M_PRECISION] == precision
    kv_int8 = manifest[c.M_KV_CACHE]["dtype"] == "int8"
    assert kv_int8 == (kv_cache != "float32")  # int8 unless asked for float32
    assert manifest[c.M_QUANTIZATION]["bits"] == precisions.get(precision).bits
    assert manifest[c.M_QUANTIZATION]["scheme"] == precisions.get(precision).scheme
    parity = manifest[c.M_PARITY]
    assert parity["kind"] == "quality" and parity["passed"]
    assert abs(parity["perplexity"]["increase"]) <= parity["thresholds"]["max_perplexity_increase"]
    assert set(parity["self_consistency"]["relative_rms_diff"]) == {"decode_vs_uncached", "padded_vs_alone"}

    graph = onnx.load(str(directory / c.MODEL_FILE), load_external_data=False).graph
    names = {t.name for t in graph.initializer}
    # every quantized tensor keeps its Hugging Face weight's name as a prefix; the tied head is a copy
    per_column = precisions.get(precision).scheme == c.SCHEME_PER_COLUMN
    for weight in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight", "lm_head.weight"):
        codes, scales, zero_points = c.quantized_names(weight)
        assert {codes, scales} <= names and weight not in names
        assert (zero_points in names) == (not per_column)  # per-column int8 is symmetric
        assert c.quantized_source(codes) == weight
    assert "transformer.wte.weight" in names  # the embedding Gather stays float32
    op = "DynamicQuantizeMatMul" if per_column else "MatMulNBits"
    assert sum(n.op_type == op for n in graph.node) == 4 * 2 + 1
    assert all(c.attention_qkv(i) in {o for n in graph.node for o in n.output} for i in range(2))
    assert all(set(c.kv_scale_names(i)) <= names for i in range(2)) == kv_int8

    model = gpt2onnx.load(directory)
    result = model.generate("Hello", max_new_tokens=12, ignore_eos=True)
    assert len(result.token_ids) == 12
    cache = model.session.run(np.array([[1, 2]]), np.ones((1, 2), np.int64), np.arange(2)[None],
                              model.session.empty_cache(1))[1]
    assert cache.tensors[0].dtype == (np.int8 if kv_int8 else np.float32)


def test_int8_kv_cache_needs_quantized_weights(tmp_path):
    from gpt2onnx.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="int8 KV cache needs quantized weights"):
        export("random:tiny", tmp_path / "out", kv_cache="int8")
    assert list(tmp_path.iterdir()) == []


def test_failing_quality_gate_publishes_nothing(tmp_path):
    with pytest.raises(VerificationError, match="quality gate") as info:
        export("random:tiny", tmp_path / "out", precision="int4", max_perplexity_increase=-0.5)
    report = info.value.report
    assert not report["passed"] and "perplexity" in report["failures"][0]
    assert list(tmp_path.iterdir()) == []


def test_bad_block_size_is_refused(tmp_path):
    from gpt2onnx.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="power of two"):
        export("random:tiny", tmp_path / "out", precision="int4", block_size=24)
    with pytest.raises(InvalidArgumentError, match="int8 has no block size") as info:
        export("random:tiny", tmp_path / "out", precision="int8", block_size=32)
    assert "int4" in info.value.hint
    assert list(tmp_path.iterdir()) == []


def _ids(n, seed=0):
    return np.random.default_rng(seed).integers(0, 50257, (1, n), dtype=np.int64)


def test_in_place_cache_at_long_past_equals_fresh_computation(tiny_export):
    """Decode one token at a time up to a long past (growing the buffers on the way) in place: the
    logits and the cache equal one uncached forward over the whole sequence."""
    session = gpt2onnx.load(tiny_export).session
    n = session.config.n_positions - 1  # 255: the longest past the tiny model has
    ids = _ids(n)
    cache = session.empty_cache(1)
    _, cache = session.run(ids[:, :5], np.ones((1, 5), np.int64), np.arange(5)[None], cache)
    buffers_seen = {id(cache.buffers[0])}
    steps = []
    for t in range(5, n):
        logits, returned = session.run(ids[:, t:t + 1], np.ones((1, t + 1), np.int64), np.array([[t]]), cache,
                                       logits_for="last")
        assert returned is cache and cache.length == t + 1
        buffers_seen.add(id(cache.buffers[0]))
        steps.append(logits[0, -1])
    full, fresh = session.run(ids, np.ones((1, n), np.int64), np.arange(n)[None], session.empty_cache(1))
    np.testing.assert_allclose(np.stack(steps), full[0, 5:], atol=1e-4)
    for ours, expected in zip(cache.tensors, fresh.tensors):
        np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert cache.capacity >= n and len(buffers_seen) <= 2  # grown at most once: no per-step copies


def test_decode_at_long_past_equals_uncached_forward(quantized_export, tiny_export):
    """One cached step after a long prompt gives the logits of the uncached forward (fp32 to 1e-4; the
    quantized exports within their activation-rounding noise)."""
    for directory, atol in ((tiny_export, 1e-4), (quantized_export[1], None)):
        session = gpt2onnx.load(directory).session
        n = session.config.n_positions - 1
        ids = _ids(n, seed=1)
        cache = session.empty_cache(1)
        _, cache = session.run(ids[:, :-1], np.ones((1, n - 1), np.int64), np.arange(n - 1)[None], cache)
        step, _ = session.run(ids[:, -1:], np.ones((1, n), np.int64), np.array([[n - 1]]), cache, logits_for="last")
        full, _ = session.run(ids, np.ones((1, n), np.int64), np.arange(n)[None], session.empty_cache(1),
                              logits_for="last")
        if atol is not None:
            np.testing.assert_allclose(step, full, atol=atol)
        else:
            assert np.sqrt(np.mean((step - full) ** 2)) <= 0.05 * full.std()


def test_last_logits_repeat_rows_and_padded_batch(tiny_export):
    session = gpt2onnx.load(tiny_export).session
    ids = _ids(9, seed=2)
    mask, positions = np.ones((1, 9), np.int64), np.arange(9)[None]
    full, cache = session.run(ids, mask, positions, session.empty_cache(1))
    last, _ = session.run(ids, mask, positions, session.empty_cache(1), logits_for="last")
    assert last.shape == (1, 1, session.config.vocab_size)
    np.testing.assert_array_equal(last[:, 0], full[:, -1])

    # one prefill shared by three rows; each row then decodes its own token, in place
    rows = cache.repeat_rows(3)
    assert rows.batch == 3 and rows.length == 9 and cache.batch == 1
    tokens = np.array([[1], [2], [3]])
    step, rows = session.run(tokens, np.ones((3, 10), np.int64), np.full((3, 1), 9), rows, logits_for="last")
    for row, token in enumerate((1, 2, 3)):
        alone, _ = session.run(np.concatenate([ids, [[token]]], axis=1), np.ones((1, 10), np.int64),
                               np.arange(10)[None], session.empty_cache(1), logits_for="last")
        np.testing.assert_allclose(step[row], alone[0], atol=1e-4)

    # a left-padded batch of a 9-token and a 4-token prompt: each row's last logits, and those of one step after
    # them, equal the prompt's own run alone
    short = _ids(4, seed=4)
    batch, padded = left_pad([ids[0].tolist(), short[0].tolist()], pad_id=50256)
    assert batch.shape == (2, 9) and (padded == 0).sum(axis=1).tolist() == [0, 5]  # the short prompt is padded
    first, rows = session.run(batch, padded, position_ids(padded), session.empty_cache(2), logits_for="last")
    following = np.array([[7], [8]])
    padded = np.concatenate([padded, np.ones((2, 1), np.int64)], axis=1)
    step, _ = session.run(following, padded, position_ids(padded)[:, -1:], rows, logits_for="last")
    for row, prompt in enumerate((ids, short)):
        n = prompt.shape[1]
        alone, cache = session.run(prompt, np.ones((1, n), np.int64), np.arange(n)[None], session.empty_cache(1),
                                   logits_for="last")
        np.testing.assert_allclose(first[row], alone[0], atol=1e-4)
        alone, _ = session.run(following[row:row + 1], np.ones((1, n + 1), np.int64), np.array([[n]]), cache,
                               logits_for="last")
        np.testing.assert_allclose(step[row], alone[0], atol=1e-4)

    with pytest.raises(ValueError, match="logits_for"):
        session.run(ids, mask, positions, session.empty_cache(1), logits_for="first")


def test_reused_logits_buffer_is_rebound_when_the_cache_moves(tiny_export):
    """reuse_logits writes every step into one buffer kept with the cache; the values equal fresh arrays',
    also across a growth of the cache (new binding) and a change of shape (prefill "all" -> step "last")."""
    session = gpt2onnx.load(tiny_export).session
    n = 40
    ids = _ids(n, seed=3)
    # room for 8 positions: the cache grows (once) at the fifth step
    fresh_cache, reused_cache = session.empty_cache(1, capacity=8), session.empty_cache(1, capacity=8)
    fresh, fresh_cache = session.run(ids[:, :4], np.ones((1, 4), np.int64), np.arange(4)[None], fresh_cache)
    reused, reused_cache = session.run(ids[:, :4], np.ones((1, 4), np.int64), np.arange(4)[None], reused_cache,
                                       reuse_logits=True)
    np.testing.assert_array_equal(reused, fresh)
    buffers = []
    for t in range(4, n):
        args = (ids[:, t:t + 1], np.ones((1, t + 1), np.int64), np.array([[t]]))
        fresh, fresh_cache = session.run(*args, fresh_cache, logits_for="last")
        reused, reused_cache = session.run(*args, reused_cache, logits_for="last", reuse_logits=True)
        np.testing.assert_array_equal(reused, fresh)
        if not any(reused is b for b in buffers):
            buffers.append(reused)
    assert reused_cache.capacity >= n and len(buffers) == 2  # one buffer per binding: before and after growing


def test_quantizer_layout_matches_onnxruntime():
    """Our packing is what MatMulNBits reads: x @ dequantize(W)^T equals ONNX Runtime's result."""
    from gpt2onnx_export.quantize import quantize

    rng = np.random.default_rng(0)
    n, k = 48, 80  # K not a multiple of the block: padded
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    for bits in (2, 4, 8):
        for symmetric in (False, True):
            qw = quantize(w, bits=bits, block_size=32, symmetric=symmetric)
            assert np.abs(qw.dequantize() - w).max() <= np.abs(w).max() * (2.0 / 2 ** bits)
            zeros = None if symmetric else qw.zero_points
            got = run_matmul_nbits(x, qw.codes, qw.scales, zeros, n=n, bits=bits, block_size=32)
            np.testing.assert_allclose(got, x @ qw.dequantize().T, atol=1e-4, rtol=1e-4)


def test_per_column_layout_matches_onnxruntime():
    """Our per-column int8 is what DynamicQuantizeMatMul reads, and with 7-bit codes ONNX Runtime's result is the
    exact integer math (activations to uint8 over the whole tensor, int32 sums): no int16 saturation."""
    from gpt2onnx.format import per_column
    from gpt2onnx_export.quantize import quantize_per_column

    rng = np.random.default_rng(0)
    k, n = 768, 96
    w = rng.standard_normal((k, n)).astype(np.float32) * rng.uniform(0.01, 1, n).astype(np.float32)
    w[:, 5] = 0  # a column of zeros stays zero
    qw = quantize_per_column(w)
    assert qw.codes.dtype == np.int8 and np.abs(qw.codes).max() <= per_column.MAX_CODE
    assert_within_half_a_step(qw.dequantize(), w)
    for x in (rng.standard_normal((16, k)), np.abs(rng.standard_normal((4, k))) * 3 + 5):  # the second: worst case
        x = x.astype(np.float32)
        low, high = min(x.min(), 0), max(x.max(), 0)
        scale = (high - low) / 255
        zero = np.clip(np.rint(-low / scale), 0, 255)
        xq = np.clip(np.rint(x / scale) + zero, 0, 255) - zero
        exact = (xq.astype(np.int64) @ qw.codes.astype(np.int64)) * scale * qw.scales
        got = run_dynamic_quantize_matmul(x, qw.codes, qw.scales)
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


def test_int8_cache_prefill_attends_in_float32(tiny_quantized):
    """A prefill (no past) of an int8-cache export attends in float32: its logits are those of the same weights
    with a float32 cache, and the cache it stores is that float32 cache quantized with the export's scales
    (round half to even, clipped to int8). A step after a past reads the int8 cache: it differs from the
    float32 cache's step by the cache's rounding, and no more."""
    directory = tiny_quantized("int4")
    runs, n = [], 100
    ids = _ids(n + 1, seed=2)
    for session in (gpt2onnx.load(directory).session, gpt2onnx.load(tiny_quantized("int4", "float32")).session):
        prefill, cache = session.run(ids[:, :n], np.ones((1, n), np.int64), np.arange(n)[None], session.empty_cache(1))
        stored = [t.copy() for t in cache.tensors]
        step, _ = session.run(ids[:, n:], np.ones((1, n + 1), np.int64), np.array([[n]]), cache, logits_for="last")
        runs.append((prefill, stored, step))
    (ours, int8_cache, int8_step), (theirs, float_cache, float_step) = runs
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    graph = onnx.load(directory / c.MODEL_FILE)
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    names = [name for layer in range(len(int8_cache) // 2) for name in c.kv_scale_names(layer)]
    assert all(t.dtype == np.int8 for t in int8_cache)
    for stored, values, name in zip(int8_cache, float_cache, names):
        expected = np.clip(np.round(values / scales[name]), -128, 127)
        assert np.abs(stored - expected).max() <= 1  # a value within float noise of a half step may round apart
        assert np.mean(stored == expected) > 0.999
    assert not np.array_equal(int8_step, float_step)
    assert np.sqrt(np.mean((int8_step - float_step) ** 2)) <= 0.05 * float_step.std()
    # inspect counts the attention inside each layer's If: a float32 and an int8 one per layer
    ops = inspect_model(directory).op_counts
    layers = len(int8_cache) // 2
    assert ops["If"] == layers and ops["com.microsoft.GroupQueryAttention"] == 2 * layers


@pytest.fixture(scope="module")
def trained_int8(trained_dir, tmp_path_factory):
    return export(str(trained_dir), tmp_path_factory.mktemp("trained-int8") / "model", precision="int8")


def test_int8_of_trained_model_passes_the_gate_and_keeps_weights_within_half_a_step(trained_int8, trained_reference):
    """The export passed the quality gate on the held-out text (each window: its first position, then the rest in
    one cached step, reading the int8 cache); every
    quantized weight is within half a step (max |column| / MAX_CODE / 2) of PyTorch's, per output column."""
    from gpt2onnx.tools.inspection import ModelFile

    parity = json.loads((trained_int8 / c.MANIFEST_FILE).read_text())[c.M_PARITY]
    assert parity["passed"] and parity["eval_text"].endswith("heldout.txt") and parity["window"] > 1
    assert parity["top1_agreement"] >= precisions.get("int8").min_top1_agreement
    state = trained_reference[0].state_dict()
    stored = ModelFile(trained_int8)
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight",
                 "transformer.h.1.mlp.c_proj.weight", "lm_head.weight"):
        w = state[name].float().numpy()
        w = w.T if name == "lm_head.weight" else w  # as the matmul reads it: [in, out]
        d = stored.weight(name)
        d = d.T if name == "lm_head.weight" else d
        assert_within_half_a_step(d, w, name)


def test_int8_greedy_tokens_are_pytorchs_where_it_is_decisive(trained_int8, trained_reference):
    """Greedy decoding with the int8 export (cached, one token per step); PyTorch fp32 scores the same sequence:
    where PyTorch is decisive its top token is ours."""
    import torch

    from gpt2onnx_export.verify import DECISIVE_MARGIN

    model = gpt2onnx.load(trained_int8)
    text = "To open a file in a new window, use the"
    prompt = model.tokenizer.encode(text)
    ours = model.generate(text, max_new_tokens=48, ignore_eos=True, temperature=0).token_ids
    ids = torch.tensor([list(prompt) + list(ours)])
    with torch.inference_mode():
        probs = torch.softmax(trained_reference[0](input_ids=ids).logits[0, len(prompt) - 1:-1].double(), -1)
    top2 = probs.topk(2)
    decisive = (top2.values[:, 0] - top2.values[:, 1]) >= DECISIVE_MARGIN
    agree = (top2.indices[:, 0] == torch.tensor(ours)) & decisive
    assert int(decisive.sum()) >= 10
    assert int(agree.sum()) >= 0.95 * int(decisive.sum())
