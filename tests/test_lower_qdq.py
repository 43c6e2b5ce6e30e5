"""QDQ / QOperator models lowered to integer-only code: the verifier agrees, and every
output is bit-exact with the golden interpreter (runtime/golden.run_qdq)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from conftest import compile_with_golden, concat_cnn, make_model, mlp_model
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from test_qoperator import _residual_cnn

import compiler
from compiler import qoperator
from compiler.options import CompileOptions
from compiler.tools import ort
from models import zoo
from runtime import golden


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


def _conv_then(op: str, **attrs) -> onnx.ModelProto:
    w = numpy_helper.from_array(_rand(4, 3, 3, 3), "w")
    return make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                       helper.make_node(op, ["c"], ["y"], name=op.lower(), **attrs)],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])], [w])


def test_an_op_without_integer_form_is_an_island_the_rest_integer(caplog):
    """A float op with no integer form between Q/DQ pairs: that op runs in float (an island,
    named with its node in a warning and the verdict), the convolution before it stays integer."""
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        # softmax over the channels: Shiftmax runs along the last axis only
        art = compiler.compile(_conv_then("Softmax", axis=1), options=CompileOptions(calib={"x": _rand(8, 3, 6, 6)}))
    m = art.manifest
    assert m.precision == "int8" and not m.integer_only and "fake-quant" not in caplog.text
    assert "float island: relax.nn.softmax at node 'softmax'" in caplog.text
    assert m.integer_region == "1 float island(s): relax.nn.softmax (softmax)"
    assert [w["op"] for w in m.quantization["weights"]] == ["conv2d"]


@pytest.mark.parametrize("op", ["Sigmoid", "Tanh", "Erf"])
def test_a_float_op_of_one_8bit_tensor_is_a_table(op, tmp_path):
    """Between a dequantize and a quantize, a float op of one 8-bit tensor is a function of its 256
    integers: one table lookup, integer-only, bit-exact with the golden interpreter."""
    path = tmp_path / "m.onnx"
    onnx.save(_conv_then(op), path)
    calib = {"x": _rand(8, 3, 6, 6)}
    art, qdq, variants = compile_with_golden(path, calib=calib)
    assert art.manifest.integer_only, art.manifest.integer_region
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


# ---- the lowering's structure: target-neutral, ops by table, contractions as data ---------------

def test_passes_import_no_backend():
    """passes/ describes the integer program only: nothing there imports codegen/, runtime/ or
    compiler/ (targets reach the lowering as contraction units, Backend.units in codegen/backend.py)."""
    import ast

    from conftest import ROOT

    for path in sorted((ROOT / "passes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] in ("codegen", "runtime", "compiler") for m in modules), (path.name, modules)


def test_every_op_family_has_its_handler():
    from passes.lower_qdq import FLOAT_BINARY, FLOAT_UNARY, HANDLERS, NONLINEAR_OPS, VIEWS

    families = [*VIEWS, *FLOAT_UNARY, *FLOAT_BINARY, *NONLINEAR_OPS, "relax.quantize", "relax.dequantize",
                "relax.nn.conv2d", "relax.matmul", "relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.concat",
                "relax.mean", "relax.nn.batch_norm", "relax.nn.layer_norm", "relax.nn.relu", "relax.clip",
                "TupleGetItem"]
    assert not set(families) - HANDLERS.keys()
    assert len({HANDLERS[v] for v in VIEWS}) == 1 and len({HANDLERS[f] for f in FLOAT_UNARY}) == 1


def _unit_names(units) -> list[str]:
    return [f"{type(u).__module__.split('.')[-1]}.{type(u).__name__}" for u in units]


@pytest.mark.parametrize("target, names", [
    ({"kind": "llvm", "mcpu": "haswell"}, []),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}, []),
    ({"kind": "llvm", "mcpu": "alderlake"}, ["vnni.MatmulUnit", "vnni.ConvUnit", "vnni.ActivationMatmulUnit"]),
    ({"kind": "llvm", "mcpu": "icelake-server"}, ["vnni.MatmulUnit", "vnni.ConvUnit", "vnni.ActivationMatmulUnit"]),
    ({"kind": "llvm", "mcpu": "sapphirerapids"}, ["amx.ConvUnit", "amx.TokenMatmulUnit", "depthwise.DepthwiseUnit",
                                                  "vnni.MatmulUnit", "vnni.ConvUnit", "vnni.ActivationMatmulUnit"]),
], ids=["avx2", "aarch64", "avx_vnni", "avx512_vnni", "amx"])
def test_cpu_units_follow_the_isa(target, names):
    from codegen.cpu import cpu_units
    from codegen.cuda.backend import cuda_units
    from passes.contraction import ContractionUnit

    got = cpu_units(target)
    assert _unit_names(got) == names
    assert all(isinstance(u, ContractionUnit) for u in (*got, *cuda_units()))


@pytest.mark.parametrize("tokens, weights, x_dtype, want", [
    (40, np.int8, "uint8", {"amx": "amx.TokenMatmulUnit", "vnni": "vnni.MatmulUnit", "cuda": "dp4a.MatmulUnit"}),
    (8, np.int8, "uint8", {"amx": "vnni.MatmulUnit", "vnni": "vnni.MatmulUnit", "cuda": "dp4a.MatmulUnit"}),
    (40, np.int8, "int8", {"amx": None, "vnni": None, "cuda": "dp4a.MatmulUnit"}),      # vpdpbusd: u8 x s8
    (40, np.int16, "uint8", {"amx": None, "vnni": None, "cuda": None}),
])
def test_the_first_unit_that_fits_takes_the_matmul(tokens, weights, x_dtype, want):
    """A token matmul goes to AMX's tiles from a whole tile block of tokens on, else to VNNI; an
    s8 input only to dp4a; 16-bit weights to no unit (the generic int32 matmul)."""
    from codegen.cpu import cpu_units
    from codegen.cuda.backend import cuda_units
    from passes.contraction import MATMUL, Contraction, Operand, first_fit

    c = Contraction(MATMUL, Operand(x_dtype, (None, tokens, 64), 3), "int32",
                    np.ones((64, 64), weights))
    targets = {"amx": cpu_units({"kind": "llvm", "mcpu": "sapphirerapids"}),
               "vnni": cpu_units({"kind": "llvm", "mcpu": "icelake-server"}), "cuda": cuda_units()}
    for name, us in targets.items():
        unit = first_fit(us, c)
        assert (_unit_names([unit])[0] if unit else None) == want[name], name


def test_linear_bound_holds_for_every_input():
    """passes/accumulators.linear bounds |sum_k q_x w - z_x sum_k w| over every u8 input."""
    import itertools

    from passes import accumulators

    w = np.array([[3, -2, 0], [1, 1, -5]])          # [K, N]
    for zx in (0, 128, 255):
        got = accumulators.linear(w, 1, "uint8", zx)
        worst = max(int(np.abs(np.array(x) @ w + got.correction).max())
                    for x in itertools.product((0, 255), repeat=w.shape[0]))
        assert worst <= got.bound and got.dtype == "int32"
        np.testing.assert_array_equal(got.correction, -zx * w.sum(axis=0))
    assert accumulators.accumulator_dtype(2**31 - 1) == "int32" and accumulators.accumulator_dtype(2**31) == "int64"
    assert accumulators.activation_matmul(64, "uint8", 0, "int8", 0) == 64 * 255 * 128


@pytest.mark.parametrize("output", ["h2", "h0"])
def test_an_output_that_other_ops_also_read_stays_integer(output):
    """A model with several outputs, one an intermediate that later layers also read (a hidden state
    beside the logits): each output is its own dequantize, the readers take the integers, and the
    model lowers integer-only, bit-exact with golden (it was fake-quant as a whole)."""
    m = mlp_model(batch=1)
    m.graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, 16]))
    calib = {"x": np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)}
    art, qdq, variants = compile_with_golden(m, calib=calib)
    assert art.manifest.integer_only, art.manifest.integer_region
    x = {"x": calib["x"][:1] * 3}
    got, want = art.run(x), golden.run_qdq(qdq, x, variants)
    for name in ("y", output):
        np.testing.assert_array_equal(got[name], want[name])


def test_a_matmul_over_16_bit_activations_requantizes_past_int64_products():
    """int16 activations times int8 weights over K = 1024: the accumulator bound 1024 * 127 * 32768
    (~2^32) times a 31-bit multiplier passes 2^62, which was a float island; the requantize splits
    the product (passes/dyadic.rescale_wide) and stays integer-only, bit-exact with golden at the
    input's extremes."""
    k, n = 1024, 8
    rng = np.random.default_rng(4)
    w = np.where(rng.random((k, n)) < 0.5, -127, 127).astype(np.int8)
    consts = [numpy_helper.from_array(np.array(0.001, np.float32), "sx"), numpy_helper.from_array(np.array(0, np.int16), "zx"),
              numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "sw"),
              numpy_helper.from_array(np.zeros(n, np.int8), "zw"),
              numpy_helper.from_array(np.array(40.0, np.float32), "sy"), numpy_helper.from_array(np.array(0, np.int8), "zy")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["acc"]),
             helper.make_node("QuantizeLinear", ["acc", "sy", "zy"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], consts, opset=21)
    art = compiler.compile(model, options=CompileOptions())
    assert art.manifest.integer_only and not art.manifest.islands
    x = rng.uniform(-33, 33, (3, k)).astype(np.float32)
    x[1] = np.sign(w[:, 0]) * 33.0                       # every product at the bound for channel 0
    want = golden.run_qdq(model, {"x": x})["y"]
    np.testing.assert_array_equal(art.run({"x": x})["y"], want)
    assert np.abs(want[1, 0]) > 100                      # a value the narrow grid still resolves


