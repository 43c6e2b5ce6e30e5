"""The golden reference for integer softmax, GELU and LayerNorm, in numpy.

Written from the definitions (I-ViT, I-BERT, with lowbit's fixes; see
``passes/integer_nonlinear.py`` for the list), independently of the Relax
builders: here every step is exact Python-int64 numpy arithmetic, and the
square root is a plain bisection, not Newton.  Each function returns
``(y, scale)`` with the real value ``scale * y``.
"""

from __future__ import annotations

import numpy as np

N = 15                  # exp values carry 2^15
RECIP = 62              # reciprocals floor(2^62 / S)


def shift_exp(x: np.ndarray, s: float) -> tuple[np.ndarray, int]:
    """I-ViT ShiftExp of x <= 0: x*log2(e) ~ x + x/2 - x/16 (floor shifts), 2^frac ~ 1 + frac/2."""
    x0 = int(np.floor(-1.0 / s))
    p = np.maximum(x + (x >> 1) - (x >> 4), N * x0)
    q = p // x0
    r = p - q * x0
    return np.maximum(((r >> 1) - x0) << (N - q), 0), x0


def poly_exp(x: np.ndarray, s: float) -> np.ndarray:
    """I-BERT i-exp of x <= 0: x = r + q*x0 (x0 = -ln 2 on the grid), exp(r) ~ a(r + b)^2 + c."""
    x0 = int(np.floor(-np.log(2.0) / s))
    b = int(np.floor(1.353 / s))
    c = int(np.floor(0.344 / (0.35815147 * s * s)))
    q = x // x0
    r = x - q * x0
    poly = (r + b) ** 2 + c
    return np.where(q > N, 0, poly << np.maximum(N - q, 0))


def softmax(kind: str, x: np.ndarray, s: float, bits: int = 16) -> tuple[np.ndarray, float]:
    x = np.asarray(x, np.int64)
    d = x - x.max(axis=-1, keepdims=True)
    e = shift_exp(d, s)[0] if kind == "shift" else poly_exp(d, s)
    f = (1 << RECIP) // e.sum(axis=-1, keepdims=True)
    k = RECIP - (bits - 1)
    return (e * f + (1 << (k - 1))) >> k, 2.0 ** -(bits - 1)


def gelu(kind: str, x: np.ndarray, s: float) -> tuple[np.ndarray, float]:
    x = np.asarray(x, np.int64)
    if kind == "shift":                     # x * sigmoid(1.702 x), sigmoid from exp(-|1.702 x|)
        e, x0 = shift_exp(-np.abs(x), 1.702 * s)
        one = (-x0) << N
        sig = (np.where(x >= 0, one, e) << 16) // (one + e)
        return x * sig, s * 2.0 ** -16
    se = s / np.sqrt(2.0)                   # erf(x / sqrt 2) ~ sign * (a (min(|x|, -b) + b)^2 + 1)
    b = int(np.floor(-1.769 / se))
    c = int(np.floor(1.0 / (-0.2888 * se * se)))
    erf = np.sign(x) * ((np.minimum(np.abs(x), -b) + b) ** 2 + c)
    return -x * (c + erf), 0.2888 * se * se * s / 2.0


def isqrt(v: np.ndarray) -> np.ndarray:
    """floor(sqrt(v)) by bisection on [0, 2^31]: the answer is the largest r with r*r <= v."""
    v = np.asarray(v, np.int64)
    lo, hi = np.zeros_like(v), np.full_like(v, 1 << 31)
    while np.any(lo < hi):
        mid = (lo + hi + 1) >> 1
        ok = mid * mid <= v
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid - 1)
    return lo


def layer_norm(x: np.ndarray, s: float, gamma: np.ndarray, beta: np.ndarray, eps: float):
    """I-LayerNorm over the last axis; see passes/integer_nonlinear.layer_norm for the definition."""
    x = np.asarray(x, np.int64)
    c = gamma.size
    y = c * x - x.sum(axis=-1, keepdims=True)                  # C * (x - mean), exact
    v = (y * y).sum(axis=-1, keepdims=True) + int(np.round(eps * c**3 / (s * s)))
    std = np.maximum(isqrt(v), 1)
    norm = (y * ((1 << 39) // std)) >> 16
    unit = np.sqrt(c) * 2.0 ** -23
    out = (norm + np.round(beta / (gamma * unit)).astype(np.int64)) * np.sign(gamma).astype(np.int64)
    return out, np.abs(gamma) * unit
