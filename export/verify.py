"""The verification gate: the exported graph against PyTorch, output by output, before anything is published.

Checks (fp32, max |difference| <= atol):
  * logits and every present key/value for prompts of length 1, 7, 128 and n_positions - 1;
  * a cached decode step against the uncached forward of the same tokens;
  * a left-padded batch of two prompts of different lengths (logits at the real positions);
  * a greedy continuation (32 tokens, EOS ignored) that must equal transformers' generate token for token.
"""

from __future__ import annotations

import numpy as np

from gpt2onnx import contract as c
from gpt2onnx.errors import VerificationError
from gpt2onnx.generator import generate, left_pad
from gpt2onnx.session import OnnxSession
from gpt2onnx.settings import GenerationSettings

GREEDY_PROMPT = "Hello, I'm a language model,"
DEFAULT_ATOL = 1e-4


class _Report:
    """Collects every comparison and the largest difference seen per output name."""

    def __init__(self, atol: float):
        self.atol = atol
        self.checks: list[dict] = []
        self.outputs: dict[str, float] = {}

    def compare(self, check: str, name: str, ours: np.ndarray, reference: np.ndarray) -> float:
        if ours.shape != reference.shape:
            diff = float("inf")
        else:
            diff = float(np.max(np.abs(ours - reference), initial=0.0))
            if np.isnan(diff):
                diff = float("inf")
        self.outputs[name] = max(self.outputs.get(name, 0.0), diff)
        self.checks.append({"check": check, "output": name, "max_abs_diff": diff, "passed": diff <= self.atol})
        return diff

    def as_dict(self, greedy: dict) -> dict:
        failed = sorted({ch["output"] for ch in self.checks if not ch["passed"]})
        return {"reference": "transformers GPT2LMHeadModel (PyTorch, fp32)", "atol": self.atol,
                "passed": not failed and greedy["equal"], "failed_outputs": failed,
                "max_abs_diff": self.outputs, "checks": self.checks, "greedy": greedy}


def verify(session: OnnxSession, reference, tokenizer, *, atol: float = DEFAULT_ATOL, seed: int = 0,
           greedy_tokens: int = 32) -> dict:
    """Compare `session` with the torch `reference` model. Returns the report; raises VerificationError."""
    import torch

    config = session.config
    rng = np.random.default_rng(seed)
    report = _Report(atol)
    lengths = sorted({n for n in (1, 7, 128, config.n_positions - 1) if n < config.n_positions})

    def torch_forward(ids, mask, positions):
        with torch.inference_mode():
            out = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                            position_ids=torch.from_numpy(positions), use_cache=True)
        presents = [t.numpy() for layer in range(config.n_layer) for t in _cache_layer(out.past_key_values, layer)]
        return out.logits.float().numpy(), presents

    for length in lengths:
        ids = rng.integers(0, config.vocab_size, (1, length + 1), dtype=np.int64)
        prompt, mask, positions = ids[:, :length], np.ones((1, length), np.int64), np.arange(length)[None]
        logits, presents = session.run(prompt, mask, positions, session.empty_cache(1))
        ref_logits, ref_presents = torch_forward(prompt, mask, positions)
        report.compare(f"prefill[{length}]", c.LOGITS, logits, ref_logits)
        for name, ours, ref in zip(c.present_names(config.n_layer), presents.tensors, ref_presents):
            report.compare(f"prefill[{length}]", name, ours, ref)
        if length + 1 < config.n_positions and length in (7, 128):
            # one cached step must equal the uncached forward over prompt + that token
            step_logits, step_presents = session.run(ids[:, length:], np.ones((1, length + 1), np.int64),
                                                     np.array([[length]]), presents)
            full_logits, full_presents = torch_forward(ids, np.ones((1, length + 1), np.int64),
                                                       np.arange(length + 1)[None])
            report.compare(f"decode[past={length}]", c.LOGITS, step_logits, full_logits[:, -1:])
            for name, ours, ref in zip(c.present_names(config.n_layer), step_presents.tensors, full_presents):
                report.compare(f"decode[past={length}]", name, ours, ref)

    # a left-padded batch: rows of different lengths give the logits they give alone
    short, long = [int(t) for t in rng.integers(0, config.vocab_size, 3)], [int(t) for t in rng.integers(0, config.vocab_size, 9)]
    ids, mask = left_pad([short, long], pad_id=0)
    positions = np.where(mask == 1, mask.cumsum(axis=1) - 1, 1)
    logits, _ = session.run(ids, mask, positions, session.empty_cache(2))
    ref_logits, _ = torch_forward(ids, mask, positions)
    keep = mask.astype(bool)
    report.compare("padded_batch[3,9]", c.LOGITS, logits[keep], ref_logits[keep])

    greedy = _greedy_parity(session, reference, tokenizer, greedy_tokens)
    result = report.as_dict(greedy)
    if not result["passed"]:
        worst = ", ".join(f"{name} {report.outputs[name]:.3g}" for name in result["failed_outputs"][:8])
        parts = [f"outputs over atol={atol}: {worst}"] if worst else []
        if not greedy["equal"]:
            parts.append(f"greedy continuation differs from step {greedy['first_mismatch']}")
        raise VerificationError("the exported graph does not match PyTorch: " + "; ".join(parts), report=result,
                                hint="this is a bug in the export (or a damaged checkpoint); the full report is "
                                     "in the error's `report` and nothing was published")
    return result


def _greedy_parity(session: OnnxSession, reference, tokenizer, tokens: int) -> dict:
    """Our greedy loop (KV cache) against transformers' generate(do_sample=False), EOS ignored on both sides."""
    import torch
    from transformers import GenerationConfig

    prompt = tokenizer.encode(GREEDY_PROMPT)
    tokens = min(tokens, session.config.n_positions - len(prompt))
    ours = generate(session, [prompt], GenerationSettings(max_new_tokens=tokens, ignore_eos=True),
                    eos_id=tokenizer.eos_token_id)[0]
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                                  eos_token_id=None, pad_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                                 generation_config=gen_config)
    theirs = out[0, len(prompt):].tolist()
    mismatch = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if mismatch is None and len(ours) != len(theirs):
        mismatch = min(len(ours), len(theirs))
    return {"prompt": GREEDY_PROMPT, "tokens": len(theirs), "equal": mismatch is None, "first_mismatch": mismatch,
            "ours": ours, "reference": theirs}


def _cache_layer(cache, layer: int):
    """(key, value) of one layer from transformers' cache object (or a legacy tuple)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer][0], cache[layer][1]
