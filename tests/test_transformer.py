"""Integer-only transformer ops (passes/integer_nonlinear.py) against the golden reference
(runtime/golden_nonlinear.py), alone and inside quantized graphs."""

from __future__ import annotations

import math

import numpy as np
import onnx
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


def gelu_tanh_model(c=16):
    """GELU's tanh form as torch exports it: x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Mul", ["h", "half"], ["h2"]),
             helper.make_node("Pow", ["h", "three"], ["h3"]), helper.make_node("Mul", ["h3", "k"], ["c"]),
             helper.make_node("Add", ["h", "c"], ["i"]), helper.make_node("Mul", ["i", "s2pi"], ["z"]),
             helper.make_node("Tanh", ["z"], ["t"]), helper.make_node("Add", ["t", "one"], ["a"]),
             helper.make_node("Mul", ["h2", "a"], ["y"])]
    return make_model(nodes, [_io("x", (1, 5, c))], [_io("y", (1, 5, c))],
                      [_init("w", _rand(c, c, seed=2, scale=0.5)), _init("half", 0.5), _init("three", 3.0),
                       _init("k", 0.044715), _init("s2pi", math.sqrt(2 / math.pi)), _init("one", 1.0)])


def layernorm_decomposed_model(c=16, t=5):
    """LayerNorm spelled out: ReduceMean - Sub - Pow - ReduceMean - Add - Sqrt - Div - Mul - Add."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]), helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["p"]), helper.make_node("ReduceMean", ["p"], ["v"], axes=[-1]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n"]), helper.make_node("Mul", ["n", "g"], ["ng"]),
             helper.make_node("Add", ["ng", "b"], ["y"])]
    return make_model(nodes, [_io("x", (1, t, c))], [_io("y", (1, t, c))],
                      [_init("two", 2.0), _init("eps", 1e-5), _init("g", rng.uniform(0.5, 1.5, c)),
                       _init("b", rng.normal(0, 0.2, c))])


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


MODELS = {"layernorm": layernorm_model, "softmax": softmax_model, "gelu": gelu_model, "attention": attention_model,
          "gelu_tanh": gelu_tanh_model, "layernorm_decomposed": layernorm_decomposed_model}
FUSED_TO = {"gelu": "Gelu", "gelu_tanh": "Gelu", "layernorm_decomposed": "LayerNormalization"}


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
    if name in FUSED_TO:                    # the exported spelling was recognized as one op
        assert FUSED_TO[name] in {n.op_type for n in qdq.graph.node}
        import onnxruntime as ort

        from compiler.canonicalize import canonicalize
        run = [ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
               for m in (model, canonicalize(model))]
        np.testing.assert_allclose(run[1], run[0], atol=5e-4 if name == "gelu_tanh" else 1e-5)


# ---- the integer non-linears alone: Relax kernels vs numpy golden, edge cases -----------------

def _kernel(fn, shape, dtype="int32"):
    """Compile ``fn(x) -> (y, scale)`` for an integer input of ``shape``; returns a numpy runner."""
    import tvm
    from tvm import relax

    from codegen import llvm

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = fn(x)
            out = bb.emit_output(y[0] if isinstance(y, tuple) else y)
        bb.emit_func_output(out)
    ex, _, _ = llvm.build(bb.get(), llvm.host_target())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return lambda a: vm["main"](tvm.runtime.tensor(np.asarray(a, dtype))).numpy()


def test_isqrt_converges_for_every_input():
    from passes.integer_nonlinear import isqrt
    from runtime.golden_nonlinear import isqrt as isqrt_golden

    hand = {0: 0, 1: 1, 2: 1, 100: 10, 2**31 - 1: 46340}       # 46340^2 = 2147395600 <= 2^31-1 < 46341^2
    rng = np.random.default_rng(0)
    r = rng.integers(0, 2**31 - 1, 2000)
    v = np.concatenate([list(hand), np.arange(1 << 16), rng.integers(0, 2**62, 2000),
                        (r + 1) * (r + 1) - 1, r * r, [2**62 - 1]]).astype(np.int64)
    got = _kernel(isqrt, (len(v),), "int64")(v)
    assert [int(got[i]) for i in range(len(hand))] == list(hand.values())
    np.testing.assert_array_equal(got, isqrt_golden(v))
    assert all(int(g) == math.isqrt(int(x)) for g, x in zip(got, v, strict=True))


