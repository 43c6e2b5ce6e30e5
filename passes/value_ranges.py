"""Value ranges of an integer Relax function: one closed interval [lo, hi] per bound variable.

The lowered graph computes its requantize products and I-ViT's polynomials in int64 because some
values need 64 bits.  A target without 64-bit arithmetic (TOSA: int8/int16/int32 tensors, 48-bit
accumulators) needs to know which int64 tensors hold values that fit int32.  This analysis proves
it from the constants and the inputs' types alone, so the bound holds for every input: interval
arithmetic, one transfer function per op (a table), over the bindings in order.

    x + y  in [lo_x + lo_y, hi_x + hi_y]          x * y  in [min, max] of the four corner products
    x >> e in [min, max] of the corners           floor(x / y), y not spanning 0: the corners
    clip(x, a, b) in [max(lo, a), min(hi, b)]     astype(x, t): [lo, hi] if it fits t, else t's range
    sum over n elements: n [lo, hi]               a contraction over K: K [lo_x, hi_x] [lo_w, hi_w]
    max(x, axis) - x  in [0, hi_x - lo_x]         (a row's maximum is at least each of its elements)

Every result is also within its own dtype's range: the lowering proved that no integer it computes
wraps (passes/accumulators.py), so an int32 accumulator's range is at most int32's.  An op with no
transfer function gets its dtype's range, which is sound.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod

import numpy as np
import tvm
from tvm import relax

Interval = tuple[int, int]


def dtype_range(dtype: str) -> Interval:
    if dtype == "bool":
        return 0, 1
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _corners(f, a: Interval, b: Interval) -> Interval:
    v = [f(x, y) for x in a for y in b]
    return min(v), max(v)


def _shape(expr) -> tuple[int, ...] | None:
    s = getattr(expr.ty, "shape", None)
    if not isinstance(s, relax.ShapeExpr):
        return None
    try:
        return tuple(int(d) for d in s.values)
    except TypeError:
        return None


class Ranges:
    """The ranges of ``func``'s parameters and bindings (``of(expr)`` for any of its expressions)."""

    def __init__(self, func: relax.Function):
        self.known: dict = {}
        self.bound: dict = {}
        for p in func.params:
            self.known[p] = dtype_range(str(p.ty.dtype))
        for block in func.body.blocks:
            for b in block.bindings:
                self.bound[b.var] = b.value
                self.known[b.var] = self._value(b.value, b.var)

    def of(self, expr) -> Interval:
        if isinstance(expr, tvm.ir.GenericConst):
            a = expr.value.numpy()
            return (int(a.min()), int(a.max())) if a.size else (0, 0)
        if isinstance(expr, tvm.tirx.IntImm):      # a PrimValue
            return int(expr.value), int(expr.value)
        if expr in self.known:
            return self.known[expr]
        return dtype_range(str(expr.ty.dtype))

    def _value(self, value, var) -> Interval:
        dtype = str(getattr(var.ty, "dtype", "") or "")
        if isinstance(value, relax.Var):
            return self.of(value)
        if not dtype or dtype.startswith("float") or dtype == "void":
            return 0, 0
        full = dtype_range(dtype)
        if isinstance(value, relax.TupleGetItem):   # a part of a split holds values of what was split
            split = self.bound.get(value.tuple_value)
            if isinstance(split, relax.Call) and split.op.name == "relax.split":
                lo, hi = self.of(split.args[0])
                return max(lo, full[0]), min(hi, full[1])
            return full
        rule = TRANSFER.get(value.op.name) if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None
        if rule is None:
            return full
        lo, hi = rule(self, value)
        return max(lo, full[0]), min(hi, full[1])


def _same(r: Ranges, call) -> Interval:
    return r.of(call.args[0])


def _union(r: Ranges, call) -> Interval:
    parts = [r.of(f) for f in call.args[0].fields]
    return min(p[0] for p in parts), max(p[1] for p in parts)


def _astype(r: Ranges, call) -> Interval:
    lo, hi = r.of(call.args[0])
    tlo, thi = dtype_range(str(call.attrs.dtype))
    return (lo, hi) if tlo <= lo and hi <= thi else (tlo, thi)


def _binary(f) -> Callable:
    return lambda r, call: _corners(f, r.of(call.args[0]), r.of(call.args[1]))


def _subtract(r: Ranges, call) -> Interval:
    a, b = call.args[0], call.args[1]
    reduced = r.bound.get(a) if isinstance(a, relax.Var) else None
    if isinstance(reduced, relax.Call) and getattr(reduced.op, "name", None) == "relax.max" \
            and reduced.args[0].same_as(b):
        lo, hi = r.of(b)
        return 0, hi - lo
    return _corners(lambda x, y: x - y, r.of(a), r.of(b))


