"""Dyadic requantization (HAWQ-V3 §3.4 / I-ViT §3.1): the one home of the multiplier.

A real rescale ``y = x * r`` (r = s_in / s_out, one per tensor or per channel)
becomes integer-only as ``y = round(x * m / 2^e)`` with a 31-bit multiplier
``m`` and a right shift ``e``, both computed offline from the float32 scales:

    r          = double(float32(s_in)) / double(float32(s_out))
    r          = mant * 2^ex,  mant in [0.5, 1)                    (frexp)
    m          = round_half_up(mant * 2^31)   in [2^30, 2^31]
    m == 2^31  -> m = 2^30, ex += 1           (m must fit int32)
    e          = 31 - ex

Scales are cast to float32 first, as HAWQ-V3 does, so m and e are what any
backend derives from the float32 constants in the graph.

Rounding is **half up** (ties toward +inf), the same in every backend:

    y = (x * m + 2^(e-1)) >> e        (64-bit product, arithmetic shift)

|x| < 2^31 and m <= 2^31 - 1 keep |x*m| < 2^62, so the sum fits int64 for any
e <= 62.  A ratio below 2^-32 maps every int32 to 0 and is stored as m = 0;
ratios >= 2^31 are rejected: no quantized graph needs them.

``requantize`` builds the Relax expression.  ``runtime/golden.py`` re-implements
the integer formula in numpy, separately, so each checks the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax

MAX_SHIFT = 62


@dataclass(frozen=True)
class Dyadic:
    """``x * m / 2^e`` with int32-range ``m`` and a shift in [0, 62]; arrays for per-channel."""
    m: np.ndarray        # int64, values in [0, 2^31 - 1]
    e: np.ndarray        # int64, values in [0, 62]

    def value(self) -> np.ndarray:
        """The real multiplier this pair represents (for error reporting)."""
        return self.m.astype(np.float64) * np.exp2(-self.e.astype(np.float64))


def dyadic(s_in, s_out) -> Dyadic:
    """Multiplier and shift for rescaling from ``s_in`` to ``s_out`` (scalars or per-channel arrays)."""
    ratio = (np.asarray(s_in, np.float32).astype(np.float64)
             / np.asarray(s_out, np.float32).astype(np.float64))
    return dyadic_from_ratio(ratio)


def dyadic_from_ratio(ratio) -> Dyadic:
    """Multiplier and shift for a real ratio given in float64.

    Folded constants (an average pool's 1/(H*W), attention's 1/sqrt(d)) make
    ratios that are not a quotient of two float32 scales; for those the
    mantissa can round up to 2^31, which is renormalized to m = 2^30, e - 1.
    (For a quotient of two float32 values it cannot: 24-bit mantissas keep
    the ratio at least 2^-25 away from the next power of two.)
    """
    ratio = np.atleast_1d(np.asarray(ratio, np.float64))
    if not np.all(np.isfinite(ratio)) or np.any(ratio < 0):
        raise ValueError(f"requantization ratio must be finite and >= 0, got {ratio}")
    if np.any(ratio >= 2.0**31):
        raise ValueError(f"requantization ratio {ratio.max():g} >= 2^31 is not representable")
    mant, ex = np.frexp(ratio)
    m = np.floor(mant * 2.0**31 + 0.5).astype(np.int64)        # round half up
    full = m == 2**31
    m = np.where(full, 2**30, m)
    ex = np.where(full, ex + 1, ex).astype(np.int64)
    e = 31 - ex
    # below 2^-32 every int32 input rounds to 0; so does m = 0
    zero = (ratio == 0) | (e > MAX_SHIFT)
    return Dyadic(np.where(zero, 0, m).astype(np.int64), np.where(zero, 0, e).astype(np.int64))


FINE_BITS = 16


def fine_offset(offset, max_abs_x: int) -> tuple[int, np.ndarray]:
    """A real per-channel offset, in units of an integer tensor's step, added at a grid
    2^k times finer: ``x * 2^k + round(offset * 2^k)``.  k is the largest in [0, 16]
    keeping ``|x| * 2^k + |offset| * 2^k`` inside int32, so the offset's rounding error
    shrinks to 2^-(k+1) of a step instead of half a step."""
    offset = np.asarray(offset, np.float64)
    for k in range(FINE_BITS, -1, -1):
        if (max_abs_x + np.abs(offset).max(initial=0.0) + 1) * 2.0**k < 2.0**31:
            return k, np.round(offset * 2.0**k).astype(np.int64)
    raise ValueError("offset does not fit int32 at any grid")


def rescale(x: relax.Expr, d: Dyadic, axis: int = -1) -> relax.Expr:
    """``(x * m + 2^(e-1)) >> e`` in int64, unclamped (terms of a residual sum are added first).

    ``x`` is an int32 (or int64) tensor; per-channel ``d`` broadcasts along ``axis``.
    """
    op = relax.op
    half = np.where(d.e > 0, np.left_shift(1, np.maximum(d.e, 1) - 1), 0)
    if d.m.size == 1:
        # scalars become immediates in the kernel: LLVM sees a 31-bit multiplier (one 32 x 32 -> 64
        # vpmuldq instead of a 64-bit vpmullq, three uops) and a constant shift
        m, e, h = (relax.const(int(v.reshape(-1)[0]), "int64") for v in (d.m, d.e, half))
    else:
        shape = [1] * x.ty.ndim
        shape[axis] = d.m.size
        m, e, h = (relax.const(v.reshape(shape), "int64") for v in (d.m, d.e, half))
    return op.right_shift(op.add(op.multiply(op.astype(x, "int64"), m), h), e)


WIDE_SPLIT = 20             # rescale_wide's low part: x = a1 * 2^20 + a0


def rescale_wide(x: relax.Expr, d: Dyadic, axis: int = -1) -> relax.Expr | None:
    """``rescale`` for an int64 ``x`` whose product ``x * m`` may pass int64 (|x| >= 2^62 / m: a
    convolution over 16-bit activations), exact for |x| < 2^51 and every shift e > 20.  With
    ``x = a1 * 2^20 + a0`` (a1 = x >> 20, arithmetic; a0 = x & (2^20 - 1) in [0, 2^20)):

        x * m + 2^(e-1)  =  (a1 * m + 2^(e-21)) * 2^20 + a0 * m

    and with ``a0 * m = q * 2^20 + r`` (0 <= r < 2^20) the remainder r never carries past the floor:

        (x * m + 2^(e-1)) >> e  ==  (a1 * m + 2^(e-21) + ((a0 * m) >> 20)) >> (e - 20)

    |a1 * m| < 2^31 * 2^31 and a0 * m < 2^51 keep every term inside int64.  Returns the same int64
    value as the exact formula (runtime/golden.py computes it with unbounded integers), or None when
    a shift is 20 or less (the ratio is then >= 2^10; no requantize of a wide sum has one).
    """
    if not np.all(d.e > WIDE_SPLIT):
        return None
    op = relax.op
    if d.m.size == 1:
        m, e, h = (relax.const(int(v.reshape(-1)[0]), "int64")
                   for v in (d.m, d.e - WIDE_SPLIT, np.left_shift(1, d.e - WIDE_SPLIT - 1)))
    else:
        shape = [1] * x.ty.ndim
        shape[axis] = d.m.size
        m, e, h = (relax.const(v.reshape(shape).astype(np.int64), "int64")
                   for v in (d.m, d.e - WIDE_SPLIT, np.left_shift(1, d.e - WIDE_SPLIT - 1)))
    split = relax.const(WIDE_SPLIT, "int64")
    x = op.astype(x, "int64")
    high = op.multiply(op.right_shift(x, split), m)
    low = op.right_shift(op.multiply(op.bitwise_and(x, relax.const((1 << WIDE_SPLIT) - 1, "int64")), m), split)
    return op.right_shift(op.add(op.add(high, h), low), e)


def rescale_high(x: relax.Expr, d: Dyadic, axis: int = -1) -> relax.Expr | None:
    """``rescale`` for an int32 ``x`` on a 32-bit core, when every shift is e >= 33: with
    ``x * m = hi * 2^32 + lo`` and ``s = e - 32 >= 1``, the rounding constant 2^(e-1) only adds
    2^(s-1) to ``hi``, and ``lo / 2^32 < 1`` never carries past the floor, so

        (x * m + 2^(e-1)) >> e  ==  (hi + 2^(s-1)) >> s

    One high-word multiply (RISC-V ``mulh``) and two 32-bit operations instead of a 64-bit
    multiply, add and variable shift.  ``|x * m| < 2^62`` keeps ``hi`` within int32.  Returns the
    same int64 value as ``rescale``, or None when a shift is below 33 (the general form applies).
    """
    if not np.all(d.e >= 33):
        return None
    op = relax.op
    s = d.e - 32
    half = np.left_shift(1, s - 1)
    if d.m.size == 1:
        m = relax.const(int(d.m.reshape(-1)[0]), "int64")
        s_, h = (relax.const(int(v.reshape(-1)[0]), "int32") for v in (s, half))
    else:
        shape = [1] * x.ty.ndim
        shape[axis] = d.m.size
        m = relax.const(d.m.reshape(shape), "int64")
        s_, h = (relax.const(v.reshape(shape).astype(np.int32), "int32") for v in (s, half))
    hi = op.astype(op.right_shift(op.multiply(op.astype(x, "int64"), m), relax.const(32, "int64")), "int32")
    return op.astype(op.right_shift(op.add(hi, h), s_), "int64")


def saturate(total: relax.Expr, zero_point: int, qmin: int, qmax: int, out_dtype: str) -> relax.Expr:
    """``clip(total + zero_point, qmin, qmax)`` cast to ``out_dtype`` (``total`` is int64).

    Clamping before the final cast matters: ``astype`` wraps, it does not saturate.
    """
    if zero_point:
        total = relax.op.add(total, relax.const(zero_point, "int64"))
    return relax.op.astype(relax.op.clip(total, qmin, qmax), out_dtype)


def requantize(x: relax.Expr, d: Dyadic, qmin: int, qmax: int, out_dtype: str, axis: int = -1,
               zero_point: int = 0) -> relax.Expr:
    """One rescaled term, saturated: ``clip(((x * m + 2^(e-1)) >> e) + zero_point, qmin, qmax)``."""
    return saturate(rescale(x, d, axis), zero_point, qmin, qmax, out_dtype)
