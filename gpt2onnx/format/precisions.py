"""The precisions an export can have, in one table.

The CLI's choices and help, the builder (export/builder.py `quantization_for`), the quantizer, the quality
gate of export and verify, inspect and bench all read this table. A new precision is a row here and, if its
graph differs, a case in the builder; nothing else spells a precision's numbers.

Schemes (the manifest's quantization "scheme"; contract.SCHEME_*):
  per-column  int8: ONNX Runtime's DynamicQuantizeMatMul, int8 codes with one scale per output column
              (gpt2onnx/format/per_column.py); the activations are quantized to uint8 at each call, so the matmul runs
              in integers (why not MatMulNBits 8-bit blocks: benchmarks/results/2026-12-01-quantization.md). No
              block size.
  blocks      int4 (and int8 exports made before per-column): MatMulNBits, a scale per block of inputs
              (gpt2onnx/format/matmulnbits.py).

Block sizes: inputs per quantization block (a power of two >= 16) unless chosen; larger blocks are faster
(fewer scales). int4 at 128 instead of 64: a decode step 20% faster on 2 threads for +0.2% perplexity on the
trained test model (benchmarks/quantization.py).

The quality gate of a quantized export, against PyTorch fp32 on a text (export/verify.py `verify_quality`):
  max_perplexity_increase  relative perplexity increase, 0.01 = 1%
  max_kl                   mean KL(PyTorch fp32 || export) of the next-token distributions, nats per position.
                           Measured on the trained test model's held-out text: int8 per-column 2.9e-4
                           (float32 cache) / 1.1e-3 (int8 cache; MatMulNBits int8 block 32 was 5.4e-5),
                           int4 (block 32) 4.1e-3; the limits leave room for other checkpoints and catch a
                           broken quantization.
  min_top1_agreement       share of the *decisive* positions (PyTorch's top-1 probability ahead of its
                           second by at least verify.DECISIVE_MARGIN) where the export's top-1 is PyTorch's;
                           near-ties and near-flat distributions say nothing about quality and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .contract import KV_CACHE_DTYPES, SCHEME_BLOCKS, SCHEME_PER_COLUMN

FLOAT_KV_CACHE, INT8_KV_CACHE = KV_CACHE_DTYPES


@dataclass(frozen=True)
class Precision:
    """One precision: how its weights are stored and how closely it must follow PyTorch fp32."""

    name: str
    bits: int | None  # bits per weight of the quantized matmuls; None: float32, not quantized
    scheme: str | None  # SCHEME_PER_COLUMN or SCHEME_BLOCKS (see above); None: not quantized
    default_block_size: int | None  # inputs per quantization block unless chosen (blocks only)
    kv_cache_dtype: str  # the KV cache's dtype unless chosen
    max_perplexity_increase: float | None = None  # quality gate (quantized only; fp32 is verified to atol)
    min_top1_agreement: float | None = None
    max_kl: float | None = None

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def kv_cache_dtypes(self) -> tuple[str, ...]:
        """The cache dtypes it may have: an int8 cache needs quantized weights (fp32 is verified exactly)."""
        return KV_CACHE_DTYPES if self.quantized else (FLOAT_KV_CACHE,)

    def thresholds(self) -> dict[str, float]:
        """The quality gate's limits, by the names the reports use."""
        return {"max_perplexity_increase": self.max_perplexity_increase, "min_top1_agreement": self.min_top1_agreement,
                "max_kl_divergence": self.max_kl}


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", bits=None, scheme=None, default_block_size=None, kv_cache_dtype=FLOAT_KV_CACHE),
    # int8 keeps the int8 KV cache: random:gpt2, 2 threads, three sessions of 7, 5 and 5 interleaved runs (medians)
    # on a shared machine (load 4-6, so read the ratios), int8 cache vs float32: prefill@512 200 vs 259 tok/s
    # (191 vs 261, 184 vs 239), decode@8 28.3 vs 24.0 (22.0 vs 24.9, 26.2 vs 24.5), decode@768 24.9 vs 13.8
    # (18.3 vs 15.0, 21.4 vs 13.0): prefill a quarter slower, decode at a short past about even, at a long past
    # 1.2-1.8x faster; generation is mostly decode. Quality on the trained test model's held-out text: KL 1.1e-3
    # vs 2.9e-4 nats, perplexity -0.25% vs -0.03%, decisive top-1 99.98% vs 100% (the gate allows 5e-3). Timed
    # with session.run: prefill 512 positions, then one-token steps (48 at past 8, 24 at past 768). Since then a
    # prefill attends in float32 (export/builder.py), so the int8 cache no longer slows it: prefill@512 572 -> 914
    # tok/s (int8), 440 -> 550 (int4), old and new graphs side by side on a quiet machine, 3 interleaved rounds.
    Precision("int8", bits=8, scheme=SCHEME_PER_COLUMN, default_block_size=None, kv_cache_dtype=INT8_KV_CACHE,
              max_perplexity_increase=0.01, min_top1_agreement=0.95, max_kl=0.005),
    Precision("int4", bits=4, scheme=SCHEME_BLOCKS, default_block_size=128, kv_cache_dtype=INT8_KV_CACHE,
              max_perplexity_increase=0.05, min_top1_agreement=0.85, max_kl=0.05),
)}
NAMES = tuple(PRECISIONS)
QUANTIZED = tuple(name for name, p in PRECISIONS.items() if p.quantized)
BLOCKED = tuple(name for name, p in PRECISIONS.items() if p.scheme == SCHEME_BLOCKS)  # the ones with a block size


def get(name: str) -> Precision:
    """The precision called `name`, or an InvalidArgumentError listing the known ones."""
    precision = PRECISIONS.get(name) if isinstance(name, str) else None
    if precision is None:
        raise InvalidArgumentError(f"precision must be one of {', '.join(NAMES)}, got {name!r}",
                                   hint="fp32 is exact; the quantized ones are smaller and faster, gated on quality")
    return precision


def check_kv_cache(kv_cache) -> str:
    """`kv_cache` if it is a KV-cache dtype, else an InvalidArgumentError listing them."""
    if kv_cache not in KV_CACHE_DTYPES:
        raise InvalidArgumentError(f"kv_cache must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache!r}",
                                   hint="leave it out for the precision's default (see gpt2onnx/format/precisions.py)")
    return kv_cache


def per_precision(field: str) -> str:
    """A field's value for every quantized precision that has one, for help texts: "0.01 for int8, 0.05 for
    int4"."""
    return ", ".join(f"{getattr(PRECISIONS[name], field):g} for {name}" for name in QUANTIZED
                     if getattr(PRECISIONS[name], field) is not None)
