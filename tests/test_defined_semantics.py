"""Conversions and shifts with one answer on every machine (passes/defined_semantics.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import make_model, runnable_cpus
from onnx import TensorProto, helper
from tvm.script import relax as R

import compiler
from compiler import CompileOptions
from passes.defined_semantics import DefinedSemantics, float_bounds
from runtime.golden import saturating_cast


@tvm.script.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((4,), "float32"), i: R.Tensor((4,), "int8"), s: R.Tensor((4,), "int8")):
        with R.dataflow():
            a = R.astype(x, "int8")
            b = R.right_shift(i, s)
            c = R.left_shift(i, R.const(3, "int8"))        # a constant amount in range: left alone
            R.output(a, b, c)
        return (a, b, c)


@tvm.script.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((4,), "float32"), i: R.Tensor((4,), "int8"), s: R.Tensor((4,), "int8")):
        with R.dataflow():
            a = R.astype(R.where(R.isnan(x), R.const(0, "float32"), R.clip(x, -128.0, 127.0)), "int8")
            inside = R.logical_and(R.greater_equal(s, R.const(0, "int8")), R.less_equal(s, R.const(7, "int8")))
            b = R.right_shift(i, R.where(inside, s, R.const(7, "int8")))
            c = R.left_shift(i, R.const(3, "int8"))
            R.output(a, b, c)
        return (a, b, c)


def test_casts_and_shifts_become_total_functions():
    tvm.ir.assert_structural_equal(DefinedSemantics()(Before), Expected)


def test_float_bounds_round_inward():
    assert float_bounds(-(2**31), 2**31 - 1, "float32") == (-(2.0**31), 2147483520.0)
    assert float_bounds(0, 255, "float16") == (0.0, 255.0)
    assert float_bounds(-(2**31), 2**31 - 1, "float16") == (-65504.0, 65504.0)


EXTREMES = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 3e9, -3e9, 300, -300, 255.9, 128.5, 2.6, -2.6, -0.9,
                     0, 7], np.float32)
SHIFT_X = np.array([-8, 4, -1, 5, -128, 3, 127, 64], np.int8)
SHIFT_Y = np.array([8, 9, 127, -1, 7, 2, -128, 1], np.int8)
CASTS = {"i32": (TensorProto.INT32, np.int32), "u8": (TensorProto.UINT8, np.uint8), "i8": (TensorProto.INT8, np.int8),
         "i64": (TensorProto.INT64, np.int64), "u16": (TensorProto.UINT16, np.uint16)}


def _model():
    nodes = [helper.make_node("Cast", ["x"], [k], to=t) for k, (t, _) in CASTS.items()]
    nodes += [helper.make_node("BitShift", ["i", "s"], ["left"], direction="LEFT"),
              helper.make_node("BitShift", ["i", "s"], ["right"], direction="RIGHT"),
              helper.make_node("BitShift", ["u", "v"], ["uright"], direction="RIGHT")]
    io = [("x", TensorProto.FLOAT), ("i", TensorProto.INT8), ("s", TensorProto.INT8), ("u", TensorProto.UINT8),
          ("v", TensorProto.UINT8)]
    outs = [(k, t) for k, (t, _) in CASTS.items()] + [("left", TensorProto.INT8), ("right", TensorProto.INT8),
                                                    ("uright", TensorProto.UINT8)]
    size = {"x": len(EXTREMES), **{k: len(EXTREMES) for k in CASTS}}
    return make_model(nodes, [helper.make_tensor_value_info(k, t, [size.get(k, 8)]) for k, t in io],
                      [helper.make_tensor_value_info(k, t, [size.get(k, 8)]) for k, t in outs], opset=18)


def _expected(u, v) -> dict[str, np.ndarray]:
    """ONNX BitShift (opset 28): an amount outside [0, width) leaves the sign fill alone."""
    out = {k: saturating_cast(EXTREMES, np.iinfo(d).min, np.iinfo(d).max).astype(d) for k, (_, d) in CASTS.items()}
    x, y = SHIFT_X.astype(np.int64), SHIFT_Y.astype(np.int64)
    inside = (y >= 0) & (y < 8)
    out["left"] = np.where(inside, (x << np.clip(y, 0, 7)) & 0xFF, 0).astype(np.uint8).view(np.int8)
    out["right"] = np.where(inside, x >> np.clip(y, 0, 7), np.where(x < 0, -1, 0)).astype(np.int8)
    out["uright"] = np.where(v < 8, u.astype(np.int64) >> np.clip(v, 0, 7), 0).astype(np.uint8)
    return out


@pytest.mark.parametrize("cpu", runnable_cpus())
def test_every_isa_path_gives_the_defined_answer(cpu):
    """NaN, +-inf and out-of-range floats, and shift amounts past the width or negative: the same
    integers on every ISA path this machine executes, and the ones the rule defines."""
    u = np.array([200, 1, 255, 128, 7, 9, 3, 255], np.uint8)
    v = np.array([1, 8, 9, 255, 7, 0, 2, 3], np.uint8)
    art = compiler.compile(_model(), options=CompileOptions(target_options={"mcpu": cpu}))
    got = art.run({"x": EXTREMES, "i": SHIFT_X, "s": SHIFT_Y, "u": u, "v": v})
    for k, want in _expected(u, v).items():
        np.testing.assert_array_equal(got[k], want, err_msg=f"{k} on {cpu}")


def test_constant_casts_fold_by_the_same_rule():
    c = helper.make_tensor("c", TensorProto.FLOAT, [len(EXTREMES)], EXTREMES.tolist())
    nodes = [helper.make_node("Cast", ["c"], ["k"], to=TensorProto.INT8),
             helper.make_node("Add", ["k", "z"], ["y"])]
    m = make_model(nodes, [helper.make_tensor_value_info("z", TensorProto.INT8, [len(EXTREMES)])],
                   [helper.make_tensor_value_info("y", TensorProto.INT8, [len(EXTREMES)])], [c], opset=18)
    z = np.zeros(len(EXTREMES), np.int8)
    np.testing.assert_array_equal(compiler.compile(m).run({"z": z})["y"],
                                  saturating_cast(EXTREMES, -128, 127).astype(np.int8))
