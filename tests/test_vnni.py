"""x86 VNNI kernels (codegen/vnni.py): the three ISA paths by forcing the LLVM CPU.  Each build's
assembly is checked for ``vpdpbusd`` (zmm for AVX-512 VNNI, ymm for AVX-VNNI, none for AVX2), and
every build this machine can execute is bit-exact against the golden reference."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

import compiler
from codegen import vnni
from codegen.llvm import host_target
from compiler import quantize
from compiler.options import CompileOptions
from runtime import golden
from runtime.runner import missing_cpu_features

CPUS = {"avx512_vnni": "icelake-server", "avx_vnni": "alderlake", None: "haswell"}


def _mlp(seed=0, lead=("N",), dims=(64, 32, 48), scale=0.3):
    """x[*lead, 64] -> MatMul 64x32 (+bias) -> ReLU -> MatMul 32x48 (``dims``): both shapes fit the
    16 x 4 packing."""
    rng = np.random.default_rng(seed)
    k, h, n = dims
    inits = [numpy_helper.from_array(rng.normal(0, scale, s).astype(np.float32), name)
             for name, s in (("w1", (k, h)), ("b1", (h,)), ("w2", (h, n)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
             helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, n])], inits)


def _cnn(seed=0):
    """x[N, 3, 9, 9] -> Conv 3->16 3x3 pad 1 (+bias, ReLU) -> Conv 16->32 3x3 stride 2 dilation 1 pad
    (0, 1): 3 input channels pad to 4, 9 and 5 wide rows have no 4-wide tile."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n)
             for n, s in (("w1", (16, 3, 3, 3)), ("b1", (16,)), ("w2", (32, 16, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h0"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h0"], ["h1"], name="relu1"),
             helper.make_node("Conv", ["h1", "w2"], ["y"], name="conv2", strides=[2, 2], pads=[0, 0, 1, 1])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 5, 5])], inits)


def _host_can_run(cpu: str) -> bool:
    return not missing_cpu_features({"kind": "llvm", "mcpu": cpu})


@pytest.mark.parametrize("kind", ["matmul", "conv"])
@pytest.mark.parametrize("flavour", list(CPUS), ids=[str(f) for f in CPUS])
def test_isa_paths(flavour, kind):
    cpu = CPUS[flavour]
    assert vnni.isa(tvm.target.Target({"kind": "llvm", "mcpu": cpu})) == flavour
    model = _mlp() if kind == "matmul" else _cnn()
    shape = (64, 64) if kind == "matmul" else (16, 3, 9, 9)
    calib = {"x": np.random.default_rng(1).normal(size=shape).astype(np.float32)}
    opts = CompileOptions(calib=calib, target_options={"mcpu": cpu})
    art = compiler.compile(model, options=opts)
    assert art.manifest.integer_only and art.manifest.target["mcpu"] == cpu
    asm = art.kernel_library().inspect_source("asm")
    dots = re.findall(r"vpdpbusd\s[^\n]*%([xyz])mm\d+$", asm, re.M)      # the accumulator register
    if flavour == "avx512_vnni":
        assert dots and set(dots) == {"z"}
    elif flavour == "avx_vnni":
        assert dots and set(dots) == {"y"} and "{vex}" in asm
    else:
        assert not dots
    if not _host_can_run(cpu):
        from runtime.errors import UserError

        with pytest.raises(UserError, match=f"compiled for CPU {cpu}, whose .* this machine lacks"):
            art.run({"x": np.zeros((1, *shape[1:]), np.float32)})       # refused, not a SIGILL
        pytest.skip(f"this machine cannot execute {cpu} code ({flavour}); assembly and the refusal checked")
    qdq, _ = quantize.quantize(model, calib, opts.quant_config())
    for batch in (1, 5):                 # 5 rows: no 4-row tile divides it
        x = np.random.default_rng(batch).normal(size=(batch, *shape[1:])).astype(np.float32)
        np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(qdq, {"x": x})["y"])


