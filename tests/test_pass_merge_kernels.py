"""MergeKernels (passes/merge_kernels.py): FuseOps' groups merged into one kernel per row-wise
operator and per contraction.

The pass runs right after ``FuseOps`` and before ``FuseTIR`` (codegen/llvm.fusion), so its input is a
``main`` whose bindings call legalized PrimFuncs directly (``call_tir``) or through FuseOps'
``Primitive`` group functions.
"""

from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from passes.merge_kernels import TILE_EPILOGUE, MergeKernels


@I.ir_module
class RowChain:
    """A row sum read only by an elementwise kernel: two launches FuseOps left apart."""

    @T.prim_func(private=True, s_tir=True)
    def right_shift(s: T.Buffer((T.int64(2),), "int32"), T_right_shift: T.Buffer((T.int64(2),), "int32")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for ax0 in range(T.int64(2)):
            with T.sblock("T_right_shift"):
                v_ax0 = T.axis.spatial(T.int64(2), ax0)
                T.reads(s[v_ax0])
                T.writes(T_right_shift[v_ax0])
                T_right_shift[v_ax0] = s[v_ax0] >> 2

    @T.prim_func(private=True, s_tir=True)
    def sum(x: T.Buffer((T.int64(2), T.int64(4)), "int32"), x_red: T.Buffer((T.int64(2),), "int32")):
        T.func_attr({"op_pattern": 3, "tirx.noalias": True})
        for ax0, k1 in T.grid(T.int64(2), T.int64(4)):
            with T.sblock("x_red"):
                v_ax0, v_k1 = T.axis.remap("SR", [ax0, k1])
                T.reads(x[v_ax0, v_k1])
                T.writes(x_red[v_ax0])
                with T.init():
                    x_red[v_ax0] = 0
                x_red[v_ax0] = x_red[v_ax0] + x[v_ax0, v_k1]

    @R.function
    def main(x: R.Tensor((2, 4), "int32")) -> R.Tensor((2,), "int32"):
        cls = RowChain
        with R.dataflow():
            s = R.call_tir(cls.sum, (x,), out_ty=R.Tensor((2,), "int32"))
            y = R.call_tir(cls.right_shift, (s,), out_ty=R.Tensor((2,), "int32"))
            R.output(y)
        return y


@I.ir_module
class RowChainMerged:
    @T.prim_func(private=True, s_tir=True)
    def right_shift(s: T.Buffer((T.int64(2),), "int32"), T_right_shift: T.Buffer((T.int64(2),), "int32")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for ax0 in range(T.int64(2)):
            with T.sblock("T_right_shift"):
                v_ax0 = T.axis.spatial(T.int64(2), ax0)
                T.reads(s[v_ax0])
                T.writes(T_right_shift[v_ax0])
                T_right_shift[v_ax0] = s[v_ax0] >> 2

    @T.prim_func(private=True, s_tir=True)
    def sum(x: T.Buffer((T.int64(2), T.int64(4)), "int32"), x_red: T.Buffer((T.int64(2),), "int32")):
        T.func_attr({"op_pattern": 3, "tirx.noalias": True})
        for ax0, k1 in T.grid(T.int64(2), T.int64(4)):
            with T.sblock("x_red"):
                v_ax0, v_k1 = T.axis.remap("SR", [ax0, k1])
                T.reads(x[v_ax0, v_k1])
                T.writes(x_red[v_ax0])
                with T.init():
                    x_red[v_ax0] = 0
                x_red[v_ax0] = x_red[v_ax0] + x[v_ax0, v_k1]

    @R.function(private=True)
    def fused_sum_right_shift(p0: R.Tensor((2, 4), "int32")) -> R.Tensor((2,), "int32"):
        R.func_attr({"Primitive": True})
        cls = RowChainMerged
        with R.dataflow():
            s = R.call_tir(cls.sum, (p0,), out_ty=R.Tensor((2,), "int32"))
            y = R.call_tir(cls.right_shift, (s,), out_ty=R.Tensor((2,), "int32"))
            gv = y
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((2, 4), "int32")) -> R.Tensor((2,), "int32"):
        cls = RowChainMerged
        with R.dataflow():
            y = cls.fused_sum_right_shift(x)
            R.output(y)
        return y


@I.ir_module
class Unmergeable:
    """Three kernels the rules keep apart:
    * ``s``, a row sum read only by a contraction (``dot``): no reduction in a GEMM prologue;
    * ``s2``, a sum that is also a result of ``main``;
    * ``t``, an elementwise kernel (not a view) read by two kernels."""

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
    def dot(a: T.Buffer((T.int64(2),), "int32"), w: T.Buffer((T.int64(2),), "int32"),
            out: T.Buffer((T.int64(1),), "int32")):
        T.func_attr({"op_pattern": 4, "tirx.noalias": True})
        for i, k in T.grid(T.int64(1), T.int64(2)):
            with T.sblock("dot"):
                v_i, v_k = T.axis.remap("SR", [i, k])
                with T.init():
                    out[v_i] = 0
                out[v_i] = out[v_i] + a[v_k] * w[v_k]

    @T.prim_func(private=True, s_tir=True)
    def right_shift(s: T.Buffer((T.int64(2),), "int32"), T_right_shift: T.Buffer((T.int64(2),), "int32")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for ax0 in range(T.int64(2)):
            with T.sblock("T_right_shift"):
                v_ax0 = T.axis.spatial(T.int64(2), ax0)
                T_right_shift[v_ax0] = s[v_ax0] >> 2

    @R.function
    def main(x: R.Tensor((2, 4), "int32"), w: R.Tensor((2,), "int32")):
        cls = Unmergeable
        with R.dataflow():
            s = R.call_tir(cls.sum, (x,), out_ty=R.Tensor((2,), "int32"))
            d = R.call_tir(cls.dot, (s, w), out_ty=R.Tensor((1,), "int32"))
            s2 = R.call_tir(cls.sum, (x,), out_ty=R.Tensor((2,), "int32"))
            r1 = R.call_tir(cls.right_shift, (s2,), out_ty=R.Tensor((2,), "int32"))
            t = R.call_tir(cls.right_shift, (w,), out_ty=R.Tensor((2,), "int32"))
            r2 = R.call_tir(cls.right_shift, (t,), out_ty=R.Tensor((2,), "int32"))
            r3 = R.call_tir(cls.right_shift, (t,), out_ty=R.Tensor((2,), "int32"))
            R.output(d, s2, r1, r2, r3)
        return (d, s2, r1, r2, r3)


W = np.arange(64).reshape(8, 8) % 7 - 3


@I.ir_module
class Scores:
    """An integer attention row: a head view (transpose) read by the score matmul and by a row sum,
    the scores, and a Shiftmax-like normalization (row max, clamp, row sum, divide)."""

    @R.function
    def main(x: R.Tensor((8, 4), "int32")) -> R.Tensor((4, 8), "int32"):
        with R.dataflow():
            xt = R.permute_dims(x)
            s = R.matmul(xt, R.const(W, "int32"))
            mx = R.max(s, axis=[1], keepdims=True)
            p = R.maximum(R.add(R.subtract(s, mx), R.const(1024, "int32")), R.const(0, "int32"))
            t = R.sum(p, axis=[1], keepdims=True)
            y = R.floor_divide(R.multiply(p, R.const(255, "int32")), R.add(t, R.const(1, "int32")))
            z = R.add(y, R.sum(xt, axis=[1], keepdims=True))
            R.output(z)
        return z


@I.ir_module
class SymbolicScores:
    """Scores with a symbolic row count."""

    @R.function
    def main(x: R.Tensor((8, "n"), "int32")) -> R.Tensor(("n", 8), "int32"):
        with R.dataflow():
            s = R.matmul(R.permute_dims(x), R.const(W, "int32"))
            mx = R.max(s, axis=[1], keepdims=True)
            p = R.maximum(R.add(R.subtract(s, mx), R.const(1024, "int32")), R.const(0, "int32"))
            y = R.floor_divide(p, R.add(R.sum(p, axis=[1], keepdims=True), R.const(1, "int32")))
            R.output(y)
        return y


def _fuse(mod: tvm.IRModule) -> tvm.IRModule:
    """codegen/llvm.fusion's TVM passes up to FuseOps: MergeKernels' input."""
    t = relax.transform
    with tvm.target.Target("llvm"):
        return tvm.transform.Sequential([t.LegalizeOps(), t.AnnotateTIROpPattern(), t.FoldConstant(),
                                         t.FuseOps()])(mod)


def _kernels(mod: tvm.IRModule) -> list[tuple[str, list[str]]]:
    """(kernel, its source ops in order) for each launch of ``main``."""
    def ops(expr):
        found = []
        relax.analysis.post_order_visit(expr, lambda e: found.append(re.sub(r"\d+$", "", e.args[0].name_hint))
                                        if isinstance(e, relax.Call) and e.op == tvm.ir.Op.get("relax.call_tir")
                                        else None)
        return found

    out = []
    for b in mod["main"].body.blocks[0].bindings:
        if isinstance(b.value, relax.Call) and isinstance(b.value.op, relax.GlobalVar):
            out.append((b.value.op.name_hint, ops(mod[b.value.op])))
        elif isinstance(b.value, relax.Call):
            out.append((b.value.args[0].name_hint, ops(b.value)))
    return out


def _scores_numpy(x: np.ndarray) -> np.ndarray:
    xt = x.T.astype(np.int64)
    s = xt @ W
    p = np.maximum(s - s.max(axis=1, keepdims=True) + 1024, 0)
    y = (p * 255) // (p.sum(axis=1, keepdims=True) + 1)
    return (y + xt.sum(axis=1, keepdims=True)).astype(np.int32)


def test_row_chain_becomes_one_primitive_kernel():
    """A reduction read by one elementwise kernel joins it: one ``Primitive`` function running both
    call_tirs, named after its ops, called once from ``main``; the PrimFuncs are untouched."""
    tvm.ir.assert_structural_equal(MergeKernels()(RowChain), RowChainMerged)


def test_gemm_prologue_escaping_values_and_shared_non_views_stay_apart():
    """A reduction feeding a contraction, a kernel whose result leaves ``main``, and an elementwise
    kernel read twice: nothing merges, the module is unchanged."""
    tvm.ir.assert_structural_equal(MergeKernels()(Unmergeable), Unmergeable)


def test_scores_and_their_normalization_are_one_kernel():
    """FuseOps leaves the attention row as seven launches; MergeKernels makes one: the view, the score
    matmul (its only reader is a two-reduction normalization) and every row-wise piece."""
    fused = _fuse(Scores)
    assert [k for k, _ in _kernels(fused)] == ["transpose", "matmul", "max", "fused_subtract_add_maximum", "sum",
                                               "sum", "fused_multiply_add1_floor_divide_add2"]
    assert _kernels(MergeKernels()(fused)) == [
        ("fused_transpose_matmul_max_subtract_add_maximum",
         ["transpose", "matmul", "max", "subtract", "add", "maximum", "sum", "sum", "multiply", "add", "floor_divide",
          "add"])]


def test_without_row_contractions_the_view_is_copied_into_each_reader():
    """``row_contractions=False`` (GPUs): the matmul stays its own kernel, and the transpose, read by
    the matmul and by the row sum, is recomputed inside both kernels rather than materialized."""
    assert _kernels(MergeKernels(row_contractions=False)(_fuse(Scores))) == [
        ("fused_transpose_matmul", ["transpose", "matmul"]),
        ("fused_transpose_max_subtract_add_maximum_sum",
         ["transpose", "max", "subtract", "add", "maximum", "sum", "sum", "multiply", "add", "floor_divide", "add"])]


def test_symbolic_shapes_are_not_merged():
    """FuseTIR cannot bind a symbolic dimension no parameter carries, so kernels over ``n`` rows keep
    FuseOps' grouping unchanged."""
    fused = _fuse(SymbolicScores)
    tvm.ir.assert_structural_equal(MergeKernels()(fused), fused)


def test_merged_kernels_are_bit_exact():
    """After FuseTIR, both merged forms compute numpy's integer result exactly."""
    x = np.random.default_rng(3).integers(-60, 60, size=(8, 4)).astype(np.int32)
    x[:, 0] = [60, -60, 59, 0, 1, -1, 7, 3]
    want = _scores_numpy(x)
    for row_contractions in (True, False):
        merged = relax.transform.FuseTIR()(MergeKernels(row_contractions)(_fuse(Scores)))
        prims = [gv.name_hint for gv, f in merged.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
        assert len(prims) == (1 if row_contractions else 2), prims
        vm = relax.VirtualMachine(tvm.compile(merged, target="llvm"), tvm.cpu())
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), want)


def _tiled_then_contraction(tile_epilogue: bool, steps: int = 1) -> tvm.IRModule:
    """A hand-written kernel's int32 result -> ``steps`` elementwise kernels -> a matmul; the first
    kernel marked TILE_EPILOGUE or not."""

    @T.prim_func(private=True, s_tir=True)
    def tiled(x: T.Buffer((T.int64(2), T.int64(4)), "int8"), acc: T.Buffer((T.int64(2), T.int64(4)), "int32")):
        T.func_attr({"op_pattern": 8, "tirx.is_scheduled": True, "tirx.noalias": True})
        for i, j in T.grid(T.int64(2), T.int64(4)):
            acc[i, j] = T.Cast("int32", x[i, j]) * 3

    @T.prim_func(private=True, s_tir=True)
    def shift(acc: T.Buffer((T.int64(2), T.int64(4)), "int32"), out: T.Buffer((T.int64(2), T.int64(4)), "int32")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for i, j in T.grid(T.int64(2), T.int64(4)):
            with T.sblock("shift"):
                vi, vj = T.axis.remap("SS", [i, j])
                out[vi, vj] = acc[vi, vj] >> 1

    @T.prim_func(private=True, s_tir=True)
    def matmul(a: T.Buffer((T.int64(2), T.int64(4)), "int32"), w: T.Buffer((T.int64(4), T.int64(2)), "int32"),
               out: T.Buffer((T.int64(2), T.int64(2)), "int32")):
        T.func_attr({"op_pattern": 4, "tirx.noalias": True})
        for i, j, k in T.grid(T.int64(2), T.int64(2), T.int64(4)):
            with T.sblock("matmul"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    out[vi, vj] = 0
                out[vi, vj] = out[vi, vj] + a[vi, vk] * w[vk, vj]

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4), "int8"))
    w = relax.Var("w", relax.TensorType((4, 2), "int32"))
    kernel = tiled.with_attr(TILE_EPILOGUE, True) if tile_epilogue else tiled
    with bb.function("main", [x, w]):
        with bb.dataflow():
            acc = bb.emit(relax.call_tir(bb.add_func(kernel, "tiled"), [x], relax.TensorType((2, 4), "int32")))
            s = acc
            for _ in range(steps):
                s = bb.emit(relax.call_tir(bb.add_func(shift, "shift"), [s], relax.TensorType((2, 4), "int32")))
            y = bb.emit_output(relax.call_tir(bb.add_func(matmul, "matmul"), [s, w], relax.TensorType((2, 2), "int32")))
        bb.emit_func_output(y)
    return bb.get()