def _edge_rows(t):
    rng = np.random.default_rng(3)
    return np.stack([np.full(t, 37), rng.integers(-128, 128, t), np.where(np.arange(t) % 2, 127, -128),
                     rng.integers(-2, 3, t), np.zeros(t, np.int64)]).astype(np.int32)


@pytest.mark.parametrize("s", [0.5, 0.05, 1e-3], ids=["large-range", "typical", "small-range"])
@pytest.mark.parametrize("kind", ["shift", "poly"])
def test_softmax_and_gelu_edge_cases_bit_exact(kind, s):
    from passes import integer_nonlinear as inl
    from runtime import golden_nonlinear as gnl

    x = _edge_rows(197)                     # all-equal, random, alternating extremes, tiny, zeros
    got = _kernel(lambda v: inl.softmax(kind, v, s), x.shape)(x)
    want, scale = gnl.softmax(kind, x, s)
    np.testing.assert_array_equal(got, want)
    p = np.exp(s * (x - x.max(-1, keepdims=True)))
    p /= p.sum(-1, keepdims=True)
    assert np.abs(want * scale - p).max() < 0.1 and np.allclose((want * scale).sum(-1), 1, atol=0.02)
    assert (want[0] * scale == want[0, 0] * scale).all()           # an all-equal row stays uniform
    got = _kernel(lambda v: inl.gelu(kind, v, s), x.shape)(x)
    want, scale = gnl.gelu(kind, x, s)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("s", [0.5, 0.05, 1e-3])
