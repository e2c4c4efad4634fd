"""`gpt2onnx verify MODEL_DIR`: an export side by side with PyTorch, and a report of every difference.

The reference is transformers' GPT2LMHeadModel holding the weights the export came from: the source its
manifest records (a hub id at the recorded commit, a local directory, or random:NAME regenerated from its
seed), or `--reference`. Then, for an fp32 export:

  1. logits and cache against PyTorch for prompts of several lengths, a cached step and a padded batch,
     and a greedy continuation (`verify.verify`, the export gate itself);
  2. seeded sampling over seeds x settings x prompts (`parity`): `model.generate(..., seed=s)` against
     `set_seed(s); generate(do_sample=True, ...)`, token for token; greedy decoding of every prompt; and
     beam search and beam sampling cases (`parity.beam_cases`).

A greedy or sampled row that differs is analysed at its first differing step (`parity.explain`; a beam row
at the first step where the two sides ranked candidates differently, `parity.explain_beams`): a flip of a
near-tie by float noise is reported with its margin; anything else fails the verification.

A quantized export cannot be identical to PyTorch fp32, so it is measured instead (`verify.verify_quality`,
the export's own quality gate) — the KL divergence of its next-token distributions from PyTorch's,
perplexity on a text, and top-1 agreement where PyTorch's choice is decisive — against thresholds the user
can set.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpt2onnx.errors import InvalidArgumentError, VerificationError
from gpt2onnx.format import contract as c
from gpt2onnx.format import precisions
from gpt2onnx.runtime.optimum_layout import has_pytorch_weights

from . import parity, sources, staging, verify
from .progress import stderr, stopwatch
from .reference import torch_model

DEFAULT_SEEDS = 10
_SHOWN = 20  # unexplained differences listed in the text report


@dataclass(frozen=True)
class VerifyOptions:
    """What `verify_model` compares, and how strictly."""

    # hub id, local directory or random:NAME (default: the manifest's source; for an Optimum export without one,
    # the directory itself when it holds PyTorch weights, as Hub repositories with an onnx/ folder often do)
    reference: str | None = None
    reference_seed: int | None = None  # the seed of a random:NAME reference (default: the manifest's, else 0)
    seeds: int = DEFAULT_SEEDS  # sampling: seeds 0 .. seeds-1, each with every setting of parity.SETTINGS
    max_new_tokens: int = parity.MAX_NEW_TOKENS  # sampling: tokens generated per case
    atol: float = verify.DEFAULT_ATOL  # fp32: largest |logit difference| that counts as float noise
    attention: str | None = None  # the reference's attention: "sdpa" (from_pretrained's default) or "eager"
    # quantized: least top-1 agreement where PyTorch is decisive (default: the precision's)
    min_top1: float | None = None
    max_kl: float | None = None  # quantized: largest mean KL divergence per position (nats)
    max_ppl_increase: float | None = None  # quantized: largest relative perplexity increase (0.01 = 1%)
    text: str | None = None  # quantized: the text scored (default: heldout.txt of a local source, else a sample)
    threads: int = 0  # ONNX Runtime threads (0: one per physical core)


def verify_model(model_dir: str | Path, options: VerifyOptions = VerifyOptions(), *,
                 progress: Callable[[str], None] = stderr) -> dict:
    """Compare the export in `model_dir` with PyTorch. Returns the report (`passed`, `failures`, ...)."""
    import gpt2onnx

    _check(options)
    step = stopwatch(progress)
    model = gpt2onnx.load(model_dir, threads=options.threads)
    spec, seed, revision = reference_spec(model.manifest, options.reference, directory=model_dir,
                                          seed=options.reference_seed)
    step(f"loading the reference {spec}")
    with staging.terminate_cleanly(), tempfile.TemporaryDirectory(prefix="gpt2onnx-verify-") as work:
        source = sources.load_source(spec, workdir=Path(work), seed=seed, revision=revision)
    if source.config != model.config:
        raise InvalidArgumentError(f"the reference {spec} is not the same architecture as {model_dir}",
                                   hint="pass --reference the checkpoint this model was exported from")
    attention = options.attention or _attention(source.config_dict)
    reference = torch_model(source.config_dict, source.weights, attn_implementation=attention)
    # an Optimum export has no manifest: its float32 cache (the only one load accepts) is verified as fp32
    precision = (model.manifest or {}).get(c.M_PRECISION, "fp32")
    report = {"model": str(Path(model_dir)), "precision": precision, "layout": model.layout.kind,
              "reference": {"spec": spec, **({"seed": seed} if spec.startswith(sources.RANDOM_PREFIX) else {}),
                            "attention": attention, "transformers": _transformers_version()}}
    with _torch_threads(1):
        if not precisions.get(precision).quantized:
            step("logits, cache and greedy decoding against PyTorch")
            report["logits"] = _logits(model, reference, options.atol)
            step(f"generate: greedy, {options.seeds} seeds x {len(parity.SETTINGS)} sampling settings, beams")
            report["sampling"] = _sampling(model, reference, model_dir, options, step)
        else:
            step(f"{precision}: perplexity, top-1 agreement and KL divergence against PyTorch fp32")
            report["quality"] = _quality(model, reference, precision, source, options)
    report["failures"] = _failures(report)
    report["passed"] = not report["failures"]
    step("passed" if report["passed"] else f"{len(report['failures'])} unexplained differences")
    return report


@contextlib.contextmanager
def _torch_threads(n: int):
    """PyTorch on `n` threads for a while. The reference runs on one: it takes turns with ONNX Runtime, and
    its many small per-step operations gain nothing from more (verify on random:tiny, a loaded 2-core
    machine: 34 s on one thread, 76 s on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check(report: dict) -> None:
    """Raise VerificationError naming the unexplained differences of a report that did not pass."""
    if report["passed"]:
        return
    failures = report["failures"]
    shown = "; ".join(failures[:2]) + (f"; and {len(failures) - 2} more" if len(failures) > 2 else "")
    raise VerificationError(f"{report['model']} differs from PyTorch: {shown}", report=report,
                            hint="the export or the weights differ from the reference (is --reference the "
                                 "checkpoint it came from?); --json prints every comparison")


def reference_spec(manifest: dict | None, override: str | None, *, directory: str | Path | None = None,
                   seed: int | None = None) -> tuple[str, int, str | None]:
    """(MODEL spec, seed, revision) of the reference: `override`, else the source the manifest records; with
    no manifest (an Optimum export), `directory` itself when it holds PyTorch weights. `seed`: of a
    random:NAME reference, instead of the manifest's."""
    source = (manifest or {}).get(c.M_SOURCE) or {}
    recorded = int(source.get("seed", 0)) if source.get("kind") == "random" else 0
    seed = recorded if seed is None else seed
    if override:
        return override, seed, None
    if manifest is None:
        if directory is not None and has_pytorch_weights(directory):  # its own reference
            return str(directory), seed, None
        raise InvalidArgumentError(f"{directory} has no gpt2onnx manifest (an Optimum export) and no PyTorch weights "
                                   "to compare with", hint="pass --reference HF_ID_OR_DIR (or random:NAME with "
                                                           "--reference-seed), the checkpoint it was exported from")
    kind = source.get("kind")
    if kind == "random":
        return sources.RANDOM_PREFIX + source["architecture"], seed, None
    if kind == "local":
        return source["path"], 0, None
    if kind == "hub":
        return source["id"], 0, source.get("commit") or source.get("revision")
    raise InvalidArgumentError(f"the manifest does not say where the model came from (source: {source!r})",
                               hint="pass --reference HF_ID_OR_DIR, the checkpoint it was exported from")


def _check(options: VerifyOptions) -> None:
    """Every option, before any work: InvalidArgumentError naming the first bad one."""
    if not verify.is_int(options.seeds) or options.seeds < 0:
        raise InvalidArgumentError(f"seeds must be an integer >= 0, got {options.seeds!r}",
                                   hint=f"seeds 0 .. N-1 are compared (default {DEFAULT_SEEDS}; 0: greedy cases only)")
    tokens = options.max_new_tokens
    if not verify.is_int(tokens) or tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be an integer >= 1, got {options.max_new_tokens!r}",
                                   hint=f"tokens generated per case (default {parity.MAX_NEW_TOKENS})")
    verify.check_atol(options.atol, meaning="the largest |logit difference| that counts as float noise")
    if options.attention not in (None, "sdpa", "eager"):
        raise InvalidArgumentError(f"attention must be sdpa or eager, got {options.attention!r}",
                                   hint="leave it out for what from_pretrained uses (sdpa)")
    verify.check_thresholds(options.max_ppl_increase, options.max_kl, options.min_top1,
                            names=("max_ppl_increase", "max_kl", "min_top1"))
    if options.text is not None and not Path(options.text).expanduser().is_file():
        raise InvalidArgumentError(f"the text {options.text!r} is not a file", hint="pass a UTF-8 text file to --text")
    if options.reference_seed is not None and (not verify.is_int(options.reference_seed) or options.reference_seed < 0):
        raise InvalidArgumentError(f"reference_seed must be an integer >= 0, got {options.reference_seed!r}",
                                   hint="the --seed a random:NAME model was exported with (default 0)")
    if not verify.is_int(options.threads) or options.threads < 0:
        raise InvalidArgumentError(f"threads must be an integer >= 0, got {options.threads!r}",
                                   hint="0 uses one thread per physical core")


