"""FoldOffsets (passes/fold_offsets.py) on tiny lowered Relax graphs.

A requantize of ``acc + b`` (per-channel int32 constants: the bias and the zero points' correction)
becomes one of ``acc`` whose rounding constant holds ``b * m``: the same integers, and the product's
operand a widened int32 as loaded (one 32 x 32 -> 64-bit multiply on x86).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from passes.fold_offsets import FoldOffsets

M = np.array([[1518500250, 1073741824, 2147483647]], np.int64)     # per channel, along axis 1
B1 = np.array([[-7, 300, 2**20]], np.int32)
B2 = np.array([[5, -1, 0]], np.int32)
E = np.array([[37, 38, 40]], np.int64)
HALF = np.left_shift(1, E - 1)


@I.ir_module
class Before:
    """Two constant adds (bias, then the zero-point correction), as the lowering emits them."""

    @R.function
    def main(acc: R.Tensor(("n", 3), "int32")) -> R.Tensor(("n", 3), "int64"):
        with R.dataflow():
            x1 = R.add(acc, R.const(B1, "int32"))
            x = R.add(x1, R.const(B2, "int32"))
            wide = R.astype(x, "int64")
            prod = R.multiply(wide, R.const(M, "int64"))
            total = R.add(prod, R.const(HALF, "int64"))
            y = R.right_shift(total, R.const(E, "int64"))
            R.output(y)
        return y


@I.ir_module
class Expected:
    """``acc * m + (2^(e-1) + (b1 + b2) m) >> e``: no int32 add, the offsets in the rounding term."""

    @R.function
    def main(acc: R.Tensor(("n", 3), "int32")) -> R.Tensor(("n", 3), "int64"):
        with R.dataflow():
            wide = R.astype(acc, "int64")
            prod = R.multiply(wide, R.const(M, "int64"))
            total = R.add(prod, R.const(HALF + (B1 + B2).astype(np.int64) * M, "int64"))
            y = R.right_shift(total, R.const(E, "int64"))
            R.output(y)
        return y


@I.ir_module
class NotApplicable:
    """Kept: an offset that is a tensor (a residual), and a rescale with no offset to fold."""

    @R.function
    def main(acc: R.Tensor((2, 3), "int32"), r: R.Tensor((2, 3), "int32")):
        with R.dataflow():
            m, h, e = R.const(M, "int64"), R.const(HALF, "int64"), R.const(E, "int64")
            a = R.right_shift(R.add(R.multiply(R.astype(R.add(acc, r), "int64"), m), h), e)
            b = R.right_shift(R.add(R.multiply(R.astype(acc, "int64"), m), h), e)
            R.output(a, b)
        return (a, b)


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_offsets_join_the_rounding_term():
    tvm.ir.assert_structural_equal(FoldOffsets()(Before), Expected)


def test_rescales_without_constant_offsets_are_left_alone():
    tvm.ir.assert_structural_equal(FoldOffsets()(NotApplicable), NotApplicable)


def test_folded_requantize_is_bit_exact_on_the_accumulators_extremes():
    """Every accumulator whose sum with the offsets stays in int32 (the lowering's proof), at the
    edges of that range, on exact ties of the rounding, and at random: the same int64 results as
    the int32 add first, and as exact Python integers."""
    b = (B1 + B2).astype(np.int64)
    lo, hi = -(2**31) - b.min(), 2**31 - 1 - b.max()
    rng = np.random.default_rng(3)
    # ties: (acc + b) m = 2^(e-1) mod 2^e, reachable in int32 on channel 1 (m = 2^30, e = 38) at +-128
    ties = np.zeros((2, 3), np.int64)
    ties[:, 1] = np.array([128, -128]) - b[0, 1]
    m1, e1 = int(M[0, 1]), int(E[0, 1])
    assert all((int(t) + int(b[0, 1])) * m1 % (1 << e1) == 1 << (e1 - 1) for t in ties[:, 1])
    acc = np.concatenate([np.array([[lo] * 3, [hi] * 3, [0] * 3, [-1] * 3]), ties,
                          rng.integers(lo, hi, size=(16, 3), endpoint=True)]).astype(np.int32)
    got = _run(FoldOffsets()(Before), acc)
    np.testing.assert_array_equal(got, _run(Before, acc))
    want = np.array([[((int(a) + int(o)) * int(m) + (1 << (int(e) - 1))) >> int(e)
                      for a, o, m, e in zip(row, b[0], M[0], E[0], strict=True)] for row in acc], np.int64)
    np.testing.assert_array_equal(got, want)
