"""The contraction units of the TOSA target (passes/contraction.py): each contraction as the plain
Relax op TOSA has a counterpart for, so that codegen/tosa/emit.py maps it one to one.

A convolution reads the raw 8-bit input padded with its zero point (``nn.pad`` with that value:
``tosa.pad``'s constant), then ``nn.conv2d`` with no padding into int32 (``tosa.conv2d`` or
``tosa.depthwise_conv2d`` with zero points 0); a matmul is ``matmul`` into int32 (``tosa.matmul``);
either into int64 where the range analysis asks for it.
Both keep the raw accumulator the lowering expects, which adds -z_x sum(w) itself.  Sub-byte weights
are stored unpacked, as int8 constants: TOSA has no 4- or 2-bit operand."""

from __future__ import annotations

import numpy as np
from tvm import relax

from passes.contraction import CONV2D, MATMUL, Accumulator, Contraction


def _int8(c: Contraction) -> bool:
    """An 8- or 16-bit input (unsigned ones as signed views, codegen/tosa/emit.py) times int8-valued
    weights: TOSA's int8 profile.  Summed within int32, or, for a 16-bit input, in int64, which
    the emitter writes as one int8 contraction per byte of the input (int16's own 48-bit
    accumulator it narrows back to int32, and has no int64 form)."""
    w = c.weights
    return (c.x.dtype in ("int8", "int16", "uint8", "uint16") and c.x.static
            and (c.acc_dtype == "int32" or c.x.dtype in ("int16", "uint16"))
            and w is not None and int(w.min()) >= -128 and int(w.max()) <= 127)


class ConvUnit:
    name = "conv2d"
    channels_last = False

    def fits(self, c: Contraction) -> bool:
        return c.kind == CONV2D and _int8(c)

    def pack(self, c: Contraction) -> np.ndarray:
        return c.weights.astype(np.int8)

    def emit(self, bb, c: Contraction, x, w) -> Accumulator:
        top, left, bottom, right = c.padding
        if any(c.padding):
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(c.x.zero or 0)))
        acc = bb.emit(relax.op.nn.conv2d(x, w, strides=c.strides, dilation=c.dilation, groups=c.groups,
                                         out_dtype=c.acc_dtype))
        return Accumulator(acc, 1)


class MatmulUnit:
    name = "matmul"
    channels_last = False

    def fits(self, c: Contraction) -> bool:
        return c.kind == MATMUL and _int8(c) and c.weights.ndim == 2

    def pack(self, c: Contraction) -> np.ndarray:
        return c.weights.astype(np.int8)

    def emit(self, bb, c: Contraction, x, w) -> Accumulator:
        return Accumulator(bb.emit(relax.op.matmul(x, w, out_dtype=c.acc_dtype)), -1)


UNITS = (ConvUnit(), MatmulUnit())
