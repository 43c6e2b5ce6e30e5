"""AMX convolutions (codegen/amx.py) with a static batch: a max pool between two convs fuses with the
first conv's requantize and the second conv's input rows (``amx_rows``, the pool's output bordered
with the zero point: rows ``y - 1`` over more rows than the pool has).  That copy cannot be computed
per tile of the pool (TVM asserts on the ``y - 1`` read, and the border is on no tile), so the
schedule keeps it as its own nest (codegen/cpu_schedule._epilogues_at).  Only compiled: running AMX
code needs a Sapphire Rapids (tests/test_amx.py runs it where the host has one)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler.options import CompileOptions


def _pooled_cnn(size: int, seed: int = 0):
    """x[N, 1, S, S]: conv 1->32, ReLU -> max pool 2 -> conv 32->32, ReLU -> max pool 2 -> conv 32->64,
    ReLU -> global average pool -> Gemm 64->10 (the plain digits CNN, narrower)."""
    rng = np.random.default_rng(seed)
    shapes = {"w1": (32, 1, 3, 3), "b1": (32,), "w2": (32, 32, 3, 3), "b2": (32,), "w3": (64, 32, 3, 3),
              "b3": (64,), "wf": (10, 64), "bf": (10,)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n) for n, s in shapes.items()]
    node = helper.make_node
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), node("Relu", ["c1"], ["r1"]),
             node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]), node("Relu", ["c2"], ["r2"]),
             node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1]), node("Relu", ["c3"], ["r3"]),
             node("GlobalAveragePool", ["r3"], ["g"]), node("Flatten", ["g"], ["f"]),
             node("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, size, size])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)


@pytest.mark.parametrize("batch", [1, 8])
def test_pool_into_amx_conv_compiles_with_a_static_batch(tmp_path, batch):
    path = tmp_path / "cnn.onnx"
    path.write_bytes(_pooled_cnn(20).SerializeToString())
    calib = {"x": np.random.default_rng(1).normal(size=(8, 1, 20, 20)).astype(np.float32)}
    opts = CompileOptions(target_options={"mcpu": "sapphirerapids"}, input_shapes={"x": (batch, 1, 20, 20)}, calib=calib)
    art = compiler.compile(str(path), options=opts)
    assert art.manifest.integer_only
    assert not art.manifest.unscheduled
    assert sum("conv2d_amx" in k for k in art.manifest.kernels) == 3      # every conv on the tiles
