"""onnx's reference evaluator with the fixes lowbit relies on: one home for both the constant
folding (compiler/canonicalize.py) and the golden interpreter's float islands (runtime/golden.py)."""

from __future__ import annotations

import numpy as np
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun


class GatherElements(OpRun):
    """onnx 1.23's reference fails on 2-D data with more than 32 rows along the axis (np.choose's
    limit; BERT's token-type buffer, gathered by constant positions): take_along_axis, negative
    indices counted from the end."""

    def _run(self, data, indices, axis=0):
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, indices, axis=axis),)


FIXES = (GatherElements,)


def evaluator(proto, new_ops=()) -> ReferenceEvaluator:
    """A ReferenceEvaluator of ``proto`` (a model, graph or node) with ``FIXES`` and ``new_ops``."""
    return ReferenceEvaluator(proto, new_ops=[*FIXES, *new_ops])
