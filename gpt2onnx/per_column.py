"""The weight layout of ONNX Runtime's DynamicQuantizeMatMul (com.microsoft), written once: the export's
quantizer writes it, `gpt2onnx inspect` and `plot` read it back (gpt2onnx/matmulnbits.py is the block layout
of int4 and of int8 exports made before this one).

Y = A @ W with W [K, N] (K inputs, N outputs: the layout of GPT-2's Conv1D, not transposed) stored as

  codes   int8 [K, N], symmetric: |code| <= MAX_CODE, no zero point
  scales  float32 [N], one per output column: W[:, j] means codes[:, j] * scales[j]

ONNX Runtime quantizes the activations A to uint8 at each call (one scale and zero point over the whole
tensor, every row of a prefill at once) and multiplies in integers.

MAX_CODE 63 (7-bit codes, ONNX Runtime's `reduce_range`) rather than 127: without AVX-512 VNNI the u8 x s8
kernel sums pairs of products in int16 (vpmaddubsw), and 255 * 127 * 2 > 32767 saturates. Measured on this
AVX2 machine (no VNNI), ONNX Runtime against the exact integer computation of the same quantized math, one
matmul K=768 N=256: max |error| / max |result| 0.098 at 127 levels (Gaussian activations), 5e-8 at 63.
On whole models against PyTorch fp32 (mean KL nats / perplexity increase / top-1 on decisive positions):
  trained test model, held-out text:  127: KL_127_TRAINED    63: KL_63_TRAINED
  random:gpt2 (124M), sample text:    127: KL_127_GPT2       63: KL_63_GPT2
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidArgumentError

MAX_CODE = 63  # largest |code| the export writes (see above)


def check_layout(codes: np.ndarray, scales: np.ndarray) -> None:
    """codes [K, N] and scales [N] (or one scale for all columns)."""
    if np.ndim(codes) != 2 or np.size(scales) not in (1, np.shape(codes)[-1]):
        raise InvalidArgumentError(f"per-column weights need codes [K, N] and N scales, got codes "
                                   f"{list(np.shape(codes))} and {np.size(scales)} scales",
                                   hint="the model file may be damaged; export it again")


def dequantize(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None = None) -> np.ndarray:
    """The float32 [K, N] matrix that DynamicQuantizeMatMul multiplies by (Y = A @ W)."""
    check_layout(codes, scales)
    q = np.asarray(codes).astype(np.float32)
    if zero_points is not None:
        q -= np.asarray(zero_points).astype(np.float32).reshape(-1)
    return q * np.asarray(scales, dtype=np.float32).reshape(-1)
