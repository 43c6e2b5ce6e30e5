"""QDQ / QOperator models lowered to integer-only code: the verifier agrees, and every
output is bit-exact with the golden interpreter (runtime/golden.run_qdq)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from conftest import concat_cnn, golden_model, make_model, mlp_model
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from test_qoperator import _residual_cnn

import compiler
from compiler import qoperator
from compiler.options import CompileOptions
from models import zoo
from runtime import golden, ort


class _Reader:
    def __init__(self, name, x):
        self.it = iter([{name: x[i : i + 4]} for i in range(0, len(x), 4)])

    def get_next(self):
        return next(self.it, None)


def _quantized(tmp_path, model, x, fmt="qdq", per_channel=True):
    src = tmp_path / "fp32.onnx"
    onnx.save(model, src)
    name = model.graph.input[0].name
    if fmt == "qdq":
        return ort.quantize(str(src), {name: x}, str(tmp_path / "q.onnx"), "static")
    dst = tmp_path / "qop.onnx"
    quantize_static(str(src), str(dst), _Reader(name, x), quant_format=QuantFormat.QOperator,
                    per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return str(dst)


def _check_bit_exact(path, x):
    art = compiler.compile(path)
    m = art.manifest
    assert m.precision == "int8" and m.integer_only, m.integer_region
    model = qoperator.to_qdq(onnx.load(path))
    name = model.graph.input[0].name
    want = golden.run_qdq(model, {name: x})[model.graph.output[0].name]
    got = art.run({name: x})[m.outputs[0].name]
    np.testing.assert_array_equal(got, want)
    return art


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_mlp(tmp_path, fmt):
    _check_bit_exact(_quantized(tmp_path, mlp_model(), _rand(16, 8), fmt), _rand(5, 8, seed=1))


@pytest.mark.parametrize("fmt, per_channel", [("qdq", True), ("qoperator", False), ("qoperator", True)])
def test_residual_cnn(tmp_path, fmt, per_channel):
    path = _quantized(tmp_path, _residual_cnn(), _rand(8, 4, 10, 10), fmt, per_channel)
    _check_bit_exact(path, _rand(3, 4, 10, 10, seed=2))


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_concat(tmp_path, fmt):
    _check_bit_exact(_quantized(tmp_path, concat_cnn(), _rand(8, 4, 6, 6), fmt), _rand(2, 4, 6, 6, seed=3))


@pytest.mark.parametrize("name, fmt", [(n, "qdq") for n in ("digits_cnn", "resnet8", "ds_cnn", "mobilenet_v1_025",
                                                              "fc_autoencoder")]
                         + [(n, "qoperator") for n in ("digits_cnn", "resnet8", "ds_cnn")])
def test_zoo_cnn(tmp_path, name, fmt):
    files = zoo.ensure(name)
    calib = files.calibration()[zoo.INPUT]
    path = _quantized(tmp_path, onnx.load(files.onnx), calib[:16], fmt)
    _check_bit_exact(path, zoo.get(name).samples(3, seed=7))


def _conv_then(op: str) -> onnx.ModelProto:
    w = numpy_helper.from_array(_rand(4, 3, 3, 3), "w")
    return make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                       helper.make_node(op, ["c"], ["y"], name=op.lower())],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])], [w])


def test_unsupported_pattern_falls_back_to_fake_quant(caplog):
    """A float op with no integer form between Q/DQ pairs: still a correct program, compiled as
    fake-quant with a warning that names the op, and the verifier says no."""
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        art = compiler.compile(_conv_then("Sin"), options=CompileOptions(calib={"x": _rand(8, 3, 6, 6)}))
    assert art.manifest.precision == "fake-quant" and not art.manifest.integer_only
    assert "relax.sin" in caplog.text and "fake-quant" in caplog.text
    assert art.manifest.integer_region.startswith("float op inside the integer region")


@pytest.mark.parametrize("op", ["Sigmoid", "Tanh", "Erf"])
def test_a_float_op_of_one_8bit_tensor_is_a_table(op, tmp_path):
    """Between a dequantize and a quantize, a float op of one 8-bit tensor is a function of its 256
    integers: one table lookup, integer-only, bit-exact with the golden interpreter."""
    path = tmp_path / "m.onnx"
    onnx.save(_conv_then(op), path)
    calib = {"x": _rand(8, 3, 6, 6)}
    art = compiler.compile(path, options=CompileOptions(calib=calib))
    assert art.manifest.integer_only, art.manifest.integer_region
    qdq, variants = golden_model(path, calib)
    x = {"x": _rand(2, 3, 6, 6) * 50}
    np.testing.assert_array_equal(art.run(x)["y"], golden.run_qdq(qdq, x, variants)["y"])


def test_relu6_clip_folds_into_the_requantize_clamp():
    """Conv -> Clip(0, 6) (ReLU6, as in MobileNetV2): TVM imports Clip as NaN-guarded max/min
    kernels; lowbit imports constant bounds as relax.clip, which the lowering folds into the
    clamp, so the model stays integer-only and bit-exact."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                        helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    calib = {"x": rng.normal(0, 2, (16, 3, 8, 8)).astype(np.float32)}
    opts = CompileOptions(calib=calib)
    art = compiler.compile(model, options=opts)
    assert art.manifest.integer_only and art.manifest.precision == "int8"
    from compiler import quantize

    qdq, _ = quantize.quantize(model, calib, opts.quant_config())
    x = rng.normal(0, 4, (4, 3, 8, 8)).astype(np.float32)           # past the calibrated range: the clamp bites
    y = art.run({"x": x})["y"]
    np.testing.assert_array_equal(y, golden.run_qdq(qdq, {"x": x})["y"])
    assert y.min() == 0 and 5.9 < y.max() <= 6.0
