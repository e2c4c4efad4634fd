"""ONNX Runtime's CPU kernels alone, in the layouts gpt2onnx exports: where the quantized graphs' limits come from.

    python benchmarks/kernels.py [--rounds 7] [--threads 0] [--json FILE]

Each kernel is a one-node graph with GPT-2 124M's shapes, timed round-robin against the others (medians of
--rounds rounds), its weights and cache resident in the CPU's caches: what the kernel itself costs, without
the model's memory traffic around it.

  matmul      c_fc's weight (768 inputs, 3072 outputs) for M = 1, 16 and 512 rows of activations (a decode
              step, a 16-row serving step, a 512-token prefill): float32 MatMul; DynamicQuantizeMatMul with
              int8 per-column codes (the int8 export); MatMulNBits 4-bit, blocks of 128, accuracy_level 4
              (the int4 export). Each output is checked against numpy's product of the dequantized weight.
  attention   GroupQueryAttention of one layer (12 heads of 64) for one new position after a past of 8 and
              of 768, its cache bound in place as the runtime binds it (buffer room for 128 more positions):
              float32 cache (fp32 exports), int8 per-channel cache (int8 and int4 exports, their default),
              and ONNX Runtime's 4-bit cache (kv_cache_bit_width=4, which gpt2onnx does not export). Each
              is checked against numpy's attention over the dequantized cache.

Prints the CPU model and its SIMD flags first. Needs onnx (the `plot` or `export` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

K_IN, N_OUT, BLOCK = 768, 3072, 128  # c_fc of GPT-2 124M; the int4 export's default block size
HEADS, HEAD_DIM, ROOM = 12, 64, 128
ROWS = (1, 16, 512)
PASTS = (8, 768)


def _model(nodes, inputs, outputs, initializers=()):
    from onnx import helper

    graph = helper.make_graph(nodes, "kernel", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def matmul_kernels(rng) -> dict:
    """name -> (graph bytes, the float32 weight [K, N] it computes with)."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from gpt2onnx_export import quantize

    weight = rng.normal(0, 0.02, (K_IN, N_OUT)).astype(np.float32)
    x = helper.make_tensor_value_info("x", T.FLOAT, ["M", K_IN])
    y = helper.make_tensor_value_info("y", T.FLOAT, ["M", N_OUT])
    kernels = {"fp32 MatMul": (_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [x], [y],
                                      [numpy_helper.from_array(weight, "w")]), weight)}
    per_column = quantize.quantize_per_column(weight)
    kernels["int8 DynamicQuantizeMatMul"] = (
        _model([helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], domain="com.microsoft")], [x], [y],
               [numpy_helper.from_array(per_column.codes, "w"), numpy_helper.from_array(per_column.scales, "s")]),
        per_column.dequantize())
    blocks = quantize.quantize(weight.T, bits=4, block_size=BLOCK, symmetric=True)
    kernels["int4 MatMulNBits"] = (
        _model([helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=K_IN, N=N_OUT,
                                 bits=4, block_size=BLOCK, accuracy_level=4)], [x], [y],
               [numpy_helper.from_array(blocks.codes, "w"), numpy_helper.from_array(blocks.scales, "s")]),
        blocks.dequantize().T)
    return kernels


