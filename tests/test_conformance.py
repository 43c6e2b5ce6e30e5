"""lowbit as an ONNX backend: ONNX's node tests of the quantization ops through onnx's own
BackendTest, the committed passing set, and the backend's parameter binding."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from compiler import frontend
from compiler.tools import conformance


@pytest.fixture(scope="module")
def cases():
    return conformance.node_cases()


@pytest.fixture(scope="module")
def ops(cases):
    return conformance.op_of(cases)


def passing_set() -> set[str]:
    return set(conformance.PASSING.read_text().split())


def test_quantization_cases_pass(cases, ops):
    """The 45 node tests of QuantizeLinear, DequantizeLinear, QLinearConv, QLinearMatMul,
    MatMulInteger, ConvInteger and DynamicQuantizeLinear: every one of the passing set still
    passes, and at least 40 pass (int4/uint4/int2/uint2, float8/float4 dequantize, blocked)."""
    names = [c.name for c in cases if ops[c.name] in conformance.QUANTIZATION_OPS]
    assert len(names) == 45
    outcome = conformance.run_cases(names)
    regressed = sorted(n for n in names if n in passing_set() and outcome[n] != "pass")
    assert not regressed, f"no longer pass: {regressed}"
    assert sum(r == "pass" for r in outcome.values()) >= 40, outcome


def test_passing_set_names_real_cases(cases):
    """A renamed or mistyped case in passing.txt would silently stop being checked."""
    unknown = passing_set() - {c.name for c in cases}
    assert not unknown


def test_undefined_cases_are_told_apart_and_never_in_the_passing_set(cases):
    """A Cast of -9.0 to int4 is undefined by ONNX, so its expected output is whatever the machine
    that generated it computed: such a case has its own column and cannot be in the passing set
    (CI would pass or fail with the CPU).  In-range casts and BitShift's defined edge cases stay."""
    by_name = {c.name: c for c in cases}
    undefined = {n for n, c in by_name.items() if n.startswith(("test_cast", "test_bitshift")) and conformance.undefined(c)}
    assert {"test_castlike_FLOAT_to_INT4", "test_cast_FLOAT_to_UINT2", "test_castlike_FLOAT16_to_INT4_expanded"} <= undefined
    assert "Cast of -9.0 to int4" == conformance.undefined(by_name["test_cast_FLOAT_to_INT4"])
    assert not undefined & {"test_cast_FLOAT_to_INT8", "test_cast_FLOAT_to_UINT8", "test_bitshift_right_int8_shift_ge_width"}
    assert not undefined & passing_set()
    # the defined edges of BitShift (an amount past the width, or negative) are lowbit's to pass
    names = ["test_bitshift_left_int8_shift_ge_width", "test_bitshift_right_int8_negative_shift",
             "test_bitshift_right_int32_shift_ge_width"]
    assert set(conformance.run_cases(names).values()) == {"pass"}


def test_unsupported_is_decided_by_the_op_list():
    """Unsupported ops are the ones neither TVM's importer nor lowbit's QOperator rewrite takes."""
    made_up = make_model([helper.make_node("Frobnicate", ["x"], ["y"])],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    assert list(frontend.unsupported_ops(made_up)) == ["Frobnicate"]
    assert not conformance.LowbitBackend.is_compatible(made_up)
    qlinear = make_model([helper.make_node("QLinearMatMul", list("abcdefgh"), ["y"])],
                         [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "abcdefgh"],
                         [helper.make_tensor_value_info("y", TensorProto.UINT8, [2])])
    assert not frontend.unsupported_ops(qlinear)


def _quantize_model(opset=21):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [])
    z = helper.make_tensor_value_info("z", TensorProto.INT4, [])
    y = helper.make_tensor_value_info("y", TensorProto.INT4, [4])
    return make_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], [x, s, z], [y], opset=opset)


def test_parameter_inputs_are_bound_per_value():
    """A scale fed as a graph input is compiled in as a constant; another value compiles again
    (0-d stays 0-d), and each run matches ONNX's reference evaluator, int4 saturation included."""
    import ml_dtypes

    model = _quantize_model()
    rep = conformance.LowbitBackend.prepare(model)
    x = np.array([-9.0, -2.6, 0.4, 30.0], np.float32)
    ref = ReferenceEvaluator(model)
    results = []
    for scale in (np.float32(0.5), np.float32(2.0)):
        z = np.array(1, ml_dtypes.int4)
        (got,) = rep.run([x, scale, z])
        (want,) = ref.run(None, {"x": x, "s": np.asarray(scale), "z": z})
        assert got.dtype == want.dtype and got.shape == (4,)
        np.testing.assert_array_equal(got.astype(np.int8), want.astype(np.int8))
        results.append(got.astype(np.int8))
    assert not np.array_equal(*results)


def test_zero_d_inputs_and_outputs_stay_zero_d():
    model = make_model([helper.make_node("Add", ["a", "b"], ["y"])],
                       [helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in "ab"],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    (y,) = conformance.LowbitBackend.prepare(model).run([np.float32(1.5), np.array(2.25, np.float32)])
    assert y.shape == () and y == np.float32(3.75)


def test_ort_column_clamps_the_model_versions(cases):
    """ORT 1.31 loads IR <= 10: the opset-28 / IR-14 cases run on it only after clamping."""
    case = next(c for c in cases if c.name == "test_dequantizelinear")
    assert case.model.ir_version > conformance.ORT_MAX_IR
    assert conformance.ort_result(case) == "pass"
    with pytest.raises(Exception, match="(?i)ir_version|unsupported model"):
        import onnxruntime as ort
        ort.InferenceSession(case.model.SerializeToString(), providers=["CPUExecutionProvider"])