def test_layernorm_edge_cases_bit_exact(s):
    from passes import integer_nonlinear as inl
    from runtime import golden_nonlinear as gnl

    c = 197
    rng = np.random.default_rng(4)
    gamma = rng.uniform(0.5, 1.5, c) * np.where(np.arange(c) % 7 == 0, -1, 1)
    beta = rng.normal(0, 0.2, c)
    x = _edge_rows(c)
    x[3] = np.where(np.arange(c) < c // 2, 1, 0)          # variance ~ 1/4 of a step: tiny
    got = _kernel(lambda v: inl.layer_norm(v, s, gamma, beta, 1e-5), x.shape)(x)
    want, scale = gnl.layer_norm(x, s, gamma, beta, 1e-5)
    np.testing.assert_array_equal(got, want)
    real = x * s
    ref = (real - real.mean(-1, keepdims=True)) / np.sqrt(real.var(-1, keepdims=True) + 1e-5) * gamma + beta
    assert np.abs(want * scale - ref).max() < 2e-3
    np.testing.assert_allclose(want[0] * scale, beta, atol=1e-5)      # variance 0: the output is beta


# ---- the zoo ViT ----------------------------------------------------------------------------

def test_canonicalization_preserves_fp32():
    import onnxruntime as ort

    from compiler.canonicalize import canonicalize
    from models import zoo

    model = onnx.load(zoo.ensure("digits_vit").onnx)
    canon = canonicalize(model, {"input": (2, 1, 16, 16)})
    ops = {n.op_type for n in canon.graph.node}
    assert "Shape" not in ops and "Erf" not in ops and "Gelu" in ops and "Gather" not in ops
    x = zoo.get("digits_vit").samples(2, seed=1)
    run = [ort.InferenceSession(m.SerializeToString()).run(None, {"input": x})[0] for m in (model, canon)]
    np.testing.assert_allclose(run[1], run[0], atol=1e-5)


@pytest.fixture(scope="module")
def digits_vit():
    from models import zoo

    files = zoo.ensure("digits_vit")
    model, calib = onnx.load(files.onnx), files.calibration()
    art = compiler.compile(model, options=CompileOptions(calib=calib, input_shapes={"input": (1, 1, 16, 16)}))
    return model, calib, art


def test_digits_vit_integer_only_bit_exact(digits_vit):
    from models import zoo

    model, calib, art = digits_vit
    assert art.manifest.precision == "int8" and art.manifest.integer_only, art.manifest.integer_region
    assert art.manifest.unscheduled == []           # every integer kernel has one of our schedules
    rows = art.manifest.quantization["nonlinear"]
    assert {r["op"] for r in rows} == {"softmax", "gelu", "layernorm"} and len(rows) == 4 + 4 + 9
    for r in rows:                              # auto picks the lower mean error
        if r["op"] != "layernorm":
            assert r["mean_err"][r["chosen"]] == min(r["mean_err"].values())
    qdq, report = quantize.quantize(model, calib, shapes={"input": (1, 1, 16, 16)})
    x = zoo.get("digits_vit").samples(1, seed=7)
    want = golden.run_qdq(qdq, {"input": x}, report.variants())["output"]
    np.testing.assert_array_equal(art.run({"input": x})["output"], want)


def test_digits_vit_encoder_block_is_at_most_eight_kernels(digits_vit):
    """The repeating encoder block: I-LayerNorm, QKV, Q.K^T + Shiftmax, attention.V (head split and
    merge folded in), projection + residual, I-LayerNorm, fc1 + ShiftGELU, fc2 + residual.  On VNNI
    the two attention GEMMs take their operands as u8 x s8 and add the zero-point corrections: up to
    three row or column sums, and one copy of each head split that a sum and a GEMM both read."""
    import tvm

    from codegen import vnni

    m = digits_vit[2].manifest
    start, length, repeats = m.repeated_block()
    block = [m.kernel_ops[k] for k in m.launch_sequence[start:start + length]]
    sums = [ops for ops in block if ops == ["cast", "sum", "multiply"]]
    copies = [ops for ops in block if not {"matmul", "sum", "max"} & set(ops)]
    if vnni.isa(tvm.target.Target(m.target)) is None:
        assert not sums and not copies                              # no launch only moves data
    assert len(sums) <= 3 and len(copies) <= 2, block
    assert length - len(sums) - len(copies) <= 8 and repeats >= 3, (length, repeats, m.launch_sequence)
    assert sum(ops.count("matmul") for ops in block) == 6          # qkv, scores, attn.V, proj, fc1, fc2
    layernorms = [ops for ops in block if "matmul" not in ops and "sum" in ops and ops not in sums]
    assert len(layernorms) == 2                                     # each I-LayerNorm is one kernel
    scores = [ops for ops in block if "matmul" in ops and "max" in ops]
    assert len(scores) == 1                                         # Q.K^T and Shiftmax together
    # everything outside the blocks: patch embedding, class token, head
    assert m.kernel_launches <= length * (repeats + 1) + 4


def residual_model(c=16, t=5):
    """A pre-norm residual branch: y = LN(x + LN(x) W)."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["n1"], axis=-1),
             helper.make_node("MatMul", ["n1", "w"], ["h"]), helper.make_node("Add", ["x", "h"], ["r"]),
             helper.make_node("LayerNormalization", ["r", "g2", "b2"], ["y"], axis=-1)]
    return make_model(nodes, [_io("x", (1, t, c))], [_io("y", (1, t, c))],
                      [_init("g1", rng.uniform(0.5, 1.5, c)), _init("b1", rng.normal(0, 0.2, c)),
                       _init("w", _rand(c, c, seed=6, scale=0.3)),
                       _init("g2", rng.uniform(0.5, 1.5, c)), _init("b2", rng.normal(0, 0.2, c))])


@pytest.mark.parametrize("bits", [16, 8])
def test_residual_stream_width_bit_exact(bits):
    model = residual_model()
    calib = {"x": _rand(8, 5, 16, seed=4, scale=2.0)}
    qdq, report = quantize.quantize(model, calib, quantize.QuantConfig(residual_bits=bits))
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    assert inits["r_zero_point"].dtype == (np.int16 if bits == 16 else np.uint8)
    # the branch only joins the stream: at its width; the input, which LayerNorm also reads, stays 8-bit
    assert inits["h_zero_point"].dtype == (np.int16 if bits == 16 else np.uint8)
    assert inits["x_zero_point"].dtype == np.uint8
    assert report.residual == 2
    art = compiler.compile(model, options=CompileOptions(calib=calib, residual_bits=bits))
    assert art.manifest.integer_only and art.manifest.quantization["residual_stream"] == f"2 tensors in int{bits}"
    x = _rand(1, 5, 16, seed=5, scale=2.0)
    np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(qdq, {"x": x})["y"])


def post_norm_model(c=16, t=5):
    """A post-norm residual branch (BERT's): n = LN(x); y = LN(n + n W)."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w"], ["h"]), helper.make_node("Add", ["n", "h"], ["r"]),
             helper.make_node("LayerNormalization", ["r", "g2", "b2"], ["y"], axis=-1)]
    return make_model(nodes, [_io("x", (1, t, c))], [_io("y", (1, t, c))],
                      [_init("g1", rng.uniform(0.5, 1.5, c)), _init("b1", rng.normal(0, 0.2, c)),
                       _init("w", _rand(c, c, seed=7, scale=0.3)),
                       _init("g2", rng.uniform(0.5, 1.5, c)), _init("b2", rng.normal(0, 0.2, c))])


def test_a_stream_operand_a_matmul_also_reads_forks_an_8_bit_copy():
    """BERT's LayerNorm output joins the next sum and feeds the projections: the sum reads it at the
    stream's 16 bits, the MatMul reads an 8-bit copy (a requantize of those integers), so its kernel
    keeps an 8-bit operand; integer-only and bit-exact with golden."""
    model, calib = post_norm_model(), {"x": _rand(8, 5, 16, seed=4, scale=2.0)}
    qdq, report = quantize.quantize(model, calib)
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    assert inits["n_zero_point"].dtype == np.int16 and inits["n_narrow_zero_point"].dtype == np.uint8
    matmul = next(n for n in qdq.graph.node if n.op_type == "MatMul")
    add = next(n for n in qdq.graph.node if n.op_type == "Add")
    assert matmul.input[0] == "n_narrow" and "n" in add.input
    assert report.residual == 3                                     # n, h and their sum r
    art = compiler.compile(model, options=CompileOptions(calib=calib))
    assert art.manifest.integer_only
    for seed in range(3):
        x = _rand(1, 5, 16, seed=10 + seed, scale=2.0)
        np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(qdq, {"x": x}, report.variants())["y"])


