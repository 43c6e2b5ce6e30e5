"""Integer forms for what a quantizer left in float between two quantized tensors.

NNCF quantizes a squeeze-excitation block only at its ends: the pool's input and the gate's
output.  In between, ``mean -> Conv(float W) -> ReLU | SiLU -> Conv(float W) -> Sigmoid -> Q``
has float weights and no activation grid.  Each piece gets one here, chosen from constants
alone, so the lowering (passes/lower_qdq.py) and the golden interpreter (runtime/golden.py),
which both take them from this module as they take dyadic multipliers from passes/dyadic.py,
compute the same integers:

* **float weights** become int8 per output channel, symmetric (HAWQ-V3's weight quantizer, as
  lowbit's own calibration writes them): s_c = max_k |W[c, k]| / 127, q = clip(round(W / s_c)).
* **a linear result read by another linear layer or a pool** (no quantize after it) is read on
  a 16-bit grid (zero point 0) that holds every value it can take.  Its real bound is proven
  from the integers: |acc[c]| <= sum_k |q_w[c, k]| * max|q_x - z_x| (passes/accumulators.py's
  span), so |y| <= R = max_c (sum_k |q_w[c, k]| span_x) * s_x s_w[c], plus max |bias| once a
  bias joins it; the grid's step is R / 32767.
* **a residual sum** (NNCF leaves a transformer's residual stream float): the terms of both
  operands, bounds added; an operand that is itself such a sum is first kept as int32 on the grid
  R / 2^29 (its real value to 2^-29 of its bound), so the stream is one tensor plus the new term.
* **a float function f of such a result** (SiLU between the two convolutions) read by a linear
  layer: f at each of the 65,536 points of that grid, quantized to a second 16-bit grid whose
  step is max |f| / 32767 over them; one table lookup per element.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from passes.fine_grid import FineGrid, grid_values, quantize64

WIDE_MAX = 32767            # the 16-bit grids' largest magnitude (int16, zero point 0)
_TINY = 1e-30               # a bound of 0 (all-zero weights) still gets a usable step


def float_weights(w: np.ndarray, out_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values as int64, one float32 scale per output channel) of float weights ``w``."""
    w = np.asarray(w, np.float32)
    red = tuple(i for i in range(w.ndim) if i != out_axis % w.ndim)
    scale = np.maximum(np.abs(w).max(axis=red) / np.float32(127), np.float32(1e-8)).astype(np.float32)
    shape = [1] * w.ndim
    shape[out_axis % w.ndim] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int64)
    return q, scale


def linear_reach(wq: np.ndarray, out_axis: int, span: int, num: np.ndarray) -> float:
    """R, the real bound of a linear result: max_c sum_k |q_w[c, k]| * span * num[c] (float64)."""
    red = tuple(i for i in range(wq.ndim) if i != out_axis % wq.ndim)
    per_channel = np.abs(wq).sum(axis=red).astype(np.float64) * np.float64(span)
    return float(np.max(per_channel * np.asarray(num, np.float64).reshape(-1)))


def product_reach(k: int, span_a: int, span_b: int, num: np.ndarray) -> float:
    """R of a product of two activations summed over k (attention's Q.K^T, P.V): k span_a span_b num."""
    return float(k) * float(span_a) * float(span_b) * float(np.max(np.asarray(num, np.float64)))


def probability_reach(k: int, total: int, span_b: int, num: np.ndarray) -> float:
    """R of P.V with P a softmax's integer output whose rows sum to at most ``total`` (+ K/2 from
    rounding each of K terms), V read at ``span_b``: (total + ceil(K/2)) span_b num."""
    return float(total + (k + 1) // 2) * float(span_b) * float(np.max(np.asarray(num, np.float64)))


def bias_reach(reach: float, bias_q: np.ndarray, step: np.ndarray) -> float:
    """R once integers on the accumulator's grid join it: a bias, a position embedding (``step``
    the grid's ratio, broadcast against ``bias_q``: per channel or one)."""
    return reach + const_reach(bias_q, step)


def term_step(num: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """A term's ratio (its float32 values, in float64) broadcast against its accumulator: one value, or one
    per channel along ``axis`` (the grid a float constant joining the accumulator is put on)."""
    step = np.asarray(num).astype(np.float32).astype(np.float64)
    if step.size == 1:
        return step.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return step.reshape(shape)


def const_reach(q: np.ndarray, step: np.ndarray) -> float:
    """max |q * step|: the real bound of integers ``q`` on a grid ``step`` (broadcast against them)."""
    return float(np.max(np.abs(np.asarray(q, np.float64)) * np.asarray(step, np.float64)))


def clamped_reach(reach: float, lo: float, hi: float) -> float:
    """R of a value clamped to [lo, hi] (a bound outside R is still reached: Clip(x, 7, 9))."""
    return max([reach, *(abs(b) for b in (lo, hi) if np.isfinite(b))])


def wide_reach(step: float) -> float:
    """R of a value whose 16-bit grid is fixed by a bound (a LayerNorm's |gamma| sqrt(C) + |beta|,
    step = R / 32767): the bound, for a sum it joins."""
    return float(step) * WIDE_MAX


def norm_shift(channels: int) -> int:
    """Bits a LayerNorm drops, rounding, from a value read on its 16-bit grid so that I-LayerNorm's
    integer variance, channels * (channels * span)^2 with span = 2^16 >> k, stays below 2^62 (passes/
    integer_nonlinear.layer_norm): 0 up to 1024 channels, 1 for Swin's 1536-channel patch merging."""
    k = 0
    while k < 15 and channels * (channels * ((1 << 16) >> k)) ** 2 >= 2**62:
        k += 1
    return k


def reach_step(reach: float) -> float:
    """The 16-bit grid's step (float32) for values of magnitude at most ``reach``."""
    return float(np.float32(max(reach, _TINY) / WIDE_MAX))


STREAM_BITS = 29           # a residual sum kept as int32: |q| <= 2^29 leaves the requantize's products in int64


def stream_step(reach: float) -> float:
    """The int32 grid (zero point 0) a residual sum of several terms is kept on before the next
    term joins it: step R / 2^29, so the stream stays one tensor and two terms, whatever its depth."""
    return float(np.float32(max(reach, _TINY) / 2.0**STREAM_BITS))


def function_table(fn: Callable[[np.ndarray], np.ndarray], step: float) -> tuple[np.ndarray, float]:
    """(T, s_f): f (float64 -> float64) at each point of the grid (``step``, zero point 0), as int16
    values at s_f = max |f| / 32767 (T indexed by q16 + 2^15; NaN to the maximum, as
    QuantizeLinear sends it)."""
    with np.errstate(all="ignore"):
        y = fn(grid_values(FineGrid(step, 0)))
        finite = np.isfinite(y)
        top = float(np.max(np.abs(y[finite]))) if finite.any() else 0.0
    s_f = reach_step(top)
    return quantize64(y, s_f, 0, -WIDE_MAX - 1, WIDE_MAX), s_f
