"""The weight layout of ONNX Runtime's DynamicQuantizeMatMul (com.microsoft), written once: the export's
quantizer writes it, `gpt2onnx inspect` and `plot` read it back (gpt2onnx/format/matmulnbits.py is the block layout
of int4 and of int8 exports made before this one).

Y = A @ W with W [K, N] (K inputs, N outputs: the layout of GPT-2's Conv1D, not transposed) stored as

  codes   int8 [K, N], symmetric: |code| <= MAX_CODE, no zero point
  scales  float32 [N], one per output column: W[:, j] means codes[:, j] * scales[j]

ONNX Runtime quantizes the activations A to uint8 at each call (one scale and zero point over the whole
tensor, every row of a prefill at once) and multiplies in integers.

MAX_CODE 63 (7-bit codes, ONNX Runtime's `reduce_range`) rather than 127: without AVX-512 VNNI the u8 x s8
kernel sums pairs of products in int16 (vpmaddubsw), and 255 * 127 * 2 > 32767 saturates. Measured on this
AVX2 machine (no VNNI), ONNX Runtime against the exact integer computation of the same quantized math, one
matmul K=768 N=256: max |error| / max |result| 0.098 at 127 levels (Gaussian activations), 5e-8 at 63; layer 0's
c_attn on the real ln_1 output of a text (every row in one call, as a prefill): 0.051 (trained test model) and
0.086 (random:gpt2) at 127, 7e-8 at 63. Whole models against PyTorch fp32, KV cache float32 (mean KL nats per
position / perplexity change / top-1 agreement over all positions; the decisive-position top-1 is 100% for both
on the trained model, random:gpt2 has no decisive positions):
  trained test model, held-out text (4378 positions):  127: 7.2e-4 / -0.18% / 98.4%   63: 2.9e-4 / -0.03% / 98.7%
  random:gpt2 (124M), built-in sample text:            127: 2.2e-4 / -0.09% / 93.2%   63: 2.9e-4 / +0.25% / 91.1%
The 127-level export is not the math it claims (5-9% off where it saturates) and worse on the trained model;
7-bit codes are exact on every CPU. (Old int8, MatMulNBits block 32: KL 5.4e-5 on the trained model.)
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError

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
