"""The 16-bit grid on which a float function of an accumulator is tabulated.

A quantizer may leave a linear layer's result unquantized before an elementwise function and
quantize only after it (NNCF: Conv -> HardSwish -> Q; Gemm -> GELU -> Q).  Its real value is
x = sum_i acc_i * r_i, with 32-bit accumulators, so no 8-bit table can read it.  The integer
form is two steps, both exact integer arithmetic:

    q16 = clamp(rescale(acc, r / d) + z16, -2^15, 2^15 - 1)       the usual dyadic requantize
    q_y = T[q16 + 2^15],  T[k] = clamp(round(f(d (k - 2^15 - z16)) / s_y) + z_y)   65,536 entries

f is evaluated in float64 and quantized with ties to even (as QuantizeLinear rounds), NaN to the
grid's maximum.  The grid (d, z16) must cover the inputs where the quantized output still
changes: below a and above b, Q(f(x)) is constant, so the clamp of q16 loses nothing there.
``table_grid`` finds [a, b] by scanning Q(f) on fixed points: dense (2^-10) on [-64, 64],
geometric out to 2^20 (a real value past 2^20 at an 8-bit output would need s_y > 2^12).
Inside [a, b] the step is d = (b - a) / 65535: f is read at most d / 2 from x, against an output
step s_y that is typically 200x coarser.

passes/lower_qdq.py builds the table; runtime/golden.py computes the same integers element by
element.  Both take (d, z16) from here, as both take a dyadic multiplier from passes/dyadic.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BITS = 16
LEVELS = 1 << BITS
QMIN, QMAX = -(1 << (BITS - 1)), (1 << (BITS - 1)) - 1
DENSE = 64.0
_SCAN = np.concatenate([-np.geomspace(2.0**20, DENSE, 1024)[:-1], np.arange(-DENSE, DENSE, 2.0**-10),
                        np.geomspace(DENSE, 2.0**20, 1024)])


@dataclass(frozen=True)
class FineGrid:
    scale: float        # d, a float32 value
    zero: int           # z16: real = d * (q16 - z16)


def quantize64(y: np.ndarray, s: float, z: int, qmin: int, qmax: int) -> np.ndarray:
    """float64 values -> the output grid: ties to even, saturated, NaN to the maximum."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        q = np.round(np.asarray(y, np.float64) / np.float64(np.float32(s)))
        q = np.clip(q + z, qmin, qmax)
    return np.where(np.isnan(q), qmax, q).astype(np.int64)


def _interval(fn: Callable[[np.ndarray], np.ndarray], s: float, z: int, qmin: int, qmax: int) -> tuple[float, float]:
    """[a, b]: outside it Q(fn(x)) at output (s, z, [qmin, qmax]) is constant."""
    with np.errstate(all="ignore"):
        return _interval_of(fn(_SCAN), s, z, qmin, qmax)


def _interval_of(y: np.ndarray, s: float, z: int, qmin: int, qmax: int) -> tuple[float, float]:
    """``_interval`` from f's values on the scan points."""
    with np.errstate(all="ignore"):
        q = quantize64(y, s, z, qmin, qmax)
    low, high = np.flatnonzero(q != q[0]), np.flatnonzero(q != q[-1])
    if not low.size:                      # a constant: any grid
        return -1.0, 1.0
    return _SCAN[max(low[0] - 1, 0)], _SCAN[min(high[-1] + 1, len(_SCAN) - 1)]


def _grid(a: float, b: float) -> FineGrid:
    # a narrow interval far from 0 gets a coarser step so that z16 stays well inside int32
    d = float(np.float32(max((b - a) / (LEVELS - 1), max(abs(a), abs(b)) * 2.0**-30)))
    return FineGrid(d, QMIN - int(np.round(a / d)))


def table_grid(fn: Callable[[np.ndarray], np.ndarray], s: float, z: int, qmin: int, qmax: int) -> FineGrid:
    """The grid for Q(fn(x)) at output (s, z, [qmin, qmax]); ``fn`` maps float64 to float64."""
    return _grid(*_interval(fn, s, z, qmin, qmax))


# ---- one scale per output channel (NNCF quantizes a depthwise convolution's input so) ----------------
#
# One grid covers every channel's interval, and the table holds f in fixed point at a step t finer
# than every channel's scale; each channel then requantizes the table's value by its own dyadic
# ratio t / s_c (passes/dyadic.py), clamped to the output type:
#
#     q_y[c] = clamp(rescale(F[q16], t / s_c) + z_y),   F[k] = round(f(grid value k) / t) in int32
#
# F's rounding adds at most t / 2 to f's error, with t <= min_c s_c / 2^12.

def channel_grid(fn: Callable[[np.ndarray], np.ndarray], scales: np.ndarray, z: int | np.ndarray, qmin: int,
                 qmax: int, sign: np.ndarray | None = None) -> FineGrid:
    """The grid for Q_c(sign_c fn(x)) at every channel's scale in ``scales`` and zero point in ``z``
    (one for all, or one per channel: NNCF's asymmetric depthwise inputs); the sign per channel, +1
    where ``sign`` is None."""
    signs = np.ones(np.size(scales)) if sign is None else np.asarray(sign, np.float64).reshape(-1)
    zeros = np.broadcast_to(np.asarray(z, np.int64).reshape(-1), (np.size(scales),))
    triples = sorted(set(zip(np.float32(scales).reshape(-1).tolist(), signs.tolist(), zeros.tolist(), strict=True)))
    with np.errstate(all="ignore"):
        y = fn(_SCAN)                       # once: a GELU's erf at every scan point is the cost, not the quantize
    spans = [_interval_of(g * y, s, zc, qmin, qmax) for s, g, zc in triples]
    return _grid(min(a for a, _ in spans), max(b for _, b in spans))


def fixed_table(fn: Callable[[np.ndarray], np.ndarray], grid: FineGrid, scales: np.ndarray) -> tuple[np.ndarray, float]:
    """(F, t): fn at each grid point in fixed point at step t (float32), as int32 (saturated; NaN
    to the maximum, as QuantizeLinear sends it)."""
    with np.errstate(all="ignore"):
        y = fn(grid_values(grid))
        top = float(np.nanmax(np.abs(np.where(np.isfinite(y), y, 0.0)))) if np.isfinite(y).any() else 0.0
    t = float(np.float32(max(float(np.min(np.float32(scales))) * 2.0**-12, top * 2.0**-30, 2.0**-100)))
    limit = 2**31 - 1
    with np.errstate(all="ignore"):
        f = np.clip(np.round(y / np.float64(t)), -limit, limit)
    return np.where(np.isnan(f), limit, f).astype(np.int64), t


def grid_values(grid: FineGrid) -> np.ndarray:
    """The real value of each of the 65,536 grid points, in float64, index k for q16 = k + QMIN."""
    return (np.arange(QMIN, QMAX + 1, dtype=np.int64) - grid.zero).astype(np.float64) * np.float64(grid.scale)
