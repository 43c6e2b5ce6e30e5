"""NarrowConstants (passes/narrow_constants.py) on a tiny legalized module.

The pass runs after ``FoldConstant`` and before ``FuseOps`` (codegen/llvm.fusion with ``narrow=True``),
so its input is a ``main`` of ``call_tir``s to legalized, pattern-annotated PrimFuncs whose operands
include folded int64 constants.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from passes.narrow_constants import NarrowConstants

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
M = np.array([[I32_MAX, I32_MIN, -3]])          # per-channel multipliers at both int32 extremes


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def multiply(x: T.Buffer((T.int64(2), T.int64(3)), "int64"), B: T.Buffer((T.int64(1), T.int64(3)), "int64"),
                 T_multiply: T.Buffer((T.int64(2), T.int64(3)), "int64")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for ax0, ax1 in T.grid(T.int64(2), T.int64(3)):
            with T.sblock("T_multiply"):
                v_ax0, v_ax1 = T.axis.remap("SS", [ax0, ax1])
                T.reads(x[v_ax0, v_ax1], B[T.int64(0), v_ax1])
                T.writes(T_multiply[v_ax0, v_ax1])
                T_multiply[v_ax0, v_ax1] = x[v_ax0, v_ax1] * B[T.int64(0), v_ax1]

    @R.function
    def main(x: R.Tensor((2, 3), "int64")) -> R.Tensor((2, 3), "int64"):
        cls = Before
        with R.dataflow():
            y = R.call_tir(cls.multiply, (x, R.const(M, "int64")), out_ty=R.Tensor((2, 3), "int64"))
            R.output(y)
        return y


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def cast(A: T.Buffer((T.int64(1), T.int64(3)), "int32"), compute: T.Buffer((T.int64(1), T.int64(3)), "int64")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for i0, i1 in T.grid(T.int64(1), T.int64(3)):
            with T.sblock("compute"):
                v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                T.reads(A[v_i0, v_i1])
                T.writes(compute[v_i0, v_i1])
                compute[v_i0, v_i1] = T.Cast("int64", A[v_i0, v_i1])

    @T.prim_func(private=True, s_tir=True)
    def multiply(x: T.Buffer((T.int64(2), T.int64(3)), "int64"), B: T.Buffer((T.int64(1), T.int64(3)), "int64"),
                 T_multiply: T.Buffer((T.int64(2), T.int64(3)), "int64")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for ax0, ax1 in T.grid(T.int64(2), T.int64(3)):
            with T.sblock("T_multiply"):
                v_ax0, v_ax1 = T.axis.remap("SS", [ax0, ax1])
                T.reads(x[v_ax0, v_ax1], B[T.int64(0), v_ax1])
                T.writes(T_multiply[v_ax0, v_ax1])
                T_multiply[v_ax0, v_ax1] = x[v_ax0, v_ax1] * B[T.int64(0), v_ax1]

    @R.function
    def main(x: R.Tensor((2, 3), "int64")) -> R.Tensor((2, 3), "int64"):
        cls = Expected
        with R.dataflow():
            m = R.call_tir(cls.cast, (R.const(M, "int32"),), out_ty=R.Tensor((1, 3), "int64"))
            y = R.call_tir(cls.multiply, (x, m), out_ty=R.Tensor((2, 3), "int64"))
            R.output(y)
        return y


@I.ir_module
class OutOfRange:
    """Three int64 constants the pass must keep: one above INT32_MAX, one below INT32_MIN, and a
    scalar (scalars become kernel immediates, passes/dyadic.rescale)."""

    @T.prim_func(private=True, s_tir=True)
    def multiply(x: T.Buffer((T.int64(2), T.int64(3)), "int64"), B: T.Buffer((T.int64(1), T.int64(3)), "int64"),
                 T_multiply: T.Buffer((T.int64(2), T.int64(3)), "int64")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for ax0, ax1 in T.grid(T.int64(2), T.int64(3)):
            with T.sblock("T_multiply"):
                v_ax0, v_ax1 = T.axis.remap("SS", [ax0, ax1])
                T.reads(x[v_ax0, v_ax1], B[T.int64(0), v_ax1])
                T.writes(T_multiply[v_ax0, v_ax1])
                T_multiply[v_ax0, v_ax1] = x[v_ax0, v_ax1] * B[T.int64(0), v_ax1]

    @T.prim_func(private=True, s_tir=True)
    def multiply1(x: T.Buffer((T.int64(2), T.int64(3)), "int64"), B: T.Buffer((), "int64"),
                  T_multiply: T.Buffer((T.int64(2), T.int64(3)), "int64")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for ax0, ax1 in T.grid(T.int64(2), T.int64(3)):
            with T.sblock("T_multiply"):
                v_ax0, v_ax1 = T.axis.remap("SS", [ax0, ax1])
                T.reads(x[v_ax0, v_ax1], B[()])
                T.writes(T_multiply[v_ax0, v_ax1])
                T_multiply[v_ax0, v_ax1] = x[v_ax0, v_ax1] * B[()]

    @R.function
    def main(x: R.Tensor((2, 3), "int64")) -> R.Tensor((2, 3), "int64"):
        cls = OutOfRange
        with R.dataflow():
            a = R.call_tir(cls.multiply, (x, R.const(np.array([[2**31, 0, 1]]), "int64")),
                           out_ty=R.Tensor((2, 3), "int64"))
            b = R.call_tir(cls.multiply, (a, R.const(np.array([[0, -(2**31) - 1, 1]]), "int64")),
                           out_ty=R.Tensor((2, 3), "int64"))
            y = R.call_tir(cls.multiply1, (b, R.const(7, "int64")), out_ty=R.Tensor((2, 3), "int64"))
            R.output(y)
        return y


def test_int64_constant_that_fits_becomes_an_int32_constant_widened():
    """A folded int64 operand whose values all fit int32 (here exactly INT32_MAX and INT32_MIN)
    becomes ``astype(int32 constant, int64)``, legalized into a ``cast`` kernel FuseOps can fuse into
    its reader; the reader's kernel is untouched."""
    tvm.ir.assert_structural_equal(NarrowConstants()(Before), Expected)


def test_the_stored_constant_is_int32_with_the_same_values():
    """The constant the rewritten module carries is an int32 array, value for value the int64 one."""
    consts = []
    relax.analysis.post_order_visit(NarrowConstants()(Before)["main"],
                                    lambda e: consts.append(e) if isinstance(e, tvm.ir.GenericConst) else None)
    assert [c.value.numpy().dtype for c in consts] == [np.dtype(np.int32)]
    np.testing.assert_array_equal(consts[0].value.numpy(), M)


def test_constants_outside_int32_and_scalars_are_left_alone():
    """2^31 and -2^31 - 1 do not fit int32, and scalar constants are kept: the module is unchanged."""
    tvm.ir.assert_structural_equal(NarrowConstants()(OutOfRange), OutOfRange)


def test_narrowed_module_computes_the_int64_product_bit_exactly():
    """The widening cast is exact: x * m with m at INT32_MAX / INT32_MIN and |x| up to 2^32 equals
    numpy's int64 product, sign extension included."""
    narrowed = NarrowConstants()(Before)
    x = np.array([[2**32 - 1, -(2**32), 5], [-1, 1, -(2**31)]], np.int64)
    vm = relax.VirtualMachine(tvm.compile(narrowed, target="llvm"), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), x * M)
