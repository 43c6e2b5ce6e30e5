"""HighWordRescale: dyadic requantization with one high-word multiply, for 32-bit cores.

Every requantize of the lowered graph is ``dyadic.rescale``'s ``(x * m + 2^(e-1)) >> e`` in int64.
On rv32 that is a 64-bit multiply, a 64-bit add and a variable 64-bit shift per output: about 35
instructions, more than the nine multiply-accumulates of a depthwise 3x3 output.  Where ``x`` is
int32 and every shift is at least 33 (conv and matmul ratios are far below 2^-1), this pass
rewrites it as ``dyadic.rescale_high``: ``(mulh(x, m) + 2^(e-33)) >> (e-32)``, the same integer.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes.dyadic import Dyadic, rescale_high
from passes.rewrite import bound, constant, each_function, is_op


@relax.expr_functor.mutator
class _HighWord(relax.PyExprMutator):
    def __init__(self, mod=None):
        super().__init__(mod)
        self._high: list[relax.Expr] = []   # the int32 results of the rescales rewritten here

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if is_op(call, "relax.astype"):
            return self._saturate(call)
        if not is_op(call, "relax.right_shift") or (e := constant(call.args[1])) is None:
            return call
        add = bound(self, call.args[0])
        if not is_op(add, "relax.add") or constant(add.args[1]) is None:
            return call
        mul = bound(self, add.args[0])
        if not is_op(mul, "relax.multiply") or (m := constant(mul.args[1])) is None or m.dtype != np.int64:
            return call
        cast = bound(self, mul.args[0])
        if not is_op(cast, "relax.astype") or str(cast.args[0].ty.dtype) != "int32" or m.shape != e.shape:
            return call
        x = cast.args[0]
        axis = next((i for i, n in enumerate(m.shape) if n > 1), -1)
        high = rescale_high(x, Dyadic(m.reshape(-1), e.reshape(-1)), axis)
        # the rounding constant is part of the pattern: only the form dyadic.rescale builds
        half = constant(add.args[1])
        if high is None or not np.array_equal(half, np.left_shift(1, np.maximum(e, 1) - 1) * (e > 0)):
            return call
        high = self.builder_.normalize(high)
        self._high.append(bound(self, high.args[0]))    # astype(int32 result, int64): |result| < 2^30
        return high

    def _saturate(self, call):
        """``dyadic.saturate`` of a rescale rewritten above: ``astype(clip(astype(v, int64) + z, lo,
        hi), int8)`` clamps in int32 instead, since ``|v| < 2^30`` and ``v + z`` cannot wrap.  Any
        other int32 ``v`` may be near 2^31, so its sum stays in int64."""
        if tvm.DataType(str(call.ty.dtype)).bits > 32:
            return call
        clip = bound(self, call.args[0])
        if not is_op(clip, "relax.clip"):
            return call
        total, zero = bound(self, clip.args[0]), 0
        if is_op(total, "relax.add") and (z := constant(total.args[1])) is not None and z.size == 1:
            total, zero = bound(self, total.args[0]), int(z.reshape(-1)[0])
        if not is_op(total, "relax.astype") or str(total.args[0].ty.dtype) != "int32":
            return call
        v = total.args[0]
        if not any(bound(self, v).same_as(h) for h in self._high):
            return call
        lo, hi = (int(b.value) for b in clip.args[1:3])
        if zero:
            v = relax.op.add(v, relax.const(zero, "int32"))
        return self.builder_.normalize(relax.op.astype(relax.op.clip(v, lo, hi), call.ty.dtype))


@tvm.transform.module_pass(opt_level=0, name="lowbit.HighWordRescale")
class HighWordRescale:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return relax.transform.DeadCodeElimination()(each_function(_HighWord(mod), mod))
