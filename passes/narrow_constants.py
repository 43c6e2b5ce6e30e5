"""NarrowConstants: 64-bit constants whose values fit in 32 bits are stored as int32.

Per-channel requantize multipliers ``m`` (HAWQ-V3's dyadic ``m * 2^-e``, ``m < 2^31``) and shifts
``e`` are int64 tensors in the lowered graph, because the product ``x * m`` needs 64 bits.
``FoldConstant`` folds any widening cast of a constant back into an int64 constant, so each kernel
reads 8-byte values it cannot know are sign-extended 32-bit ones: on a 32-bit core ``x * m`` is
then a 64 x 64-bit multiply (four ``mul``s) where ``mulh`` + ``mul`` would do, and flash holds twice
the bytes; on x86 a 64 x 64-bit ``vpmullq`` (three uops) where ``vpmuldq`` (one) would do.  After
``FoldConstant`` and before ``FuseOps``, each such constant operand becomes
``astype(int32 constant, "int64")``; fusion puts the cast inside the consumer's kernel, which then
takes the int32 array.  Values and results are unchanged (the cast is exact).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes.rewrite import each_function

I32 = np.iinfo(np.int32)


@relax.expr_functor.mutator
class _Narrow(relax.PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
            return call
        args, changed = [], False
        for a in call.args[1].fields:
            arr = a.value.numpy() if isinstance(a, tvm.ir.GenericConst) else None
            if arr is not None and arr.dtype == np.int64 and arr.size > 1 and \
                    arr.min() >= I32.min and arr.max() <= I32.max:
                a = self.builder_.emit(relax.op.astype(relax.const(arr.astype(np.int32)), "int64"))
                changed = True
            args.append(a)
        if not changed:
            return call
        return relax.Call(call.op, [call.args[0], relax.Tuple(args), *call.args[2:]], call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="lowbit.NarrowConstants")
class NarrowConstants:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        # the new casts are Relax ops: legalize them into kernels FuseOps can fuse
        out = relax.transform.LegalizeOps()(each_function(_Narrow(mod), mod))
        return relax.transform.AnnotateTIROpPattern()(out)
