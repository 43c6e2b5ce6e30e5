"""HighWordRescale (passes/high_word_rescale.py) on tiny lowered Relax graphs.

The pass runs on the lowered, unlegalized integer graph before fusion (codegen/rv32), where every
requantize is ``dyadic.requantize``: ``astype(x, int64) * m + 2^(e-1) >> e``, then ``+ z``, clip and
cast.  Where ``x`` is int32 and every shift is >= 33 it becomes ``dyadic.rescale_high``, and the
saturation of that int32 result clamps in int32.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from passes.dyadic import Dyadic, rescale
from passes.high_word_rescale import HighWordRescale

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


@I.ir_module
class Before:
    """requantize(x, m = 2^31 - 1, e = 40, zero point 3) to int8, as passes/dyadic.py builds it."""

    @R.function
    def main(x: R.Tensor((2, 3), "int32")) -> R.Tensor((2, 3), "int8"):
        with R.dataflow():
            wide = R.astype(x, "int64")
            prod = R.multiply(wide, R.const(I32_MAX, "int64"))
            total = R.add(prod, R.const(2**39, "int64"))
            q = R.right_shift(total, R.const(40, "int64"))
            z = R.add(q, R.const(3, "int64"))
            c = R.clip(z, -128, 127)
            y = R.astype(c, "int8")
            R.output(y)
        return y


@I.ir_module
class Expected:
    """hi = (x * m) >> 32 as int32, then (hi + 2^7) >> 8; the zero point and clamp in int32."""

    @R.function
    def main(x: R.Tensor((2, 3), "int32")) -> R.Tensor((2, 3), "int8"):
        with R.dataflow():
            wide = R.astype(x, "int64")
            prod = R.multiply(wide, R.const(I32_MAX, "int64"))
            hi = R.astype(R.right_shift(prod, R.const(32, "int64")), "int32")
            q = R.right_shift(R.add(hi, R.const(128, "int32")), R.const(8, "int32"))
            c = R.clip(R.add(q, R.const(3, "int32")), -128, 127)
            y = R.astype(c, "int8")
            R.output(y)
        return y


@I.ir_module
class NotApplicable:
    """Three rescales the pass must keep: a shift of 32 (the high word alone would lose a bit of the
    rounding), a rounding constant that is not 2^(e-1), and an int64 ``x`` (not a widened int32)."""

    @R.function
    def main(x: R.Tensor((2, 3), "int32"), w: R.Tensor((2, 3), "int64")):
        with R.dataflow():
            a = R.right_shift(R.add(R.multiply(R.astype(x, "int64"), R.const(I32_MAX, "int64")),
                                    R.const(2**31, "int64")), R.const(32, "int64"))
            b = R.right_shift(R.add(R.multiply(R.astype(x, "int64"), R.const(I32_MAX, "int64")),
                                    R.const(2**38, "int64")), R.const(40, "int64"))
            c = R.right_shift(R.add(R.multiply(w, R.const(I32_MAX, "int64")),
                                    R.const(2**39, "int64")), R.const(40, "int64"))
            R.output(a, b, c)
        return (a, b, c)


@I.ir_module
class WideSaturate:
    """A zero point added to a full-range int32 widened to int64, then clamped to int8: no rescale
    bounds ``x`` here, so ``x + 1`` needs the 64 bits."""

    @R.function
    def main(x: R.Tensor((4,), "int32")) -> R.Tensor((4,), "int8"):
        with R.dataflow():
            z = R.add(R.astype(x, "int64"), R.const(1, "int64"))
            y = R.astype(R.clip(z, -128, 127), "int8")
            R.output(y)
        return y


def _run(mod: tvm.IRModule, *args: np.ndarray):
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(a) for a in args))
    return [o.numpy() for o in out] if isinstance(out, tvm_ffi.Array) else out.numpy()


def test_requantize_becomes_a_high_word_multiply_and_an_int32_clamp():
    """Both rewrites apply to dyadic.requantize's form: the 64-bit add and shift by 40 become an
    int32 add of 2^7 and shift by 8 on the high word, and the saturation runs in int32."""
    tvm.ir.assert_structural_equal(HighWordRescale()(Before), Expected)


def test_rescales_outside_the_pattern_are_left_alone():
    """e = 32, a rounding constant other than 2^(e-1), and an int64 operand: the module is unchanged."""
    tvm.ir.assert_structural_equal(HighWordRescale()(NotApplicable), NotApplicable)


def test_high_word_rescale_equals_the_int64_rescale_at_the_boundaries():
    """dyadic.rescale (unclamped, int64) and its high-word rewrite agree bit for bit on every int32
    extreme, with the largest multiplier 2^31 - 1 at the smallest (33) and largest (62) shifts, the
    smallest normalized multiplier 2^30 on exact ties (x = +-4, +-12: half up), and m = 1."""
    m = np.array([I32_MAX, I32_MAX, I32_MAX, 2**30, 1, 1234567891], np.int64)
    e = np.array([33, 62, 47, 33, 33, 40], np.int64)
    rng = np.random.default_rng(5)
    x = np.concatenate([
        np.array([[I32_MAX] * 6, [I32_MIN] * 6, [I32_MIN + 1] * 6, [-1] * 6, [0] * 6, [1] * 6,
                  [4, -4, 12, 4, -12, 12], [-4, 4, -12, -4, 12, -12]], np.int64),
        rng.integers(I32_MIN, I32_MAX, size=(8, 6), endpoint=True)]).astype(np.int32)

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "int32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit_output(rescale(xv, Dyadic(m, e), axis=1))
        bb.emit_func_output(y)
    mod = bb.get()
    high = HighWordRescale()(mod)
    ops = []
    relax.analysis.post_order_visit(high["main"], lambda n: ops.append(n.op.name)
                                    if isinstance(n, relax.Call) and isinstance(n.op, tvm.ir.Op) else None)
    assert ops.count("relax.right_shift") == 2 and "relax.add" in ops     # the high-word form, not the original

    got = _run(high, x)
    # the specification in exact Python integers: (x * m + 2^(e-1)) >> e, floor division
    want = np.array([[(int(v) * int(mm) + (1 << (int(ee) - 1))) >> int(ee) for v, mm, ee in zip(row, m, e, strict=True)]
                     for row in x], np.int64)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, _run(mod, x))
    assert want[6, 3] == 1 and want[7, 3] == 0          # the ties of m = 2^30, e = 33 round half up


def test_requantize_rewrite_is_bit_exact_with_the_original():
    """The int8 results of Before and its rewrite agree on the int32 extremes and around the
    saturation points (x * m / 2^40 near 124.5 and -131.5 with the zero point 3)."""
    x = np.array([[I32_MAX, I32_MIN, 0], [int(124.5 * 2**40 / I32_MAX), int(-131.5 * 2**40 / I32_MAX), -1]],
                 np.int32)
    got = _run(HighWordRescale()(Before), x)
    want = np.clip(((x.astype(np.int64) * I32_MAX + 2**39) >> 40) + 3, -128, 127).astype(np.int8)
    np.testing.assert_array_equal(got, want)


def test_saturation_of_an_unbounded_int32_is_not_narrowed():
    """The pass must preserve values: clip(INT32_MAX + 1, -128, 127) is 127, not a wrapped -128."""
    x = np.array([I32_MAX, I32_MIN, 5, -5], np.int32)
    np.testing.assert_array_equal(_run(HighWordRescale()(WideSaturate), x), np.array([127, -128, 6, -4], np.int8))
