"""The integer region cut (codegen/integer_region.extract) on tiny lowered Relax graphs.

``extract`` runs on the lowered model before the rv32 build: ``main(x: float32) -> dequantize(...)``
becomes ``main(x_q: int8) -> int8``, the opening quantize replaced by a parameter, the closing
dequantize by its integer operand, and bindings the outputs do not need dropped.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from codegen.integer_region import RegionError, extract
from runtime.types import BoundaryTensor

BIAS = np.array([1, -2, 3, -4])


@I.ir_module
class Model:
    @R.function
    def main(x: R.Tensor((2, 4), "float32")) -> R.Tensor((2, 4), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.05, "float32"), R.const(3, "int8"), axis=-1, out_dtype="int8")
            _dead = R.multiply(x, R.const(2.0, "float32"))          # the outputs do not need it
            w = R.add(R.astype(q, "int32"), R.const(BIAS, "int32"))
            y = R.astype(R.clip(R.right_shift(w, R.const(1, "int32")), -128, 127), "int8")
            f = R.dequantize(y, R.const(0.1, "float32"), R.const(-1, "int8"), axis=-1, out_dtype="float32")
            R.output(f)
        return f


@I.ir_module
class Region:
    @R.function
    def main(input0: R.Tensor((2, 4), "int8")) -> R.Tensor((2, 4), "int8"):
        with R.dataflow():
            w = R.add(R.astype(input0, "int32"), R.const(BIAS, "int32"))
            y = R.astype(R.clip(R.right_shift(w, R.const(1, "int32")), -128, 127), "int8")
            gv = y
            R.output(gv)
        return gv


@I.ir_module
class TwoWay:
    """Two inputs, two outputs, the second through an alias of its dequantize."""

    @R.function
    def main(a: R.Tensor((3,), "float32"), b: R.Tensor((3,), "float32")):
        with R.dataflow():
            qa = R.quantize(a, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            qb = R.quantize(b, R.const(0.25, "float32"), R.const(10, "uint8"), axis=-1, out_dtype="uint8")
            s = R.astype(R.clip(R.add(R.astype(qa, "int32"), R.astype(qb, "int32")), 0, 255), "uint8")
            d = R.astype(R.clip(R.subtract(R.astype(qa, "int32"), R.astype(qb, "int32")), -128, 127), "int8")
            fs = R.dequantize(s, R.const(1.0, "float32"), R.const(5, "uint8"), axis=-1, out_dtype="float32")
            fd = R.dequantize(d, R.const(2.0, "float32"), R.const(-3, "int8"), axis=-1, out_dtype="float32")
            alias = fd
            R.output(fs, alias)
        return (fs, alias)


@I.ir_module
class FloatFirst:
    """Float math before the input quantize: no integer-only entry point."""

    @R.function
    def main(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
        with R.dataflow():
            q = R.quantize(R.multiply(x, R.const(2.0, "float32")), R.const(0.5, "float32"), R.const(0, "int8"),
                           axis=-1, out_dtype="int8")
            f = R.dequantize(q, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            R.output(f)
        return f


@I.ir_module
class FloatLast:
    """Float math after the output dequantize."""

    @R.function
    def main(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            f = R.dequantize(q, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            g = R.nn.relu(f)
            R.output(g)
        return g


@I.ir_module
class PerChannelOut:
    """The output dequantize has a scale per channel: the C interface takes one."""

    @R.function
    def main(x: R.Tensor((2, 2), "float32")) -> R.Tensor((2, 2), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            f = R.dequantize(q, R.const(np.array([0.5, 0.25]), "float32"), R.const(np.array([0, 0]), "int8"),
                             axis=-1, out_dtype="float32")
            R.output(f)
        return f


@I.ir_module
class Symbolic:
    @R.function
    def main(x: R.Tensor(("n", 4), "float32")) -> R.Tensor(("n", 4), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            f = R.dequantize(q, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            R.output(f)
        return f


def _vm(mod: tvm.IRModule):
    return relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())["main"]


def test_region_is_the_integer_core():
    """The quantize becomes an int8 parameter named after the ONNX input, the dequantize its int8
    operand, and the float binding the output does not need is gone."""
    region, _, _ = extract(Model, ["input0"], ["out0"])
    tvm.ir.assert_structural_equal(region, Region)


def test_boundaries_carry_the_graph_quantization_parameters():
    """Each boundary tensor has the ONNX name, static shape, integer dtype, and the float32 scale and
    zero point of its quantize / dequantize, in parameter and output order."""
    _, ins, outs = extract(Model, ["input0"], ["out0"])
    assert ins == [BoundaryTensor("input0", (2, 4), "int8", float(np.float32(0.05)), 3)]
    assert outs == [BoundaryTensor("out0", (2, 4), "int8", float(np.float32(0.1)), -1)]

    region, ins, outs = extract(TwoWay, ["a", "b"], ["sum", "diff"])
    assert [(p.name, str(p.ty.dtype)) for p in region["main"].params] == [("a", "int8"), ("b", "uint8")]
    assert ins == [BoundaryTensor("a", (3,), "int8", 0.5, 0), BoundaryTensor("b", (3,), "uint8", 0.25, 10)]
    assert outs == [BoundaryTensor("sum", (3,), "uint8", 1.0, 5), BoundaryTensor("diff", (3,), "int8", 2.0, -3)]
    ret = region["main"].ret_ty
    assert [str(f.dtype) for f in ret.fields] == ["uint8", "int8"]


@pytest.mark.parametrize("mod, message", [
    (FloatFirst, "input 'x' is not quantized directly"),
    (FloatLast, "output 'y' is not dequantized at the end"),
    (PerChannelOut, "per-channel or non-constant parameters"),
    (Symbolic, "symbolic shape"),
])
def test_graphs_without_an_integer_core_are_refused(mod, message):
    """Float math at either end, a per-channel boundary or a symbolic shape: RegionError, named."""
    with pytest.raises(RegionError, match=message):
        extract(mod, ["x"], ["y"])


def test_region_runs_bit_exact_with_the_whole_model():
    """Quantizing on the host, running the region and dequantizing on the host gives the whole
    float model's output exactly, on values inside the int8 range and saturating at both ends."""
    region, (tin,), (tout,) = extract(Model, ["input0"], ["out0"])
    x = np.array([[0.31, -0.47, 1.02, -2.13], [100.0, -100.0, 6.26, -6.43]], np.float32)
    q = tin.quantize(x)
    got = _vm(region)(tvm.runtime.tensor(q)).numpy()
    want_q = np.clip((q.astype(np.int32) + BIAS) >> 1, -128, 127).astype(np.int8)
    assert got.dtype == np.int8 and {127, -128} <= set(q.reshape(-1).tolist())
    np.testing.assert_array_equal(got, want_q)
    np.testing.assert_array_equal(tout.dequantize(got), _vm(Model)(tvm.runtime.tensor(x)).numpy())


