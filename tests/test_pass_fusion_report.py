"""The fusion record (passes/fusion_report.py): CountKernels before FuseOps, RecordFusion after
MergeKernels, RecordUnscheduled after the schedules (codegen/llvm.fusion and .lowering).

All three are analyses: each must fill its part of the ``FusionReport`` exactly and hand the module
back unchanged.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from codegen import llvm
from passes.analysis import digest
from passes.fusion_report import CountKernels, FusionReport, RecordFusion, RecordUnscheduled

C = np.arange(8).reshape(2, 4) - 3          # a weight passed into a group
B = np.array([5, -5])                         # a bias passed to a direct call_tir


@I.ir_module
class Legalized:
    """``main`` before FuseOps: one call_tir per op (three), plus a Relax helper with one more."""

    @T.prim_func(private=True, s_tir=True)
    def sum(x: T.Buffer((T.int64(2), T.int64(4)), "int32"), x_red: T.Buffer((T.int64(2),), "int32")):
        T.func_attr({"op_pattern": 3, "tirx.noalias": True})
        for ax0, k1 in T.grid(T.int64(2), T.int64(4)):
            with T.sblock("x_red"):
                v_ax0, v_k1 = T.axis.remap("SR", [ax0, k1])
                with T.init():
                    x_red[v_ax0] = 0
                x_red[v_ax0] = x_red[v_ax0] + x[v_ax0, v_k1]

    @T.prim_func(private=True, s_tir=True)
    def right_shift(s: T.Buffer((T.int64(2),), "int32"), T_right_shift: T.Buffer((T.int64(2),), "int32")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for ax0 in range(T.int64(2)):
            with T.sblock("T_right_shift"):
                v_ax0 = T.axis.spatial(T.int64(2), ax0)
                T_right_shift[v_ax0] = s[v_ax0] >> 2

    @R.function
    def helper(x: R.Tensor((2, 4), "int32")) -> R.Tensor((2,), "int32"):
        cls = Legalized
        with R.dataflow():
            s = R.call_tir(cls.sum, (x,), out_ty=R.Tensor((2,), "int32"))
            R.output(s)
        return s

    @R.function
    def main(x: R.Tensor((2, 4), "int32")) -> R.Tensor((2,), "int32"):
        cls = Legalized
        with R.dataflow():
            s = R.call_tir(cls.sum, (x,), out_ty=R.Tensor((2,), "int32"))
            y = R.call_tir(cls.right_shift, (s,), out_ty=R.Tensor((2,), "int32"))
            z = R.call_tir(cls.right_shift, (y,), out_ty=R.Tensor((2,), "int32"))
            R.output(z)
        return z


@I.ir_module
class Grouped:
    """``main`` after FuseOps and MergeKernels: a Primitive group launched twice (once on a
    constant), and a direct call_tir launched twice (once with a constant bias)."""

    @T.prim_func(private=True, s_tir=True)
    def sum(x: T.Buffer((T.int64(2), T.int64(4)), "int32"), x_red: T.Buffer((T.int64(2),), "int32")):
        T.func_attr({"op_pattern": 3, "tirx.noalias": True})
        for ax0, k1 in T.grid(T.int64(2), T.int64(4)):
            with T.sblock("x_red"):
                v_ax0, v_k1 = T.axis.remap("SR", [ax0, k1])
                with T.init():
                    x_red[v_ax0] = 0
                x_red[v_ax0] = x_red[v_ax0] + x[v_ax0, v_k1]

    @T.prim_func(private=True, s_tir=True)
    def right_shift3(s: T.Buffer((T.int64(2),), "int32"), T_right_shift: T.Buffer((T.int64(2),), "int32")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for ax0 in range(T.int64(2)):
            with T.sblock("T_right_shift"):
                v_ax0 = T.axis.spatial(T.int64(2), ax0)
                T_right_shift[v_ax0] = s[v_ax0] >> 2

    @T.prim_func(private=True, s_tir=True)
    def add1(a: T.Buffer((T.int64(2),), "int32"), b: T.Buffer((T.int64(2),), "int32"),
             T_add: T.Buffer((T.int64(2),), "int32")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for ax0 in range(T.int64(2)):
            with T.sblock("T_add"):
                v_ax0 = T.axis.spatial(T.int64(2), ax0)
                T_add[v_ax0] = a[v_ax0] + b[v_ax0]

    @R.function(private=True)
    def fused_sum_right_shift(p0: R.Tensor((2, 4), "int32")) -> R.Tensor((2,), "int32"):
        R.func_attr({"Primitive": True})
        cls = Grouped
        with R.dataflow():
            s = R.call_tir(cls.sum, (p0,), out_ty=R.Tensor((2,), "int32"))
            y = R.call_tir(cls.right_shift3, (s,), out_ty=R.Tensor((2,), "int32"))
            R.output(y)
        return y

    @R.function
    def main(x: R.Tensor((2, 4), "int32")) -> R.Tensor((2,), "int32"):
        cls = Grouped
        with R.dataflow():
            a = cls.fused_sum_right_shift(R.const(C, "int32"))
            b = R.call_tir(cls.add1, (a, R.const(B, "int32")), out_ty=R.Tensor((2,), "int32"))
            c = cls.fused_sum_right_shift(x)
            d = R.call_tir(cls.add1, (b, c), out_ty=R.Tensor((2,), "int32"))
            R.output(d)
        return d


@I.ir_module
class Scheduled:
    """Three PrimFuncs: one marked scheduled, one marked not, one without the attribute."""

    @T.prim_func(private=True)
    def tuned(a: T.Buffer((4,), "int32"), b: T.Buffer((4,), "int32")):
        T.func_attr({"tirx.is_scheduled": True})
        for i in range(4):
            b[i] = a[i] + 1

    @T.prim_func(private=True)
    def naive(a: T.Buffer((4,), "int32"), b: T.Buffer((4,), "int32")):
        T.func_attr({"tirx.is_scheduled": False})
        for i in range(4):
            b[i] = a[i] + 2

    @T.prim_func(private=True)
    def bare(a: T.Buffer((4,), "int32"), b: T.Buffer((4,), "int32")):
        for i in range(4):
            b[i] = a[i] + 3

    @R.function
    def main(x: R.Tensor((4,), "int32")) -> R.Tensor((4,), "int32"):
        cls = Scheduled
        with R.dataflow():
            y = R.call_tir(cls.tuned, (x,), out_ty=R.Tensor((4,), "int32"))
            z = R.call_tir(cls.naive, (y,), out_ty=R.Tensor((4,), "int32"))
            w = R.call_tir(cls.bare, (z,), out_ty=R.Tensor((4,), "int32"))
            R.output(w)
        return w


W = np.arange(32).reshape(8, 4) % 5 - 2


@I.ir_module
class Model:
    """Eight ops: a row-wise branch (two sums of x, their shifts and sum) added to a matmul by W."""

    @R.function
    def main(x: R.Tensor((4, 8), "int32")) -> R.Tensor((4, 4), "int32"):
        with R.dataflow():
            a = R.right_shift(R.sum(x, axis=[1], keepdims=True), R.const(1, "int32"))
            b = R.right_shift(R.sum(R.multiply(x, x), axis=[1], keepdims=True), R.const(1, "int32"))
            d = R.add(R.add(a, b), R.matmul(x, R.const(W, "int32")))
            R.output(d)
        return d


def test_count_kernels_counts_every_call_tir_and_changes_nothing():
    """Before FuseOps each call_tir is a kernel: three in main and one in a helper function."""
    report = FusionReport()
    out = CountKernels(report)(Legalized)
    assert report.before == 4
    assert (report.launches, report.groups, report.sequence, report.readers) == (0, {}, [], {})
    tvm.ir.assert_structural_equal(out, Legalized)


def test_record_fusion_names_groups_launch_order_and_constant_readers():
    """Each Primitive group is recorded with its ops (de-duplication suffixes stripped), each launch of
    main in order under its final kernel name (a direct call_tir keeps its PrimFunc's name, suffix
    included), and each constant under the kernel it is passed to."""
    report = FusionReport(before=9)
    out = RecordFusion(report)(Grouped)
    assert report.groups == {"fused_sum_right_shift": ["sum", "right_shift"]}
    assert report.sequence == ["fused_sum_right_shift", "add1", "fused_sum_right_shift", "add1"]
    assert report.launches == 4 and report.before == 9
    assert report.readers == {digest(C.astype(np.int32)): "fused_sum_right_shift", digest(B.astype(np.int32)): "add1"}
    tvm.ir.assert_structural_equal(out, Grouped)


def test_record_unscheduled_lists_the_unscheduled_prim_funcs():
    """Only a PrimFunc with ``tirx.is_scheduled`` true counts as scheduled; the list is sorted."""
    report = FusionReport()
    out = RecordUnscheduled(report)(Scheduled)
    assert report.unscheduled == ["bare", "naive"]
    tvm.ir.assert_structural_equal(out, Scheduled)


def test_report_of_the_cpu_pipeline_names_the_built_kernels():
    """Through codegen/llvm.fusion and .lowering: eight ops before fusion; after it two launches,
    recorded in the order the lowered main calls them and under the names of the PrimFuncs it calls,
    with their source ops, W read by the matmul kernel, and no kernel left unscheduled by CPUDefault."""
    report = FusionReport()
    target = tvm.target.Target("llvm")
    with target:
        lowered = llvm.lowering(target, report)(llvm.fusion(target, report)(Model))
    prims = {gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    calls = []
    relax.analysis.post_order_visit(lowered["main"], lambda e: calls.append(e.op.name_hint)
                                    if isinstance(e, relax.Call) and isinstance(e.op, relax.GlobalVar) else None)
    assert report.before == 8 and report.launches == 2
    assert report.groups == {"fused_multiply_sum_right_shift_add": ["multiply", "sum", "right_shift", "sum",
                                                                    "right_shift", "add", "add"]}
    assert report.sequence == ["matmul", "fused_multiply_sum_right_shift_add"] == calls
    assert set(report.sequence) == prims
    assert report.readers == {digest(W.astype(np.int32)): "matmul"}
    assert report.unscheduled == []
