"""Static range analysis of the integer accumulators (passes/lower_qdq.py).

Every integer the lowered program computes must fit the type it is computed in: a wrap-around
would be a silent wrong answer, not an error.  The bounds here are proven at compile time from
the constants (weights, biases, zero points) and the operands' integer types alone, so they hold
for every input.  A sum whose bound stays below 2^31 accumulates in int32 (what VNNI, AMX and
dp4a execute); anything larger is widened to int64, and the lowering reports it.

Notation: an 8-bit (or 16-bit) activation q with zero point z has |q| <= max|q| =
max(|min|, |max|) of its type, and |q - z| <= span(q) = max(|min - z|, |max - z|).

    linear layer    acc[c] = sum_k q_x[k] w[c, k] - z_x sum_k w[c, k]          (the raw input, z_x folded)
                    |acc[c]| <= sum_k |w[c, k]| max|q_x| + |z_x sum_k w[c, k]|
                    bound = max_c of that
    bias add        bound + max|bias|
    q_a . q_b       |sum_k (q_a - z_a)(q_b - z_b)| <= K span(a) span(b)        (attention's Q.K^T, P.V)
    q_a * q_b       |q_a - z_a| |q_b - z_b| < 2^bits_a 2^bits_b                 (an elementwise product)
    requantize      |acc| m + 2^(e-1) < 2^63 with the dyadic multiplier m (passes/dyadic.py): checked
                    as bound * max(m) < 2^62; past that (a convolution of 16-bit activations), the
                    product split at 2^20 for any bound < 2^51 (dyadic.rescale_wide)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT32_LIMIT = 2**31         # |acc| below this: int32
REQUANTIZE_LIMIT = 2**62    # bound * multiplier below this: the requantize's int64 product cannot overflow
WIDE_REQUANTIZE_LIMIT = 2**51   # bound below this: the product split at 2^20 (dyadic.rescale_wide) is exact


def accumulator_dtype(bound: int) -> str:
    """int32 when every value the sum can take fits it, else int64."""
    return "int32" if bound < INT32_LIMIT else "int64"


def magnitude(dtype: str) -> int:
    """max |q| over the integer type: the raw input a linear layer reads."""
    info = np.iinfo(dtype)
    return max(abs(int(info.min)), abs(int(info.max)))


def span(dtype: str, zero: int) -> int:
    """max |q - z| over the integer type."""
    info = np.iinfo(dtype)
    return max(abs(int(info.min) - zero), abs(int(info.max) - zero))


@dataclass(frozen=True, eq=False)
class LinearBound:
    """A linear layer's accumulator: its bound, and per output channel the zero-point
    correction -z_x * sum_k w that is added to the raw product."""
    bound: int
    correction: np.ndarray

    @property
    def dtype(self) -> str:
        return accumulator_dtype(self.bound)


def linear(wq: np.ndarray, out_axis: int, x_dtype: str, zx: int) -> LinearBound:
    """The conv / matmul bound: max_c(sum_k |w[c, k]| * max|q_x| + |z_x * sum_k w[c, k]|), the
    reduction running over every axis of the integer weights ``wq`` but ``out_axis``."""
    red = tuple(i for i in range(wq.ndim) if i != out_axis)
    w_abs, w_sum = np.abs(wq).sum(axis=red), wq.sum(axis=red)
    correction = -zx * w_sum
    return LinearBound(int((w_abs * magnitude(x_dtype) + np.abs(correction)).max()), correction)


def bias_add(bound: int, bias: np.ndarray) -> int:
    """A linear layer's bound once its int32 bias is added."""
    return bound + int(np.abs(bias).max())


def activation_matmul(k: int, a_dtype: str, za: int, b_dtype: str, zb: int) -> int:
    """sum over K of (q_a - z_a)(q_b - z_b), both operands at run time: K * span(a) * span(b)."""
    return k * span(a_dtype, za) * span(b_dtype, zb)


def probability_matmul(k: int, total: int, b_dtype: str, zb: int) -> int:
    """sum over K of P_j (q_b - z_b), P a softmax's integer output (passes/integer_nonlinear.softmax):
    each P_j >= 0 is rounded half up from a row whose exact terms sum to at most ``total``, so
    sum_j P_j <= total + K/2 and |acc| <= (total + ceil(K/2)) span(b)."""
    return (total + (k + 1) // 2) * span(b_dtype, zb)


def product(a_dtype: str, b_dtype: str) -> int:
    """An elementwise (q_a - z_a)(q_b - z_b): |q - z| < 2^bits each."""
    return (1 << np.iinfo(a_dtype).bits) * (1 << np.iinfo(b_dtype).bits)


def requantize_fits(bound: int, multiplier: int) -> bool:
    """Whether acc * m + 2^(e-1) stays inside int64 for every |acc| <= bound."""
    return bound * multiplier < REQUANTIZE_LIMIT


def wide_requantize_fits(bound: int) -> bool:
    """Whether the split requantize (passes/dyadic.rescale_wide) is exact for every |acc| <= bound."""
    return bound < WIDE_REQUANTIZE_LIMIT


def layer_norm_fits(channels: int, dtype: str) -> bool:
    """Whether I-LayerNorm's integer variance, channels * (channels * (q_max - q_min))^2 at most,
    stays below 2^62 (passes/integer_nonlinear.py computes it in int64)."""
    info = np.iinfo(dtype)
    return channels * (channels * (int(info.max) - int(info.min))) ** 2 < REQUANTIZE_LIMIT
