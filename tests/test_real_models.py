"""The models users bring, as they bring them (tests/real_models.py): a digits CNN and a timm-style
ViT through torch's dynamo exporter, with a symbolic or a fixed batch, FP32 + calibration data,
ORT's QDQ (u8 activations) and NNCF's layout (s8 activations, zero point 0).  Each compiles
integer-only and is bit-exact with the golden interpreter; the first input paths work."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import real_models
from conftest import ISA_PATHS, compile_with_golden, runnable_cpus

import compiler
import runtime
from compiler import CompileOptions, frontend
from compiler.canonicalize import canonicalize
from passes.verify_integer import check_integer_only
from runtime import golden

pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs onnxscript (the zoo extra installs it)")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    out = {}
    for name in real_models.MODELS:
        calib = real_models.samples(name, 16, seed=3)
        out[name] = real_models.export(name, d / f"{name}.onnx")
        out[f"{name}_calib"] = calib
        np.save(d / f"{name}.npy", calib)
        out[f"{name}_npy"] = d / f"{name}.npy"
        out[f"{name}_qdq"] = real_models.quantize_ort(out[name], d / f"{name}_qdq.onnx", calib)
    out["digits_cnn_b1"] = real_models.export("digits_cnn", d / "digits_cnn_b1.onnx", batch=1)
    out["digits_cnn_nncf"] = real_models.quantize_ort(out["digits_cnn"], d / "digits_cnn_nncf.onnx",
                                                      out["digits_cnn_calib"], nncf_layout=True)
    return out


def _lowbit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compiler.cli", *map(str, args)], capture_output=True, text=True)


def assert_bit_exact_qdq(art, qdq_path, x):
    """A given QDQ model's build against the golden interpreter, which reads the model with its
    shape arithmetic folded at one sample (compiler/canonicalize.py), sample by sample."""
    model = canonicalize(onnx.load(qdq_path), {"input": (1, *x.shape[1:])})
    got = art.run({"input": x})["output"]
    want = np.concatenate([golden.run_qdq(model, {"input": x[i:i + 1]})["output"] for i in range(len(x))])
    np.testing.assert_array_equal(got, want)


def test_calib_npy_and_a_fixed_batch_run_on_many_samples(files, tmp_path):
    """`--calib x.npy` on a single-input model, as `run` reads inputs; a model exported at batch 1
    (the exporter's default) runs 16 samples, and they equal 16 single runs."""
    out = tmp_path / "cnn_b1"
    r = _lowbit("compile", files["digits_cnn_b1"], "--calib", files["digits_cnn_npy"], "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    x = files["digits_cnn_calib"]
    np.savez(tmp_path / "x.npz", input=x)
    r = _lowbit("run", out, "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npz", "-q")
    assert r.returncode == 0, r.stderr
    y = np.load(tmp_path / "y.npz")["output"]
    art = runtime.load(out)
    assert art.manifest.integer_only, art.manifest.integer_region
    assert y.shape == (16, 10)
    np.testing.assert_array_equal(y, np.concatenate([art.run({"input": x[i:i + 1]})["output"] for i in range(16)]))
    # a count that is no multiple of the batch is refused in one line
    np.savez(tmp_path / "bad.npz", input=x[:3, :, :16])
    r = _lowbit("run", out, "--input", tmp_path / "bad.npz", "-o", tmp_path / "z.npz")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_input_shape_rebatches_a_static_batch_where_the_graph_allows(files, tmp_path):
    """--input-shape may change a static batch: the TorchScript export (Flatten) carries it to the
    output and compiles at 16, equal to 16 runs of its batch-1 build; the dynamo export baked the
    batch into a Reshape constant, and that is said in one line."""
    ts = real_models.export("digits_cnn", tmp_path / "ts_b1.onnx", batch=1, dynamo=False)
    calib = {"input": files["digits_cnn_calib"]}
    one = compiler.compile(ts, options=CompileOptions(calib=calib))
    many = compiler.compile(ts, options=CompileOptions(calib=calib, input_shapes={"input": (16, 1, 32, 32)}))
    assert many.manifest.integer_only and many.manifest.inputs[0].shape == (16, 1, 32, 32)
    x = files["digits_cnn_calib"]
    np.testing.assert_array_equal(many.run({"input": x})["output"], one.run({"input": x})["output"])
    r = _lowbit("compile", files["digits_cnn_b1"], "--input-shape", "input=16,1,32,32", "-o", tmp_path / "no")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot re-batch it from 1 to 16: output 'output' stays (1,10)" in r.stderr
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("cpu", ISA_PATHS)
def test_static_batch_cnn_on_every_isa_path(files, cpu):
    """The digits CNN with a static batch of 8 crashed in the AMX schedules: it compiles for every
    ISA path, integer-only, and where this machine runs the path, it is bit-exact with golden."""
    x = files["digits_cnn_calib"][:8].copy()
    x[-1] *= 1000.0             # far outside the calibrated range
    art, qdq, variants = compile_with_golden(files["digits_cnn"], target_options={"mcpu": cpu},
                                             input_shapes={"input": (8, 1, 32, 32)},
                                             calib={"input": files["digits_cnn_calib"]})
    assert art.manifest.integer_only, art.manifest.integer_region
    if cpu not in runnable_cpus():
        return
    np.testing.assert_array_equal(art.run({"input": x})["output"], golden.run_qdq(qdq, {"input": x}, variants)["output"])


@pytest.mark.parametrize("name, data", [("digits_cnn_qdq", "digits_cnn"), ("tiny_vit_qdq", "tiny_vit"),
                                        ("digits_cnn_nncf", "digits_cnn")])
def test_given_qdq_models_lower_integer_only_and_bit_exact(files, name, data):
    """ORT's QDQ files of both models and NNCF's layout fell back to fake-quant (a Reshape after an
    unquantized mean, a class token's Expand, GELU's Div -> Erf between Q/DQ pairs); now integer-only,
    with a symbolic batch, and bit-exact with golden."""
    art = compiler.compile(files[name])
    assert art.manifest.integer_only, art.manifest.integer_region
    assert art.manifest.precision == "int8"
    assert_bit_exact_qdq(art, files[name], files[f"{data}_calib"][:2])


@pytest.mark.parametrize("name, first", [("digits_cnn_nncf", "relax.nn.conv2d"), ("digits_cnn_qdq", "relax.nn.conv2d"),
                                         ("tiny_vit_qdq", "relax.nn.conv2d")])
def test_the_verifier_names_the_float_op_of_every_fake_quant_layout(files, name, first):
    """Each QDQ layout imported as fake-quant (not lowered): not integer-only, naming its first
    float compute op, not a quantize or dequantize."""
    src = frontend.load(files[name])
    verdict = check_integer_only(frontend.to_relax(src, frontend.input_specs(src)))
    assert not verdict.integer_only and verdict.reason.startswith(f"float op inside the integer region: {first} ")


def test_the_verifier_is_not_fooled_by_a_head_without_dequantize(files):
    """A fake-quant graph whose float head leaves through no dequantize is no proof either."""
    # drop the output Q/DQ pair: the Gemm's float result is the output
    m = onnx.load(files["digits_cnn_nncf"])
    g = m.graph
    last_q = next(n for n in reversed(g.node) if n.op_type == "QuantizeLinear")
    last_dq = next(n for n in g.node if n.input[0] == last_q.output[0])
    for n in g.node:
        n.output[:] = [g.output[0].name if o == last_q.input[0] else o for o in n.output]
    g.node.remove(last_q)
    g.node.remove(last_dq)
    src = frontend.OnnxModel(m, "headless.onnx", "0")
    verdict = check_integer_only(frontend.to_relax(src, frontend.input_specs(src)))
    assert not verdict.integer_only and "relax.nn.conv2d" in verdict.reason


def test_dynamo_vit_with_calibration(files):
    """The timm-style ViT (dynamo, opset 18, symbolic batch) with --calib: no Q/DQ on its shape
    arithmetic, integer-only, bit-exact with golden."""
    calib = {"input": files["tiny_vit_calib"]}
    art, qdq, variants = compile_with_golden(files["tiny_vit"], calib=calib)
    assert art.manifest.integer_only, art.manifest.integer_region
    x = files["tiny_vit_calib"][:2]
    n = art.manifest.inputs[0].shape[0]
    got = np.concatenate([art.run({"input": x[i:i + n]})["output"] for i in range(0, len(x), n)])
    want = np.concatenate([golden.run_qdq(qdq, {"input": x[i:i + 1]}, variants)["output"] for i in range(len(x))])
    np.testing.assert_array_equal(got, want)


def test_nncf_ptq_of_the_onnx_model_lowers_integer_only_and_bit_exact(files, tmp_path):
    """NNCF's own ONNX PTQ (not ORT's writer in NNCF's layout): float convolution biases (they join
    the accumulator at s_x*s_w), and a classifier whose output leaves unquantized (its accumulator
    is dequantized at s_x*s_w as the boundary)."""
    nncf = pytest.importorskip("nncf", reason="NNCF is in the zoo extra")
    calib = files["digits_cnn_calib"]
    q = nncf.quantize(onnx.load(files["digits_cnn"]), nncf.Dataset([{"input": calib[i:i + 1]} for i in range(16)]),
                      subset_size=16)
    path = tmp_path / "nncf.onnx"
    onnx.save(q, path)
    assert not any(o.name in {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
                   for o in q.graph.output)             # NNCF leaves the logits float
    art = compiler.compile(path)
    assert art.manifest.integer_only and not art.manifest.islands, art.manifest.integer_region
    assert_bit_exact_qdq(art, path, calib[:2])
