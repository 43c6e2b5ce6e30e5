"""Integer contractions as data, and the units that may execute them.

The integer lowering (passes/lower_qdq.py) knows *what* each conv2d and matmul computes: the
raw 8-bit input times stored integer weights (the input's zero point folded into the bias), or
two runtime activations times each other (attention).  *How* a target computes it fastest (VNNI's
operand order, AMX tiles, CUDA's dp4a) is codegen's business.  This module is the boundary: the
lowering describes each contraction as a ``Contraction`` and asks an ordered tuple of
``ContractionUnit`` s, which the backend supplies (Backend.units, codegen/backend.py), for the first that fits;
with none, it emits the generic kernels that stay in passes.  So passes/ import nothing from
codegen/, and a new target adds units, not branches in the lowering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import tvm
from tvm import relax

CONV2D, MATMUL, ACTIVATION_MATMUL = "conv2d", "matmul", "activation_matmul"


@dataclass(frozen=True)
class Operand:
    """An integer tensor the contraction reads at run time."""
    dtype: str
    shape: tuple[int | None, ...]   # a conv's input NCHW whatever its storage; None: a symbolic dimension
    zero: int | None                # its zero point; None when it is per axis
    channels_last: bool = False     # an NCHW tensor stored NHWC

    @property
    def static(self) -> bool:
        return all(d is not None for d in self.shape)

    @classmethod
    def of(cls, expr: relax.Expr, dtype: str, zero: np.ndarray, channels_last: bool = False) -> Operand:
        """The integer tensor ``expr`` (NHWC with ``channels_last``), described NCHW."""
        shape = expr.ty.shape
        values = shape.values if isinstance(shape, relax.ShapeExpr) else [None] * max(expr.ty.ndim, 0)
        dims = tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in values)
        if channels_last:
            dims = (dims[0], dims[3], dims[1], dims[2])
        return cls(dtype, dims, int(zero.reshape(-1)[0]) if zero.size == 1 else None, channels_last)


@dataclass(frozen=True, eq=False)
class Contraction:
    """One integer contraction, as the lowering knows it.

    ``conv2d``: acc[n, o, y, x] = sum_{c, ky, kx} x[n, c, y s + ky d, x s + kx d] w[o, c, ky, kx], the
    input padded with its zero point; ``matmul``: acc[..., n] = sum_k x[..., k] w[k, n].  Both read
    the raw input: the lowering adds -z_x sum w per output channel to the result.
    ``activation_matmul``: acc = (x - z_x) @ (y - z_y), both operands at run time; the unit returns
    the centered product."""
    kind: str                       # CONV2D | MATMUL | ACTIVATION_MATMUL
    x: Operand                      # the input (attention: the left operand)
    acc_dtype: str                  # int32, or int64 where the range analysis could not prove int32
    weights: np.ndarray | None = None   # the integer weights (OIHW or [K, N]), narrowest dtype, zero point 0
    bits: int | None = None         # sub-byte width they are stored at (passes/subbyte.py), else None
    y: Operand | None = None        # attention's right operand
    groups: int = 1
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)     # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)

    @property
    def int8_weights(self) -> bool:
        """Weights that are whole int8 values (not packed sub-byte, not wider)."""
        return self.weights is not None and self.bits is None and self.weights.dtype == np.int8


@dataclass(frozen=True)
class Accumulator:
    """A unit's result: the int32 accumulator and its output-channel axis (-1 for a matmul, 1 for
    an NCHW convolution, 3 for an NHWC one)."""
    expr: relax.Expr
    axis: int

    @property
    def channel_shape(self) -> tuple[int, ...]:
        """The shape a per-channel constant takes to broadcast along ``axis``."""
        return (-1,) if self.axis == -1 else tuple(-1 if i == self.axis else 1 for i in range(4))


@runtime_checkable
class ContractionUnit(Protocol):
    """A way to execute a contraction on some target (codegen/vnni.py, codegen/amx.py,
    codegen/cuda/dp4a.py).

    ``name``: the block or kernel it emits.  ``channels_last``: a convolution unit that reads an
    NHWC input as it is and writes its accumulator NHWC (the epilogue, residual adds and pools after
    it stay NHWC); other units read NCHW.  ``fits``: whether it computes this contraction exactly.
    ``pack``: the stored weights in its operand layout (not called for attention).  ``emit``: the
    kernel, on the input ``x`` and the packed weights (attention: the right operand) ``w``."""
    name: str
    channels_last: bool

    def fits(self, c: Contraction) -> bool: ...

    def pack(self, c: Contraction) -> np.ndarray: ...

    def emit(self, bb: relax.BlockBuilder, c: Contraction, x: relax.Expr, w: relax.Expr) -> Accumulator: ...


def first_fit(units, c: Contraction) -> ContractionUnit | None:
    """The first unit, in the backend's order of preference, that executes ``c``."""
    return next((u for u in units if u.fits(c)), None)