def _attention(config_dict: dict) -> str:
    """sdpa, what GPT2LMHeadModel.from_pretrained uses (and so what a transformers user's seed gives) —
    except where transformers 4.57's sdpa path ignores the config (then GPT-2's own eager arithmetic)."""
    if config_dict.get("scale_attn_by_inverse_layer_idx") or config_dict.get("reorder_and_upcast_attn"):
        return "eager"
    return "sdpa"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _logits(model, reference, atol: float) -> dict:
    """The export gate's comparison; a greedy flip it reports is analysed here."""
    try:
        result = verify.verify(model.session, reference, model.tokenizer, atol=atol)
    except VerificationError as error:
        result = error.report
    lengths = {}
    for check_ in result["checks"]:
        entry = lengths.setdefault(check_["check"], {"logits": 0.0, "cache": 0.0})
        key = "logits" if check_["output"] == c.LOGITS else "cache"
        entry[key] = max(entry[key], check_["max_abs_diff"])
    greedy = result["greedy"]
    if not greedy["equal"]:
        prompt = model.tokenizer.encode(greedy["prompt"])
        divergence = parity.explain_greedy(model.session, reference, prompt, greedy["tokens"],
                                           eos_id=model.eos_token_id, atol=atol)
        greedy["divergence"] = None if divergence is None else {**vars(divergence), "text": divergence.describe()}
    return {"atol": atol, "by_check": lengths, "failed_outputs": result["failed_outputs"],
            "max_abs_diff": result["max_abs_diff"], "greedy": greedy}


