"""Read-only analyses of a Relax module: op histogram, constant (weight) bytes, constant identity."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import tvm
from tvm import relax


def op_histogram(mod: tvm.IRModule) -> dict[str, int]:
    """Count of each Relax op called in the module's Relax functions, e.g. ``{"relax.nn.conv2d": 20}``."""
    counts: Counter[str] = Counter()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            counts[expr.op.name] += 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def weight_bytes(mod: tvm.IRModule) -> int:
    """Bytes of all constants bound into the module (the model's weights after import)."""
    total = 0

    def visit(expr):
        nonlocal total
        # post_order_visit reaches each node of the DAG once, so shared constants count once
        if isinstance(expr, tvm.ir.GenericConst) and isinstance(getattr(expr, "value", None), tvm.runtime.Tensor):
            arr = expr.value
            total += int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(str(arr.dtype)).itemsize

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return total


def digest(array: np.ndarray) -> str:
    """A constant's identity across passes that may rebuild its Relax node: dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    return hashlib.sha1(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()[:16]
