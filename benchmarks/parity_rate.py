"""How often does seeded sampling differ from transformers', and is every difference a near-tie?

    python benchmarks/parity_rate.py [--models random:gpt2,TRAINED_DIR] [--seeds 20] [--json FILE]

For each model: export it (fp32, kept in --work-dir and reused), then run `gpt2onnx verify`'s comparison
(export/verify_command.py): seeds 0..N-1, each with every setting of export/parity.py (10 settings, batch
sizes 1/3/5 in turn, prompts including non-ASCII), 24 new tokens — `model.generate(seed=s)` against
`set_seed(s); generate(do_sample=True)` on the same weights. Prints one row per model (cases, rows, rows
that differ, how many of those are explained near-ties, the largest explained margin) and the JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TRAINED = Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt2-tiny-trained"


def measure(model: str, *, seeds: int, max_new_tokens: int, work_dir: Path) -> dict:
    from gpt2onnx_export import ExportOptions, export_model
    from gpt2onnx_export.verify_command import VerifyOptions, verify_model

    out = work_dir / model.replace(":", "-").replace("/", "_").strip("_")
    if not (out / "manifest.json").is_file():
        export_model(model, out, ExportOptions(force=True), progress=lambda message: None)
    start = time.perf_counter()
    report = verify_model(out, VerifyOptions(seeds=seeds, max_new_tokens=max_new_tokens),
                          progress=lambda message: print(f"  {message}", flush=True))
    sampling = report["sampling"]
    return {"model": model, "seconds": round(time.perf_counter() - start, 1), "passed": report["passed"],
            "max_abs_diff_logits": report["logits"]["max_abs_diff"]["logits"],
            "greedy_equal": report["logits"]["greedy"]["equal"],
            **{k: sampling[k] for k in ("cases", "rows", "equal_rows", "cases_with_mismatch", "mismatched_rows",
                                        "explained", "unexplained", "largest_explained_margin")},
            "divergences": [{k: d[k] for k in ("case", "text", "kind", "margin", "margin_unit", "max_abs_diff",
                                               "explained")} for d in sampling["divergences"]]}


def table(results: list[dict]) -> str:
    head = (f"{'model':<28} {'cases':>5} {'rows':>5} {'differ':>6} {'cases':>6} {'rate/row':>9} {'explained':>9} "
            f"{'unexpl.':>7} {'max margin':>10} {'max|Δlogit|':>11}")
    lines = [head, "-" * len(head)]
    for r in results:
        margin = "-" if r["largest_explained_margin"] is None else f"{r['largest_explained_margin']:.1e}"
        lines.append(f"{Path(r['model']).name if '/' in r['model'] else r['model']:<28} {r['cases']:>5} {r['rows']:>5} "
                     f"{r['mismatched_rows']:>6} {r['cases_with_mismatch']:>6} "
                     f"{100 * r['mismatched_rows'] / r['rows']:>8.2f}% {r['explained']:>9} {r['unexplained']:>7} "
                     f"{margin:>10} {r['max_abs_diff_logits']:>11.1e}")
    lines.append("(differ: rows whose tokens differ from transformers'; cases: calls with at least one such row)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=f"random:gpt2,{TRAINED}", help="comma-separated MODEL specs")
    parser.add_argument("--seeds", type=int, default=20, help="seeds per model (x 10 settings = cases)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated per case")
    parser.add_argument("--work-dir", default="~/.cache/gpt2onnx/parity", help="where the exports are kept")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON here")
    args = parser.parse_args()
    work_dir = Path(args.work_dir).expanduser()
    work_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models.split(","):
        print(f"{model}:", flush=True)
        results.append(measure(model, seeds=args.seeds, max_new_tokens=args.max_new_tokens, work_dir=work_dir))
    print(table(results))
    text = json.dumps(results, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
