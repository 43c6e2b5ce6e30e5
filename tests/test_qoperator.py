"""QOperator and ConvInteger models (ORT's quantizer output) compile and agree with ORT
to within one output step (the dequantized LSB)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import concat_cnn, make_model
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

import compiler
from compiler import qoperator
from compiler.tools import ort


def _residual_cnn() -> onnx.ModelProto:
    """Conv-Relu-Conv + identity Add, Relu, global pool, Gemm: every QOperator ORT emits for CNNs."""
    rng = np.random.default_rng(3)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)

    inits = [init("w1", 8, 4, 3, 3), init("b1", 8), init("w2", 8, 8, 3, 3), init("b2", 8),
             init("wfc", 5, 8), init("bfc", 5)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wfc", "bfc"], ["y"], transB=1, name="fc"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 10, 10])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)


def _mlp_matmul() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.normal(size=(16, 12)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])], [w])


def _se_sigmoid() -> onnx.ModelProto:
    """Conv, Sigmoid, LeakyRelu, global pool, Softmax: ORT's one-input QLinear ops (com.microsoft)."""
    rng = np.random.default_rng(6)
    w = numpy_helper.from_array((rng.normal(size=(6, 4, 3, 3)) * 0.3).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
             helper.make_node("LeakyRelu", ["s"], ["l"], alpha=0.2, name="leaky"),
             helper.make_node("GlobalAveragePool", ["l"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Softmax", ["f"], ["y"], axis=-1, name="softmax")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 10, 10])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], [w])


class _Reader:
    def __init__(self, x):
        self.it = iter([{"x": x[i : i + 4]} for i in range(0, len(x), 4)])

    def get_next(self):
        return next(self.it, None)


def _quantize(model, tmp_path, mode, per_channel):
    src, dst = tmp_path / "f.onnx", tmp_path / f"{mode}.onnx"
    onnx.save(model, src)
    shape = [d.dim_value or 8 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    if mode == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
    else:
        # 7-bit weights without VNNI: ORT's u8 x s8 saturates there (vpmaddubsw), and would not be the reference
        quantize_static(str(src), str(dst), _Reader(x), quant_format=QuantFormat.QOperator, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        reduce_range=not ort.host_has_vnni())
    return dst, x


def _output_lsb(path) -> float:
    """The scale of the DequantizeLinear that produces the graph output (one output step)."""
    m = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = m.graph.output[0].name
    node = next(n for n in m.graph.node if out in n.output)
    return float(np.max(inits[node.input[1]])) if node.op_type == "DequantizeLinear" else 0.0


@pytest.mark.parametrize("model_fn, per_channel, expect_ops", [
    (_residual_cnn, False, {"QLinearConv", "QLinearAdd", "QGemm"}),
    (_residual_cnn, True, {"QLinearConv", "QLinearAdd", "QGemm"}),
    (concat_cnn, True, {"QLinearConv", "QLinearConcat"}),
    (_se_sigmoid, True, {"QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax"}),
    (_mlp_matmul, False, {"QLinearMatMul"}),
    (_mlp_matmul, True, {"QLinearMatMul"}),
])
def test_qoperator_models_match_ort(tmp_path, model_fn, per_channel, expect_ops):
    path, x = _quantize(model_fn(), tmp_path, "static", per_channel)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert expect_ops <= ops, ops
    art = compiler.compile(path)
    assert not ({n.op_type for n in qoperator.to_qdq(onnx.load(path)).graph.node} & set(qoperator.CONVERTERS))
    want = onnxruntime.InferenceSession(str(path)).run(None, {"x": x})[0]
    got = art.run({"x": x})["y"]
    lsb = _output_lsb(path)
    assert lsb > 0
    assert np.abs(got - want).max() <= lsb + 1e-6, (np.abs(got - want).max(), lsb)


def test_conv_integer_matches_ort(tmp_path):
    path, x = _quantize(_residual_cnn(), tmp_path, "dynamic", False)
    assert "ConvInteger" in {n.op_type for n in onnx.load(path).graph.node}
    want = onnxruntime.InferenceSession(str(path)).run(None, {"x": x})[0]
    got = compiler.compile(path).run({"x": x})["y"]
    # ConvInteger itself is exact; the float epilogue (scale multiply, bias) may differ in the last bits
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_float16_scales_round_once_like_the_spec():
    """QLinearMatMul with float16 scales at opset 21, both operands at run time: the spec's result is
    the real-valued product rounded once, at the quantize.  Dequantized to float16, the sum and the
    division by y_scale would round to 11 bits first (254.58 became 254.5, then 254, in ONNX's own
    case); the rewrite computes in float32, which gives the exact value's rounding on these values."""
    rng = np.random.default_rng(11)
    a = rng.integers(0, 256, (32, 64), dtype=np.uint8)
    b = rng.integers(0, 256, (64, 32), dtype=np.uint8)
    sa, sb, sy = (np.array([s], np.float16) for s in (0.0066, 0.00705, 0.0856))
    za, zb, zy = (np.array([z], np.uint8) for z in (113, 114, 118))
    inits = [numpy_helper.from_array(v, k) for k, v in dict(sa=sa, za=za, sb=sb, zb=zb, sy=sy, zy=zy).items()]
    node = helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"], name="qmm")
    model = make_model([node], [helper.make_tensor_value_info("a", TensorProto.UINT8, [32, 64]),
                                helper.make_tensor_value_info("b", TensorProto.UINT8, [64, 32])],
                       [helper.make_tensor_value_info("y", TensorProto.UINT8, [32, 32])], inits, opset=21)
    acc = (a.astype(np.int64) - int(za[0])) @ (b.astype(np.int64) - int(zb[0]))
    real = acc * (np.float64(sa[0]) * np.float64(sb[0]) / np.float64(sy[0]))
    assert np.abs(np.abs(real - np.floor(real)) - 0.5).min() > 1e-4, "a near-tie: float32 may round it otherwise"
    want = np.clip(np.round(real) + int(zy[0]), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(compiler.compile(model).run({"a": a, "b": b})["y"], want)
