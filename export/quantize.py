"""Weight quantization: per output column into the layout of ONNX Runtime's DynamicQuantizeMatMul
(gpt2onnx/format/per_column.py; int8), or block-wise into the layout of MatMulNBits
(gpt2onnx/format/matmulnbits.py; int4).

Per column: a weight W [K, N] (Conv1D's [in, out]) gets one scale per output column, max |W[:, j]| / MAX_CODE,
and symmetric int8 codes round(W / scale); each dequantized value is within half a step (scale / 2) of W.

Block-wise:

A weight W [N, K] (N outputs, K inputs) is cut into blocks of `block_size` consecutive inputs per output;
each block stores `bits`-bit codes q and one float scale, and means `(q - zero_point) * scale`.

  symmetric   zero point 2^(bits-1) for every block (not stored); the block's largest |w| maps to -2^(bits-1)
  asymmetric  a zero point per block (stored, packed like the codes), the block's [min, max] mapped onto
              [0, 2^bits - 1] with 0.0 exactly representable
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpt2onnx.format import matmulnbits, per_column


@dataclass
class QuantizedWeight:
    """What MatMulNBits reads: packed codes [N, k_blocks, blob], scales [N, k_blocks], zero points or None."""

    codes: np.ndarray  # uint8 [N, k_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)] (asymmetric only)
    bits: int
    block_size: int
    k: int  # logical input size (before padding K up to whole blocks)

    def dequantize(self) -> np.ndarray:
        """Back to float32 [N, K]: what the quantized graph multiplies by."""
        return matmulnbits.dequantize(self.codes, self.scales, self.zero_points, k=self.k, n=self.codes.shape[0],
                                      bits=self.bits, block_size=self.block_size)


def quantize(weight: np.ndarray, *, bits: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """Quantize W [N, K] block-wise along K."""
    matmulnbits.check_layout(bits, block_size)
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    k_blocks = -(-k // block_size)
    if k_blocks * block_size != k:
        w = np.pad(w, ((0, 0), (0, k_blocks * block_size - k)))
    blocks = w.reshape(n, k_blocks, block_size)
    levels = 2 ** bits
    if symmetric:
        # the value of largest magnitude, with its sign, becomes code 0 (= -2^(bits-1) after the zero point)
        idx = np.abs(blocks).argmax(axis=2)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=2)[..., 0]
        scales = extreme / -(levels // 2)
        inv = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
        q = np.clip(np.rint(blocks * inv[..., None]) + levels // 2, 0, levels - 1)
        zero_points = None
    else:
        low = np.minimum(blocks.min(axis=2), 0.0)
        high = np.maximum(blocks.max(axis=2), 0.0)
        scales = (high - low) / (levels - 1)
        inv = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
        zp = np.clip(np.rint(-low * inv), 0, levels - 1)
        q = np.clip(np.rint(blocks * inv[..., None]) + zp[..., None], 0, levels - 1)
        zero_points = matmulnbits.pack(zp.astype(np.uint8), bits)
    codes = matmulnbits.pack(q.astype(np.uint8).reshape(n, -1), bits).reshape(n, k_blocks, block_size * bits // 8)
    return QuantizedWeight(codes, scales.astype(np.float32), zero_points, bits, block_size, k)


@dataclass
class PerColumnWeight:
    """What DynamicQuantizeMatMul reads: int8 codes [K, N] and float32 scales [N]; no zero points (symmetric)."""

    codes: np.ndarray  # int8 [K, N], |code| <= max_code
    scales: np.ndarray  # float32 [N]
    zero_points: None = None  # the stored parts are QuantizedWeight's: codes, scales, zero points (none here)

    def dequantize(self) -> np.ndarray:
        """Back to float32 [K, N]: what the quantized graph multiplies by."""
        return per_column.dequantize(self.codes, self.scales)


def quantize_per_column(weight: np.ndarray) -> PerColumnWeight:
    """Quantize W [K, N] symmetrically with one scale per output column, codes within per_column.MAX_CODE (a
    column of zeros keeps scale 1)."""
    w, top = np.asarray(weight, dtype=np.float32), per_column.MAX_CODE
    scales = np.abs(w).max(axis=0) / top
    scales[scales == 0] = 1.0
    codes = np.ascontiguousarray(np.clip(np.rint(w / scales), -top, top).astype(np.int8))
    return PerColumnWeight(codes, scales.astype(np.float32))


KV_SCALE_MARGIN = 1.25  # headroom over the largest magnitude seen in calibration (larger values saturate)


def kv_cache_scales(reference, config, token_windows: list[list[int]], *, margin: float = KV_SCALE_MARGIN) -> dict:
    """Per-channel int8 scales of every layer's keys and values, calibrated on the torch `reference`:
    scale = margin * max |value| over the calibration tokens / 127, per head and channel (a channel that
    never moved keeps a tiny scale). Returns {kv_scale_names(layer)...: float32 [1, n_head, 1, head_dim]}."""
    import torch

    from gpt2onnx.format import contract as c

    from .reference import cache_layer

    peaks = np.zeros((config.n_layer, 2, config.n_head, config.head_dim), np.float32)
    for window in token_windows:
        ids = torch.tensor([window])
        with torch.inference_mode():
            cache = reference(input_ids=ids, use_cache=True).past_key_values
        for layer in range(config.n_layer):
            k, v = cache_layer(cache, layer)
            for j, t in enumerate((k, v)):  # [1, n_head, tokens, head_dim]
                peaks[layer, j] = np.maximum(peaks[layer, j], t.abs().amax(dim=(0, 2)).numpy())
    scales = np.maximum(peaks * margin / 127.0, 1e-8).astype(np.float32)
    out = {}
    for layer in range(config.n_layer):
        key_name, value_name = c.kv_scale_names(layer)
        out[key_name] = scales[layer, 0][None, :, None, :]
        out[value_name] = scales[layer, 1][None, :, None, :]
    return out
