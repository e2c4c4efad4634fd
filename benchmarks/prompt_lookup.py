"""Prompt lookup and assisted decoding against plain greedy decoding, with identical tokens asserted.

    python benchmarks/prompt_lookup.py [--rounds 5] [--new-tokens 128] [--threads 1 --clock cpu] [--json FILE]

On the trained test model (tests/data/gpt2-tiny-trained, exported once into --work-dir at each --precisions),
greedy decoding of --new-tokens tokens (EOS ignored, so every run makes the same number of tokens) for
three sets of prompts built from its held-out text (documentation it never saw):

- repeat (own text): document editing on text the model writes. Q = the first 200 characters of a held-out
  paragraph, G = the model's greedy continuation of Q (--new-tokens tokens); the prompt is Q + G, a blank
  line, then Q again, so the continuation to write is in the prompt. (The tiny model has no in-context
  copying: on a held-out paragraph given twice its top-1 agreement with the second copy is no better than
  with the first, 0.29-0.41 against 0.36-0.43; so it does not go on copying a passage it would not write
  itself, and the set below measures that case.)
- repeat (held-out text): the same with a held-out paragraph P: P, a blank line, then P's first third.
- ordinary: the first 200 characters of a held-out paragraph, as they are. (Greedy text from this small
  model soon repeats itself, so prompt lookup finds drafts in the new text here too.)
- ordinary, sampled: the same prompts sampled (top_k=50, seeds 0, 1, ...; prompt lookup gives the very tokens
  of plain seeded sampling): text that rarely repeats, where drafts are mostly rejected.
- ordinary, no_repeat_ngram_size=3: greedy that may not repeat a 3-gram, so that a 2-gram match's draft is
  banned at its first token: the worst case, every draft wasted.

Plain and prompt-lookup runs alternate prompt by prompt, round after round (a shared machine's load hits
both alike); a set's ratio is the median over rounds of (plain time / prompt-lookup time) for the whole
set. The clock is the process's CPU time by default (steadier on a shared machine; with --threads 1 that
is the time of one core), --clock wall for wall time. Assisted decoding is measured the same way on the
ordinary sets: target = the first of --precisions, assistant = --assistant (default int4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def exports(work_dir: Path, precisions: list[str]) -> dict[str, Path]:
    """The trained test model exported at each precision (built once into work_dir)."""
    out = {}
    for precision in precisions:
        target = work_dir / f"gpt2-tiny-trained-{precision}"
        if not (target / "manifest.json").is_file():
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import assemble_trained_model

            from gpt2onnx_export import ExportOptions, export_model

            source = assemble_trained_model(work_dir / "gpt2-tiny-trained")
            print(f"exporting the trained test model at {precision} into {target}", file=sys.stderr)
            export_model(str(source), target, ExportOptions(force=True, precision=precision),
                         progress=lambda message: None)
        out[precision] = target
    return out


def prompt_sets(model, count: int, new_tokens: int) -> dict[str, tuple[list[str], list[dict]]]:
    """Each set: its prompts and the generation options of each (plain and speculative runs alike)."""
    text = (REPO / "tests" / "data" / "gpt2-tiny-trained" / "heldout.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if 400 < len(p) < 1200][:count]
    starts = [p[:200] for p in paragraphs]
    own = [q + model.generate(q, max_new_tokens=new_tokens, ignore_eos=True).text for q in starts]
    greedy = [{}] * len(starts)
    return {
        "repeat (own text)": ([p + "\n\n" + q for p, q in zip(own, starts)], greedy),
        "repeat (held-out text)": ([p + "\n\n" + p[:len(p) // 3] for p in paragraphs], greedy),
        "ordinary": (starts, greedy),
        "ordinary, sampled": (starts, [dict(do_sample=True, top_k=50, seed=i) for i in range(len(starts))]),
        "ordinary, no_repeat_ngram_size=3": (starts, [dict(no_repeat_ngram_size=3)] * len(starts)),
    }


def compare(model, prompts: list[str], options: list[dict], *, rounds: int, new_tokens: int, clock,
            **speculation) -> dict:
    """Plain decoding against decoding with `speculation` options, interleaved; identical tokens asserted."""
    ratios, plain_rates, fast_rates = [], [], []
    drafted = accepted = runs = 0
    for _ in range(rounds):
        plain_time = fast_time = 0.0
        for prompt, given in zip(prompts, options):
            start = clock()
            plain = model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, **given)
            plain_time += clock() - start
            start = clock()
            fast = model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, **given, **speculation)
            fast_time += clock() - start
            assert fast.token_ids == plain.token_ids, f"different tokens for {prompt[:40]!r}"
            drafted, accepted = drafted + fast.speculation.drafted, accepted + fast.speculation.accepted
            runs += fast.speculation.runs + 1
        tokens = new_tokens * len(prompts)
        ratios.append(plain_time / fast_time)
        plain_rates.append(tokens / plain_time)
        fast_rates.append(tokens / fast_time)
    return {"plain_tok_s": statistics.median(plain_rates), "speculative_tok_s": statistics.median(fast_rates),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_run": new_tokens * len(prompts) * rounds / runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; ratios are medians")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per set")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per prompt")
    parser.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens")
    parser.add_argument("--precisions", default="fp32,int8",
                        help="target precisions, comma-separated (int4: see benchmarks/README.md)")
    parser.add_argument("--assistant", default="int4", help="the assistant's precision ('' skips assisted decoding)")
    parser.add_argument("--num-assistant-tokens", type=int, default=5, help="assistant drafts per run")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per model")
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu", help="cpu: process CPU time; wall")
    parser.add_argument("--work-dir", default="~/.cache/gpt2onnx/prompt-lookup", help="where the exports are kept")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)

    import gpt2onnx
    from gpt2onnx.runtime import cpu

    precisions = [p for p in args.precisions.split(",") if p]
    dirs = exports(Path(args.work_dir).expanduser(), precisions + ([args.assistant] if args.assistant else []))
    clock = CLOCKS[args.clock]
    print(f"CPU: {cpu.summary()}")
    print(f"threads {args.threads}, clock {args.clock}, {args.rounds} rounds, {args.prompts} prompts per set, "
          f"{args.new_tokens} new tokens, prompt_lookup_num_tokens={args.lookup}")
    rows = []
    for precision in precisions:
        model = gpt2onnx.load(dirs[precision], threads=args.threads)
        sets = prompt_sets(model, args.prompts, args.new_tokens)
        for name, (prompts, options) in sets.items():
            result = compare(model, prompts, options, rounds=args.rounds, new_tokens=args.new_tokens, clock=clock,
                             prompt_lookup_num_tokens=args.lookup)
            rows.append({"method": "prompt lookup", "target": precision, "set": name, **result})
        if precision == precisions[0] and args.assistant:
            assistant = gpt2onnx.load(dirs[args.assistant], threads=args.threads)
            for name in ("ordinary", "ordinary, sampled"):
                result = compare(model, *sets[name], rounds=args.rounds, new_tokens=args.new_tokens,
                                 clock=clock, assistant_model=assistant, num_assistant_tokens=args.num_assistant_tokens,
                                 num_assistant_tokens_schedule="heuristic")
                rows.append({"method": f"assistant {args.assistant}", "target": precision, "set": name, **result})
    print("| method | target | set | plain tok/s | speculative tok/s | ratio (min-max) | acceptance | tokens/run |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['target']} | {r['set']} | {r['plain_tok_s']:.0f} | {r['speculative_tok_s']:.0f} | "
              f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['acceptance_rate']:.0%} | "
              f"{r['tokens_per_run']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu.summary(), "args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
