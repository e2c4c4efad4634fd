"""Block-wise weight quantization in the layouts of ONNX Runtime's MatMulNBits and GatherBlockQuantized.

A weight W [N, K] (N outputs, K inputs) is cut into blocks of `block_size` consecutive inputs per output;
each block stores `bits`-bit codes q and one float scale, and means `(q - zero_point) * scale`. Codes are
packed little end first: for 4 bits, element 2j of a block is the low nibble of byte j and 2j+1 the high.

  symmetric   zero point 2^(bits-1) for every block (not stored); the block's largest |w| maps to -2^(bits-1)
  asymmetric  a zero point per block (stored, packed like the codes), the block's [min, max] mapped onto
              [0, 2^bits - 1] with 0.0 exactly representable
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
        n, k_blocks, _ = self.codes.shape
        q = _unpack(self.codes.reshape(n, -1), self.bits).reshape(n, k_blocks, self.block_size).astype(np.float32)
        if self.zero_points is None:
            zp = np.float32(2 ** (self.bits - 1))
        else:
            zp = _unpack(self.zero_points, self.bits)[:, :k_blocks, None].astype(np.float32)
        return ((q - zp) * self.scales[:, :, None]).reshape(n, -1)[:, :self.k]


def quantize(weight: np.ndarray, *, bits: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """Quantize W [N, K] block-wise along K."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
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
        zero_points = _pack(zp.astype(np.uint8), bits)
    codes = _pack(q.astype(np.uint8).reshape(n, -1), bits).reshape(n, k_blocks, block_size * bits // 8)
    return QuantizedWeight(codes, scales.astype(np.float32), zero_points, bits, block_size, k)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, m] -> packed bytes [rows, ceil(m * bits / 8)], low bits first."""
    if bits == 8:
        return np.ascontiguousarray(values)
    if values.shape[1] % 2:
        values = np.pad(values, ((0, 0), (0, 1)))
    return np.ascontiguousarray(values[:, 0::2] | (values[:, 1::2] << 4))


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = packed & 0x0F, packed >> 4
    return out


KV_SCALE_MARGIN = 1.25  # headroom over the largest magnitude seen in calibration (larger values saturate)


def kv_cache_scales(reference, config, token_windows: list[list[int]], *, margin: float = KV_SCALE_MARGIN) -> dict:
    """Per-channel int8 scales of every layer's keys and values, calibrated on the torch `reference`:
    scale = margin * max |value| over the calibration tokens / 127, per head and channel (a channel that
    never moved keeps a tiny scale). Returns {kv_scale_names(layer)...: float32 [1, n_head, 1, head_dim]}."""
    import torch

    from gpt2onnx import contract as c

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
