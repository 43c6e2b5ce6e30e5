"""FP32 model + calibration data -> integer-only artifact (compiler/quantize.py).

Every compiled output is compared bit for bit with the golden interpreter run on
the QDQ model the quantizer wrote; the FP32 side is checked against ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import concat_cnn, make_model, mlp_model, run_cli
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler import driver, quantize
from compiler.fold_batchnorm import fold_batchnorm
from compiler.options import CompileOptions
from compiler.tools import ort as ort_baseline
from models import zoo
from runtime import golden
from runtime.errors import UserError


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def basic_block(c=16, hw=8, seed=0) -> onnx.ModelProto:
    """ResNet basic block: conv-bn-relu-conv-bn + identity add + relu, BN not folded."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def param(name, a):
        inits.append(numpy_helper.from_array(a.astype(np.float32), name))
        return name

    def conv_bn(i, src, out):
        w = param(f"w{i}", rng.normal(0, (2 / (9 * c)) ** 0.5, (c, c, 3, 3)))
        nodes.append(helper.make_node("Conv", [src, w], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("BatchNormalization", [
            f"conv{i}", param(f"gamma{i}", rng.uniform(0.5, 1.5, c)), param(f"beta{i}", rng.normal(0, 0.1, c)),
            param(f"mean{i}", rng.normal(0, 0.1, c)), param(f"var{i}", rng.uniform(0.5, 2, c))], [out], name=f"bn{i}"))

    conv_bn(1, "x", "bn1")
    nodes.append(helper.make_node("Relu", ["bn1"], ["relu1"], name="relu1"))
    conv_bn(2, "relu1", "bn2")
    nodes.append(helper.make_node("Add", ["bn2", "x"], ["sum"], name="add"))
    nodes.append(helper.make_node("Relu", ["sum"], ["y"], name="relu2"))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", c, hw, hw]) for n in ("x", "y")]
    return make_model(nodes, io[:1], io[1:], inits)


def _compile_and_check(model, calib, x, config=None, **opts):
    """Compile FP32 + calibration through the public API; bit-exact against golden on the
    QDQ model that compile's calibration produced; returns (artifact, qdq model)."""
    config = config or quantize.QuantConfig()
    if config.activations == "u8":
        art, ref = driver.compile_with_reference(model, CompileOptions(
            calib=calib, weight_bits=config.weight_bits, observer=config.observer, pin=config.pin_ends, **opts))
        qdq = ref.model
    else:                                   # no CPU target picks s8 yet: compile the QDQ model directly
        qdq, _ = quantize.quantize(model, calib, config)
        art = compiler.compile(qdq, options=CompileOptions(**opts))
    m = art.manifest
    assert m.precision == "int8" and m.integer_only, m.integer_region
    name = model.graph.input[0].name
    want = golden.run_qdq(qdq, {name: x})[model.graph.output[0].name]
    got = art.run({name: x})[m.outputs[0].name]
    np.testing.assert_array_equal(got, want)
    return art, qdq


@pytest.mark.parametrize("name", ["digits_cnn", "resnet8", "ds_cnn", "mobilenet_v1_025", "fc_autoencoder", "resnet18"])
def test_zoo_models_bit_exact(name, tmp_path):
    files = zoo.ensure(name)
    model = onnx.load(files.onnx)
    x = zoo.get(name).samples(1 if name == "resnet18" else 8, seed=7)     # golden ResNet-18: ~10 s a sample
    art, _ = _compile_and_check(model, files.calibration(), x)
    # fidelity: no worse than ORT's own static INT8 on the same calibration data
    ref = _ort(model, {zoo.INPUT: x})
    ort_int8 = _ort(onnx.load(ort_baseline.quantize(str(files.onnx), files.calibration(), str(tmp_path / "q.onnx"),
                                                    "static")), {zoo.INPUT: x})
    ours = np.abs(art.run({zoo.INPUT: x})[zoo.OUTPUT] - ref).mean()
    step = art.manifest.quant[zoo.OUTPUT].scale
    assert ours <= 1.1 * np.abs(ort_int8 - ref).mean() + step


def test_mlp_bit_exact_and_reader_interface():
    class Reader:                           # ORT's CalibrationDataReader protocol
        def __init__(self):
            self.batches = iter([{"x": _rand(3, 8, seed=i)} for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    model = mlp_model()
    by_reader, report = quantize.quantize(model, Reader())
    by_dict, _ = quantize.quantize(model, {"x": np.concatenate([_rand(3, 8, seed=i) for i in range(4)])})
    assert report.samples == 12
    assert by_reader.SerializeToString() == by_dict.SerializeToString()
    _compile_and_check(model, {"x": _rand(12, 8)}, _rand(5, 8, seed=9))


@pytest.mark.parametrize("config", [
    quantize.QuantConfig(activations="s8"), quantize.QuantConfig(weight_bits=4, pin_ends=False),
    quantize.QuantConfig(weight_bits=2, pin_ends=False),
    quantize.QuantConfig(observer="percentile"), quantize.QuantConfig(observer="mse")],
    ids=lambda c: f"{c.activations}-w{c.weight_bits}-{c.observer}")
def test_configs_bit_exact(config):
    model = basic_block()
    _, qdq = _compile_and_check(model, {"x": _rand(16, 16, 8, 8)}, _rand(2, 16, 8, 8, seed=3), config)
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    qmax = 2 ** (config.weight_bits - 1) - 1
    weights = [inits[n.input[0]] for n in qdq.graph.node
               if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0)).dtype == np.int8]
    assert weights and all(np.abs(w).max() == qmax for w in weights)
    outputs = {o.name for o in qdq.graph.output}
    zero_points = {n.output[0]: inits[n.input[2]] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    ends = {n.input[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in outputs}
    assert all(z.dtype in (np.int16, np.uint16) if q in ends else z.dtype == (np.int8 if config.activations == "s8" else np.uint8)
               for q, z in zero_points.items())


def test_concat_requantizes_branches_to_a_common_scale():
    art, qdq = _compile_and_check(concat_cnn(), {"x": _rand(16, 4, 6, 6)}, _rand(2, 4, 6, 6, seed=5))
    assert "relax.concat" in art.manifest.op_histogram
    scales = {n.input[0]: n.input[1] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    assert len({scales["a_float"], scales["b_float"], scales["cat_float"]}) == 3     # three scales, one concat


def _avgpool_cnn(out_hw: int, **pool) -> onnx.ModelProto:
    w = numpy_helper.from_array(_rand(4, 3, 3, 3, seed=6) * 0.4, "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["c"], ["y"], name="pool", **pool)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, out_hw, out_hw])], [w])


@pytest.mark.parametrize("out_hw, pool", [
    (4, dict(kernel_shape=[2, 2], strides=[2, 2])),
    (5, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1))])
def test_average_pool_is_an_integer_window_sum(out_hw, pool):
    art, _ = _compile_and_check(_avgpool_cnn(out_hw, **pool), {"x": _rand(8, 3, 9, 9)}, _rand(2, 3, 9, 9, seed=2))
    assert len(art.manifest.compute_kernels()) == 2


def test_basic_block_is_two_kernels():
    art, _ = _compile_and_check(basic_block(), {"x": _rand(16, 16, 8, 8)}, _rand(1, 16, 8, 8, seed=3),
                                input_shapes={"x": (1, 16, 8, 8)})
    m = art.manifest
    assert m.quantization["batchnorm_folded"] == 2
    compute = m.compute_kernels()
    assert len(compute) == 2, m.kernel_ops
    ops = [m.kernel_ops[k] for k in compute]
    # each kernel is one conv with its requantize; the second also holds the residual add
    assert sorted(o.count("conv2d") for o in ops) == [1, 1]
    assert all("right_shift" in o and "tir_clip" in o for o in ops)
    assert m.kernel_launches == 3                   # the input quantize, then the two integer kernels
    assert m.kernels_unfused > 4 * m.kernel_launches


def test_batchnorm_folding_preserves_fp32():
    for model, x in ((basic_block(), _rand(2, 16, 8, 8)),
                     (onnx.load(zoo.ensure("fc_autoencoder").onnx), zoo.get("fc_autoencoder").samples(4, seed=1))):
        folded = fold_batchnorm(model)
        assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
        name = model.graph.input[0].name
        want = _ort(model, {name: x})
        np.testing.assert_allclose(_ort(folded, {name: x}), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _linear_norm(bias: bool, norm_rank: int) -> onnx.ModelProto:
    """LeViT's LinearNorm: x[2, 5, 8] -> MatMul (-> Add b) -> Reshape to [10, 6] (or [2, 5, 6]
    unchanged, a 3-D norm over axis 1 that is not the channels) -> BatchNormalization -> Reshape."""
    rng = np.random.default_rng(3)
    c = 6
    inits = [numpy_helper.from_array(rng.normal(size=(8, c)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([-1, c] if norm_rank == 2 else [2, 5, c], np.int64), "flat"),
             numpy_helper.from_array(np.array([2, 5, c], np.int64), "back")] + [
        numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
            ("gamma", rng.normal(1, 0.3, c)), ("beta", rng.normal(0, 0.3, c)), ("mean", rng.normal(0, 0.5, c)),
            ("var", rng.uniform(0.5, 2, c)))]
    if norm_rank == 3:      # a norm over axis 1 of [2, 5, 6] normalizes the 5 tokens: not foldable
        inits = [i for i in inits if i.name not in ("gamma", "beta", "mean", "var")] + [
            numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
                ("gamma", rng.normal(1, 0.3, 5)), ("beta", rng.normal(0, 0.3, 5)), ("mean", rng.normal(0, 0.5, 5)),
                ("var", rng.uniform(0.5, 2, 5)))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"])]
    nodes += [helper.make_node("Add", ["m", "b"], ["a"])] if bias else []
    nodes += [helper.make_node("Reshape", ["a" if bias else "m", "flat"], ["f"]),
              helper.make_node("BatchNormalization", ["f", "gamma", "beta", "mean", "var"], ["n"]),
              helper.make_node("Reshape", ["n", "back"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, c])], inits)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_batchnorm_after_matmul_folds_through_views(bias):
    """The norm over a linear layer's channels, reached through its bias Add and a flatten, folds into
    the weights and the bias (an Add inserted where the MatMul has none); the FP32 function is kept."""
    model, x = _linear_norm(bias, 2), _rand(2, 5, 8)
    folded = fold_batchnorm(model)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    want = _ort(model, {"x": x})
    np.testing.assert_allclose(_ort(folded, {"x": x}), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_batchnorm_over_another_axis_stays():
    """A 3-D norm input normalizes axis 1, not the product's channels: left as it is."""
    folded = fold_batchnorm(_linear_norm(True, 3))
    assert any(n.op_type == "BatchNormalization" for n in folded.graph.node)


def test_calibration_batch_is_independent_of_compiled_shape():
    """7 calibration samples, a model compiled for batch 1, and a model whose batch is fixed at 2
    (the last calibration batch wraps around): all quantize and stay bit-exact."""
    calib = {"x": _rand(7, 8)}
    _compile_and_check(mlp_model(), calib, _rand(1, 8, seed=4), input_shapes={"x": (1, 8)})
    fixed = mlp_model(batch=2)
    _, report = quantize.quantize(fixed, calib)
    assert report.samples == 8
    _compile_and_check(fixed, calib, _rand(2, 8, seed=4))


def test_large_reduction_widens_to_int64():
    """K = 70000 with all-positive weights and x at the top of its range: the sum reaches
    255 * 127 * 70000 > 2^31, which int32 would wrap; the range analysis must widen it."""
    k = 70000
    w = np.ones((k, 2), np.float32)
    w[:, 1] = -1
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                       [numpy_helper.from_array(w, "w")])
    calib = {"x": np.random.default_rng(0).uniform(0, 1, (4, k)).astype(np.float32)}
    calib["x"][0] = 1.0
    art, _ = _compile_and_check(model, calib, np.ones((1, k), np.float32))
    assert "1 of 1 accumulators widened to int64" in art.manifest.quantization["accumulators"]


def test_small_reductions_proven_int32():
    art, _ = _compile_and_check(mlp_model(), {"x": _rand(8, 8)}, _rand(2, 8))
    assert art.manifest.quantization["accumulators"] == "all 2 accumulators proven to fit int32"


def test_bad_inputs_exit_2_without_artifact(tmp_path, mlp_path):
    good = tmp_path / "calib.npz"
    np.savez(good, x=_rand(4, 8))
    bad_shape, bad_name = tmp_path / "shape.npz", tmp_path / "name.npz"
    np.savez(bad_shape, x=_rand(4, 9))
    np.savez(bad_name, input=_rand(4, 8))
    cases = [
        ([mlp_path, "--calib", good, "--bits", "3"], "--bits 3"),
        ([mlp_path, "--calib", bad_shape], "has shape (4, 9)"),
        ([mlp_path, "--calib", bad_name], "['input']"),
        ([mlp_path, "--bits", "4"], "add --calib"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        r = run_cli("compile", *args, "-o", out)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not out.exists()


def test_calib_on_a_quantized_model_is_refused(tmp_path):
    qdq, _ = quantize.quantize(mlp_model(), {"x": _rand(4, 8)})
    with pytest.raises(UserError, match="already quantized"):
        compiler.compile(qdq, options=CompileOptions(calib={"x": _rand(4, 8)}))


def test_token_ids_pass_through_calibration_and_the_embedding_is_integer(tmp_path):
    """An int64 input (token ids) is calibrated with int64 arrays, untouched; the Gather of the
    constant embedding table by those ids is an activation (not a constant), so the MatMul
    after it is quantized, and the whole model is integer-only, with the ids as an integer input,
    bit-exact with the golden interpreter."""
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
                        helper.make_node("MatMul", ["e", "w"], ["y"], name="fc")],
                       [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 4])],
                       [numpy_helper.from_array(rng.normal(size=(10, 8)).astype(np.float32), "table"),
                        numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w")])
    path, calib_path = tmp_path / "emb.onnx", tmp_path / "ids.npz"
    onnx.save(model, path)
    calib = {"ids": rng.integers(0, 10, (16, 5)).astype(np.int64)}
    np.savez(calib_path, **calib)
    art = compiler.compile(path, options=CompileOptions(calib=str(calib_path)))
    assert art.manifest.integer_only, art.manifest.integer_region
    assert "1 integer input(s)" in art.manifest.integer_region
    qdq, _ = quantize.quantize(model, calib)
    ids = {"ids": rng.integers(0, 10, (1, 5)).astype(np.int64)}
    np.testing.assert_array_equal(art.run(ids)["y"], golden.run_qdq(qdq, ids)["y"])
    with pytest.raises(UserError, match="'ids' takes int64"):
        compiler.compile(path, options=CompileOptions(calib={"ids": calib["ids"].astype(np.float32)}))



def _scales(qdq: onnx.ModelProto) -> dict[str, np.ndarray]:
    consts = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    return {n.input[0]: consts[n.input[1]] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}


def test_a_build_returns_the_reference_it_lowered_from_one_calibration(monkeypatch):
    """compile_with_reference (the corpus report's and the tests' golden check) calibrates once, and
    its reference is the QDQ model that build lowered: its boundary scales, bit-exact with the build."""
    model = mlp_model(batch=1)
    calib = {"x": np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)}
    calls = []
    real = quantize.quantize
    monkeypatch.setattr(quantize, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    art, ref = driver.compile_with_reference(model, CompileOptions(calib=calib))
    assert calls == [1]
    assert float(_scales(ref.model)["x"]) == art.manifest.quant["x"].scale
    x = {"x": calib["x"][:4]}
    np.testing.assert_array_equal(art.run(x)["y"], golden.run_qdq(ref.model, x, ref.variants)["y"])


def _conv_relu6(batch) -> onnx.ModelProto:
    """Conv -> Clip(0, 6) with the bounds as Constant nodes, as TorchScript exports ReLU6."""
    w = numpy_helper.from_array(_rand(4, 3, 3, 3, seed=1) * 0.5, "w")
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.float32)))
             for name, v in (("lo", 0.0), ("hi", 6.0))]
    nodes += [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, k, 6, 6]) for n, k in (("x", 3), ("y", 4))]
    return make_model(nodes, io[:1], io[1:], [w])


