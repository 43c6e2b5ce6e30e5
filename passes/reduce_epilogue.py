"""ReduceEpilogue: let a reduction take its elementwise consumers into its kernel.

TVM's Relax ``FuseOps`` fuses an elementwise chain into the preceding kernel
only when that kernel is "out-elementwise fusable" (conv, matmul); a plain
reduction (``kCommReduce``: the integer sum of an average pool) ends its
group, so the pool's requantize -- ``(sum * m + 2^(e-1)) >> e``, clamp, cast
-- becomes a second kernel that re-reads the sum from memory.  The sum's
epilogue is elementwise on its output, which is exactly the contract of
``kOutEWiseFusable``; this pass re-marks reductions so, between
``AnnotateTIROpPattern`` and ``FuseOps``.
"""

from __future__ import annotations

import tvm
from tvm import tirx

COMM_REDUCE, OUT_ELEMWISE_FUSABLE = 3, 4      # tvm/relay/op_attr_types.h OpPatternKind


@tvm.transform.module_pass(opt_level=0, name="lowbit.ReduceEpilogue")
class ReduceEpilogue:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, f in mod.functions_items():
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None and \
                    int(f.attrs.get("op_pattern", -1)) == COMM_REDUCE:
                out[gv] = f.with_attr("op_pattern", OUT_ELEMWISE_FUSABLE)
        return out
