"""The weight layout of ONNX Runtime's MatMulNBits (com.microsoft), written once: the export's quantizer packs
into it, `gpt2onnx inspect` and `plot` unpack from it.

A weight W [N, K] (N outputs, K inputs; Y = A @ W^T) is cut into blocks of `block_size` consecutive inputs
per output. Each block stores `bits`-bit codes and one float scale and means (code - zero_point) * scale
(onnxruntime docs/ContribOperators.md):

  codes        uint8 [N, k_blocks, block_size * bits / 8], packed along K, low bits first (for 4 bits,
               element 2j of a block is the low nibble of byte j and 2j+1 the high one)
  scales       float32 [N, k_blocks] (older exports: flat)
  zero points  uint8 packed like the codes [N, ceil(k_blocks * bits / 8)], or unpacked in the scales'
               dtype [N, k_blocks]; absent means 2^(bits-1) (a symmetric scheme)

The padding past K in the last block is not part of the weight.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError

BITS = (2, 4, 8)


def check_block_size(block_size) -> None:
    """A block holds a power of two >= 16 inputs (what MatMulNBits accepts)."""
    if (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16
            or block_size & (block_size - 1)):
        raise InvalidArgumentError(f"block size must be a power of two >= 16, got {block_size!r}",
                                   hint="16, 32, 64, 128, ...: smaller blocks are more accurate, larger ones faster")


def check_layout(bits, block_size) -> None:
    if bits not in BITS:
        raise InvalidArgumentError(f"MatMulNBits bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    check_block_size(block_size)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, m] (each < 2^bits) -> packed bytes [rows, ceil(m * bits / 8)], low bits first."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(codes)
    per_byte = 8 // bits
    rows, m = codes.shape
    if m % per_byte:
        codes = np.pad(codes, ((0, 0), (0, per_byte - m % per_byte)))
    grouped = codes.reshape(rows, -1, per_byte)
    packed = np.zeros(grouped.shape[:2], np.uint8)
    for j in range(per_byte):
        packed |= grouped[:, :, j] << np.uint8(bits * j)
    return packed


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Packed bytes [rows, n] -> uint8 codes [rows, n * 8 / bits], low bits first."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed
    shifts = np.arange(8 // bits, dtype=np.uint8) * bits
    return ((packed[:, :, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(packed.shape[0], -1)


def dequantize(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *, k: int, n: int, bits: int,
               block_size: int) -> np.ndarray:
    """The float32 [N, K] matrix that MatMulNBits multiplies by (Y = A @ W^T)."""
    check_layout(bits, block_size)
    k_blocks = -(-k // block_size)
    q = unpack(np.asarray(codes).reshape(n, -1), bits)[:, :k_blocks * block_size]
    q = q.reshape(n, k_blocks, block_size).astype(np.float32)
    scales = np.asarray(scales, dtype=np.float32).reshape(n, k_blocks)
    if zero_points is None:
        zeros = np.full((n, k_blocks), 2 ** (bits - 1), dtype=np.float32)
    elif zero_points.dtype == np.uint8:
        zeros = unpack(zero_points.reshape(n, -1), bits)[:, :k_blocks].astype(np.float32)
    else:
        zeros = np.asarray(zero_points, dtype=np.float32).reshape(n, k_blocks)
    return ((q - zeros[:, :, None]) * scales[:, :, None]).reshape(n, k_blocks * block_size)[:, :k]
