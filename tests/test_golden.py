"""The golden integer interpreter of QDQ graphs: its kernels against naive loops, and its
results against ONNX Runtime (which requantizes in float32, so ties and fp32 rounding may
differ by one output step; the integers lowbit must produce are the golden ones)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import make_model, mlp_model
from onnx import TensorProto, helper, numpy_helper
from test_qoperator import _residual_cnn

from compiler.tools import ort
from models import zoo
from runtime import golden


def _naive_conv(x, w, stride, pad, dil, group):
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * pad - dil * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, m, oh, ow), np.int64)
    for b in range(n):
        for o in range(m):
            g = o // (m // group)
            for i in range(oh):
                for j in range(ow):
                    for ci in range(cg):
                        for p in range(kh):
                            for q in range(kw):
                                out[b, o, i, j] += (xp[b, g * cg + ci, i * stride + p * dil, j * stride + q * dil]
                                                    * w[o, ci, p, q])
    return out


@pytest.mark.parametrize("stride, pad, dil, group", [(1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 2), (2, 1, 1, 4)])
def test_integer_conv_matches_naive_loops(stride, pad, dil, group):
    rng = np.random.default_rng(stride * 10 + group)
    x = rng.integers(-128, 128, size=(2, 4, 7, 6))
    w = rng.integers(-127, 128, size=(8, 4 // group, 3, 3))
    got = golden._conv_int(x, w, [stride] * 2, [pad] * 4, [dil] * 2, group)
    np.testing.assert_array_equal(got, _naive_conv(x, w, stride, pad, dil, group))


def test_integer_maxpool():
    x = np.random.default_rng(0).integers(0, 256, size=(1, 2, 5, 5))
    got = golden._maxpool_int(x, [3, 3], [2, 2], [1, 1, 1, 1], fill=-(2**62))
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-(2**62))
    want = np.array([[[[xp[0, c, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max() for j in range(3)] for i in range(3)]
                      for c in range(2)]])
    np.testing.assert_array_equal(got, want)


def _output_lsb(m: onnx.ModelProto) -> float:
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    node = next(n for n in m.graph.node if m.graph.output[0].name in n.output)
    return float(np.max(inits[node.input[1]]))


def _qdq(model, x, tmp_path, name="m"):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    feeds = {model.graph.input[0].name: x}
    return onnx.load(ort.quantize(str(path), feeds, str(tmp_path / f"{name}_qdq.onnx"), "static")), feeds


@pytest.mark.parametrize("name", ["mlp", "residual_cnn"])
def test_golden_agrees_with_ort_to_one_output_step(tmp_path, name):
    model, shape = {"mlp": (mlp_model(), (16, 8)), "residual_cnn": (_residual_cnn(), (8, 4, 10, 10))}[name]
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    q, feeds = _qdq(model, x, tmp_path)
    got = golden.run_qdq(q, feeds)[q.graph.output[0].name]
    want = onnxruntime.InferenceSession(q.SerializeToString()).run(None, feeds)[0]
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= _output_lsb(q) * (1 + 1e-5)


def test_golden_digits_cnn(tmp_path):
    files = zoo.ensure("digits_cnn")
    x = files.calibration()[zoo.INPUT]
    q, feeds = _qdq(onnx.load(files.onnx), x[:64], tmp_path, "digits")
    got = golden.run_qdq(q, {zoo.INPUT: x})[zoo.OUTPUT]
    want = onnxruntime.InferenceSession(q.SerializeToString()).run(None, {zoo.INPUT: x})[0]
    lsb = _output_lsb(q)
    assert np.abs(got - want).max() <= lsb * (1 + 1e-5)
    assert (np.abs(got - want) > lsb / 2).mean() < 0.25        # most outputs identical
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.97


def test_an_op_without_integer_semantics_is_a_float_island_or_named():
    """Hardmax of a dequantized tensor runs in float (ONNX's reference Hardmax of s (q - z)); of
    the quantized integers themselves it has no meaning, and the error names the node."""
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(128), "z")]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
          helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    x = np.array([[0.3, -0.2, 0.1], [-1.0, 2.0, 0.5]], np.float32)
    island = make_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
                         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq"),
                         helper.make_node("Hardmax", ["d"], ["y"], name="hm")], io[:1], io[1:], inits)
    np.testing.assert_array_equal(golden.run_qdq(island, {"x": x})["y"], [[1, 0, 0], [0, 1, 0]])
    on_integers = make_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
                              helper.make_node("Hardmax", ["q"], ["y"], name="hm")], io[:1], io[1:], inits)
    with pytest.raises(golden.QDQUnsupported, match="Hardmax hm"):
        golden.run_qdq(on_integers, {"x": x})


def test_bias_at_another_scale_moves_to_the_accumulator_grid_in_both(tmp_path):
    """A bias whose scale is not s_x*s_w (an exporter split the Add off and a quantizer gave it its
    own grid): both the golden interpreter and the lowering round its real value onto the
    accumulator's grid, so the layer stays integer and the two agree bit for bit."""
    import compiler

    q, feeds = _qdq(mlp_model(), np.random.default_rng(2).normal(size=(16, 8)).astype(np.float32), tmp_path)
    gemm = next(n for n in q.graph.node if n.op_type in ("Gemm", "Conv") and len(n.input) > 2)
    bias_dq = next(n for n in q.graph.node if n.output[0] == gemm.input[2])
    init = next(t for t in q.graph.initializer if t.name == bias_dq.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2.5, init.name))
    art = compiler.compile(q)
    assert art.manifest.integer_only and not art.manifest.islands, art.manifest.integer_region
    out = q.graph.output[0].name
    np.testing.assert_array_equal(art.run(feeds)[out], golden.run_qdq(q, feeds)[out])