def test_a_quantize_to_the_grid_its_operand_is_on_is_the_identity():
    """ORT writes Q -> DQ around every view (Reshape, Transpose, Swin's roll as Slice + Concat), each
    quantize at the scale its operand already has, as its own scalar initializer.  Such a quantize
    is the identity on the integers, whatever shape its scale has (the lowering keeps a requantized
    result's scale as (1,), ONNX as ()): no requantize is emitted.  Swin-T's ORT file nested five of
    them per window shift, and its build took 164 s instead of 50."""
    rng = np.random.default_rng(5)
    consts = [numpy_helper.from_array(np.array(0.05, np.float32), "sx"), numpy_helper.from_array(np.array(3, np.uint8), "zx"),
              numpy_helper.from_array(rng.integers(-127, 128, (8, 6)).astype(np.int8), "wq"),
              numpy_helper.from_array(np.full(6, 0.01, np.float32), "sw"),
              numpy_helper.from_array(np.zeros(6, np.int8), "zw"), numpy_helper.from_array(np.array([2, 3], np.int64), "shape")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["acc"])]
    value = "acc"
    for i, (op, extra) in enumerate([("Reshape", ["shape"]), ("Transpose", []), ("Reshape", ["shape"])]):
        # each quantize's parameters are its own initializers, equal in value (as ORT writes them)
        consts += [numpy_helper.from_array(np.array(0.07, np.float32), f"s{i}"),
                   numpy_helper.from_array(np.array(120, np.uint8), f"z{i}")]
        nodes += [helper.make_node("QuantizeLinear", [value, f"s{i}", f"z{i}"], [f"q{i}"]),
                  helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"d{i}"]),
                  helper.make_node(op, [f"d{i}", *extra], [f"v{i}"])]
        value = f"v{i}"
    nodes += [helper.make_node("QuantizeLinear", [value, "s0", "z0"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "s0", "z0"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], consts)
    art = compiler.compile(model, options=CompileOptions())
    m = art.manifest
    assert m.integer_only and m.op_histogram["relax.right_shift"] == 1, m.op_histogram     # the matmul's alone
    x = rng.uniform(-6, 6, (1, 8)).astype(np.float32)
    np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(model, {"x": x})["y"])