def test_residual_stream_over_many_channels_is_read_coarser_by_layernorm():
    """16-bit input over 2048 channels: C * (C * 65535)^2 >= 2^62, so I-LayerNorm's variance could
    overflow int64; the LayerNorm reads q - z two bits coarser (C * (C * 2^14)^2 < 2^62) and stays
    integer, bit-exact with golden; 8 bits need no shift."""
    model, calib = residual_model(c=2048, t=2), {"x": _rand(4, 2, 2048, seed=4)}
    x = _rand(1, 2, 2048, seed=5)
    for bits in (16, 8):
        qdq, report = quantize.quantize(model, calib, quantize.QuantConfig(residual_bits=bits))
        art = compiler.compile(model, options=CompileOptions(calib=calib, residual_bits=bits))
        assert art.manifest.integer_only and not art.manifest.islands
        np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(qdq, {"x": x}, report.variants())["y"])


def test_sixteen_bit_softmax_feeds_attention_bit_exact():
    """--softmax-bits 16: the probabilities reach attention.V as u16 (scale ~2^-16), integer-only."""
    model = attention_model()
    calib = {"x": _rand(8, 7, 16, seed=4, scale=2.0)}
    qdq, report = quantize.quantize(model, calib, quantize.QuantConfig(softmax_bits=16))
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    assert inits["p_zero_point"].dtype == np.uint16 and report.softmax == 1
    art = compiler.compile(model, options=CompileOptions(calib=calib, softmax_bits=16))
    assert art.manifest.integer_only and art.manifest.quantization["softmax_output"] == "1 tensors in uint16"
    x = _rand(1, 7, 16, seed=5, scale=2.0)
    np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(qdq, {"x": x}, report.variants())["y"])