@pytest.mark.parametrize("channels", [1, 6])
def test_the_bias_grid_is_the_same_in_both(channels):
    """The lowering's bias on the accumulator grid (passes/lower_qdq._on_accumulator_grid) and the
    golden interpreter's (runtime/golden._bias), written apart, give the same integers."""
    from passes.lower_qdq import _ConstDeq, _on_accumulator_grid

    rng = np.random.default_rng(channels)
    q = rng.integers(-128, 128, 6).astype(np.int64)
    scale, zero = np.float32(0.013), np.int64(7)
    num = (np.float32(0.02) * rng.uniform(0.001, 0.01, channels).astype(np.float32)).astype(np.float64)
    lowered = _on_accumulator_grid(_ConstDeq(q, np.array([scale]), np.array([zero]), 0), num)
    node = helper.make_node("Add", ["a", "b"], ["c"], name="bias")
    np.testing.assert_array_equal(lowered, golden._bias(golden._Q(q, scale, zero), num, node))
    assert np.abs(lowered).max() > 1000        # a real re-grid, not a no-op


def test_a_quantize_after_an_identity_requantizes_the_integers():
    """DQ -> Identity -> Q is the requantize DQ -> Q is (TVM imports Identity as its input): at the
    ratio 1/2, every odd q is a tie, which the dyadic requantize rounds half up in the compiled
    model and in golden alike (a float QuantizeLinear would round it to even)."""
    import compiler
    from compiler.options import CompileOptions

    consts = [numpy_helper.from_array(np.array(v, t), n) for n, v, t in (
        ("s16", 1.0, np.float32), ("z16", 0, np.int16), ("s8", 2.0, np.float32), ("z8", 0, np.int8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s16", "z16"], ["q16"]),
             helper.make_node("DequantizeLinear", ["q16", "s16", "z16"], ["d16"]),
             helper.make_node("Identity", ["d16"], ["i"]),
             helper.make_node("QuantizeLinear", ["i", "s8", "z8"], ["q8"]),
             helper.make_node("DequantizeLinear", ["q8", "s8", "z8"], ["y"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8]) for n in ("x", "y")]
    model = make_model(nodes, io[:1], io[1:], consts, opset=21)
    x = {"x": np.array([[-5, -3, -1, 1, 3, 5, 7, 9]], np.float32)}
    want = golden.run_qdq(model, x)["y"]
    np.testing.assert_array_equal(want, 2 * np.floor(x["x"] / 2 + 0.5))
    np.testing.assert_array_equal(compiler.compile(model, options=CompileOptions()).run(x)["y"], want)
