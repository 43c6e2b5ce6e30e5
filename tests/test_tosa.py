"""The TOSA target (codegen/tosa): the integer region as TOSA 1.0 MLIR, compiled by IREE and run by
its runtime, bit-exact with the golden interpreter and with lowbit's own CPU build of the same
integer program.  Each handler of the emitter that does more than rename an op (floor division
from TOSA's truncating one, shifts past the width, lookups, 64-bit values) is checked against numpy
on inputs that reach its corner cases."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import assert_golden_per_sample, compile_with_golden, mlp_model, one_line_error, run_cli
from tvm import relax

from codegen.tosa import emit, iree
from compiler import driver
from compiler.options import CompileOptions
from models import zoo
from passes.value_ranges import Ranges

pytestmark = pytest.mark.usefixtures("iree_wheels")


def _run(func: relax.Function, *xs: np.ndarray) -> list[np.ndarray]:
    """``func`` as TOSA, through iree-compile and IREE's runtime."""
    import iree.runtime as rt

    text, _, wide = emit.module(func)
    ctx = rt.SystemContext(config=rt.Config("local-task"))
    ctx.add_vm_module(rt.VmModule.copy_buffer(ctx.instance, iree.compile_tosa(text, iree.HOST, "test")))
    out = ctx.modules.module.main(*xs)
    return [np.asarray(o.to_host()) for o in (out if isinstance(out, (list, tuple)) else [out])]


def _function(build, *params: tuple[tuple[int, ...], str]) -> relax.Function:
    bb = relax.BlockBuilder()
    vs = [relax.Var(f"x{i}", relax.TensorType(shape, dtype)) for i, (shape, dtype) in enumerate(params)]
    with bb.function("main", vs):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *vs))
        bb.emit_func_output(out)
    return bb.get()["main"]


