"""OrderShapeHeap: the shape function's stores in slot order, so one model gives one library.

A model with a symbolic dimension (a dynamic batch ``N``) keeps its shape arithmetic on a heap
``H`` of int64 slots: ``VMShapeLower`` numbers each symbolic expression (``H[0] = N`` as matched,
``H[1] = 64 * N``, ...) and emits a host ``shape_func`` that computes the ready ones.  Slot numbers
follow the IR, but the order of those stores comes from iterating an ``unordered_map`` keyed by
expression hash (vm_shape_lower.cc, ``PopulateSlotInfo``), which changes between processes now and
then: the same model then compiles to two different ``model.so`` files (tests/test_determinism.py
caught it, one compile in a few dozen).

The stores of one batch are independent: each value reads only slots of variables that an earlier
match defined (``H[i] = e(H[j], ...)`` with every ``j`` outside the batch), so

    H[i1] = e1; H[i2] = e2  ==  H[i2] = e2; H[i1] = e1      when no e_k reads an H[i_l] of the batch,

and this pass sorts every such sequence by its slot number.  A sequence that reads its own slots, or
holds anything but stores at constant indices, is left as it is.
"""

from __future__ import annotations

import tvm
from tvm import tirx


def _reads(e, buffer) -> set[int] | None:
    """The constant indices of ``buffer`` that ``e`` loads; None when ``e`` has a node this walk
    does not know (the caller then keeps the order)."""
    if isinstance(e, tvm.ir.expr.TensorLoad):      # a BufferLoad
        if not e.source.same_as(buffer):
            return set()
        if len(e.indices) == 1 and isinstance(e.indices[0], tirx.IntImm):
            return {int(e.indices[0].value)}
        return None
    if isinstance(e, (tirx.IntImm, tirx.Var)):
        return set()
    if isinstance(e, tvm.ir.prim.expr.BinaryOpExpr):
        kids = [e.a, e.b]
    elif isinstance(e, tirx.Cast):
        kids = [e.value]
    else:
        return None
    found: set[int] = set()
    for k in kids:
        r = _reads(k, buffer)
        if r is None:
            return None
        found |= r
    return found


def _slot(s) -> int | None:
    if isinstance(s, tirx.BufferStore) and len(s.indices) == 1 and isinstance(s.indices[0], tirx.IntImm):
        return int(s.indices[0].value)
    return None


def _ordered(body):
    if not isinstance(body, tirx.SeqStmt):
        return body
    stores = list(body.seq)
    slots = [_slot(s) for s in stores]
    if None in slots or any(not s.buffer.same_as(stores[0].buffer) for s in stores):
        return body
    for s in stores:
        r = _reads(s.value, s.buffer)
        if r is None or r & set(slots):
            return body
    return tirx.SeqStmt([s for _, s in sorted(zip(slots, stores, strict=True), key=lambda p: p[0])])


@tvm.transform.module_pass(opt_level=0, name="lowbit.OrderShapeHeap")
class OrderShapeHeap:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, f in mod.functions_items():
            if isinstance(f, tirx.PrimFunc):
                body = _ordered(f.body)
                if not body.same_as(f.body):
                    out[gv] = f.with_body(body)
        return out


def after_shape_lowering(passes: list) -> list:
    """``passes`` (a TVM VM pipeline) with OrderShapeHeap right after its VMShapeLower."""
    out = []
    for p in passes:
        out.append(p)
        if p.info.name == "VMShapeLower":
            out.append(OrderShapeHeap())
    return out
