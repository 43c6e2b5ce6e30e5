"""OrderShapeHeap (passes/shape_heap.py): VMShapeLower's shape-function stores in slot order.

VMShapeLower emits the ready slots of one batch in ``unordered_map`` order, so the same model
compiled in two processes could give two libraries (tests/test_determinism.py).  The pass sorts a
batch of independent stores by slot; a batch where one store reads another's slot keeps its order.
"""

from __future__ import annotations

import numpy as np
import tvm
from conftest import mlp_model
from onnx.reference import ReferenceEvaluator
from tvm import tirx
from tvm.ir.instrument import pass_instrument
from tvm.script import ir as I
from tvm.script import tirx as T

import compiler
from codegen import llvm
from compiler.options import CompileOptions
from passes.shape_heap import OrderShapeHeap, after_shape_lowering


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def shape_func(H: T.Buffer((T.int64(4),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[T.int64(3)] = T.int64(4) * H[T.int64(0)] * T.int64(4)
        H[T.int64(1)] = T.int64(64) * H[T.int64(0)]
        H[T.int64(2)] = T.Cast("int64", T.int32(2)) + H[T.int64(0)]


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def shape_func(H: T.Buffer((T.int64(4),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[T.int64(1)] = T.int64(64) * H[T.int64(0)]
        H[T.int64(2)] = T.Cast("int64", T.int32(2)) + H[T.int64(0)]
        H[T.int64(3)] = T.int64(4) * H[T.int64(0)] * T.int64(4)


@I.ir_module
class Dependent:
    @T.prim_func(private=True, s_tir=True)
    def shape_func(H: T.Buffer((T.int64(3),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[T.int64(2)] = T.int64(64) * H[T.int64(0)]
        H[T.int64(1)] = H[T.int64(2)] + T.int64(1)       # reads a slot of its own batch


def test_independent_stores_are_sorted_by_slot():
    tvm.ir.assert_structural_equal(OrderShapeHeap()(Before), Expected)


def test_sorted_stores_are_left_alone():
    tvm.ir.assert_structural_equal(OrderShapeHeap()(Expected), Expected)


def test_a_batch_that_reads_its_own_slots_keeps_its_order():
    tvm.ir.assert_structural_equal(OrderShapeHeap()(Dependent), Dependent)


def test_the_vm_pipelines_order_the_heap_after_vm_shape_lower():
    names = [p.info.name for p in after_shape_lowering(llvm.cpu.finalize_passes(tvm.target.Target("llvm")))]
    assert names[names.index("VMShapeLower") + 1] == "lowbit.OrderShapeHeap"


def _stores(mod: tvm.IRModule) -> list[list[int]]:
    out = []
    for _, f in mod.functions_items():
        if isinstance(f, tirx.PrimFunc) and isinstance(f.body, tirx.SeqStmt) and \
                all(isinstance(s, tirx.BufferStore) for s in f.body.seq):
            out.append([int(s.indices[0].value) for s in f.body.seq])
    return out


def test_a_dynamic_batch_model_compiles_with_sorted_shape_stores_and_runs():
    """End to end: the dynamic-batch MLP's shape function (slots computed from N) comes out of the
    CPU pipeline sorted, and the program still runs at two batch sizes, as ONNX's reference does."""
    seen = []

    @pass_instrument
    class Watch:
        def run_after_pass(self, mod, info):
            if info.name == "lowbit.OrderShapeHeap":
                seen.extend(_stores(mod))

    model = mlp_model()
    with tvm.transform.PassContext(opt_level=3, instruments=[Watch()]):
        art = compiler.compile(model, options=CompileOptions())
    assert any(len(s) >= 2 for s in seen) and all(s == sorted(s) for s in seen), seen
    reference = ReferenceEvaluator(model)
    for n in (1, 5):
        x = np.random.default_rng(n).normal(size=(n, 8)).astype(np.float32)
        np.testing.assert_allclose(art.run({"x": x})["y"], reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