def _cache_layout(bits: int):
    """(onnx dtype, numpy dtype, stored head_dim) of a cache of `bits` bits."""
    from onnx import TensorProto as T

    return {32: (T.FLOAT, np.float32, HEAD_DIM), 8: (T.INT8, np.int8, HEAD_DIM),
            4: (T.UINT8, np.uint8, HEAD_DIM // 2)}[bits]


def attention_kernel(bits: int) -> bytes:
    from onnx import TensorProto as T
    from onnx import helper

    onnx_type, _, stored = _cache_layout(bits)
    e = HEADS * HEAD_DIM
    cache = [helper.make_tensor_value_info(n, onnx_type, [1, HEADS, "C", stored]) for n in ("pk", "pv")]
    inputs = [helper.make_tensor_value_info("qkv", T.FLOAT, [1, 1, 3 * e]), *cache,
              helper.make_tensor_value_info("seqlens_k", T.INT32, [1]),
              helper.make_tensor_value_info("total", T.INT32, [])]
    names, attrs = ["qkv", "", "", "pk", "pv", "seqlens_k", "total"], {}
    if bits != 32:  # the int8 export's inputs: head_sink unused, then per-channel scales [1, heads, 1, head_dim]
        inputs += [helper.make_tensor_value_info(n, T.FLOAT, [1, HEADS, 1, HEAD_DIM]) for n in ("ks", "vs")]
        names += ["", "", "", "", "", "ks", "vs"]
        attrs = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=bits)
    outputs = [helper.make_tensor_value_info("out", T.FLOAT, [1, 1, e]),
               *[helper.make_tensor_value_info(n, onnx_type, [1, HEADS, "C", stored]) for n in ("k", "v")]]
    node = helper.make_node("GroupQueryAttention", names, ["out", "k", "v"], domain="com.microsoft", num_heads=HEADS,
                            kv_num_heads=HEADS, **attrs)
    return _model([node], inputs, outputs)


class AttentionCase:
    """One layer's attention at one past, its cache bound as both past and present (the runtime's binding)."""

    def __init__(self, session, bits: int, past: int, rng):
        _, dtype, stored = _cache_layout(bits)
        e = HEADS * HEAD_DIM
        shape = (1, HEADS, past + ROOM, stored)
        if bits == 32:
            self.key, self.value = (rng.normal(0, 1, shape).astype(np.float32) for _ in range(2))
        else:
            low, high = (-127, 128) if bits == 8 else (0, 256)
            self.key, self.value = (rng.integers(low, high, shape).astype(dtype) for _ in range(2))
        self.scales = np.full((1, HEADS, 1, HEAD_DIM), 0.02, np.float32)
        self.qkv = rng.normal(0, 1, (1, 1, 3 * e)).astype(np.float32)
        self.bits, self.past = bits, past
        self.session, self.binding = session, session.io_binding()
        feeds = {"qkv": self.qkv, "seqlens_k": np.array([past], np.int32), "total": np.array(past + 1, np.int32)}
        if bits != 32:
            feeds.update(ks=self.scales, vs=self.scales)
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, value)
        self.binding.bind_output("out")  # first: copy_outputs_to_cpu() lists outputs in the order they were bound
        for past_name, present_name, buffer in (("pk", "k", self.key), ("pv", "v", self.value)):
            for name, bind in ((past_name, self.binding.bind_input), (present_name, self.binding.bind_output)):
                bind(name, "cpu", 0, dtype, buffer.shape, buffer.ctypes.data)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def check(self) -> float:
        """Largest |difference| of the output from numpy's attention over the dequantized cache (after a run,
        which wrote the new position's key and value into the cache)."""
        self.run()
        out = self.binding.copy_outputs_to_cpu()[0].reshape(HEADS, HEAD_DIM)
        keys, values = (self._float(b)[0, :, :self.past + 1] for b in (self.key, self.value))
        q = self.qkv.reshape(3, HEADS, HEAD_DIM)[0]
        scores = np.einsum("hd,htd->ht", q, keys) / np.sqrt(HEAD_DIM)
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return float(np.abs(np.einsum("ht,htd->hd", probs, values) - out).max())

    def _float(self, buffer: np.ndarray) -> np.ndarray:
        if self.bits == 32:
            return buffer
        if self.bits == 8:
            return buffer.astype(np.float32) * self.scales
        from gpt2onnx.format import matmulnbits  # the same packing: two codes a byte, low nibble first, zero at 8

        codes = matmulnbits.unpack(buffer.reshape(-1, buffer.shape[-1]), 4).reshape(*buffer.shape[:3], HEAD_DIM)
        return (codes.astype(np.float32) - 8) * self.scales


def measure(*, rounds: int, threads: int) -> list[dict]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    rng = np.random.default_rng(0)
    cases = {}  # (kind, name, size) -> (run, largest difference from numpy)
    for name, (graph, weight) in matmul_kernels(rng).items():
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        for rows in ROWS:
            x = rng.normal(0, 1, (rows, K_IN)).astype(np.float32)
            difference = float(np.abs(session.run(None, {"x": x})[0] - x @ weight).max())
            cases[("matmul", name, rows)] = (lambda s=session, x=x: s.run(None, {"x": x}), difference)
    for bits, name in ((32, "fp32 cache"), (8, "int8 cache"), (4, "4-bit cache")):
        session = ort.InferenceSession(attention_kernel(bits), options, providers=["CPUExecutionProvider"])
        for past in PASTS:
            case = AttentionCase(session, bits, past, rng)
            cases[("attention", name, past)] = (case.run, case.check())
    times = {key: [] for key in cases}
    for _ in range(rounds):  # round-robin: a drift in the machine's speed touches every kernel alike
        for key, (run, _) in cases.items():
            run()
            repeat = 5 if key[0] == "matmul" and key[2] == 512 else 100
            start = time.perf_counter()
            for _ in range(repeat):
                run()
            times[key].append((time.perf_counter() - start) / repeat)
    return [{"kind": key[0], "kernel": key[1], "size": key[2], "us": round(1e6 * statistics.median(times[key]), 1),
             "max_abs_difference": difference} for key, (_, difference) in cases.items()]


def main(argv=None) -> None:
    from gpt2onnx.runtime import cpu

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per physical core)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    print(cpu.summary(), flush=True)
    rows = measure(rounds=args.rounds, threads=args.threads)
    print(f"{'kernel':34s} {'size':>10s} {'us':>10s}  max |diff| from numpy")
    for row in rows:
        size = f"M={row['size']}" if row["kind"] == "matmul" else f"past {row['size']}"
        print(f"{row['kernel']:34s} {size:>10s} {row['us']:10.1f}  {row['max_abs_difference']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
