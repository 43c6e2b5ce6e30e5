"""DefinedSemantics: every conversion and shift with one answer on every machine.

LLVM gives no value to a float -> integer conversion out of the destination's range (``fptosi`` of
NaN, +-inf or 3e9 to int32 is poison), nor to a shift by the type's width or more: x86 then answers
with its "integer indefinite" or a masked count, AVX-512 and AVX2 differently, and a CUDA or rv32
core differently again.  ONNX leaves the first undefined (Cast: "fixed point: undefined if OOR") and
defines the second (BitShift, opset 28: an amount outside [0, width) gives the sign fill alone).
This pass writes both as total functions, before legalization, so every backend compiles the same
arithmetic:

    astype(x: float, intN)     ->  where(x > hi', max, astype(where(isnan(x), 0, clip(x, lo', hi')), intN))
        lo', hi': the integer range's ends as floats of x's type, rounded inward when the type
        cannot hold them (float32(2^31 - 1) is 2^31, itself out of range; the outer where is only
        there when hi' < max).  So NaN -> 0 and out-of-range values saturate, truncating toward
        zero in range: WebAssembly's ``trunc_sat`` and Rust's ``as``.
    x << y                     ->  where(0 <= y < N, x << clip(y, 0, N-1), 0)
    x >> y  (signed x)         ->  x >> where(0 <= y < N, y, N-1)                  (the sign fill)
    x >> y  (unsigned x)       ->  where(0 <= y < N, x >> clip(y, 0, N-1), 0)

A shift by a constant inside [0, N) (every requantize of passes/dyadic.py) is left as it is.
QuantizeLinear needs nothing here: its legalization clamps before it casts, and the clamp's
compare-and-select is defined for NaN too (``min(NaN, hi)`` selects ``hi``, so NaN quantizes to the
type's maximum; ``runtime/golden.py`` mirrors that).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes.rewrite import each_function

op = relax.op


def integer_range(dtype: str) -> tuple[int, int] | None:
    """(min, max) of an integer dtype of any width (int4 and uint2 included); None otherwise."""
    t = tvm.DataType(dtype)
    if t.type_code == tvm.DataTypeCode.INT:
        return -(1 << (t.bits - 1)), (1 << (t.bits - 1)) - 1
    if t.type_code == tvm.DataTypeCode.UINT and t.bits > 1:
        return 0, (1 << t.bits) - 1
    return None


def float_bounds(lo: int, hi: int, ftype: str) -> tuple[float, float]:
    """The integer range as values of float type ``ftype``, each end rounded inward."""
    f = np.dtype(ftype)
    with np.errstate(over="ignore"):                # 2^31 in float16 is inf: rounded inward below
        flo, fhi = np.asarray(lo).astype(f), np.asarray(hi).astype(f)
    if float(flo) < lo:
        flo = np.nextafter(flo, f.type(np.inf))
    if float(fhi) > hi:
        fhi = np.nextafter(fhi, f.type(-np.inf))
    return float(flo), float(fhi)


def _dtype(expr) -> str | None:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _is_float(dtype: str | None) -> bool:
    return dtype is not None and tvm.DataType(dtype).type_code == tvm.DataTypeCode.FLOAT and \
        dtype in ("float16", "float32", "float64")


def saturate(x: relax.Expr, src: str, dtype: str, out: str | None = None) -> relax.Expr:
    """``x`` (float ``src``) converted to integer type ``dtype`` by the rule above, in dtype
    ``out`` (default ``dtype``; a narrow type travels in a wider one)."""
    lo, hi = integer_range(dtype)
    flo, fhi = float_bounds(lo, hi, src)
    y = op.astype(op.where(op.isnan(x), relax.const(0, src), op.clip(x, flo, fhi)), out or dtype)
    if fhi < hi:        # the top is not a value of src (int32 from float32): above it is the maximum
        y = op.where(op.greater(x, relax.const(fhi, src)), relax.const(hi, out or dtype), y)
    return y


def _cast(call: relax.Call) -> relax.Expr | None:
    x = call.args[0]
    src, dtype = _dtype(x), str(call.attrs.dtype)
    if not _is_float(src) or integer_range(dtype) is None:
        return None
    return saturate(x, src, dtype)


def _in_range_constant(y: relax.Expr, width: int) -> bool:
    if not isinstance(y, tvm.ir.GenericConst):
        return False
    v = y.value.numpy()
    return bool(np.all((v >= 0) & (v < width)))


def _shift(call: relax.Call) -> relax.Expr | None:
    x, y = call.args
    dtype = _dtype(x)
    bounds = integer_range(dtype) if dtype else None
    # ONNX's BitShift shifts by the same type; TVM's shifts too
    if bounds is None or _dtype(y) != dtype or _in_range_constant(y, tvm.DataType(dtype).bits):
        return None
    top = tvm.DataType(dtype).bits - 1          # <= the type's maximum for every width >= 2
    inside = op.logical_and(op.greater_equal(y, relax.const(0, dtype)), op.less_equal(y, relax.const(top, dtype)))
    if call.op.name == "relax.right_shift" and bounds[0] < 0:      # arithmetic: out of range is the sign fill
        return relax.Call(call.op, [x, op.where(inside, y, relax.const(top, dtype))], call.attrs)
    shifted = relax.Call(call.op, [x, op.clip(y, 0, top)], call.attrs)
    return op.where(inside, shifted, relax.const(0, dtype))


HANDLERS = {"relax.astype": _cast, "relax.left_shift": _shift, "relax.right_shift": _shift}


@relax.expr_functor.mutator
class _Define(relax.PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        handler = HANDLERS.get(call.op.name) if isinstance(call.op, tvm.ir.Op) else None
        new = handler(call) if handler else None
        return call if new is None else self.builder_.normalize(new)


@tvm.transform.module_pass(opt_level=0, name="lowbit.DefinedSemantics")
class DefinedSemantics:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return each_function(_Define(mod), mod)
