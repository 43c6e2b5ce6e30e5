"""PoolFirst: a max pool moves before the requantize that feeds it.

A requantize is a chain of elementwise steps, each non-decreasing in its operand: adding a
constant, a widening cast, multiplying by a non-negative constant, an arithmetic right shift, a
clip, and the cast to 8 bits after the clip.  For any non-decreasing ``f`` applied per element,

    max_{window} f(x)  ==  f(max_{window} x)

so the max pool of a requantized convolution equals the requantize of the max pool of its
accumulator, computed on a quarter of the elements (a 3 x 3 pool at stride 2: ResNet's stem
requantizes 56 x 56 x 64 accumulators instead of 112 x 112 x 64).  The pool's padding is its
dtype's minimum (TOPI's), which no window of real elements takes as its maximum in either order:
ONNX's pads are smaller than the kernel, so every window holds one.  The chain's constants must be
the same at every pixel (per channel or per tensor) and each step must have no other reader; the
pool moves only past a multiply or shift (a clip and cast alone are cheaper than a wider pool).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes.rewrite import constant, each_function, is_op


def _range(dtype: str) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _always(call, _operand) -> bool:
    return True


def _non_negative(call, _operand) -> bool:
    """x * c, x >> c: non-decreasing in x where every c >= 0 (a shift is arithmetic: a floor)."""
    return bool(np.all(constant(call.args[1]) >= 0))


def _astype(call, operand) -> bool:
    """Integer to integer, widening, or narrowing a value a clip already holds within range."""
    src, dst = str(call.args[0].ty.dtype), str(call.attrs.dtype)
    if not (src.startswith(("int", "uint")) and dst.startswith(("int", "uint"))):
        return False
    lo, hi = _range(dst)
    if lo <= _range(src)[0] and _range(src)[1] <= hi:
        return True
    return is_op(operand, "relax.clip") and lo <= int(operand.args[1].value) and int(operand.args[2].value) <= hi


# the non-decreasing steps of a requantize, and when each one is (its first argument the value)
MONOTONE = {"relax.add": _always, "relax.subtract": _always, "relax.clip": _always, "relax.multiply": _non_negative,
            "relax.right_shift": _non_negative, "relax.astype": _astype}


def _uses(mod: tvm.IRModule) -> dict:
    """How many call arguments read each variable."""
    counts: dict = {}

    def visit(node):
        if isinstance(node, relax.Call):
            for arg in node.args:
                for v in (arg.fields if isinstance(arg, relax.Tuple) else [arg]):
                    if isinstance(v, relax.Var):
                        counts[v] = counts.get(v, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


@relax.expr_functor.mutator
class _PoolFirst(relax.PyExprMutator):
    def __init__(self, mod, uses: dict):
        super().__init__(mod)
        self._uses = uses

    def _chain(self, value, spatial: tuple[int, int]):
        """The steps from the accumulator to ``value``, source first, and the accumulator."""
        steps = []
        while isinstance(value, relax.Var) and self._uses.get(value, 0) == 1:
            call = self.lookup_binding(value)
            if not any(is_op(call, name) for name in MONOTONE):
                break
            consts = [constant(a) for a in call.args[1:] if not isinstance(a, tvm.tirx.IntImm)]   # clip bounds
            # every constant the same at each pixel: per channel or per tensor
            if any(c is None or c.ndim > 4 or max(((1,) * (4 - c.ndim) + c.shape)[a] for a in spatial) > 1
                   for c in consts):
                break
            operand = call.args[0]
            if not MONOTONE[call.op.name](call, self.lookup_binding(operand) if isinstance(operand, relax.Var)
                                          else None):
                break
            steps.append(call)
            value = operand
        return steps[::-1], value

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not is_op(call, "relax.nn.max_pool2d"):
            return call
        layout = str(call.attrs.layout)
        steps, source = self._chain(call.args[0], (layout.index("H"), layout.index("W")))
        # worth it where the moved steps include the requantize's arithmetic, not a clip alone
        if not any(s.op.name in ("relax.multiply", "relax.right_shift") for s in steps) or \
                not str(source.ty.dtype).startswith("int"):
            return call
        a = call.attrs
        x = self.builder_.emit(relax.op.nn.max_pool2d(source, a.pool_size, a.strides, a.padding, a.dilation,
                                                       a.ceil_mode, a.count_include_pad, layout=layout,
                                                       out_layout=str(a.out_layout)))
        for step in steps[:-1]:
            x = self.builder_.emit(relax.Call(step.op, [x, *step.args[1:]], step.attrs))
        last = steps[-1]
        return self.builder_.normalize(relax.Call(last.op, [x, *last.args[1:]], last.attrs))


@tvm.transform.module_pass(opt_level=0, name="lowbit.PoolFirst")
class PoolFirst:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        # dead readers first: the lowering's unused layout copies (a permute_dims of the requantized
        # stem per NCHW consumer it replaced) would count as the chain's other readers
        mod = relax.transform.DeadCodeElimination()(mod)
        return relax.transform.DeadCodeElimination()(each_function(_PoolFirst(mod, _uses(mod)), mod))
