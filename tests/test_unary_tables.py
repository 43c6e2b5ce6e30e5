"""Elementwise functions of one 8-bit tensor become one integer lookup table; products of two
activations become an integer multiply; a kernel the VNNI tiling rejects falls back exactly.

Each activation below is written the way exporters write it (ONNX's own op, or its decomposition
into Sigmoid/Mul/Div/Erf/Tanh/Exp/Log), after a convolution.  lowbit's quantizer puts no quantize
inside the chain, the lowering folds the chain into a table at the quantize after it
(passes/lower_qdq._Lowering.closure), and the golden interpreter (runtime/golden.py) evaluates the
same functions elementwise with its own code: the two agree bit for bit on inputs three times
wider than the calibration data.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from conftest import compile_with_golden, make_model
from onnx import TensorProto, helper, numpy_helper

from codegen import cpu_schedule
from runtime import golden

IMAGE = (2, 4, 6, 6)
_node = helper.make_node


def _const(name, value):
    return numpy_helper.from_array(np.array(value, np.float32), name)


def _conv_model(tail: list, inits: list = (), seed: int = 0) -> onnx.ModelProto:
    """x -> Conv -> c -> ``tail`` -> y."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.normal(size=(4, 4, 3, 3)) * 0.3).astype(np.float32), "w")
    b = numpy_helper.from_array((rng.normal(size=4) * 0.3).astype(np.float32), "b")
    nodes = [_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), *tail]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(IMAGE))], [], [w, b, *inits],
                   opset=20)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    m.graph.output.append(next(v for v in inferred.graph.value_info if v.name == "y"))
    return m


CHAINS = {
    "silu": ([_node("Sigmoid", ["c"], ["s"]), _node("Mul", ["c", "s"], ["y"])], []),
    "hardswish": ([_node("HardSwish", ["c"], ["y"])], []),
    "hardsigmoid": ([_node("HardSigmoid", ["c"], ["y"], alpha=0.2, beta=0.5)], []),
    "mish": ([_node("Mish", ["c"], ["y"])], []),
    "softplus": ([_node("Softplus", ["c"], ["y"])], []),
    "elu": ([_node("Elu", ["c"], ["y"], alpha=0.7)], []),
    "selu": ([_node("Selu", ["c"], ["y"])], []),
    "leaky_relu": ([_node("LeakyRelu", ["c"], ["y"], alpha=0.1)], []),
    "tanh_gelu": ([_node("Mul", ["c", "c"], ["c2"]), _node("Mul", ["c2", "c"], ["c3"]),
                   _node("Mul", ["c3", "k"], ["t"]), _node("Add", ["c", "t"], ["u"]), _node("Mul", ["u", "r"], ["v"]),
                   _node("Tanh", ["v"], ["th"]), _node("Add", ["th", "one"], ["p"]), _node("Mul", ["c", "p"], ["h"]),
                   _node("Mul", ["h", "half"], ["y"])],
                  [_const("k", 0.044715), _const("r", 0.7978845608), _const("one", 1.0), _const("half", 0.5)]),
}


def _quantizes(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "QuantizeLinear" for n in model.graph.node)


