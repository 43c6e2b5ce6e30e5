"""Integer-only transformer ops (passes/integer_nonlinear.py) against the golden reference
(runtime/golden_nonlinear.py), alone and inside quantized graphs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler import quantize
from compiler.options import CompileOptions
from runtime import golden


def _rand(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _io(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def layernorm_model(c=16, t=5):
    rng = np.random.default_rng(1)
    return make_model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)],
                      [_io("x", (1, t, c))], [_io("y", (1, t, c))],
                      [_init("g", rng.uniform(0.5, 1.5, c) * np.where(np.arange(c) == 3, -1, 1)),
                       _init("b", rng.normal(0, 0.2, c))])


def softmax_model(t=5):
    return make_model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [_io("x", (1, 2, t, t))],
                      [_io("y", (1, 2, t, t))])


def gelu_model(c=16):
    """The erf decomposition torch exports: x * 0.5 * (1 + erf(x / sqrt 2)), after a MatMul."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["h", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])]
    return make_model(nodes, [_io("x", (1, 5, c))], [_io("y", (1, 5, c))],
                      [_init("w", _rand(c, c, seed=2, scale=0.5)), _init("sqrt2", math.sqrt(2)), _init("one", 1.0),
                       _init("half", 0.5)])


def attention_model(d=16, heads=2, t=7):
    """q, k, v projections -> (q k^T) * d^-0.5 -> softmax -> . v."""
    dh = d // heads
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}0"]),
                  helper.make_node("Reshape", [f"{n}0", "shape"], [f"{n}1"]),
                  helper.make_node("Transpose", [f"{n}1"], [n], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s"]),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"]),
              helper.make_node("Transpose", ["o"], ["o1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o1", "shape2"], ["y"])]
    inits = [_init(f"w{n}", _rand(d, d, seed=i, scale=0.4)) for i, n in enumerate("qkv")]
    inits += [numpy_helper.from_array(np.array([1, t, heads, dh], np.int64), "shape"),
              numpy_helper.from_array(np.array([1, t, d], np.int64), "shape2"), _init("scale", dh ** -0.5)]
    return make_model(nodes, [_io("x", (1, t, d))], [_io("y", (1, t, d))], inits)


MODELS = {"layernorm": layernorm_model, "softmax": softmax_model, "gelu": gelu_model, "attention": attention_model}


@pytest.mark.parametrize("nonlinear", ["shift", "poly"])
@pytest.mark.parametrize("name", list(MODELS))
def test_op_graphs_bit_exact(name, nonlinear):
    model = MODELS[name]()
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    calib = {"x": _rand(8, *shape[1:], seed=4, scale=2.0)}
    art = compiler.compile(model, options=CompileOptions(calib=calib, nonlinear=nonlinear))
    assert art.manifest.precision == "int8" and art.manifest.integer_only, art.manifest.integer_region
    qdq, report = quantize.quantize(model, calib, quantize.QuantConfig(nonlinear=nonlinear))
    x = _rand(*shape, seed=5, scale=2.0)
    want = golden.run_qdq(qdq, {"x": x}, report.variants())["y"]
    np.testing.assert_array_equal(art.run({"x": x})["y"], want)
