"""Applying a ``relax.PyExprMutator`` to every Relax function of a module (the module-pass half
that TVM's ``python/tvm/relax/transform`` passes written in Python share)."""

from __future__ import annotations

import tvm
from tvm import relax


def each_function(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with each Relax function replaced by ``mutator``'s rewrite of it (``mutator`` was
    built on ``mod``, so its block builder holds the module)."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