@I.ir_module
class PerChannelAccumulator:
    """A last layer's int32 accumulator leaves at s_x * s_w[c] (NNCF's float classifier)."""

    @R.function
    def main(x: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            acc = R.multiply(R.astype(q, "int32"), R.const(np.array([1, 200003, -3]), "int32"))
            f = R.dequantize(acc, R.const(np.array([0.5, 3e-4, 0.1]), "float32"), R.const(np.zeros(3), "int32"),
                             axis=1, out_dtype="float32")
            R.output(f)
        return f


def test_a_per_channel_output_is_taken_where_the_target_dequantizes_on_the_host():
    """With ``per_axis_outputs`` the boundary carries one scale and zero point per channel, survives
    the manifest's dict, and the host dequantize equals the compiled one bit for bit (accumulators
    past 2^24, where the order of int32 and float32 steps matters)."""
    region, (tin,), (tout,) = extract(PerChannelAccumulator, ["x"], ["y"], per_axis_outputs=True)
    assert tout == BoundaryTensor("y", (2, 3), "int32", tuple(float(np.float32(s)) for s in (0.5, 3e-4, 0.1)),
                                  (0, 0, 0), 1)
    assert BoundaryTensor.from_dict(vars(tout)) == tout
    x = np.array([[63.5, 63.5, -64.0], [-0.5, 41.0, 17.5]], np.float32)
    got = _vm(region)(tvm.runtime.tensor(tin.quantize(x))).numpy()
    assert np.abs(got).max() > 1 << 24
    np.testing.assert_array_equal(tout.dequantize(got), _vm(PerChannelAccumulator)(tvm.runtime.tensor(x)).numpy())
    with pytest.raises(RegionError, match="per-channel"):
        extract(PerChannelAccumulator, ["x"], ["y"])
