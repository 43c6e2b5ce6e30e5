"""Integer-only softmax, GELU and LayerNorm (I-ViT, I-BERT): the Relax builders.

Every function takes an integer tensor ``x`` (int32, zero point already
removed, 8-bit range) with real value ``s * x`` and returns ``(y, scale, bound)``:
an int64 tensor whose real value is ``scale * y`` (``scale`` may be per
channel), and a proven bound on ``|y|`` for the requantize's overflow check.  The caller
requantizes ``y`` to the output's 8-bit grid with the dyadic multiplier.
Offline constants are computed here from ``s`` in float64; everything that
runs is integer add, multiply, shift, compare, min/max and integer division.
``runtime/golden.py`` implements the same definitions in numpy, separately.

Two families of exp (used by softmax and GELU), selected per op:

* ``shift`` (I-ViT Shiftmax/ShiftGELU): exp(x) = 2^(x log2 e) with
  ``log2 e ~ 1 + 1/2 - 1/16`` as shifts; 2^r on (-1, 0] as the line 1 + r/2.
* ``poly`` (I-BERT i-exp): x = r - q ln 2, exp(r) ~ 0.35815147 (r + 1.353)^2 + 0.344.

Fixes over the reference code (``../shared/notes/integer-only-algorithms.md``):

* reciprocals are 64-bit, ``floor(2^62 / S)``, not ``floor((2^31-1) / S)``:
  Shiftmax keeps ~20 bits of 1/S instead of ~5 on a 197-token row, and so does
  the sigmoid of ShiftGELU;
* softmax's output is rounded and kept at ``2^(bits-1)`` in int64, so p = 1
  never wraps (the reference cast 128 into int8);
* ShiftGELU needs no row maximum: sigma(z) is computed from exp(-|z|) <= 1, so
  it is elementwise and fuses into the preceding GEMM's epilogue;
* I-LayerNorm's square root starts at 2^ceil(bitlen(V)/2) and is exact
  (floor sqrt) for every V < 2^62: the reference's fixed start 2^16 with ten
  Newton steps returns 64 for V = 1;
* the LayerNorm epsilon enters as V + round(eps * C / s^2), so a constant row
  (V = 0) gives beta, not a division by zero.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from tvm import relax

op = relax.op
EXP_SHIFT = 15                  # exp values carry 2^15 (the shift budget n)
RECIP_BITS = 62                 # floor(2^62 / S)
GELU_SIG_BITS = 16              # sigmoid at scale 2^-16: x * sigmoid stays below 2^25
LN_FRACTION = 23                # normalized LayerNorm values at scale 2^-23 (before gamma)
POLY_A, POLY_B, POLY_C = 0.35815147, 1.353, 0.344          # I-BERT exp(r) on (-ln 2, 0]
ERF_A, ERF_B = -0.2888, -1.769                             # I-BERT erf
FAMILIES = ("shift", "poly")        # --nonlinear also takes "auto": per layer, the lower measured error


def _c(v, dtype="int64") -> relax.Expr:
    return relax.const(np.asarray(v).astype(dtype), dtype)


def _i64(x):
    return op.astype(x, "int64")


def shift_exp(x, s: float):
    """exp(s*x) for x <= 0 (int64), at scale (-x0*s) / 2^n with x0 = floor(-1/s).  Returns (E, x0)."""
    x0 = int(np.floor(-1.0 / s))
    n = EXP_SHIFT
    p = op.subtract(op.add(x, op.right_shift(x, _c(1))), op.right_shift(x, _c(4)))   # x * log2(e)
    p = op.maximum(p, _c(n * x0))
    q = op.floor_divide(p, _c(x0))
    r = op.subtract(p, op.multiply(q, _c(x0)))
    e = op.left_shift(op.subtract(op.right_shift(r, _c(1)), _c(x0)), op.subtract(_c(n), q))
    return op.maximum(e, _c(0)), x0


def poly_exp(x, s: float):
    """exp(s*x) for x <= 0 (int64) by I-BERT's i-exp, at scale a*s^2 / 2^n.  Terms below
    2^-n of the maximum are 0."""
    n = EXP_SHIFT
    x0 = int(np.floor(-np.log(2.0) / s))
    b = int(np.floor(POLY_B / s))
    c = int(np.floor(POLY_C / (POLY_A * s * s)))
    q = op.floor_divide(x, _c(x0))
    r = op.subtract(x, op.multiply(q, _c(x0)))
    poly = op.add(op.multiply(op.add(r, _c(b)), op.add(r, _c(b))), _c(c))
    shifted = op.left_shift(poly, op.maximum(op.subtract(_c(n), q), _c(0)))
    return op.where(op.greater(q, _c(n)), _c(0), shifted)


def _exp(kind: str, x, s: float):
    return shift_exp(x, s)[0] if kind == "shift" else poly_exp(x, s)


def softmax(kind: str, x, s: float, axis: int = -1, bits: int = 16, span: int | None = None):
    """Row softmax.  E = exp(x - max); Y = round(E * floor(2^62 / sum E) / 2^(62 - bits + 1)),
    i.e. p * 2^(bits-1) in [0, 2^(bits-1)].  ``span``: x is 8-bit, max - x <= span, and E comes
    from ``exp_table``."""
    xi = _i64(x)
    if span is None:
        e = _exp(kind, op.subtract(xi, op.max(xi, axis=axis, keepdims=True)), s)
    else:
        x32 = op.astype(x, "int32")
        d = op.subtract(op.max(x32, axis=axis, keepdims=True), x32)
        e = op.take(relax.const(exp_table(kind, s, span), "int64"), d, axis=0)
    total = op.sum(e, axis=axis, keepdims=True)
    f = op.floor_divide(_c(1 << RECIP_BITS), total)
    k = RECIP_BITS - (bits - 1)
    y = op.right_shift(op.add(op.multiply(e, f), _c(1 << (k - 1))), _c(k))
    return y, 2.0 ** -(bits - 1), 1 << (bits - 1)


def gelu(kind: str, x, s: float):
    """GELU(s*x).  shift: x * sigmoid(1.702 x), sigmoid from exp(-|1.702 x|) by shift-exp and one
    64-bit division per element.  poly: I-BERT, x * (1 + erf(x / sqrt 2)) / 2 with a quadratic erf."""
    xi = _i64(x)
    if kind == "shift":
        sz = 1.702 * s
        e, x0 = shift_exp(op.negative(op.abs(xi)), sz)
        one = _c(-x0 << EXP_SHIFT)          # exp(0) on the same grid
        num = op.where(op.greater_equal(xi, _c(0)), one, e)
        sig = op.floor_divide(op.left_shift(num, _c(GELU_SIG_BITS)), op.add(one, e))
        return op.multiply(xi, sig), s * 2.0 ** -GELU_SIG_BITS, 256 << GELU_SIG_BITS
    se = s / np.sqrt(2.0)
    b = int(np.floor(ERF_B / se))
    c = int(np.floor(1.0 / (ERF_A * se * se)))
    m = op.add(op.minimum(op.abs(xi), _c(-b)), _c(b))
    erf = op.multiply(op.sign(xi), op.add(op.multiply(m, m), _c(c)))   # erf at scale a*se^2 (< 0)
    # (1 + erf) at scale a*se^2 is (c + erf); the scale is negative, so negate once
    return op.multiply(xi, op.subtract(_c(-c), erf)), -ERF_A * se * se * s / 2.0, 256 * (2 * abs(c) + b * b)


def tabulate(build, values: np.ndarray) -> np.ndarray:
    """``build`` (a builder of this module, as a function of one tensor) compiled and run on ``values``:
    how the tables below take the builders' exact results instead of a second implementation."""
    import tvm

    bb = relax.BlockBuilder()
    v = relax.Var("v", relax.TensorType(values.shape, str(values.dtype)))
    with bb.function("main", [v]):
        with bb.dataflow():
            out = bb.emit_output(build(v))
        bb.emit_func_output(out)
    # 256 values: what costs is compiling (a DeiT has 24 tables), not running, so no LLVM optimization
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target({"kind": "llvm", "opt-level": 0})),
                              tvm.cpu())
    return vm["main"](tvm.runtime.tensor(values)).numpy().astype(np.int64)


