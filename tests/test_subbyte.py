"""Packed sub-byte weights (passes/subbyte.py): the packing round-trips through the kernel-side
unpacking, and packed layers compile bit-exact against the golden reference with smaller weights."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import mlp_model
from tvm import te

import compiler
from compiler import quantize
from compiler.options import CompileOptions
from passes import subbyte
from runtime import golden


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 3, 3), (7,)])
def test_unpacking_in_a_kernel_round_trips(bits, shape):
    half = 1 << (bits - 1)
    q = np.random.default_rng(bits).integers(-half, half, size=shape).astype(np.int8)   # the full range
    packed = subbyte.pack(q, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-q.size * bits // 8)
    p = te.placeholder(packed.shape, "uint8", name="packed")
    f = tvm.compile(te.create_prim_func([p, subbyte.unpacked(p, shape, bits)]), target="llvm")
    out = tvm.runtime.tensor(np.zeros(shape, np.int8))
    f(tvm.runtime.tensor(packed), out)
    np.testing.assert_array_equal(out.numpy(), q)


def test_width_is_the_narrowest_that_holds_the_values():
    assert subbyte.width(np.array([-1, 0, 1])) == 2
    assert subbyte.width(np.array([-2, 1])) == 2
    assert subbyte.width(np.array([-7, 7])) == 4
    assert subbyte.width(np.array([-8, 8])) is None


@pytest.mark.parametrize("bits", [4, 2])
def test_packed_matmuls_bit_exact_and_smaller(bits):
    model, rng = mlp_model(), np.random.default_rng(0)
    calib = {"x": rng.normal(size=(32, 8)).astype(np.float32)}
    opts = CompileOptions(calib=calib, weight_bits=bits, pin=False)
    art = compiler.compile(model, options=opts)
    eight = compiler.compile(model, options=CompileOptions(calib=calib))
    weights = 8 * 16 + 16 * 4
    # the int8 weights shrink to bits/8 of a byte each; biases, scales and requant constants stay
    assert eight.manifest.weight_bytes - art.manifest.weight_bytes == weights - weights * bits // 8
    qdq, _ = quantize.quantize(model, calib, opts.quant_config())
    x = rng.normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(qdq, {"x": x})["y"])
