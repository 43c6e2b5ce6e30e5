"""IntegerRegion: cut a lowered model down to its integer-only core.

A microcontroller deployment runs the integer region only.  The host (or the sensor front end)
quantizes the input, ``q = clamp(round(x / s) + z)``, and reads the output as integers, dequantizing
with ``x = s * (q - z)`` if it wants reals; both parameter pairs go into the generated header.  So
``main(x: float32) -> dequantize(...)`` becomes ``main(x_q: int8) -> int8``: the opening quantize
is replaced by a parameter of its output type, the closing dequantize by its integer operand, and
the bindings the output does not depend on are dropped.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes.verify_integer import DEQUANTIZE, QUANTIZE
from runtime.types import BoundaryTensor


class RegionError(ValueError):
    pass


def _op(value) -> str | None:
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None


def _scalar(expr, what: str):
    if not isinstance(expr, tvm.ir.GenericConst) or expr.value.numpy().size != 1:
        raise RegionError(f"the {what} has per-channel or non-constant parameters; the C interface takes one "
                          "scale and zero point")
    return expr.value.numpy().reshape(()).item()


def _output(name: str, value, per_axis: bool) -> BoundaryTensor:
    """The boundary of an output dequantize; per-axis parameters only where the target's host side
    takes them (``per_axis``)."""
    q, scale, zero = value.args
    what = f"output {name!r}"
    shape, dtype = _static_shape(q.ty, what), str(q.ty.dtype)
    consts = all(isinstance(e, tvm.ir.GenericConst) for e in (scale, zero))
    if per_axis and consts and max(scale.value.numpy().size, zero.value.numpy().size) > 1:
        axis = int(value.attrs.axis) % len(shape)
        s, z = (np.broadcast_to(e.value.numpy().reshape(-1), (shape[axis],)) for e in (scale, zero))
        return BoundaryTensor(name, shape, dtype, tuple(float(v) for v in s), tuple(int(v) for v in z), axis)
    return BoundaryTensor(name, shape, dtype, float(_scalar(scale, what)), int(_scalar(zero, what)))


def _static_shape(ty, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in ty.shape.values)
    except (TypeError, AttributeError):
        raise RegionError(f"the {what} has a symbolic shape; fix it with --input-shape NAME=D1,D2,...") from None


def extract(mod: tvm.IRModule, input_names: list[str], output_names: list[str], per_axis_outputs: bool = False
            ) -> tuple[tvm.IRModule, list[BoundaryTensor], list[BoundaryTensor]]:
    """(integer-only module, its inputs, its outputs).  Raises RegionError when the model's inputs
    are not quantized directly or its outputs are not dequantized at the end, or (unless
    ``per_axis_outputs``) dequantized per channel."""
    func = mod["main"]
    bindings = [b for block in func.body.blocks for b in block.bindings]
    by_var = {b.var: b.value for b in bindings}
    params = {p: name for p, name in zip(func.params, input_names, strict=True)}

    remap: dict = {}
    inputs: list[BoundaryTensor] = []
    for b in bindings:
        if _op(b.value) == QUANTIZE and b.value.args[0] in params:
            name = params[b.value.args[0]]
            ty = b.var.ty
            shape = _static_shape(ty, f"input {name!r}")
            inputs.append(BoundaryTensor(name, shape, str(ty.dtype), float(_scalar(b.value.args[1], f"input {name!r}")),
                                         int(_scalar(b.value.args[2], f"input {name!r}"))))
            remap[b.var] = relax.Var(name, relax.TensorType(shape, ty.dtype))
    if len(inputs) != len(params):
        quantized = {i.name for i in inputs}
        missing = next(n for n in params.values() if n not in quantized)
        raise RegionError(f"input {missing!r} is not quantized directly (float math runs before its "
                          "QuantizeLinear); the microcontroller code starts at the input quantize")

    results = func.body.body
    results = list(results.fields) if isinstance(results, relax.Tuple) else [results]
    outputs: list[BoundaryTensor] = []
    ends = []
    for var, name in zip(results, output_names, strict=True):
        value = by_var.get(var)
        while isinstance(value, relax.Var):                 # aliases (lower_qdq ends at the dequantize)
            value = by_var.get(value)
        if _op(value) != DEQUANTIZE:
            raise RegionError(f"output {name!r} is not dequantized at the end (it is {_op(value) or 'an input'}); "
                              "the microcontroller code ends at the output dequantize")
        outputs.append(_output(name, value, per_axis_outputs))
        ends.append(value.args[0])

    needed: set = set()
    stack = list(ends)
    while stack:
        var = stack.pop()
        if var in needed or var in remap or var not in by_var:
            continue
        needed.add(var)
        relax.analysis.post_order_visit(by_var[var], lambda e: stack.append(e) if isinstance(e, relax.Var) else None)

    bb = relax.BlockBuilder()
    new_params = [remap[b.var] for b in bindings if b.var in remap]
    substitute = _Substitute(remap)
    with bb.function("main", new_params):
        with bb.dataflow():
            for b in bindings:
                if b.var in needed:
                    remap[b.var] = bb.emit(substitute.visit_expr(b.value), name_hint=b.var.name)
            outs = [remap[q] for q in ends]
            out = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        bb.emit_func_output(out)
    new = bb.get()
    region = tvm.IRModule({**{gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"},
                           **dict(new.functions_items())})
    return relax.transform.DeadCodeElimination()(region), inputs, outputs


@relax.expr_functor.mutator
class _Substitute(relax.PyExprMutator):
    """An expression with the variables in ``remap`` substituted."""

    def __init__(self, remap: dict):
        super().__init__()
        self.remap = remap

    def visit_var_(self, var):
        return self.remap.get(var, var)

    def visit_dataflow_var_(self, var):
        return self.remap.get(var, var)

