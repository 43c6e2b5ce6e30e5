"""Integer-only verifier: no float arithmetic strictly inside the quantized region.

The region is defined by the graph itself.  It opens at ``relax.quantize``
calls whose input is float (the input quantize) and closes at
``relax.dequantize`` calls whose value reaches the function's result through
views only (the output dequantize).  Every binding that depends on an opening
quantize is inside unless it comes after a closing dequantize; inside, every
call must produce an integer (or bool) tensor from integer operands.
Shape-only values and views of integer tensors pass.  A region with no closing
dequantize, or with nothing computed in it, is not integer-only: a model whose
float head leaves through no dequantize is float compute, not an empty proof.

This is what makes "integer-only" checkable rather than a promise: a float op
smuggled between the boundaries, say a QDQ pair around a float GELU, is
reported by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax

QUANTIZE, DEQUANTIZE = "relax.quantize", "relax.dequantize"
VIEW_OPS = {"relax.reshape", "relax.permute_dims", "relax.squeeze", "relax.expand_dims", "relax.flatten",
            "relax.broadcast_to", "relax.strided_slice", "relax.take"}


@dataclass
class IntegerVerdict:
    integer_only: bool
    reason: str                                   # one line for `lowbit inspect`
    offenders: list[str] = field(default_factory=list)


def _dtype(ty) -> str | None:
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _is_float(dtype: str | None) -> bool:
    return dtype is not None and (dtype.startswith("float") or dtype.startswith("bfloat"))


def _is_integer(dtype: str | None) -> bool:
    return dtype is not None and dtype.startswith(("int", "uint"))


def _op_name(value) -> str | None:
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    if isinstance(value, relax.Call):
        return str(getattr(value.op, "name_hint", "call"))
    return None


def _ancestors(roots: set, bindings, deps) -> set:
    """``roots`` and every binding they depend on (bindings are in program order)."""
    found = set(roots)
    for b in reversed(bindings):
        if b.var in found:
            found |= deps[b.var]
    return found


def check_integer_only(mod: tvm.IRModule, func_name: str = "main") -> IntegerVerdict:
    func = mod[func_name]
    bindings = [b for block in func.body.blocks for b in block.bindings]
    deps: dict[relax.Var, set] = {}                # var -> vars it reads directly

    def free_vars(expr) -> set:
        found: set = set()

        def visit(e):
            if isinstance(e, relax.Var):
                found.add(e)

        relax.analysis.post_order_visit(expr, visit)
        return found

    for b in bindings:
        deps[b.var] = free_vars(b.value)

    # opening: quantizes of float values that no earlier quantize feeds (the input quantize), and
    # in a quantized graph its integer inputs (token ids, masks), which are integers already
    quantized = any(_op_name(b.value) == DEQUANTIZE for b in bindings)
    after: set = {p for p in func.params if quantized and _is_integer(_dtype(p.ty))}
    opening: set = set()
    for b in bindings:
        if deps[b.var] & after:
            after.add(b.var)
        elif _op_name(b.value) == QUANTIZE and _is_float(_dtype(b.value.args[0].ty)):
            opening.add(b.var)
            after.add(b.var)
    if not opening and not after:
        return IntegerVerdict(False, "no quantized region (float model)")

    # closing: dequantizes whose value reaches the result through views and tuples only
    users: dict = {}
    for b in bindings:
        for d in deps[b.var]:
            users.setdefault(d, []).append(b)

    def only_views_after(var) -> bool:
        for u in users.get(var, []):
            passes_through = _op_name(u.value) in VIEW_OPS or isinstance(u.value, (relax.Tuple, relax.Var))
            if not passes_through or not only_views_after(u.var):
                return False
        return True

    result = _ancestors(free_vars(func.body.body), bindings, deps)
    closing = {b.var for b in bindings
               if _op_name(b.value) == DEQUANTIZE and b.var in result and only_views_after(b.var)}
    # past a closing dequantize there are only views on the way out; everything else that an input
    # quantize reaches is inside, whether or not it reaches a closing dequantize: a float conv whose
    # result leaves the model without one is float compute all the same
    past = set(closing)
    for b in bindings:
        if deps[b.var] & past:
            past.add(b.var)
    inside = [b for b in bindings if b.var in after and b.var not in opening and b.var not in past]

    offenders = []
    for b in inside:
        op = _op_name(b.value)
        if op is None:                            # tuples, aliases: checked via their users
            continue
        out = _dtype(b.var.ty)
        floats_in = [a for a in getattr(b.value, "args", []) if _is_float(_dtype(getattr(a, "ty", None)))]
        if _is_float(out) or floats_in:
            offenders.append(f"{op} ({b.var.name}: {out or 'float operand'})")
    if offenders:
        # name float arithmetic before the Q/DQ pairs that wrap it: that is what has to change
        offenders.sort(key=lambda o: o.split(" ")[0] in (QUANTIZE, DEQUANTIZE))
        more = f" and {len(offenders) - 1} more" if len(offenders) > 1 else ""
        return IntegerVerdict(False, f"float op inside the integer region: {offenders[0]}{more}", offenders)
    computing = [b for b in inside if _op_name(b.value) not in (None, *VIEW_OPS)]
    if not closing or not computing:
        return IntegerVerdict(False, "empty integer region: nothing is computed between the input quantize(s) and "
                                     "an output dequantize")
    ints = len([p for p in func.params if p in after])
    return IntegerVerdict(True, f"{len(inside)} integer ops between {len(opening)} input quantize(s)"
                                f"{f' and {ints} integer input(s)' if ints else ''} and {len(closing)} output "
                                "dequantize(s)")


@tvm.transform.module_pass(opt_level=0, name="VerifyIntegerOnly")
class VerifyIntegerOnly:
    """Fail the build, naming the op, if a float op sits inside the integer region."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        verdict = check_integer_only(mod)
        if not verdict.integer_only and verdict.offenders:
            raise ValueError(verdict.reason)
        return mod
