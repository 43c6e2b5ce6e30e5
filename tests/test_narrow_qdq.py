"""Quantize / dequantize in types TVM has no tensors for (compiler/narrow_qdq.py)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from compiler import driver, narrow_qdq
from runtime import types
from runtime.errors import UserError


def _int_weight_mlp(w_type: int, w: np.ndarray) -> object:
    """x -> Q(u8) -> DQ -> MatMul(DQ(w, per column)) -> Q(u8) -> DQ -> y, weights stored as ``w_type``."""
    rng = np.random.default_rng(3)
    scales = rng.uniform(0.02, 0.05, w.shape[1]).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(np.array(0.1, np.float32), "ys"), numpy_helper.from_array(np.array(100, np.uint8), "yz"),
             numpy_helper.from_array(scales, "ws"), numpy_helper.from_array(np.zeros(w.shape[1], w.dtype), "wz"),
             numpy_helper.from_array(w, "w")]
    for t in inits[-2:]:                                     # the same values in the narrow type
        t.CopyFrom(helper.make_tensor(t.name, w_type, t.dims, numpy_helper.to_array(t).astype(np.int64).ravel()))
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=1),
             helper.make_node("MatMul", ["xf", "wf"], ["h"]),
             helper.make_node("QuantizeLinear", ["h", "ys", "yz"], ["hq"]),
             helper.make_node("DequantizeLinear", ["hq", "ys", "yz"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])], inits, opset=21)


def test_int4_weights_lower_to_the_same_integer_code_as_int8():
    """int4 weights are carried in int8 with the same values: the build is integer-only and its
    outputs are bit-identical to the model storing those values as int8."""
    w = np.random.default_rng(0).integers(-8, 8, (16, 8)).astype(np.int8)
    x = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    narrow = driver.compile(_int_weight_mlp(TensorProto.INT4, w))
    wide = driver.compile(_int_weight_mlp(TensorProto.INT8, w))
    assert narrow.manifest.integer_only
    np.testing.assert_array_equal(narrow.run(x)["y"], wide.run(x)["y"])


def _dequantize_model(x_type: int, shape, scale: float, zp: float | None = None):
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s")]
    if zp is not None:
        inits.append(helper.make_tensor("z", x_type, [], [zp]))
    node = helper.make_node("DequantizeLinear", ["x", "s"] + (["z"] if zp is not None else []), ["y"])
    return make_model([node], [helper.make_tensor_value_info("x", x_type, shape)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits, opset=21)


@pytest.mark.parametrize("x_type, dtype", [(TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn),
                                           (TensorProto.FLOAT8E5M2, ml_dtypes.float8_e5m2)])
def test_float8_dequantize_decodes_every_code(x_type, dtype):
    """All 256 bit patterns in, (decode(x) - decode(zp)) * scale out: exact, NaN where NaN."""
    x = np.arange(256, dtype=np.uint8).view(dtype)
    zp = np.array(0.5, dtype)
    model = _dequantize_model(x_type, [256], 0.25, 0.5)
    got = driver.compile(model).run(x)["y"]
    want = (x.astype(np.float32) - np.float32(zp.astype(np.float32))) * np.float32(0.25)
    np.testing.assert_array_equal(got, want)        # NaN positions must match too


def test_quantize_to_float8_is_refused_in_one_line():
    model = make_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, [4])],
                       [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
                        helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0])], opset=21)
    with pytest.raises(UserError, match=r"node 'y' \(QuantizeLinear\): quantizing to float8_e4m3fn") as exc:
        driver.compile(model)
    assert "\n" not in str(exc.value)


def test_blocked_weights_run_as_float_and_match_the_reference():
    """A MatMul whose weights are dequantized per block of 4 rows (the LLM weight-only layout)."""
    rng = np.random.default_rng(2)
    w = rng.integers(0, 256, (8, 6)).astype(np.uint8)
    s = rng.uniform(0.01, 0.1, (2, 6)).astype(np.float32)
    z = rng.integers(100, 156, (2, 6)).astype(np.uint8)
    model = make_model([helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=0, block_size=4),
                        helper.make_node("MatMul", ["x", "wf"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
                       [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (s, "s"), (z, "z"))], opset=21)
    x = rng.normal(size=(2, 8)).astype(np.float32)
    (want,) = ReferenceEvaluator(model).run(None, {"x": x})
    np.testing.assert_allclose(driver.compile(model).run(x)["y"], want, rtol=1e-5, atol=1e-5)


def test_per_axis_activation_quantization_runs_as_float_and_is_refused_on_rv32(rv32_toolchain):
    """Per-channel scales and zero points on an activation other than a feature map's channels: the
    integer lowering takes those only on an NCHW feature map (a depthwise convolution's input), so
    the pair runs as the spec's float arithmetic (exactly ONNX's reference) on the CPU, and the
    rv32 target, which runs integer-only models, refuses it in one line."""
    scale = numpy_helper.from_array(np.array([0.1, 0.05, 0.2, 0.5], np.float32), "s")
    zero = numpy_helper.from_array(np.array([0, 10, 128, 255], np.uint8), "z")
    model = make_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_in", axis=1),
                        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq_in", axis=1)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])], [scale, zero], opset=21)
    x = np.random.default_rng(4).normal(0, 20, (1, 4, 3)).astype(np.float32)
    (want,) = ReferenceEvaluator(model).run(None, {"x": x})
    np.testing.assert_array_equal(driver.compile(model).run(x)["y"], want)
    with pytest.raises(UserError, match="not integer-only") as exc:
        driver.compile(model, "rv32")
    assert "\n" not in str(exc.value)


def test_the_artifact_containers_match_the_onnx_types():
    """runtime/types.CONTAINERS (what Artifact.run converts, with no ONNX import) is the table
    narrow_qdq.container gives, by numpy dtype name."""
    def name(t):
        return np.dtype(helper.tensor_dtype_to_np_dtype(t)).name

    assert types.CONTAINERS == {name(t): name(narrow_qdq.container(t))
                                for t in (*narrow_qdq.NARROW_INT, *narrow_qdq.FLOAT_CODES)}
    assert types.FLOAT_CODES == {name(t) for t in narrow_qdq.FLOAT_CODES}