@pytest.mark.parametrize("lead", [(3, 5), (7,)], ids=["batch-x-tokens", "7-rows"])
def test_row_layouts_bit_exact(lead):
    """Rows as (batch, tokens), and an odd fixed batch (no row tile divides 5 or 7): each tiles,
    tensorizes and matches the golden reference.  (A single row, a vector times the matrix, is
    covered by the classifier heads of the zoo models.)"""
    if vnni.isa(tvm.target.Target(host_target())) is None:
        pytest.skip("this machine has no VNNI; the ISA paths are checked by test_isa_paths")
    rng = np.random.default_rng(2)
    model = _mlp(lead=lead)
    calib = {"x": rng.normal(size=(4 * lead[0], *lead[1:], 64)).astype(np.float32)}    # whole batches
    opts = CompileOptions(calib=calib)
    art = compiler.compile(model, options=opts)
    assert "vpdpbusd" in art.kernel_library().inspect_source("asm")
    qdq, _ = quantize.quantize(model, calib, opts.quant_config())
    x = rng.normal(size=(*lead, 64)).astype(np.float32)
    np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(qdq, {"x": x})["y"])


def test_pack_layout():
    w = np.arange(8 * 32, dtype=np.int64).reshape(8, 32).astype(np.int8)
    p = vnni.pack(w)
    assert p.shape == (2, 2, 16, 4)
    for k in range(8):
        for j in range(32):
            assert p[j // 16, k // 4, j % 16, k % 4] == w[k, j]


def test_bad_cpu_is_a_user_error():
    from runtime.errors import UserError

    with pytest.raises(UserError, match="--mcpu pentium9: not a CPU LLVM knows for llvm"):
        CompileOptions(target_options={"mcpu": "pentium9"})


@pytest.mark.parametrize("a_dtype, b_dtype, shape", [
    ("uint8", "uint8", (2, 37, 64, 37)),        # scores: 37 keys pad to 3 column blocks
    ("uint8", "uint8", (1, 70, 37, 64)),        # attention . V: K = 37 tokens pads to 40
    ("int8", "int8", (3, 9, 20, 70)),           # s8 operands: a shifted to u8, b packed as is
    ("int8", "uint8", (1, 5, 8, 16)),
])
def test_runtime_operand_matmul_bit_exact(a_dtype, b_dtype, shape):
    """Both operands at run time (attention): a as u8, b packed per call as s8, and the row and
    column sums that correct for the offsets and zero points; exact against sum (a - z_a)(b - z_b)."""
    if vnni.isa(tvm.target.Target(host_target())) is None:
        pytest.skip("this machine has no VNNI; runtime operands then take the generic int32 matmul")
    from tvm import relax

    from codegen import llvm
    from codegen.cpu import cpu_units
    from passes.lower_qdq import _Int, _Lowering

    batch, m, k, n = shape
    rng = np.random.default_rng(sum(shape))
    info = [np.iinfo(a_dtype), np.iinfo(b_dtype)]
    a = rng.integers(info[0].min, int(info[0].max) + 1, (batch, m, k)).astype(a_dtype)
    b = rng.integers(info[1].min, int(info[1].max) + 1, (batch, k, n)).astype(b_dtype)
    za, zb = int(rng.integers(info[0].min, info[0].max)), int(rng.integers(info[1].min, info[1].max))
    bb = relax.BlockBuilder()
    va, vb = (relax.Var(name, relax.TensorType(v.shape, str(v.dtype))) for name, v in (("a", a), ("b", b)))
    with bb.function("main", [va, vb]):
        with bb.dataflow():
            low = _Lowering(bb, "auto", cpu_units(host_target()))
            pending = low.activation_matmul(_Int(va, np.array([0.1]), np.array([za]), a_dtype),
                                            _Int(vb, np.array([0.1]), np.array([zb]), b_dtype))
            out = bb.emit_output(pending.terms[0][0])
        bb.emit_func_output(out)
    ex, _, _ = llvm.build(bb.get(), host_target())
    assert "vpdpbusd" in getattr(ex, "mod", ex).imports[0].inspect_source("asm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    want = np.einsum("bmk,bkn->bmn", a.astype(np.int64) - za, b.astype(np.int64) - zb)
    np.testing.assert_array_equal(got, want)