def test_a_symbolic_batch_quantizes_as_the_static_batch_does():
    """Constant-only subgraphs fold whatever the batch: a ReLU6 whose bounds are Constant nodes is the
    convolution's activation (one quantize, after the Clip) at a symbolic batch as at a static one.
    Unfolded, the convolution's output got a quantize of its own before the Clip (TorchScript's
    dynamic-batch MobileNetV2 lost 0.008 of cosine to FP32 against its static-batch export)."""
    calib = {"x": _rand(8, 3, 6, 6, seed=2) * 3}

    def quantized(model):
        qdq, _ = quantize.quantize(model, calib)
        consts = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
        return {n.input[0]: float(consts[n.input[1]]) for n in qdq.graph.node if n.op_type == "QuantizeLinear"}

    static, symbolic = quantized(_conv_relu6(1)), quantized(_conv_relu6("N"))
    assert len(static) == 2 and "x" in static and "c" not in static
    assert symbolic == static


def test_the_logits_leave_on_a_16_bit_grid():
    """One output grid serves every input.  Where the logits' scale varies between inputs (RegNetY's
    over photo crops: a standard deviation from 0.25 to 2.75), an 8-bit grid wide enough for the
    loud inputs rounds the quiet inputs' logits mostly to zero.  The graph's output is quantized to
    int16 (the accumulator's precision, one requantize): here a feature that is off in all inputs but
    one drives one logit to ~900 against the others' few units; the quiet inputs keep their logits,
    bit-exact with golden."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    w[0], w[:, 0] = 0, 0
    w[0, 0] = 300                                          # logit 0 is the feature alone
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [numpy_helper.from_array(w, "w")])
    x = rng.normal(size=(16, 8)).astype(np.float32)
    x[1:, 0] = 0
    x[0, 0] = 3.0                                          # the one input with the feature on
    art, ref = driver.compile_with_reference(model, CompileOptions(calib={"x": x}))
    out = next(n for n in ref.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0].startswith("y"))
    consts = {t.name: numpy_helper.to_array(t) for t in ref.model.graph.initializer}
    assert consts[out.input[2]].dtype == np.int16 and art.manifest.integer_only
    for i in range(1, 6):                                   # quiet inputs, as calibration's typical ones
        feed = {"x": x[i : i + 1]}
        got = art.run(feed)["y"]
        np.testing.assert_array_equal(got, golden.run_qdq(ref.model, feed, ref.variants)["y"])
        want = feed["x"] @ w
        cos = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert cos > 0.998, (i, cos)          # the input and the weights are 8-bit; an 8-bit output: < 0.9


def _class_token_model(rng) -> onnx.ModelProto:
    """ViT's embedding and one pre-norm block: [class token; patches] + position embedding starts the
    residual stream, and the classifier reads the class token's row alone.  The class token is initialized at
    std 0.02 (as ViT's is), the position embedding at 0.002; the patch embeddings run to +-10.  With no
    attention the class row does not depend on the patches; only its grid does, through calibration."""
    d, p = 16, 8
    inits = {"cls": rng.normal(0, 0.02, (1, 1, d)), "pos": rng.normal(0, 0.002, (1, p + 1, d)),
             "w": rng.normal(0, d ** -0.5, (d, d)), "wc": rng.normal(0, d ** -0.5, (d, 4)),
             "g": np.ones(d), "b": np.zeros(d), "row": np.array(0, np.int64)}
    nodes = [helper.make_node("Concat", ["cls", "x"], ["cat"], name="cat", axis=1),
             helper.make_node("Add", ["cat", "pos"], ["e"], name="embed"),
             helper.make_node("LayerNormalization", ["e", "g", "b"], ["n"], name="norm", axis=-1),
             helper.make_node("MatMul", ["n", "w"], ["h"], name="fc"),
             helper.make_node("Add", ["e", "h"], ["s"], name="residual"),
             helper.make_node("Gather", ["s", "row"], ["c"], name="class_row", axis=1),
             helper.make_node("MatMul", ["c", "wc"], ["y"], name="head")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, p, d])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                      [numpy_helper.from_array(np.asarray(a, np.int64 if k == "row" else np.float32), k)
                       for k, a in inits.items()])


def test_the_class_token_joins_the_stream_at_its_width():
    """x + position embedding starts a transformer's residual stream, and x (the class token
    concatenated with the patch embeddings) is quantized at the stream's 16 bits: on an 8-bit grid
    the patches' range (+-10, a step of ~0.08) rounds the class token (+-0.05), whose row alone
    reaches the classifier, to a few steps.  Cosine to FP32 on the classifier's output > 0.999 (0.954 with
    the concat on 8 bits), integer-only and bit-exact with golden."""
    rng = np.random.default_rng(5)
    model = _class_token_model(rng)
    x = (rng.normal(size=(16, 8, 16)) * 3).astype(np.float32)
    art, ref = driver.compile_with_reference(model, CompileOptions(calib={"x": x}))
    cat = next(n for n in ref.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0].startswith("cat"))
    consts = {t.name: numpy_helper.to_array(t) for t in ref.model.graph.initializer}
    assert consts[cat.input[2]].dtype == np.int16 and art.manifest.integer_only, art.manifest.integer_region
    for i in range(2):
        feed = {"x": x[i : i + 1]}
        got = art.run(feed)["y"].ravel()
        np.testing.assert_array_equal(got, golden.run_qdq(ref.model, feed, ref.variants)["y"].ravel())
        want = _ort(model, feed).ravel()
        cos = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert cos > 0.999, (i, cos)


def _loud_sample_mlp(rng) -> onnx.ModelProto:
    """relu(x W1 + g W_g) W2: a gate input g (0 or 1) lifts every hidden unit by ~1000, as one photo crop
    lifts RegNetY's last stage (by ~100 there, through 20 more layers)."""
    w1 = rng.normal(0, 8 ** -0.5, (8, 64)).astype(np.float32)
    wg = rng.uniform(900, 1100, (1, 64)).astype(np.float32)
    w2 = rng.normal(0, 64 ** -0.5, (64, 32)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
                       helper.make_node("MatMul", ["g", "wg"], ["b"], name="gate"),
                       helper.make_node("Add", ["a", "b"], ["h"], name="add"),
                       helper.make_node("Relu", ["h"], ["r"], name="relu"),
                       helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                       helper.make_tensor_value_info("g", TensorProto.FLOAT, [1, 1])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                      [numpy_helper.from_array(w, n) for n, w in (("w1", w1), ("wg", wg), ("w2", w2))])


