"""HAWQ-V3 dyadic requantization: offline parameters, the Relax kernel, and the
golden reference, which must agree bit for bit."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import tvm
from tvm import relax

from codegen import llvm
from passes.dyadic import Dyadic, dyadic, dyadic_from_ratio, requantize
from runtime import golden


def _round_half_up(num: int, den: int) -> int:
    """Exact rational rounding, ties toward +inf: the specification itself."""
    q = Fraction(num, den)
    return int((q + Fraction(1, 2)).__floor__())


def test_parameters_are_31_bit_and_accurate():
    ratios = np.concatenate([np.logspace(-9, 3, 2000), [1.0, 0.5, 2.0**-20, 1 / 3]])
    d = dyadic_from_ratio(ratios)
    assert np.all((d.m >= 2**30) & (d.m < 2**31))
    assert np.all((d.e >= 0) & (d.e <= 62))
    rel = np.abs(d.value() - ratios) / ratios
    assert rel.max() <= 2.0**-31


def test_float32_scales_give_the_graph_constants_ratio():
    s_x, s_w, s_out = np.float32(0.0123), np.float32([0.002, 0.0031]), np.float32(0.05)
    d = dyadic(np.float32(s_x * s_w), s_out)
    want = np.float32(s_x * s_w).astype(np.float64) / np.float64(s_out)
    assert d.m.shape == (2,)
    assert np.all(np.abs(d.value() - want) / want <= 2.0**-31)


def test_mantissa_rounding_up_to_2_31_is_renormalized():
    ratio = 1 - 2.0**-34                     # mant * 2^31 = 2^31 - 2^-3 rounds to 2^31
    d = dyadic_from_ratio(ratio)
    assert int(d.m[0]) == 2**30 and int(d.e[0]) == 30
    assert d.value()[0] == 1.0


def test_tiny_zero_and_invalid_ratios():
    d = dyadic_from_ratio([0.0, 2.0**-40, 2.0**-32])
    assert d.m.tolist()[:2] == [0, 0] and d.e.tolist()[:2] == [0, 0]
    assert int(d.e[2]) == 62                           # 2^-32 is the smallest kept: e = 62
    # at e = 62, -2^31 * 2^-32 = -0.5 exactly: half up gives 0, and nothing overflows int64
    assert golden.requantize([-(2**31), 2**31 - 1], d.m[2], d.e[2], -128, 127).tolist() == [0, 0]
    for bad in (-1.0, np.inf, np.nan, 2.0**31):
        with pytest.raises(ValueError):
            dyadic_from_ratio(bad)


def test_golden_matches_exact_rational_rounding_including_ties():
    rng = np.random.default_rng(0)
    d = dyadic_from_ratio(np.array([0.37, 1.0 / 3, 2.0**-9, 0.001]))
    for m, e in zip(d.m.tolist(), d.e.tolist(), strict=True):
        x = rng.integers(-(2**31), 2**31, size=300, dtype=np.int64)
        # exact ties: x*m = (k + 1/2) * 2^e for x = 2^(e-1)/gcd-style values; build some directly
        ties = np.array([(2 * k + 1) * (1 << (e - 1)) // m for k in range(-5, 5)
                         if ((2 * k + 1) * (1 << (e - 1))) % m == 0], dtype=np.int64)
        x = np.concatenate([x, ties, [2**31 - 1, -(2**31), 0, -1, 1]])
        got = golden.requantize(x, m, e, -(2**40), 2**40, dtype=np.int64)
        want = [_round_half_up(int(v) * m, 1 << e) for v in x]
        assert got.tolist() == want


def test_half_up_on_exact_ties():
    d = Dyadic(np.array([1 << 30]), np.array([31]))     # exactly x / 2
    x = np.array([-5, -3, -1, 1, 3, 5])
    assert golden.requantize(x, d.m, d.e, -128, 127).tolist() == [-2, -1, 0, 1, 2, 3]


def _compile_requant(shape, d: Dyadic, qmin, qmax, out_dtype, axis):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(requantize(x, d, qmin, qmax, out_dtype, axis))
        bb.emit_func_output(y)
    mod = bb.get()
    ex, kernels, _ = llvm.build(mod, llvm.host_target())
    return relax.VirtualMachine(ex, tvm.cpu()), list(kernels)


@pytest.mark.parametrize("per_channel, out_dtype, qmin, qmax", [
    (False, "int8", -128, 127),
    (True, "int8", -128, 127),
    (True, "uint8", 0, 255),
    (False, "int16", -(2**15), 2**15 - 1),
])
def test_relax_kernel_is_bit_exact_against_golden(per_channel, out_dtype, qmin, qmax):
    rng = np.random.default_rng(1)
    channels = 12
    ratios = rng.uniform(1e-5, 0.2, size=channels if per_channel else 1)
    ratios[0] = 2.0**-9                                  # a pure shift, with exact ties below
    if per_channel:
        ratios[1], ratios[2] = 2.0**-32, 2.0**-40        # the largest shift (62) and m = 0
    d = dyadic_from_ratio(ratios)
    x = rng.integers(-(2**31), 2**31, size=(7, channels), dtype=np.int64)
    x[0] = rng.integers(-(2**12), 2**12, size=channels)  # small values: many land in range
    x[1, :] = 2**31 - 1
    x[2, :] = -(2**31)
    x[3, :] = np.arange(channels) * 256 + 256            # multiples of 2^8: ties for 2^-9
    x = x.astype(np.int32)
    vm, kernels = _compile_requant((7, channels), d, qmin, qmax, out_dtype, axis=1)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = golden.requantize(x, d.m, d.e, qmin, qmax, axis=1, dtype=np.dtype(out_dtype))
    assert got.dtype == np.dtype(out_dtype)
    np.testing.assert_array_equal(got, want)
    assert len(kernels) == 1                             # multiply-add-shift-clip-cast fused into one kernel


@pytest.mark.parametrize("per_channel", [False, True])
def test_high_word_rescale_is_the_same_integer(per_channel):
    """passes/high_word_rescale.py (rv32): (mulh(x, m) + 2^(e-33)) >> (e-32) for every e >= 33,
    bit-exact against the golden 64-bit formula at the int32 extremes and on exact ties."""
    import tvm_ffi

    from passes.high_word_rescale import HighWordRescale

    rng = np.random.default_rng(2)
    channels = 12
    ratios = rng.uniform(1e-6, 0.24, size=channels if per_channel else 1)
    ratios[0] = 2.0**-9                                  # e = 39, exact ties below
    if per_channel:
        ratios[1], ratios[2] = 2.0**-32, 0.2499          # the largest shift (62), and e = 33
    d = dyadic_from_ratio(ratios)
    assert d.e.min() >= 33
    x = rng.integers(-(2**31), 2**31, size=(7, channels), dtype=np.int64)
    x[0] = rng.integers(-(2**12), 2**12, size=channels)
    x[1, :], x[2, :] = 2**31 - 1, -(2**31)
    x[3, :] = np.arange(channels) * 256 + 256
    x = x.astype(np.int32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "int32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit_output(requantize(xv, d, -128, 127, "int8", axis=1))
        bb.emit_func_output(y)
    mod = bb.get()
    high = HighWordRescale()(mod)
    assert not tvm_ffi.structural_equal(high, mod)       # the rewrite applied
    ex, _, _ = llvm.build(high, llvm.host_target())
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, golden.requantize(x, d.m, d.e, -128, 127, axis=1))


@pytest.mark.parametrize("per_channel", [False, True])
def test_wide_rescale_is_the_exact_integer_past_int64_products(per_channel):
    """passes/dyadic.rescale_wide: accumulators up to 2^51 (a convolution over 16-bit activations),
    whose product with a 31-bit multiplier passes int64, split at 2^20: equal to the exact rational
    round-half-up at the extremes, on exact ties and at random, as golden's unbounded integers."""
    from passes.dyadic import rescale_wide

    rng = np.random.default_rng(3)
    channels = 6
    ratios = rng.uniform(1e-9, 1e-3, size=channels if per_channel else 1)
    ratios[0] = 2.0**-24                                 # exact ties below
    d = dyadic_from_ratio(ratios)
    x = rng.integers(-(2**51) + 1, 2**51, size=(6, channels), dtype=np.int64)
    x[1, :], x[2, :] = 2**51 - 1, -(2**51) + 1
    x[3, :] = (np.arange(channels) * 2 + 1) << 23        # odd multiples of 2^23: ties at 2^-24
    x[4, :] = -x[3, :]
    assert int(np.abs(x).max()) * int(d.m.max()) >= 2**63      # rescale's int64 product would wrap
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "int64"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit_output(rescale_wide(xv, d, axis=1))
        bb.emit_func_output(y)
    ex, _, _ = llvm.build(bb.get(), llvm.host_target())
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    m, e = np.broadcast_to(d.m, (channels,)), np.broadcast_to(d.e, (channels,))
    want = np.array([[_round_half_up(int(v) * int(m[c]), 1 << int(e[c])) for c, v in enumerate(row)] for row in x])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, golden.requantize(x, d.m, d.e, -(2**62), 2**62, axis=1, dtype=np.int64))
