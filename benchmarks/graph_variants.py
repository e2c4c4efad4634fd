"""Why the graph looks the way it does: each fusion and the in-place cache, switched off one at a time.

    python benchmarks/graph_variants.py [--model random:gpt2] [--rounds 9] [--threads 0]

Builds (without verification, in a temporary directory) the graph `export/builder.py` makes, and variants
with one choice undone:

  fused           what gpt2onnx exports: GroupQueryAttention, SkipLayerNormalization, FastGelu, cache in place
  copying cache   the same graph, but run with separate past and present tensors (ONNX Runtime concatenates
                  the past into a new present every step: what a plain session.run does)
  unfused attn    MatMul / Softmax / MatMul attention with Concat of the past (no GroupQueryAttention;
                  necessarily a copying cache)
  unfused norms   Add + LayerNormalization instead of SkipLayerNormalization
  unfused gelu    the tanh GELU written out (Mul, Add, Tanh) instead of FastGelu

and measures, round-robin so that a machine whose load drifts slows them all alike: a decode step after a
past of 8 and of 768 tokens, and a 512-token prefill. Reports the 10th percentile and median per variant.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

CLOCK = time.perf_counter  # --clock cpu: process CPU time, steadier on a shared machine (use with --threads 1)


def _variants():
    from gpt2onnx.format import contract as c
    from gpt2onnx_export import builder

    def unfused_attention(g, x, layer, config, q, lengths):
        p = f"transformer.h.{layer}.attn"
        e = config.n_embd
        qkv = builder._linear(g, x, p + ".c_attn", e, 3 * e, q, name=c.attention_qkv(layer))
        g.const("c_split3", [e, e, e])
        g.const("c_heads_shape", [0, 0, config.n_head, config.head_dim])
        g.const("c_merge_shape", [0, 0, e])
        query, key, value = g.op("Split", qkv, "c_split3", axis=2, outputs=3)

        def heads(t):
            return g.op("Transpose", g.op("Reshape", t, "c_heads_shape"), perm=[0, 2, 1, 3])

        key = g.op("Concat", c.past_key(layer), heads(key), axis=2, name=c.present_key(layer))
        value = g.op("Concat", c.past_value(layer), heads(value), axis=2, name=c.present_value(layer))
        scores = g.op("MatMul", heads(query), g.op("Transpose", key, perm=[0, 1, 3, 2]))
        scores = g.op("Add", g.op("Mul", scores, g.const(f"c_scale_{layer}", 1 / math.sqrt(config.head_dim),
                                                          np.float32)), lengths["bias"])
        context = g.op("Transpose", g.op("MatMul", g.op("Softmax", scores, axis=-1), value), perm=[0, 2, 1, 3])
        return builder._linear(g, g.op("Reshape", context, "c_merge_shape"), p + ".c_proj", e, e, q, bias=False)

    def unfused_norm(g, x, residual, norm, bias, eps):
        total = g.op("Add", residual, g.op("Add", x, bias), name=f"{norm}.residual")
        return g.op("LayerNormalization", total, norm + ".weight", norm + ".bias", axis=-1, epsilon=eps), total

    def unfused_mlp(g, x, layer, config, q):
        p = f"transformer.h.{layer}.mlp"
        h = builder._linear(g, x, p + ".c_fc", config.n_embd, config.inner_dim, q)
        g.const("c_half", 0.5, np.float32)
        g.const("c_one", 1.0, np.float32)
        g.const("c_gelu_a", 0.044715, np.float32)
        g.const("c_gelu_b", math.sqrt(2 / math.pi), np.float32)
        cube = g.op("Mul", g.op("Mul", h, h), h)
        inner = g.op("Mul", g.op("Add", h, g.op("Mul", cube, "c_gelu_a")), "c_gelu_b")
        h = g.op("Mul", g.op("Mul", h, "c_half"), g.op("Add", g.op("Tanh", inner), "c_one"))
        return builder._linear(g, h, p + ".c_proj", config.inner_dim, config.n_embd, q, bias=False)

    return {"fused": {}, "copying cache": {}, "unfused attn": {"_attention": unfused_attention},
            "unfused norms": {"_skip_layer_norm": unfused_norm}, "unfused gelu": {"_mlp": unfused_mlp}}


def build(model: str, out: Path, patches: dict, precision: str) -> Path:
    from gpt2onnx_export import builder, sources
    from gpt2onnx_export.steps import _write_side_files

    saved = {name: getattr(builder, name) for name in patches}
    try:
        for name, function in patches.items():
            setattr(builder, name, function)
        with tempfile.TemporaryDirectory() as work:
            source = sources.load_source(model, workdir=Path(work))
            out.mkdir(parents=True, exist_ok=True)
            graph = builder.build_graph(source.config, builder.quantization_for(precision))
            builder.save_model(graph, source.weights, source.config, out)
            _write_side_files(source, out)
    finally:
        for name, function in saved.items():
            setattr(builder, name, function)
    return out


class _Copying:
    """Runs a graph the plain way: feeds in, a new present out, fed back as the next past."""

    def __init__(self, session):
        self.session, self.inner = session, session._session
        from gpt2onnx.format import contract as c

        self.c = c

    def prefill(self, ids):
        c, config = self.c, self.session.config
        n = ids.shape[1]
        past = [np.zeros((1, config.n_head, 0, config.head_dim), np.float32)] * (2 * config.n_layer)
        feeds = {c.INPUT_IDS: ids, c.ATTENTION_MASK: np.ones((1, n), np.int64), c.POSITION_IDS: np.arange(n)[None],
                 c.LOGITS_TO_KEEP: np.array(1, np.int64), **dict(zip(c.past_names(config.n_layer), past))}
        return self.inner.run(c.output_names(config.n_layer), feeds)[1:]

    def prefill_ms(self, ids):
        start = CLOCK()
        self.prefill(ids)
        return (CLOCK() - start) * 1000

    def decode_ms(self, ids, steps):
        c, config = self.c, self.session.config
        n = ids.shape[1]
        names = c.output_names(config.n_layer)
        past = self.prefill(ids)
        start = CLOCK()
        for i in range(steps):
            feeds = {c.INPUT_IDS: np.array([[1]]), c.ATTENTION_MASK: np.ones((1, n + i + 1), np.int64),
                     c.POSITION_IDS: np.array([[n + i]]), c.LOGITS_TO_KEEP: np.array(1, np.int64),
                     **dict(zip(c.past_names(config.n_layer), past))}
            _, *past = self.inner.run(names, feeds)
        return (CLOCK() - start) / steps * 1000


def _in_place_decode_ms(session, ids, steps):
    n = ids.shape[1]
    cache = session.empty_cache(1, capacity=n + steps)
    _, cache = session.run(ids, np.ones((1, n), np.int64), np.arange(n)[None], cache, logits_for="last")
    start = CLOCK()
    for i in range(steps):
        _, cache = session.run(np.array([[1]]), np.ones((1, n + i + 1), np.int64), np.array([[n + i]]), cache,
                               logits_for="last")
    return (CLOCK() - start) / steps * 1000


def _prefill_ms(session, ids):
    n = ids.shape[1]
    start = CLOCK()
    session.run(ids, np.ones((1, n), np.int64), np.arange(n)[None], session.empty_cache(1), logits_for="last")
    return (CLOCK() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int4"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per measurement")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: count this process's CPU time only (with --threads 1, a machine shared with other "
                             "work disturbs it less)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    from gpt2onnx.format.config import ModelConfig
    from gpt2onnx.runtime.session import OnnxSession, SessionOptions

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, patches in _variants().items():
            if name == "copying cache":
                continue
            print(f"building {name}", flush=True)
            directory = build(args.model, Path(tmp) / name.replace(" ", "-"), patches, args.precision)
            config = ModelConfig.from_file(directory / "config.json")
            sessions[name] = OnnxSession(directory / "model.onnx", config, SessionOptions(threads=args.threads))
        vocab = sessions["fused"].config.vocab_size
        short, long, prompt = (rng.integers(0, vocab, (1, n)) for n in (8, 768, 512))
        copying = {"copying cache": _Copying(sessions["fused"]), "unfused attn": _Copying(sessions["unfused attn"])}
        order = ["fused", "copying cache", "unfused attn", "unfused norms", "unfused gelu"]
        results = {name: {"decode@8": [], "decode@768": [], "prefill@512": []} for name in order}
        for round_ in range(args.rounds):
            for name in order:
                if name in copying:
                    runner = copying[name]
                    results[name]["decode@8"].append(runner.decode_ms(short, args.steps))
                    results[name]["decode@768"].append(runner.decode_ms(long, args.steps))
                else:
                    results[name]["decode@8"].append(_in_place_decode_ms(sessions[name], short, args.steps))
                    results[name]["decode@768"].append(_in_place_decode_ms(sessions[name], long, args.steps))
                if name == "unfused attn":
                    results[name]["prefill@512"].append(copying[name].prefill_ms(prompt))
                elif name != "copying cache":
                    results[name]["prefill@512"].append(_prefill_ms(sessions[name], prompt))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    print(f"\n{args.model} {args.precision}, {args.clock} clock, {args.threads or 'default'} threads, "
          f"ms (10th percentile / median of {args.rounds} rounds)")
    print("| variant | decode step @8 | decode step @768 | @768 / @8 | prefill 512 |\n|---|---|---|---|---|")
    for name in order:
        r = results[name]
        cells = [f"{np.percentile(r[k], 10):.2f} / {np.median(r[k]):.2f}" if r[k] else "—" for k in r]
        ratio = np.percentile(r["decode@8"], 10) / np.percentile(r["decode@768"], 10)
        print(f"| {name} | {cells[0]} | {cells[1]} | {ratio:.2f} | {cells[2]} |")


if __name__ == "__main__":
    main()