def _sampling(model, reference, model_dir, options: VerifyOptions, step) -> dict:
    # the concrete class, never AutoTokenizer: an auto_map in tokenizer_config.json would make transformers
    # offer to import Python files from the directory
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(str(model.layout.tokenizer_file.parent))
    runner = parity.SideBySide(model, reference, tokenizer, atol=options.atol)
    results = []
    all_cases = (parity.greedy_cases(max_new_tokens=options.max_new_tokens)
                 + parity.cases(range(options.seeds), max_new_tokens=options.max_new_tokens)
                 + parity.beam_cases(range(options.seeds), max_new_tokens=options.max_new_tokens))
    for index, case in enumerate(all_cases):
        results.append(runner.run(case))
        if (index + 1) % 25 == 0:
            step(f"  {index + 1} / {len(all_cases)} cases")
    summary = parity.summarize(results)
    beams = sum(c.kwargs["num_beams"] > 1 for c in all_cases)
    return {"seeds": options.seeds, "beam_cases": beams,
            "greedy_cases": sum(not c.do_sample for c in all_cases if c.kwargs["num_beams"] == 1),
            "settings": [dict(s) for s in parity.SETTINGS],
            "batch_sizes": list(parity.BATCH_SIZES), "prompts": list(parity.PROMPTS),
            "max_new_tokens": options.max_new_tokens, **summary}


def _quality(model, reference, precision: str, source, options: VerifyOptions) -> dict:
    description = source.description
    beside = Path(description["path"]) if description.get("kind") == "local" else None
    eval_source, eval_ids = verify.eval_tokens(model.tokenizer, text_file=options.text, beside=beside)
    try:
        return verify.verify_quality(model.session, reference, model.tokenizer, precision=precision,
                                     eval_ids=eval_ids, eval_source=eval_source,
                                     max_perplexity_increase=options.max_ppl_increase, max_kl=options.max_kl,
                                     min_top1_agreement=options.min_top1)
    except VerificationError as error:
        return error.report