def test_floor_division_of_signed_values_is_numpys():
    """TOSA's INTDIV truncates toward zero; Relax's floor_divide floors: the emitter corrects where
    the remainder is nonzero and the signs differ."""
    func = _function(lambda bb, a, b: relax.op.floor_divide(a, b), ((64,), "int32"), ((64,), "int32"))
    rng = np.random.default_rng(0)
    a = rng.integers(-1000, 1000, 64).astype(np.int32)
    b = rng.choice([-7, -3, -1, 1, 2, 5, 9], 64).astype(np.int32)
    (got,) = _run(func, a, b)
    np.testing.assert_array_equal(got, a // b)


def test_a_shift_past_the_width_is_the_sign_and_64_bit_values_stay_exact():
    """``x >> 40`` of int32 values is 0 or -1 (TOSA takes shifts below the width, so it is clamped);
    int64 products beyond int32 are written on i64 tensors and counted."""
    def build(bb, a):
        wide = bb.emit(relax.op.multiply(relax.op.astype(a, "int64"), relax.const(3_000_000_000, "int64")))
        return relax.op.add(relax.op.right_shift(wide, relax.const(33, "int64")),
                            relax.op.astype(relax.op.right_shift(a, relax.const(40, "int32")), "int64"))
    func = _function(build, ((32,), "int32"))
    a = np.random.default_rng(1).integers(-2**31, 2**31 - 1, 32).astype(np.int32)
    (got,) = _run(func, a)
    want = ((a.astype(np.int64) * 3_000_000_000) >> 33) + (a >> 31)
    np.testing.assert_array_equal(got, want)
    assert emit.module(func)[2], "the 64-bit product was not counted as an i64 op"


def test_a_lookup_is_a_gather_of_the_table():
    table = np.random.default_rng(2).integers(-30000, 30000, 256).astype(np.int16)
    func = _function(lambda bb, q: relax.op.take(relax.const(table), relax.op.add(relax.op.astype(q, "int32"),
                                                                                     relax.const(128, "int32")), axis=0),
                     ((2, 16), "int8"))
    q = np.arange(-128, -96, dtype=np.int8).reshape(2, 16)
    (got,) = _run(func, q)
    np.testing.assert_array_equal(got, table[q.astype(np.int32) + 128])


def test_a_computed_divisor_is_kept_off_zero_and_the_quotient_is_numpys():
    """I-ViT's 2^40 // sum(exp): a divisor computed by a reduction is guarded (max(d, 1) where the
    ranges prove d >= 1, else 0 -> 1), as IREE divides on a reduction tile's padding too, where the
    divisor reads 0 and x86 traps; on every real element the quotient is the floor division's."""
    def build(bb, x, d):
        s = bb.emit(relax.op.sum(relax.op.add(relax.op.astype(x, "int64"), relax.const(200, "int64")),
                                 axis=[-1], keepdims=True))
        return relax.op.add(relax.op.floor_divide(relax.const(1 << 40, "int64"), s),
                            relax.op.astype(relax.op.floor_divide(relax.op.astype(x, "int32"), d), "int64"))
    func = _function(build, ((5, 33), "int8"), ((5, 1), "int32"))
    text, ops, _ = emit.module(func)
    assert ops["tosa.maximum"] == 1 and ops["tosa.select"] == 1     # one divisor proven >= 1, one not
    x = np.random.default_rng(4).integers(-128, 128, (5, 33)).astype(np.int8)
    d = np.array([[-7], [3], [1], [-1], [250]], np.int32)
    (got,) = _run(func, x, d)
    s = (x.astype(np.int64) + 200).sum(-1, keepdims=True)
    np.testing.assert_array_equal(got, (1 << 40) // s + x.astype(np.int64) // d)


def test_a_requantize_past_32_bits_stays_64_bit_arithmetic():
    """(x * m + 2^(e-1)) >> e whose result does not fit int32 (a ratio above one on a wide value,
    bounded only by the clip after it) is not a tosa.rescale, which IREE truncates to 32 bits."""
    def build(bb, x):
        r = bb.emit(relax.op.right_shift(relax.op.add(relax.op.multiply(relax.op.astype(x, "int64"),
                                                                        relax.const(1 << 30, "int64")),
                                                      relax.const(1 << 27, "int64")), relax.const(28, "int64")))
        return relax.op.astype(relax.op.clip(r, -32768, 32767), "int16")
    func = _function(build, ((64,), "int32"))
    assert "tosa.rescale" not in emit.module(func)[1]
    x = np.random.default_rng(5).integers(-2**31, 2**31 - 1, 64).astype(np.int32)
    x[:4] = [0, 5000, -5000, 8191]
    (got,) = _run(func, x)
    want = np.clip(((x.astype(np.int64) << 30) + (1 << 27)) >> 28, -32768, 32767)
    np.testing.assert_array_equal(got, want)


def test_constant_indices_into_a_tensor_and_lower_rank_operands():
    """ONNX Gather of a class token (take at a constant index along an axis: slices), negative
    indices from the end, and a computed rank-0 value added to a matrix (TOSA broadcasts between
    equal ranks only: reshaped)."""
    def build(bb, x):
        head = bb.emit(relax.op.take(x, relax.const(0, "int64"), axis=1))
        both = bb.emit(relax.op.take(x, relax.const(np.array([-1, 1]), "int64"), axis=1))
        top = bb.emit(relax.op.max(relax.op.astype(head, "int32")))
        return relax.op.add(relax.op.astype(both, "int32"), top)
    func = _function(build, ((2, 5, 3), "int8"))
    x = np.random.default_rng(6).integers(-128, 128, (2, 5, 3)).astype(np.int8)
    (got,) = _run(func, x)
    np.testing.assert_array_equal(got, x[:, [-1, 1]].astype(np.int32) + x[:, 0].astype(np.int32).max())


def test_a_16_bit_operand_with_a_zero_point_is_centered():
    """TOSA 1.0 takes a 16-bit matmul's zero points as 0 only: int16 activations minus their zero
    point (their range proves the difference fits int16) times centered int8 values."""
    def build(bb, x, w):
        x16 = bb.emit(relax.op.astype(relax.op.clip(relax.op.astype(x, "int32"), -1000, 1000), "int16"))
        a = bb.emit(relax.op.subtract(relax.op.astype(x16, "int32"), relax.const(100, "int32")))
        b = bb.emit(relax.op.subtract(relax.op.astype(w, "int32"), relax.const(3, "int32")))
        return relax.op.matmul(a, b, out_dtype="int32")
    func = _function(build, ((2, 4, 8), "int16"), ((2, 8, 3), "int8"))
    rng = np.random.default_rng(7)
    x = rng.integers(-2000, 2000, (2, 4, 8)).astype(np.int16)
    w = rng.integers(-128, 128, (2, 8, 3)).astype(np.int8)
    (got,) = _run(func, x, w)
    np.testing.assert_array_equal(got, (np.clip(x.astype(np.int64), -1000, 1000) - 100) @ (w.astype(np.int64) - 3))


def test_a_u16_operand_over_its_full_span_times_constant_weights():
    """value - 5 of a uint16 tensor spans [-5, 65530], no int16: the matmul reads the stored view
    (value - 32768) with zero point 0, and 32763 times each column's weight sum is added after."""
    w = np.random.default_rng(8).integers(-128, 128, (8, 3)).astype(np.int8)
    func = _function(lambda bb, x: relax.op.matmul(relax.op.subtract(relax.op.astype(x, "int32"), relax.const(5, "int32")),
                                                   relax.const(w.astype(np.int32)), out_dtype="int32"),
                     ((4, 8), "uint16"))
    x = np.random.default_rng(9).integers(0, 65536, (4, 8)).astype(np.uint16)
    x[0] = 65535
    x[1] = 0
    (got,) = _run(func, (x.astype(np.int32) - 32768).astype(np.int16))     # the boundary crosses as the view
    np.testing.assert_array_equal(got, (x.astype(np.int64) - 5) @ w.astype(np.int64))


def test_a_matmul_whose_sums_need_64_bits_is_two_byte_matmuls():
    """A uint16 vector (a pooled feature map on its 16-bit grid) times 600 int8 weights per output
    passes int32; TOSA's matmul accumulates in 32 bits, so each byte of x is its own int8 matmul and
    256 acc_high + acc_low is joined in int64, exactly."""
    w = np.random.default_rng(10).integers(64, 128, (600, 5)).astype(np.int8)
    func = _function(lambda bb, x: relax.op.matmul(relax.op.astype(x, "int32"), relax.const(w.astype(np.int32)),
                                                   out_dtype="int64"), ((2, 600), "uint16"))
    assert emit.module(func)[1]["tosa.matmul"] == 2
    x = np.random.default_rng(11).integers(0, 65536, (2, 600)).astype(np.uint16)
    x[0] = 65535
    (got,) = _run(func, (x.astype(np.int32) - 32768).astype(np.int16))
    want = x.astype(np.int64) @ w.astype(np.int64)
    assert np.abs(want).max() > 2**31
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("groups, floor", [(1, 0), (2, 0), (1, 40000)])
def test_a_convolution_whose_sums_need_64_bits_is_two_byte_convolutions(groups, floor):
    """The same for a uint16 feature map, padded with its zero point, into a 3x3 convolution (as
    codegen/tosa/units.py writes it): each byte of the padded input is an int8 convolution.  With a
    floor, the values' high bytes start at 156, and their int8 offset's zero point stays in range."""
    w = np.random.default_rng(12).integers(64, 128, (8, 128 // groups, 3, 3)).astype(np.int8)

    def build(bb, x):
        if floor:
            x = bb.emit(relax.op.maximum(x, relax.const(floor, "uint16")))
        xp = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=40000.0))
        return relax.op.nn.conv2d(xp, relax.const(w), groups=groups, out_dtype="int64")
    func = _function(build, ((1, 128, 5, 5), "uint16"))
    assert emit.module(func)[1]["tosa.conv2d"] == 2 * groups
    x = np.random.default_rng(13).integers(0, 65536, (1, 128, 5, 5)).astype(np.uint16)
    x[0, :, 2] = 65535
    (got,) = _run(func, (x.astype(np.int32) - 32768).astype(np.int16))
    xp = np.pad(np.maximum(x.astype(np.int64), floor), [(0, 0), (0, 0), (1, 1), (1, 1)], constant_values=40000)
    per = 128 // groups
    want = np.zeros((1, 8, 5, 5), np.int64)
    for o in range(8):
        g = o // (8 // groups)
        for i, j in np.ndindex(5, 5):
            want[0, o, i, j] = (xp[0, g * per:(g + 1) * per, i:i + 3, j:j + 3] * w[o]).sum()
    assert np.abs(want).max() > 2**31
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_an_8_bit_lookup_is_a_table_over_the_window_its_indices_reach(dtype):
    """Indices 172..427 of a 1024-entry table: one ``tosa.table`` over that window (TOSA reads
    ``table[x + 128]``); a uint8 table's result comes back as its signed view."""
    info = np.iinfo(dtype)
    table = np.random.default_rng(3).integers(info.min, info.max + 1, 1024).astype(dtype)
    func = _function(lambda bb, q: relax.op.take(relax.const(table), relax.op.add(relax.op.astype(q, "int32"),
                                                                                     relax.const(300, "int32")), axis=0),
                     ((4, 64), "int8"))
    assert emit.module(func)[1]["tosa.table"] == 1
    q = np.arange(-128, 128, dtype=np.int8).reshape(4, 64)
    (got,) = _run(func, q)
    offset = emit.OFFSET.get(dtype, 0)
    np.testing.assert_array_equal(got.astype(np.int64) + offset, table[q.astype(np.int32) + 300])


def test_ranges_bound_every_value_for_every_input():
    """passes/value_ranges on a requantize and a row-max difference: the intervals hold on random
    inputs, and max(x) - x is known to be nonnegative."""
    def build(bb, q):
        x = bb.emit(relax.op.astype(q, "int32"))
        d = bb.emit(relax.op.subtract(relax.op.max(x, axis=-1, keepdims=True), x))
        y = bb.emit(relax.op.right_shift(relax.op.add(relax.op.multiply(relax.op.astype(d, "int64"),
                                                                         relax.const(1518500250, "int64")),
                                                       relax.const(1 << 31, "int64")), relax.const(32, "int64")))
        return relax.op.clip(y, -128, 127)
    func = _function(build, ((4, 8), "int8"))
    ranges = Ranges(func)
    bindings = [b for block in func.body.blocks for b in block.bindings]
    (difference,) = [b.var for b in bindings if b.value.op.name == "relax.subtract"]
    assert ranges.of(difference) == (0, 255)
    mod = tvm.IRModule({"main": func})
    exe = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    for seed in range(5):
        q = np.random.default_rng(seed).integers(-128, 128, (4, 8)).astype(np.int8)
        (got,) = _run(func, q)
        np.testing.assert_array_equal(got, vm["main"](tvm.runtime.tensor(q)).numpy())
        d = q.astype(np.int64).max(-1, keepdims=True) - q
        lo, hi = ranges.of(bindings[-2].var)
        y = (d * 1518500250 + (1 << 31)) >> 32
        assert lo <= y.min() and y.max() <= hi


@pytest.mark.parametrize("bits", ["4", "mixed"])
def test_sub_byte_and_mixed_plans_run_bit_exact(bits):
    """4-bit and mixed plans: the packed weights are stored unpacked, as int8 constants."""
    files = zoo.ensure("digits_cnn")
    extra = {"size_budget": 0.5} if bits == "mixed" else {}
    art, qdq, variants = compile_with_golden(files.onnx, calib=files.calibration(), target="tosa",
                                             weight_bits=bits, **extra)
    assert any(w["bits"] < 8 for w in art.manifest.quantization["weights"]) or bits == "mixed"
    assert_golden_per_sample(art, qdq, variants, zoo.get("digits_cnn").samples(3, seed=6))


def test_cli_writes_tosa_and_a_vmfb_runs_and_inspects(tmp_path):
    files = zoo.ensure("digits_cnn")
    out = tmp_path / "art"
    r = run_cli("compile", files.onnx, "--calib", files.calib, "--target", "tosa", "-o", out)
    assert r.returncode == 0, r.stderr
    text = (out / "model.tosa.mlir").read_text()
    assert '"tosa.conv2d"' in text and '"tosa.rescale"' in text and "f32" not in text
    assert (out / "model.vmfb").stat().st_size > 0
    x = zoo.get("digits_cnn").samples(2, seed=1)
    np.save(tmp_path / "x.npy", x)
    r = run_cli("run", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "y.npz")[zoo.OUTPUT].shape[0] == 2
    r = run_cli("inspect", out)
    assert r.returncode == 0 and "tosa " in r.stdout and "conv2d" in r.stdout


def test_a_float_model_and_a_bad_triple_are_one_line_errors(tmp_path, mlp_path):
    r = run_cli("compile", mlp_path, "--target", "tosa", "--input-shape", "x=1,8", "-o", tmp_path / "a")
    assert r.returncode == 2 and "not integer-only" in one_line_error(r.stderr)
    assert not (tmp_path / "a").exists()
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32))
    r = run_cli("compile", mlp_path, "--calib", calib, "--target", "tosa", "--iree-target", "arm", "--input-shape", "x=1,8",
                "-o", tmp_path / "b")
    assert r.returncode == 2 and "--iree-target arm" in one_line_error(r.stderr)