def _right_shift(r: Ranges, call) -> Interval:
    e = r.of(call.args[1])
    if e[0] < 0:
        return dtype_range(str(call.ty.dtype))
    return _corners(lambda x, s: x >> s, r.of(call.args[0]), e)


def _left_shift(r: Ranges, call) -> Interval:
    e = r.of(call.args[1])
    if e[0] < 0 or e[1] > 63:
        return dtype_range(str(call.ty.dtype))
    return _corners(lambda x, s: x << s, r.of(call.args[0]), e)


def _floor_divide(r: Ranges, call) -> Interval:
    b = r.of(call.args[1])
    if b[0] <= 0 <= b[1]:
        return dtype_range(str(call.ty.dtype))
    return _corners(lambda x, y: x // y, r.of(call.args[0]), b)


def _bitwise_and(r: Ranges, call) -> Interval:
    (alo, ahi), (blo, bhi) = r.of(call.args[0]), r.of(call.args[1])
    if blo >= 0:
        return 0, bhi if alo < 0 else min(ahi, bhi)
    if alo >= 0:
        return 0, ahi
    return dtype_range(str(call.ty.dtype))


def _clip(r: Ranges, call) -> Interval:
    lo, hi = r.of(call.args[0])
    a, b = (int(v.value) for v in call.args[1:3])
    return min(max(lo, a), b), max(min(hi, b), a)


def _where(r: Ranges, call) -> Interval:
    (alo, ahi), (blo, bhi) = r.of(call.args[1]), r.of(call.args[2])
    return min(alo, blo), max(ahi, bhi)


def _count(call) -> int | None:
    """The number of elements a reduction sums into one."""
    shape = _shape(call.args[0])
    if shape is None:
        return None
    axes = call.attrs.axis
    axes = range(len(shape)) if axes is None else [int(a) % len(shape) for a in axes]
    return prod(shape[a] for a in axes)


def _sum(r: Ranges, call) -> Interval:
    n = _count(call)
    if n is None:
        return dtype_range(str(call.ty.dtype))
    lo, hi = r.of(call.args[0])
    return n * lo if lo < 0 else lo, n * hi if hi > 0 else hi


def _contraction(k_of: Callable) -> Callable:
    def rule(r: Ranges, call) -> Interval:
        k = k_of(call)
        if k is None:
            return dtype_range(str(call.ty.dtype))
        lo, hi = _corners(lambda x, y: x * y, r.of(call.args[0]), r.of(call.args[1]))
        return k * lo if lo < 0 else lo, k * hi if hi > 0 else hi
    return rule


def _matmul_k(call) -> int | None:
    s = _shape(call.args[0])
    return None if s is None else s[-1]


def _conv_k(call) -> int | None:
    s = _shape(call.args[1])            # OIHW: a sum over I/groups x H x W
    return None if s is None or str(call.attrs.kernel_layout) != "OIHW" else prod(s[1:])


def _pad(r: Ranges, call) -> Interval:
    lo, hi = r.of(call.args[0])
    v = int(call.attrs.pad_value)
    return min(lo, v), max(hi, v)


def _take(r: Ranges, call) -> Interval:
    return r.of(call.args[0])           # a table's values (or a view's) bound what it returns


def _bool(_r: Ranges, _call) -> Interval:
    return 0, 1


TRANSFER: dict[str, Callable[[Ranges, relax.Call], Interval]] = {
    "relax.astype": _astype,
    "relax.add": _binary(lambda x, y: x + y),
    "relax.subtract": _subtract,
    "relax.multiply": _binary(lambda x, y: x * y),
    "relax.maximum": _binary(max),
    "relax.minimum": _binary(min),
    "relax.right_shift": _right_shift,
    "relax.left_shift": _left_shift,
    "relax.floor_divide": _floor_divide,
    "relax.bitwise_and": _bitwise_and,
    "relax.clip": _clip,
    "relax.where": _where,
    "relax.sum": _sum,
    "relax.max": _same,
    "relax.min": _same,
    "relax.matmul": _contraction(_matmul_k),
    "relax.nn.conv2d": _contraction(_conv_k),
    "relax.nn.pad": _pad,
    "relax.nn.max_pool2d": _same,
    "relax.take": _take,
    "relax.concat": _union,
    **{op: _same for op in ("relax.reshape", "relax.permute_dims", "relax.squeeze", "relax.expand_dims",
                            "relax.strided_slice", "relax.broadcast_to", "relax.flatten")},
    **{op: _bool for op in ("relax.equal", "relax.not_equal", "relax.greater", "relax.greater_equal",
                            "relax.less", "relax.less_equal")},
}
