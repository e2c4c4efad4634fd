"""GPT-2 at every size: `gpt2onnx bench` on random:gpt2, gpt2-medium, gpt2-large and gpt2-xl, next to
transformers+torch fp32, and a chart of tokens/s and peak memory against parameters.

    python benchmarks/model_sizes.py [--models gpt2,gpt2-medium,gpt2-large,gpt2-xl] [--precisions fp32,int8,int4]
                                     [--runs 2] [--out bench-results/model_sizes]

One `gpt2onnx bench` run per model (export/bench.py `run_bench`: every configuration in a worker process of its
own, round-robin), so each model's ratios against torch come from one run on one machine state; the workload
shrinks with the model so that gpt2-xl's torch fp32 rounds stay in minutes (--new-tokens, --long-new-tokens,
--batch per model below). Random weights (random:NAME, seed 0) stand in for the Hub checkpoints, which this
machine cannot download: speed and memory depend on the shapes, not on the values. The models are exported
into the bench's --work-dir once (gpt2-xl fp32 is 6.2 GB and is saved with external data).

Memory: every configuration of one model is loaded at the same time (the bench's design). gpt2-xl needs about
6.5 GB for torch fp32 and as much again for gpt2onnx fp32; on a machine with less than ~20 GB leave fp32 out of
--precisions for it (--skip-fp32-above 1e9).

Writes OUT/<model>.json (the bench report), OUT/model_sizes.json (all of them) and OUT/model_sizes.png; prints
one Markdown table: decode@8 tok/s, decode@768 tok/s, prefill tok/s, peak RSS and the ratio to torch fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / ".shim")] if (REPO / ".shim").is_dir() else [str(REPO)]

try:
    from gpt2onnx_export.bench import BenchOptions, format_table, run_bench
    from gpt2onnx_export.sources import ARCHITECTURES, GPT2_VOCAB_SIZE
except ImportError as error:  # the export extra is what prepares the models
    sys.exit(f"error: this benchmark needs the export extra ({error})\n"
             "hint: pip install -e '.[export,bench]'")

# tokens per figure by model: enough steps to stand out from timer noise, few enough for torch fp32 at 1.5 B
WORKLOAD = {"gpt2": dict(new_tokens=128, long_new_tokens=64, batch=5),
            "gpt2-medium": dict(new_tokens=64, long_new_tokens=32, batch=5),
            "gpt2-large": dict(new_tokens=48, long_new_tokens=48, batch=3),
            "gpt2-xl": dict(new_tokens=32, long_new_tokens=48, batch=2)}
# decode@768 was once (N - 1) / (time(768 + N) - time(768 + 1)): at gpt2-xl a 768-token prefill takes ~25 s on 2
# cores and varied by more than 16 tokens' decode (negative rates), hence 48; it is now timed inside one call


def parameters(name: str) -> int:
    """GPT-2's parameter count from its shape (wte tied with lm_head): what the x axis shows."""
    a = ARCHITECTURES[name]
    e, layers, positions = a["n_embd"], a["n_layer"], a["n_positions"]
    vocab = a.get("vocab_size", GPT2_VOCAB_SIZE)
    per_layer = 4 * e + (3 * e * e + 3 * e) + (e * e + e) + (4 * e * e + 4 * e) + (4 * e * e + e)  # 2 norms, attn, mlp
    return vocab * e + positions * e + layers * per_layer + 2 * e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="gpt2,gpt2-medium,gpt2-large,gpt2-xl")
    parser.add_argument("--precisions", default="fp32,int8,int4", help="gpt2onnx precisions (bench --precisions)")
    parser.add_argument("--runs", type=int, default=2, help="rounds per model; figures are medians")
    parser.add_argument("--skip-fp32-above", type=float, default=0,
                        help="leave fp32 (torch stays) out for models with more parameters than this (0: never)")
    parser.add_argument("--work-dir", type=Path, default=None, help="the bench's --work-dir (default: its own)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/model_sizes"))
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in WORKLOAD]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(WORKLOAD)}")
    args.out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for name in models:
        precisions = tuple(p for p in args.precisions.split(",")
                           if not (p == "fp32" and args.skip_fp32_above and parameters(name) > args.skip_fp32_above))
        extra = {"work_dir": args.work_dir} if args.work_dir else {}
        options = BenchOptions(model=f"random:{name}", runs=args.runs, frameworks=("torch", "gpt2onnx"),
                               precisions=precisions, **WORKLOAD[name], **extra)
        report = run_bench(options, progress=lambda m: print(m, flush=True),
                           command=" ".join(["python", "benchmarks/model_sizes.py", *(argv or sys.argv[1:])]))
        report["parameters"] = parameters(name)
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
        print(format_table(report), flush=True)
        reports[name] = report
    (args.out / "model_sizes.json").write_text(json.dumps(reports, indent=2))
    print(summary_table(reports))
    chart = write_chart(reports, args.out / "model_sizes.png")
    if chart:
        print(f"chart: {chart}")
    return 0


def _by_config(reports: dict) -> dict[str, list[tuple[int, dict]]]:
    """configuration name -> [(parameters, its result)] in model order."""
    out: dict[str, list[tuple[int, dict]]] = {}
    for report in reports.values():
        for r in report["results"]:
            out.setdefault(r["name"], []).append((report["parameters"], r))
    return out


def summary_table(reports: dict) -> str:
    lines = ["| model | parameters | configuration | decode@8 tok/s | x torch | decode@768 tok/s | prefill tok/s | "
             "peak RSS MB | disk MB |", "|" + "---|" * 9]
    for name, report in reports.items():
        torch = next((r for r in report["results"] if r["framework"] == "torch"), None)
        for r in report["results"]:
            ratio = f"{r['decode_short'] / torch['decode_short']:.2f}" if torch else "—"
            lines.append(f"| {name} | {report['parameters'] / 1e6:.0f} M | {r['name']} | {r['decode_short']:.1f} | "
                         f"{ratio} | {r['decode_long']:.1f} | {r['prefill']:.0f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['size_mb']:.0f} |")
    machine = next(iter(reports.values()))["machine"]
    lines.append(f"\n{machine['cpu']} (flags: {' '.join(machine.get('flags', [])) or 'unknown'}), "
                 f"{machine['threads']} threads; medians of the rounds of each model's run")
    return "\n".join(lines)


def write_chart(reports: dict, path: Path) -> Path | None:
    """tokens/s and peak RSS against parameters (log-log), a line per configuration; None without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: nothing global, no backend to choose
    except ImportError:
        return None
    fig = Figure(figsize=(16, 5))
    axes = fig.subplots(1, 3)
    by_config = _by_config(reports)
    panels = [("decode_short", "decode after an 8-token prompt, tokens/s"),
              ("prefill", "prefill, prompt tokens/s"), ("peak_rss_mb", "peak RSS, MB")]
    for ax, (key, title) in zip(axes, panels):
        for config, points in by_config.items():
            xs = [p / 1e6 for p, _ in points]
            ax.plot(xs, [r[key] for _, r in points], marker="o", label=config.replace("transformers+torch", "torch"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters, millions")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    machine = next(iter(reports.values()))["machine"]
    fig.suptitle(f"GPT-2 sizes (random weights) on {machine['cpu']}, {machine['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