def test_a_tile_epilogue_stays_out_of_the_next_contraction():
    """The elementwise kernel after a TILE_EPILOGUE kernel (codegen/amx.py) is left whole for
    codegen/tile_epilogue.py to move into the tiles; after any other kernel it is the matmul's
    prologue."""
    marked = _tiled_then_contraction(True)
    tvm.ir.assert_structural_equal(MergeKernels()(marked), marked)
    merged = _kernels(MergeKernels()(_tiled_then_contraction(False)))
    assert [ops for _, ops in merged] == [["tiled"], ["shift", "matmul"]], merged
    # a second elementwise step (EfficientNet's SiLU table) stays out of the matmul's prologue too
    chain = _tiled_then_contraction(True, steps=2)
    tvm.ir.assert_structural_equal(MergeKernels()(chain), chain)


def test_a_row_reduction_does_not_join_a_layout_copy_of_more_rows():
    """A row sum read only by a copy into rows padded to a tile (AMX's input rows): merged, no row
    loop would hold both (3 rows computed, 4 written) and the kernel went unscheduled (DeiT-tiny's
    I-LayerNorms, 52 us each); apart, the sum runs row-parallel and the copy is its own launch."""

    @T.prim_func(private=True, s_tir=True)
    def padded(s: T.Buffer((T.int64(3),), "int32"), rows: T.Buffer((T.int64(4),), "int32")):
        T.func_attr({"op_pattern": 2, "tirx.noalias": True})
        for i in range(T.int64(4)):
            with T.sblock("rows"):
                vi = T.axis.spatial(T.int64(4), i)
                rows[vi] = T.if_then_else(vi < T.int64(3), s[T.min(vi, T.int64(2))], 0)

    @T.prim_func(private=True, s_tir=True)
    def row_sum(x: T.Buffer((T.int64(3), T.int64(4)), "int32"), x_red: T.Buffer((T.int64(3),), "int32")):
        T.func_attr({"op_pattern": 3, "tirx.noalias": True})
        for ax0, k1 in T.grid(T.int64(3), T.int64(4)):
            with T.sblock("x_red"):
                v_ax0, v_k1 = T.axis.remap("SR", [ax0, k1])
                with T.init():
                    x_red[v_ax0] = 0
                x_red[v_ax0] = x_red[v_ax0] + x[v_ax0, v_k1]

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 4), "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            s = bb.emit(relax.call_tir(bb.add_func(row_sum, "row_sum"), [x], relax.TensorType((3,), "int32")))
            y = bb.emit_output(relax.call_tir(bb.add_func(padded, "padded"), [s], relax.TensorType((4,), "int32")))
        bb.emit_func_output(y)
    mod = bb.get()
    tvm.ir.assert_structural_equal(MergeKernels()(mod), mod)
