"""FoldOffsets: a constant added to an accumulator before its requantize joins the rounding term.

``dyadic.rescale`` of a linear layer's result ``x = acc + b`` (b: the bias, and the zero points'
correction sum, per channel) is ``((int64) x * m + 2^(e-1)) >> e``.  The lowering proved that
``acc + b`` does not wrap in int32 (passes/accumulators.py), so in int64

    (acc + b) * m + 2^(e-1)  ==  acc * m + (b * m + 2^(e-1))

exactly, and ``b * m + 2^(e-1)`` is a constant (int64 per channel: |b m| < 2^62).  The product's
operand is then the accumulator as loaded, a sign-extended int32: with the multiplier stored as
int32 too (passes/narrow_constants.py), LLVM multiplies 32 x 32 -> 64 bits (x86 ``vpmuldq``, one
uop) where the sum ``sext(acc) + sext(b)`` has one sign bit too few and costs a 64 x 64-bit
``vpmullq`` (three uops) per eight lanes; the int32 add goes too.  HAWQ-V3 (Yao et al. 2021) §3.4
folds the bias the same way, into the integer accumulator's offset.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes.rewrite import bound, constant, each_function, is_op


@relax.expr_functor.mutator
class _Fold(relax.PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        # ((int64) (acc + b...) * m + h) >> e, with m, h, e constants
        if not is_op(call, "relax.right_shift") or constant(call.args[1]) is None:
            return call
        add = bound(self, call.args[0])
        if not is_op(add, "relax.add") or (h := constant(add.args[1])) is None:
            return call
        mul = bound(self, add.args[0])
        if not is_op(mul, "relax.multiply") or (m := constant(mul.args[1])) is None or m.dtype != np.int64:
            return call
        cast = bound(self, mul.args[0])
        if not is_op(cast, "relax.astype") or str(cast.args[0].ty.dtype) != "int32":
            return call
        acc, offsets = cast.args[0], []
        while is_op(total := bound(self, acc), "relax.add") and (b := constant(total.args[1])) is not None:
            acc, offsets = total.args[0], [*offsets, b.astype(np.int64)]
        ndim = call.ty.ndim
        folded = h.astype(np.int64) + sum(offsets) * m
        if not offsets or folded.ndim > ndim:
            return call
        folded = folded.reshape((1,) * (ndim - folded.ndim) + folded.shape)
        product = self.builder_.emit(relax.op.multiply(self.builder_.emit(relax.op.astype(acc, "int64")), mul.args[1]))
        total = self.builder_.emit(relax.op.add(product, relax.const(folded, "int64")))
        return self.builder_.normalize(relax.op.right_shift(total, call.args[1]))


@tvm.transform.module_pass(opt_level=0, name="lowbit.FoldOffsets")
class FoldOffsets:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return relax.transform.DeadCodeElimination()(each_function(_Fold(mod), mod))
