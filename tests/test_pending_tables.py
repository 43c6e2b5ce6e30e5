"""A float function of a linear layer's unquantized result, quantized only after it.

NNCF (and hand-written QDQ) leave Conv -> HardSwish -> Q or MatMul -> Add -> GELU -> Q without a
quantize in between.  lowbit requantizes the accumulator to a 16-bit grid and reads the function
from a 65,536-entry table (passes/fine_grid.py); runtime/golden.py computes the same integers
element by element.  These graphs are written by hand, as such a quantizer writes them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler.canonicalize import canonicalize
from passes import fine_grid
from runtime import golden

_node = helper.make_node
S_X, S_Y = 0.02, 0.03


def _init(name, value, dtype=None):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _qdq_in(rng, kind: str):
    """x -> Q -> DQ -> a linear layer with int8 per-channel weights and a float bias -> "acc"."""
    if kind == "conv":
        shape, w = (2, 3, 8, 8), rng.integers(-127, 128, (6, 3, 3, 3))
        ws = (rng.uniform(0.5, 1.5, 6) * 2e-3).astype(np.float32)
        layer = [_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
                 _node("Conv", ["xd", "w", "b"], ["acc"], pads=[1, 1, 1, 1])]
        inits = [_init("wq", w, np.int8), _init("ws", ws), _init("wz", np.zeros(6), np.int8),
                 _init("b", rng.normal(size=6) * 0.1, np.float32)]
    else:
        shape, w = (2, 5, 8), rng.integers(-127, 128, (8, 12))
        layer = [_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1),
                 _node("MatMul", ["xd", "w"], ["m"]), _node("Add", ["m", "b"], ["acc"])]
        inits = [_init("wq", w, np.int8), _init("ws", (rng.uniform(0.5, 1.5, 12) * 2e-3).astype(np.float32)),
                 _init("wz", np.zeros(12), np.int8), _init("b", rng.normal(size=12) * 0.1, np.float32)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             *layer]
    return shape, nodes, inits + [_init("sx", S_X, np.float32), _init("zx", 128, np.uint8)]


# the function, spelled as exporters spell it: (kind of layer, nodes from "acc" to "f", constants, output zero point)
FUNCTIONS = {
    "hardswish": ("conv", [_node("HardSwish", ["acc"], ["f"])], [], 20),
    "hardsigmoid": ("conv", [_node("HardSigmoid", ["acc"], ["f"], alpha=0.25, beta=0.4)], [], 0),
    "sigmoid": ("conv", [_node("Sigmoid", ["acc"], ["f"])], [], 0),
    "silu": ("conv", [_node("Sigmoid", ["acc"], ["g"]), _node("Mul", ["acc", "g"], ["f"])], [], 10),
    "gelu_erf": ("matmul", [_node("Div", ["acc", "sqrt2"], ["t"]), _node("Erf", ["t"], ["e"]),
                            _node("Add", ["e", "one"], ["e1"]), _node("Mul", ["acc", "e1"], ["g"]),
                            _node("Mul", ["g", "half"], ["f"])],
                 [_init("sqrt2", np.sqrt(2.0), np.float32), _init("one", 1.0, np.float32),
                  _init("half", 0.5, np.float32)], 10),
    "tanh": ("matmul", [_node("Tanh", ["acc"], ["f"])], [], 128),
}


def _model(name: str, seed: int = 0) -> tuple[onnx.ModelProto, tuple]:
    kind, fn_nodes, consts, zy = FUNCTIONS[name]
    rng = np.random.default_rng(seed)
    shape, nodes, inits = _qdq_in(rng, kind)
    scale = 1.0 / 255 if name in ("sigmoid", "hardsigmoid") else 2.0 / 255 if name == "tanh" else S_Y
    nodes += fn_nodes + [_node("QuantizeLinear", ["f", "sy", "zy"], ["yq"]),
                         _node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    inits += consts + [_init("sy", scale, np.float32), _init("zy", zy, np.uint8)]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))], [], inits, opset=17)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    m.graph.output.append(next(v for v in inferred.graph.value_info if v.name == "y"))
    return m, shape


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_function_of_accumulator_is_integer_and_bit_exact(name, tmp_path):
    m, shape = _model(name)
    path = tmp_path / f"{name}.onnx"
    onnx.save(m, path)
    art = compiler.compile(str(path))
    assert art.manifest.integer_only, art.manifest.integer_region
    assert not art.manifest.islands
    rng = np.random.default_rng(1)
    x = {"x": (rng.normal(size=shape) * 3).astype(np.float32)}      # past the input grid: every clamp is hit
    got = art.run(x)["y"]
    want = golden.run_qdq(canonicalize(m, {"x": shape}), x)["y"]
    np.testing.assert_array_equal(got, want)
    # ORT runs the function in float32 on the exact accumulator: the 16-bit grid moves the input by at
    # most half a step, so an output differs by at most one of its own steps, and rarely
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, x)[0]
    step = float(numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "sy")))
    off = np.abs(got - ref) / step
    assert off.max() <= 1.0 + 1e-3, off.max()
    assert np.mean(off > 0.5) <= 0.01, np.mean(off > 0.5)


@pytest.mark.parametrize("fn, s, z, lo, hi", [
    (lambda x: x * np.clip(x + 3, 0, 6) / 6, 0.05, 0, -128, 127),
    (lambda x: 1 / (1 + np.exp(-x)), 1 / 255, 0, 0, 255),
    (lambda x: 0.5 * x * (1 + np.tanh(0.8 * x)), 0.1, 3, 0, 255),
    (np.square, 0.5, 0, 0, 255),
])
def test_grid_covers_every_input_whose_output_changes(fn, s, z, lo, hi):
    """Outside the grid's interval, Q(f(x)) is the value at its end: the int16 clamp loses nothing."""
    grid = fine_grid.table_grid(fn, s, z, lo, hi)
    ends = fine_grid.grid_values(grid)[[0, -1]]
    x = np.concatenate([np.random.default_rng(0).uniform(-1e4, 1e4, 200_000), np.linspace(-200, 200, 400_001)])
    q = fine_grid.quantize64(fn(x), s, z, lo, hi)
    qa, qb = fine_grid.quantize64(fn(ends), s, z, lo, hi)
    assert np.all(q[x <= ends[0]] == qa) and np.all(q[x >= ends[1]] == qb)
    assert grid.scale <= (ends[1] - ends[0]) / (fine_grid.LEVELS - 2)