def test_one_loud_calibration_sample_does_not_set_every_grid():
    """RegNetY's case: one calibration sample runs a hidden layer 1000x louder than the others.  The pooled
    range covers it and leaves the quiet samples a step or two; the mean of each sample's range is ~1/16
    of it.  ``observer="auto"`` weighs both by the QDQ model's output error on the calibration samples and
    takes the mean-minmax ranges here (at least 10% less error), pooled ones where no sample stands out;
    a named observer is used as it is.  The build is integer-only and bit-exact with golden; on the
    quiet samples its mean cosine to FP32 is > 0.98, the pooled minmax ranges' < 0.8."""
    rng = np.random.default_rng(11)
    model = _loud_sample_mlp(rng)
    calib = {"x": rng.normal(size=(16, 8)).astype(np.float32), "g": np.zeros((16, 1), np.float32)}
    calib["g"][0] = 1                                       # the one loud sample
    _, report = quantize.quantize(model, calib)
    assert report.ranges.chosen == "mean-minmax", report.ranges
    assert report.ranges.error["mean-minmax"] < quantize.RANGE_MARGIN * report.ranges.error["pooled"]
    assert report.ranges.samples == 16
    quiet_calib = {k: v[1:] for k, v in calib.items()}      # no loud sample: nothing to gain, pooled stays
    assert quantize.quantize(model, quiet_calib)[1].ranges.chosen == "pooled"
    assert quantize.quantize(model, calib, quantize.QuantConfig(observer="minmax"))[1].ranges is None

    # every activation at 8 bits (no fidelity target), so that the grids compared are the ranges' own
    art, ref = driver.compile_with_reference(model, CompileOptions(calib=calib, fidelity=None))
    assert art.manifest.integer_only and art.manifest.quantization["ranges"]["chosen"] == "mean-minmax"
    minmax, _ = quantize.quantize(model, calib, quantize.QuantConfig(observer="minmax", fidelity=None))

    def cos(a, b):
        norms = np.linalg.norm(a) * np.linalg.norm(b)
        return float(a @ b / norms) if norms else 0.0       # an all-zero output: nothing of b

    ours, theirs = [], []
    for i in range(1, 16):                                  # the quiet samples, as most inputs are
        feed = {k: v[i : i + 1] for k, v in calib.items()}
        got = art.run(feed)["y"].ravel()
        np.testing.assert_array_equal(got, golden.run_qdq(ref.model, feed, ref.variants)["y"].ravel())
        want = _ort(model, feed).ravel()
        ours.append(cos(got, want))
        theirs.append(cos(golden.run_qdq(minmax, feed)["y"].ravel(), want))
    # mean-minmax clips each sample's own extremes of the tensors no sample inflates (a = x W1), hence < 1
    assert np.mean(ours) > 0.98 and np.mean(theirs) < 0.8, (np.mean(ours), np.mean(theirs))