# Elementwise functions of an 8-bit value have 256 results: tables of them replace the shift
# arithmetic and 64-bit divisions (which no x86 vector unit has) by one read per element.

@cache
def gelu_table(kind: str, s: float, zero: int, dtype: str) -> tuple[np.ndarray, float, int]:
    """``gelu`` of every 8-bit input q (real s * (q - zero)), as int64[256] indexed by q - min(dtype),
    with gelu's scale and bound."""
    built = {}

    def build(q):
        y, built["scale"], built["bound"] = gelu(kind, op.subtract(op.astype(q, "int32"), _c(zero, "int32")), s)
        return y

    info = np.iinfo(dtype)
    table = tabulate(build, np.arange(int(info.min), int(info.max) + 1).astype(dtype))
    return table, built["scale"], built["bound"]


@cache
def exp_table(kind: str, s: float, span: int) -> np.ndarray:
    """exp(-s * d) as softmax computes it, for d = 0 .. span (a row's max minus an 8-bit value)."""
    return tabulate(lambda d: _exp(kind, op.negative(_i64(d)), s), np.arange(span + 1, dtype=np.int32))


def isqrt(v):
    """floor(sqrt(v)) for int64 0 <= v < 2^62.  Newton from x0 = 2^ceil(bitlen(v)/2), which lies
    in [sqrt v, 2 sqrt v].  From above, integer Newton never goes below floor(sqrt v) and stays
    under the real Newton iterate, whose relative error falls 1 -> 0.25 -> 2.5e-2 -> 3e-4 ->
    5e-8 -> 1e-15: after five steps it is below 2^-31, so x is floor(sqrt v) or floor + 1, and
    one fix-up step removes the +1.  (Each step reads the previous x twice: the CPU schedule
    leaves such chains as separate loops rather than inlining them 2^5 times.)"""
    powers = _c(2 ** np.arange(63, dtype=np.float64).astype(np.int64))
    bitlen = op.sum(op.astype(op.greater_equal(op.expand_dims(v, -1), powers), "int64"), axis=-1)
    x = op.left_shift(_c(1), op.floor_divide(op.add(bitlen, _c(1)), _c(2)))
    w = op.maximum(v, _c(1))                # v = 0 would reach x = 0 and divide by it; fixed below
    for _ in range(5):
        x = op.right_shift(op.add(x, op.floor_divide(w, x)), _c(1))
    x = op.subtract(x, op.astype(op.greater(op.multiply(x, x), w), "int64"))
    return op.where(op.equal(v, _c(0)), _c(0), x)


