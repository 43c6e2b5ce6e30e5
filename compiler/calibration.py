"""Calibration: range observers and the quantization parameters they yield.

Observers see activations batch by batch, so the calibration set can have any
batch size, independent of the compiled input shape.  Four estimators:

* ``MinMaxObserver``: the exact range seen (ORT's and HAWQ-V3's default);
* ``MeanMinMaxObserver``: the mean over samples of each sample's min and max
  (NNCF's ``mean_min_max``): one loud sample moves it by 1/n of its excess;
* ``PercentileObserver``: clips the tails at a percentile of |x| (robust to
  rare outliers that would waste most of an 8-bit grid);
* ``MSEObserver``: the clipping range that minimizes the mean squared
  quantization error of the observed values at the target bit-width.

The percentile and MSE observers keep a fixed-size uniform reservoir of the
values (seeded), so their memory does not grow with the calibration set.

Schemes (the zero point makes real 0 exactly representable, so zero padding
and ReLU stay exact):

* activations ``u8``: asymmetric, real = s * (q - z), q in [0, 255];
* activations ``s8``: symmetric, z = 0, q in [-127, 127];
* weights: symmetric per output channel, s_c = max|W_c| / (2^(b-1) - 1).
"""

from __future__ import annotations

import numpy as np

from runtime.types import QuantParams

MIN_SCALE = 1e-8            # HAWQ-V3's floor: an all-zero channel still gets a usable scale
RESERVOIR = 1 << 18
ZERO_RANGE_FALLBACK = (-1.0, 1.0)   # an activation calibration saw only zeros (compiler/quantize.py)


class NonFinite(ValueError):
    """An observer was shown NaN or Inf: no range, so no scale."""


class MinMaxObserver:
    def __init__(self):
        self.lo, self.hi = np.inf, -np.inf

    def update(self, x: np.ndarray, samples: int = 1) -> None:
        """``x``: one batch of a tensor, ``samples`` calibration samples along its first axis (a
        tensor whose first axis is not the batch's counts as one)."""
        x = np.asarray(x)
        if x.size:
            lo, hi = float(x.min()), float(x.max())     # a NaN anywhere makes both NaN
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise NonFinite(f"values in [{lo}, {hi}]")
            self.lo = min(self.lo, lo)
            self.hi = max(self.hi, hi)

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise ValueError("observer saw no data")
        return self.lo, self.hi


class MeanMinMaxObserver(MinMaxObserver):
    """Each sample (a row of the batch axis) contributes its own min and max; the range is their
    means.  The pooled estimators let the loudest sample decide: RegNetY-400MF's last stage runs
    100x louder on one of 32 photo crops than on the others, and a grid that covers it leaves the
    rest a handful of steps."""

    def __init__(self):
        super().__init__()
        self.lo_sum = self.hi_sum = 0.0
        self.n = 0

    def update(self, x: np.ndarray, samples: int = 1) -> None:
        super().update(x)
        x = np.asarray(x, np.float32)
        if x.size:
            rows = x.reshape(samples, -1) if x.ndim and x.shape[0] == samples else x.reshape(1, -1)
            self.lo_sum += float(rows.min(axis=1).astype(np.float64).sum())
            self.hi_sum += float(rows.max(axis=1).astype(np.float64).sum())
            self.n += len(rows)

    def range(self) -> tuple[float, float]:
        super().range()
        return self.lo_sum / self.n, self.hi_sum / self.n


class _ReservoirObserver(MinMaxObserver):
    """Min/max plus a uniform sample of at most RESERVOIR values (Algorithm R, vectorized)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.rng = np.random.default_rng(seed)
        self.sample = np.empty(0, np.float32)
        self.seen = 0

    def update(self, x: np.ndarray, samples: int = 1) -> None:
        super().update(x)
        flat = np.asarray(x, np.float32).reshape(-1)
        take = min(RESERVOIR - len(self.sample), len(flat))
        if take > 0:
            self.sample = np.concatenate([self.sample, flat[:take]])
            self.seen += take
            flat = flat[take:]
        if len(flat):
            # element i of this batch replaces a random slot with probability RESERVOIR / (seen + i + 1)
            idx = self.seen + np.arange(1, len(flat) + 1)
            slots = (self.rng.random(len(flat)) * idx).astype(np.int64)
            keep = slots < RESERVOIR
            self.sample[slots[keep]] = flat[keep]
            self.seen += len(flat)


class PercentileObserver(_ReservoirObserver):
    def __init__(self, percentile: float = 99.99, seed: int = 0):
        super().__init__(seed)
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        lo, hi = super().range()
        bound = float(np.percentile(np.abs(self.sample), self.percentile))
        return max(lo, -bound), min(hi, bound)


class MSEObserver(_ReservoirObserver):
    def __init__(self, bits: int = 8, scheme: str = "u8", steps: int = 100, seed: int = 0):
        super().__init__(seed)
        self.bits, self.scheme, self.steps = bits, scheme, steps

    def range(self) -> tuple[float, float]:
        lo, hi = super().range()
        best, best_err = (lo, hi), np.inf
        for frac in np.linspace(1.0, 0.05, self.steps):
            cand = (lo * frac, hi * frac)
            p = activation_params(*cand, scheme=self.scheme, bits=self.bits)
            err = float(np.mean((fake_quantize(self.sample, p, self.bits) - self.sample) ** 2))
            if err < best_err:
                best, best_err = cand, err
        return best


def activation_params(lo: float, hi: float, scheme: str = "u8", bits: int = 8) -> QuantParams:
    """Per-tensor activation parameters for a range (widened to include 0).  ``bits`` narrows the
    8-bit schemes (the MSE observer's trial grids); u16 and s16 are 16-bit."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if scheme in ("u8", "u16"):
        bits = 16 if scheme == "u16" else bits
        qmax = (1 << bits) - 1
        scale = max((hi - lo) / qmax, MIN_SCALE)
        zero = int(np.clip(np.round(-lo / scale), 0, qmax))
        return QuantParams(float(np.float32(scale)), zero, "uint16" if bits == 16 else "uint8")
    if scheme in ("s8", "s16"):
        bits = 16 if scheme == "s16" else bits
        qmax = (1 << (bits - 1)) - 1
        scale = max(max(-lo, hi) / qmax, MIN_SCALE)
        return QuantParams(float(np.float32(scale)), 0, "int16" if scheme == "s16" else "int8")
    raise ValueError(f"unknown activation scheme {scheme!r} (u8, s8, u16 or s16)")


def _qrange(p: QuantParams, bits: int) -> tuple[int, int]:
    if p.dtype == "uint8":
        return 0, (1 << bits) - 1
    return -((1 << (bits - 1)) - 1), (1 << (bits - 1)) - 1


def fake_quantize(x: np.ndarray, p: QuantParams, bits: int = 8) -> np.ndarray:
    """x -> dequantize(quantize(x)), round half to even (as ONNX QuantizeLinear)."""
    lo, hi = _qrange(p, bits)
    q = np.clip(np.round(x / p.scale) + p.zero_point, lo, hi)
    return ((q - p.zero_point) * p.scale).astype(np.float32)


def weight_params(w: np.ndarray, axis: int | None = 0, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weights: (int8 values, float32 scales along ``axis``; one 0-d scale when ``axis``
    is None, per tensor)."""
    w = np.asarray(w, np.float32)
    qmax = (1 << (bits - 1)) - 1
    reduce = tuple(i for i in range(w.ndim) if axis is None or i != axis % w.ndim)
    scale = np.maximum(np.abs(w).max(axis=reduce) / qmax, MIN_SCALE).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale
