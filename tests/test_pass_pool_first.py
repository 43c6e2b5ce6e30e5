"""PoolFirst (passes/pool_first.py) on tiny lowered Relax graphs: a max pool after a requantize
moves onto the accumulator, the requantize after it, with the same integers."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from passes.pool_first import PoolFirst

B = np.array([[[[-40, 7, 300]]]], np.int32)                 # per channel, NHWC
M = np.array([[[[1518500250, 1073741824, 2147483647]]]], np.int64)
H = np.left_shift(1, np.array([[[[36, 37, 39]]]], np.int64))
E = np.array([[[[37, 38, 40]]]], np.int64)


@I.ir_module
class Before:
    """The stem's requantize (bias, 64-bit rescale, zero point, clamp, u8) and its 3x3/2 pool."""

    @R.function
    def main(acc: R.Tensor((1, 9, 8, 3), "int32")) -> R.Tensor((1, 5, 4, 3), "uint8"):
        with R.dataflow():
            x = R.add(acc, R.const(B, "int32"))
            wide = R.astype(x, "int64")
            prod = R.multiply(wide, R.const(M, "int64"))
            total = R.add(prod, R.const(H, "int64"))
            shifted = R.right_shift(total, R.const(E, "int64"))
            zp = R.add(shifted, R.const(-3, "int64"))
            clipped = R.clip(zp, 0, 255)
            q = R.astype(clipped, "uint8")
            y = R.nn.max_pool2d(q, pool_size=[3, 3], strides=[2, 2], padding=[1, 1, 1, 1], layout="NHWC")
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def main(acc: R.Tensor((1, 9, 8, 3), "int32")) -> R.Tensor((1, 5, 4, 3), "uint8"):
        with R.dataflow():
            pooled = R.nn.max_pool2d(acc, pool_size=[3, 3], strides=[2, 2], padding=[1, 1, 1, 1], layout="NHWC")
            x = R.add(pooled, R.const(B, "int32"))
            wide = R.astype(x, "int64")
            prod = R.multiply(wide, R.const(M, "int64"))
            total = R.add(prod, R.const(H, "int64"))
            shifted = R.right_shift(total, R.const(E, "int64"))
            zp = R.add(shifted, R.const(-3, "int64"))
            clipped = R.clip(zp, 0, 255)
            y = R.astype(clipped, "uint8")
            R.output(y)
        return y


@I.ir_module
class DeadReader:
    """Before, with an unused layout copy of the requantized tensor (the lowering leaves one per NCHW
    consumer it replaced): dead, it is not another reader."""

    @R.function
    def main(acc: R.Tensor((1, 9, 8, 3), "int32")) -> R.Tensor((1, 5, 4, 3), "uint8"):
        with R.dataflow():
            x = R.add(acc, R.const(B, "int32"))
            wide = R.astype(x, "int64")
            prod = R.multiply(wide, R.const(M, "int64"))
            total = R.add(prod, R.const(H, "int64"))
            shifted = R.right_shift(total, R.const(E, "int64"))
            zp = R.add(shifted, R.const(-3, "int64"))
            clipped = R.clip(zp, 0, 255)
            q = R.astype(clipped, "uint8")
            _unused = R.permute_dims(q, axes=[0, 3, 1, 2])
            y = R.nn.max_pool2d(q, pool_size=[3, 3], strides=[2, 2], padding=[1, 1, 1, 1], layout="NHWC")
            R.output(y)
        return y


@I.ir_module
class NotApplicable:
    """Kept: a negative multiplier (decreasing), a constant that differs per pixel, and a requantized
    tensor another op also reads."""

    @R.function
    def main(acc: R.Tensor((1, 9, 8, 3), "int32")):
        with R.dataflow():
            neg = R.astype(R.clip(R.multiply(acc, R.const(-2, "int32")), 0, 255), "uint8")
            a = R.nn.max_pool2d(neg, pool_size=[3, 3], strides=[2, 2], padding=[1, 1, 1, 1], layout="NHWC")
            ramp = R.const(np.arange(9 * 8, dtype=np.int32).reshape(1, 9, 8, 1))
            per_pixel = R.astype(R.clip(R.add(acc, ramp), 0, 255), "uint8")
            b = R.nn.max_pool2d(per_pixel, pool_size=[3, 3], strides=[2, 2], padding=[1, 1, 1, 1], layout="NHWC")
            shared = R.astype(R.clip(acc, 0, 255), "uint8")
            c = R.nn.max_pool2d(shared, pool_size=[3, 3], strides=[2, 2], padding=[1, 1, 1, 1], layout="NHWC")
            d = R.add(shared, shared)
            R.output(a, b, c, d)
        return (a, b, c, d)


def test_the_pool_moves_onto_the_accumulator():
    tvm.ir.assert_structural_equal(PoolFirst()(Before), Expected)


def test_a_dead_reader_does_not_keep_the_pool():
    tvm.ir.assert_structural_equal(PoolFirst()(DeadReader), Expected)


def test_a_decreasing_step_a_per_pixel_constant_and_a_shared_value_keep_the_pool():
    tvm.ir.assert_structural_equal(PoolFirst()(NotApplicable), NotApplicable)


def test_pooling_first_is_bit_exact():
    """Accumulators across int32's range (the requantize saturates both ways and rounds in between),
    the border windows reading the padding: the same bytes in both orders."""
    rng = np.random.default_rng(2)
    acc = np.concatenate([rng.integers(-(2**31) + 400, 2**31 - 400, (1, 9, 4, 3)),
                          rng.integers(-(2**12), 2**12, (1, 9, 4, 3))], axis=2).astype(np.int32)
    outs = []
    for mod in (Before, PoolFirst()(Before)):
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(acc)).numpy())
    np.testing.assert_array_equal(outs[1], outs[0])
    assert 0 < np.count_nonzero(outs[0] == 255) < outs[0].size and np.count_nonzero((outs[0] > 0) & (outs[0] < 255))