def _failures(report: dict) -> list[str]:
    """Every unexplained difference, one line each."""
    failures = []
    if "logits" in report:
        logits = report["logits"]
        for name in logits["failed_outputs"]:
            failures.append(f"{name}: max |Δ| {logits['max_abs_diff'][name]:.3g} > atol {logits['atol']:g}")
        divergence = logits["greedy"].get("divergence")
        if not logits["greedy"]["equal"] and not (divergence and divergence["explained"]):
            failures.append("greedy " + (divergence["text"] if divergence else
                                         f"continuation differs from step {logits['greedy']['first_mismatch']}"))
    if "sampling" in report:
        for d in report["sampling"]["divergences"]:
            if not d["explained"]:
                failures.append(f"{d['case']}: {d['text']}")
    if "quality" in report:
        failures += report["quality"]["failures"]
    return failures


def format_report(report: dict) -> str:
    """The report as text: one section per comparison, then the verdict."""
    ref = report["reference"]
    optimum = report.get("layout") == "optimum"
    lines = [f"gpt2onnx verify {report['model']} ({report['precision']}"
             + (", an Optimum export: no manifest, so no file hashes were checked" if optimum else "") + ")",
             f"reference: {ref['spec']}" + (f" (seed {ref['seed']})" if "seed" in ref else "")
             + f", transformers {ref['transformers']} GPT2LMHeadModel, {ref['attention']} attention", ""]
    if "logits" in report:
        logits = report["logits"]
        lines += [f"logits and cache vs PyTorch (max |Δ|, atol {logits['atol']:g})",
                  f"  {'check':<20} {'logits':>10} {'cache':>10}"]
        lines += [f"  {name:<20} {d['logits']:>10.2e} {d['cache']:>10.2e}" for name, d in logits["by_check"].items()]
        greedy = logits["greedy"]
        if greedy["equal"]:
            lines.append(f"greedy, {greedy['tokens']} tokens: identical to transformers' generate")
        else:
            lines.append(f"greedy, {greedy['tokens']} tokens: " + (greedy.get("divergence") or {}).get(
                "text", f"differs from step {greedy['first_mismatch']}"))
        lines.append("")
    if "sampling" in report:
        s = report["sampling"]
        lines += [f"generate vs transformers' generate (seeded: after set_seed(s)): {s['cases']} cases — "
                  f"{s['greedy_cases']} greedy, {s['seeds']} seeds x {len(s['settings'])} sampling settings, "
                  f"{s.get('beam_cases', 0)} beam search and beam sampling, batches "
                  f"{'/'.join(map(str, s['batch_sizes']))}, {s['max_new_tokens']} new tokens — {s['rows']} rows",
                  f"  identical rows: {s['equal_rows']} / {s['rows']}",
                  f"  explained near-ties: {s['explained']}" + (
                      f" (largest margin {s['largest_explained_margin']:.2g})"
                      if s["largest_explained_margin"] is not None else ""),
                  f"  unexplained: {s['unexplained']}"]
        lines += [f"    {d['case']}: {d['text']}" for d in s["divergences"] if d["explained"]]
        lines.append("")
    if "quality" in report:
        q = report["quality"]
        limits, ppl, kl = q["thresholds"], q["perplexity"], q["kl_divergence"]
        top1 = "n/a" if q["top1_agreement"] is None else f"{100 * q['top1_agreement']:.2f}%"
        lines += [f"quality vs PyTorch fp32 on {q['eval_text']} ({q['eval_tokens']} tokens)",
                  f"  KL divergence    {kl['mean']:.3g} nats/token, largest {kl['max']:.3g}"
                  f"   (at most {limits['max_kl_divergence']:g})",
                  f"  perplexity       {ppl['export']:.3f} vs {ppl['reference']:.3f} ({100 * ppl['increase']:+.2f}%)"
                  f"   (at most {100 * limits['max_perplexity_increase']:+g}%)",
                  f"  top-1 agreement  {top1} at the {q['top1_positions']} positions where PyTorch is decisive "
                  f"(top-1 probability >= {q['decisive_margin']:g} above the second)"
                  f"   (at least {100 * limits['min_top1_agreement']:g}%)",
                  f"  greedy, {q['greedy']['tokens']} tokens: " + (
                      "identical" if q["greedy"]["equal"] else f"differs from step {q['greedy']['first_mismatch']}")
                  + " (informational)", ""]
    if report["passed"]:
        lines.append("PASSED: no unexplained difference")
    else:
        lines.append(f"FAILED: {len(report['failures'])} unexplained differences")
        lines += [f"  - {failure}" for failure in report["failures"][:_SHOWN]]
        if len(report["failures"]) > _SHOWN:
            lines.append(f"  ... and {len(report['failures']) - _SHOWN} more (--json prints them all)")
    return "\n".join(lines)