def _compare(model, tmp_path, calib=None):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    calib = calib or {"x": np.random.default_rng(0).normal(size=(16, *IMAGE[1:])).astype(np.float32)}
    art, qdq, variants = compile_with_golden(path, calib=calib)
    assert art.manifest.integer_only and not art.manifest.islands, art.manifest.integer_region
    x = {"x": np.random.default_rng(1).normal(size=IMAGE).astype(np.float32) * 3}
    np.testing.assert_array_equal(art.run(x)["y"], golden.run_qdq(qdq, x, variants)["y"])
    return art, qdq


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_a_chain_of_elementwise_functions_is_one_table(name, tmp_path):
    nodes, inits = CHAINS[name]
    art, qdq = _compare(_conv_model(nodes, inits), tmp_path)
    # quantized: the input, the conv's output, the chain's output; nothing inside the chain
    assert _quantizes(qdq) == 3, [n.output[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert any("take" in op for ops in art.manifest.kernel_ops.values() for op in ops), art.manifest.kernel_ops


def test_squeeze_excitation_gate_is_an_integer_product(tmp_path):
    """EfficientNet's SE: x * sigmoid(conv(mean(x))); the gate gets its own grid (the quantizer
    quantizes both operands of a product of two activations) and the product is integer."""
    rng = np.random.default_rng(3)
    w2 = numpy_helper.from_array((rng.normal(size=(4, 4, 1, 1)) * 0.5).astype(np.float32), "w2")
    tail = [_node("Sigmoid", ["c"], ["s0"]), _node("Mul", ["c", "s0"], ["a"]),          # SiLU
            _node("GlobalAveragePool", ["a"], ["g"]), _node("Conv", ["g", "w2"], ["e"]),
            _node("Sigmoid", ["e"], ["gate"]), _node("Mul", ["gate", "a"], ["y"])]
    _, qdq = _compare(_conv_model(tail, [w2], seed=3), tmp_path)
    quantized = {n.input[0].removesuffix("_float") for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    assert {"gate", "a"} <= quantized and "s0" not in quantized


def test_a_kernel_the_vnni_tiling_rejects_is_scheduled_plainly_and_stays_exact(tmp_path, monkeypatch):
    """ConvNeXt's channels-last Linear made TVM assert inside tensorize; any such failure now
    reschedules the kernel on the plain vector schedule, with the same result."""
    real = cpu_schedule.CPUDefault.schedule

    def vnni_fails(self, sch, target):
        if target is not cpu_schedule.GENERIC:
            raise tvm.error.InternalError("tensorize: simulated failure")
        return real(self, sch, target)

    monkeypatch.setattr(cpu_schedule.CPUDefault, "schedule", vnni_fails)
    nodes, inits = CHAINS["silu"]
    _compare(_conv_model(nodes, inits), tmp_path)


@pytest.mark.parametrize("low", [-np.inf, float(np.finfo(np.float32).min)])
def test_a_padded_attention_mask_is_an_integer_select(low, tmp_path):
    """scores + where(mask, 0, -inf) (BERT as the TorchScript exporter writes it; float32's lowest
    in the dynamo export): the quantize after it is where(mask, q_scores, qmin), integer-only, and
    bit-exact; calibration takes the -inf scores as the grid's minimum."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array((rng.normal(size=(8, 6)) * 0.5).astype(np.float32), "w")
    nodes = [_node("MatMul", ["x", "w"], ["s"]), _node("Cast", ["mask"], ["b"], to=TensorProto.BOOL),
             _node("Unsqueeze", ["b", "axis"], ["keep"]), _node("Where", ["keep", "zero", "low"], ["bias"]),
             _node("Add", ["s", "bias"], ["masked"]), _node("Softmax", ["masked"], ["y"], axis=-1)]
    inits = [w, _const("zero", 0.0), _const("low", low), numpy_helper.from_array(np.array([1], np.int64), "axis")]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 8]),
                           helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 6])], inits, opset=17)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    mask = (np.arange(6)[None] < rng.integers(2, 7, size=(16, 1))).astype(np.int64)
    calib = {"x": rng.normal(size=(16, 6, 8)).astype(np.float32), "mask": mask}
    art, qdq, variants = compile_with_golden(path, calib=calib)
    assert art.manifest.integer_only and not art.manifest.islands, art.manifest.integer_region
    x = {"x": rng.normal(size=(2, 6, 8)).astype(np.float32) * 3, "mask": np.array([[1, 1, 1, 0, 0, 0], [1] * 6])}
    got, want = art.run(x)["y"], golden.run_qdq(qdq, x, variants)["y"]
    np.testing.assert_array_equal(got, want)
    # the masked scores sit at the grid's minimum, exp of which is not quite 0: on the output's 16-bit grid
    # the masked probabilities are below 2^-10 (on an 8-bit one they rounded to 0)
    assert np.all(got[0, :, 3:] < 2.0**-10) and np.allclose(got[0, :, :3].sum(-1), 1, atol=0.05)


def _wide_qdq_model(tail: list, inits: list, out_dtype: int, shape: list[int]) -> onnx.ModelProto:
    """x -> Q(u16) -> DQ -> c -> ``tail`` -> y -> Q(``out_dtype``) -> DQ: a 16-bit activation, as the
    fidelity target widens one (compiler/quantize._widen), read by a chain of float functions."""
    zero16 = numpy_helper.from_array(np.array(20000, np.uint16), "xz")
    zero_out = numpy_helper.from_array(np.array(0 if out_dtype == TensorProto.INT16 else 30,
                                                helper.tensor_dtype_to_np_dtype(out_dtype)), "yz")
    nodes = [_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), _node("DequantizeLinear", ["xq", "xs", "xz"], ["c"]),
             *tail, _node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]), _node("DequantizeLinear", ["yq", "ys", "yz"],
                                                                            ["out"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
                      [_const("xs", 2e-4), zero16, _const("ys", 0.03 if out_dtype == TensorProto.UINT8 else 4e-4),
                       zero_out, *inits], opset=21)


@pytest.mark.parametrize("shape", [[1, 256, 256], [1, 1 << 16, 1, 1]], ids=["map", "vector"])
@pytest.mark.parametrize("out_dtype", [TensorProto.UINT8, TensorProto.INT16])
@pytest.mark.parametrize("name", sorted(CHAINS))
def test_a_function_of_a_16_bit_tensor_is_a_table_of_all_its_integers(name, out_dtype, shape):
    """The table covers all 65,536 input integers; fed every one of them, the build agrees with the
    golden interpreter bit for bit (8- and 16-bit results), with no float island.  "vector" is a
    squeeze-excitation's shape, (1, C, 1, 1): there the golden interpreter once took SiLU's sigmoid(x),
    which varies along the channels only, for a constant per-channel factor of x (LayerScale's form)."""
    from compiler import driver
    from compiler.options import CompileOptions

    nodes, inits = CHAINS[name]
    model = _wide_qdq_model(nodes, inits, out_dtype, shape)
    art, ref = driver.compile_with_reference(model, CompileOptions())
    assert art.manifest.integer_only and not art.manifest.islands, art.manifest.integer_region
    x = {"x": ((np.arange(1 << 16) - 20000) * np.float32(2e-4)).astype(np.float32).reshape(shape)}
    got, want = art.run(x)["out"], golden.run_qdq(ref.model, x, ref.variants)["out"]
    np.testing.assert_array_equal(got, want, err_msg=f"{np.sum(got != want)} of 65536 differ")
