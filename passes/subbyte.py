"""Sub-byte weights: 4-bit values two to a byte, 2-bit values four to a byte.

The weight tensor is flattened in C order and value i goes to byte i // n, bits
[b*(i % n), b*(i % n) + b) with n = 8 / b, in two's complement.  Kernels read the
packed bytes and unpack in registers (no int8 copy of the weights exists anywhere):

    v = (byte >> b*(i % n)) & (2^b - 1)            the field
    w = (v ^ 2^(b-1)) - 2^(b-1)                    sign-extended: 0..2^(b-1)-1 stay, the rest go negative

Symmetric 4-bit weights are in [-7, 7] and 2-bit in [-1, 1] (``calibration.weight_params``),
so a layer packs at the narrowest width its values fit, losslessly.
"""

from __future__ import annotations

import numpy as np

WIDTHS = (2, 4)
BLOCK = "unpack_weights"        # the unpacking stage's name: schedules inline it into the multiply-add


def width(q: np.ndarray) -> int | None:
    """The narrowest sub-byte width that holds every value of ``q``, or None (8 bits)."""
    lo, hi = int(q.min(initial=0)), int(q.max(initial=0))
    return next((b for b in WIDTHS if -(1 << (b - 1)) <= lo and hi < 1 << (b - 1)), None)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Packed uint8 bytes of the integer tensor ``q`` at ``bits`` (2 or 4) per value."""
    per = 8 // bits
    flat = (q.reshape(-1).astype(np.int64) & ((1 << bits) - 1)).astype(np.uint8)
    flat = np.concatenate([flat, np.zeros(-len(flat) % per, np.uint8)]).reshape(-1, per)
    return np.bitwise_or.reduce(flat << (bits * np.arange(per, dtype=np.uint8)), axis=1).astype(np.uint8)


def unpacked(packed, shape, bits: int, name: str = BLOCK):
    """A TE tensor of ``shape`` (int8) whose elements are read out of the packed bytes: inside a
    kernel, the unpacking is part of the expression that consumes the weight."""
    from tvm import te

    per, mask, half = 8 // bits, (1 << bits) - 1, 1 << (bits - 1)
    strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]

    def value(*idx):
        flat = sum(i * s for i, s in zip(idx, strides, strict=True))
        field = (packed[flat // per].astype("int32") >> ((flat % per) * bits).astype("int32")) & mask
        return ((field ^ half) - half).astype("int8")

    return te.compute(shape, value, name=name)


def matmul(x, packed, packing, out_dtype: str):
    """TE: x[..., K] @ w[K, N] with w read out of its packed bytes (``packing``: ((K, N), bits)),
    summed in ``out_dtype``: the integer lowering's generic kernel for a sub-byte matmul."""
    from tvm import te

    (k_dim, n_dim), bits = packing
    w = unpacked(packed, (k_dim, n_dim), bits)
    k = te.reduce_axis((0, k_dim), name="k")
    return te.compute((*x.shape[:-1], n_dim), lambda *i: te.sum(
        x[(*i[:-1], k)].astype(out_dtype) * w[k, i[-1]].astype(out_dtype), axis=k), name="matmul")