def test_an_mlp_compiles_for_another_triple_without_running_here(tmp_path):
    """--iree-target aarch64-linux-gnu: cross-compiled by IREE's llvm-cpu backend."""
    calib = {"x": np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)}
    art = driver.compile(mlp_model(), options=CompileOptions(target="tosa", calib=calib,
                                                            target_options={"iree_target": "aarch64-linux-gnu"}))
    assert art.manifest.build["iree_target"] == "aarch64-linux-gnu"


def test_a_u8_qdq_file_runs_on_signed_views(tmp_path):
    """ORT's static QDQ (u8 activations, s8 weights) of digits_cnn: every uint8 tensor crosses TOSA as
    its signed view (value - 128, the offset folded into the convolutions' zero points), bit-exact
    with golden, and the boundary's uint8 integers are what IREE's module reads and writes."""
    from compiler.tools import ort

    files = zoo.ensure("digits_cnn")
    qdq = ort.quantize(str(files.onnx), files.calibration(), str(tmp_path / "q.onnx"), "static")
    art, model, variants = compile_with_golden(qdq, target="tosa")
    assert art.manifest.integer_only and art.manifest.build["inputs"][0]["dtype"] == "uint8"
    assert_golden_per_sample(art, model, variants, zoo.get("digits_cnn").samples(3, seed=7))


def test_a_split_is_one_slice_per_part():
    """ShuffleNetV2's channel split, as quantized files keep it: relax.split's parts are slices, each
    read through its tuple field, and the parts keep the range of what was split."""
    def build(bb, x):
        parts = bb.emit(relax.op.split(x, [2, 5], axis=1))
        a, b, c = (bb.emit(relax.TupleGetItem(parts, i)) for i in range(3))
        return relax.op.concat([relax.op.astype(c, "int32"), relax.op.add(relax.op.astype(a, "int32"),
                                                                             relax.op.strided_slice(relax.op.astype(b, "int32"), [1], [0], [2]))],
                               axis=1)
    func = _function(build, ((2, 7, 3), "uint8"))
    x = np.random.default_rng(12).integers(0, 256, (2, 7, 3)).astype(np.uint8)
    (got,) = _run(func, (x.astype(np.int32) - 128).astype(np.int8))
    xi = x.astype(np.int32)
    np.testing.assert_array_equal(got, np.concatenate([xi[:, 5:], xi[:, :2] + xi[:, 2:4]], axis=1))
    assert Ranges(func).of(next(b.var for blk in func.body.blocks for b in blk.bindings
                                if isinstance(b.value, relax.TupleGetItem))) == (0, 255)
