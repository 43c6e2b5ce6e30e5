"""Applying a ``relax.PyExprMutator`` to every Relax function of a module (the module-pass half
that TVM's ``python/tvm/relax/transform`` passes written in Python share), and the pattern
helpers those mutators match the lowered graph with."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def constant(expr) -> np.ndarray | None:
    """A Relax constant's value, or None."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.GenericConst) else None


def is_op(expr, name: str) -> bool:
    """Whether ``expr`` is a call of the Relax op ``name``."""
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def bound(mutator: relax.PyExprMutator, expr):
    """The expression a dataflow variable is bound to, through variables bound to variables (the
    lowering binds every op)."""
    while isinstance(expr, relax.Var):
        value = mutator.lookup_binding(expr)
        if value is None:
            return expr
        expr = value
    return expr


def each_function(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with each Relax function replaced by ``mutator``'s rewrite of it (``mutator`` was
    built on ``mod``, so its block builder holds the module)."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