def layer_norm(x, s: float, gamma: np.ndarray, beta: np.ndarray, eps: float, axis: int = -1):
    """I-LayerNorm over the last axis of C channels, with the mean removed exactly: y = C*x - sum(x)
    (I-ViT rounds the mean to an integer, an error of up to 0.5/sigma), V = sum y^2 (+ eps on the
    same grid), std = isqrt(V), Y = y * floor(2^39 / std) >> 16 ~ y/std * 2^23.  The real output
    is sqrt(C)/2^23 * gamma * (Y + B), B = round(beta / (gamma sqrt(C)/2^23)): returned as
    sign(gamma) * (Y + B) with per-channel scale |gamma| sqrt(C) / 2^23.  For 8-bit x and
    C <= 4096, |y| < 2^21 and V < 2^54; for a 16-bit residual stream, V < 2^62 up to C = 1024
    (the lowering checks the bound)."""
    channels = gamma.size
    xi = _i64(x)
    total = op.sum(xi, axis=axis, keepdims=True)
    y = op.subtract(op.multiply(xi, _c(channels)), total)
    eps_int = int(np.round(eps * channels ** 3 / (s * s)))
    v = op.add(op.sum(op.multiply(y, y), axis=axis, keepdims=True), _c(eps_int))
    std = op.maximum(isqrt(v), _c(1))
    f = op.floor_divide(_c(1 << (31 + 8)), std)
    norm = op.right_shift(op.multiply(y, f), _c(16))
    unit = np.sqrt(channels) * 2.0 ** -LN_FRACTION
    bias = np.round(beta / (gamma * unit))
    out = op.add(norm, _c(bias))
    if np.any(gamma < 0):
        out = op.multiply(out, _c(np.sign(gamma)))
    return out, np.abs(gamma) * unit, (1 << LN_FRACTION) + int(np.abs(bias).max())
