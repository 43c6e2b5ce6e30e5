"""Float islands (passes/lower_qdq.py ``_Lowering.island``): an op with no integer form runs in
float between a dequantize of its operands and the quantize after it, and everything else stays
integer.  The island is named (op, ONNX node, why) in the compile's warnings, the manifest and
``lowbit inspect``; ``--integer-only`` and the rv32 target refuse it in one line."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from conftest import compile_with_golden, make_model, one_line_error, run_cli
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler.options import CompileOptions
from runtime import golden
from runtime.errors import UserError


def _sandwich() -> onnx.ModelProto:
    """MatMul -> softmax over the batch axis (no integer form: I-ViT's Shiftmax runs along rows) ->
    MatMul: two integer layers around one island."""
    rng = np.random.default_rng(0)
    return make_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
                       helper.make_node("Softmax", ["h"], ["s"], name="odd_one", axis=0),
                       helper.make_node("MatMul", ["s", "w2"], ["y"], name="fc2")],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                      [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
                       for n, s in (("w1", (8, 16)), ("w2", (16, 4)))])


def _calib(n=32, seed=1):
    return {"x": np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)}


def test_an_op_without_integer_form_is_a_named_island(tmp_path, caplog):
    path = tmp_path / "m.onnx"
    onnx.save(_sandwich(), path)
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        art, qdq, variants = compile_with_golden(path, calib=_calib())
    m = art.manifest
    assert m.precision == "int8" and not m.integer_only
    assert [(i["op"], i["node"]) for i in m.islands] == [("relax.nn.softmax", "odd_one")]
    assert m.integer_region == "1 float island(s): relax.nn.softmax (odd_one)"
    assert "float island: relax.nn.softmax at node 'odd_one'" in caplog.text and "fake-quant" not in caplog.text
    # both matmuls are integer layers, with their accumulators proven
    assert [w["op"] for w in m.quantization["weights"]] == ["matmul", "matmul"]
    # the integer layers are bit-exact; only the island's float softmax may round differently from
    # numpy's, so an output may move by one step of the next quantize, times fc2's weights
    x = {"x": np.random.default_rng(5).normal(size=(64, 8)).astype(np.float32) * 2}
    got, want = art.run(x)["y"], golden.run_qdq(qdq, x, variants)["y"]
    assert np.mean(got == want) >= 0.99
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


def test_integer_only_refuses_the_island_in_one_line(tmp_path):
    path, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "out"
    onnx.save(_sandwich(), path)
    np.savez(calib, **_calib())
    r = run_cli("compile", path, "--calib", calib, "--integer-only", "-o", out)
    assert r.returncode == 2 and not out.exists()
    line = one_line_error(r.stderr)
    assert "float island: relax.nn.softmax at node 'odd_one'" in line and "--integer-only" in line
    ok = run_cli("compile", path, "--calib", calib, "-o", out)
    assert ok.returncode == 0, ok.stderr
    shown = run_cli("inspect", out)
    assert "island     relax.nn.softmax at node 'odd_one': softmax over an axis other than the last is not supported" in shown.stdout


def test_rv32_refuses_the_island_with_the_same_line(rv32_toolchain):
    with pytest.raises(UserError, match=r"float island: relax.nn.softmax at node 'odd_one' .*the rv32 target runs "
                                        r"integer-only models"):
        compiler.compile(_sandwich(), options=CompileOptions(target="rv32", calib=_calib(),
                                                             input_shapes={"x": (1, 8)}))


def test_golden_island_gathers_elements_of_a_long_buffer():
    """BERT's position / token-type buffer: GatherElements along 512 entries, where onnx's reference
    implementation fails (np.choose takes at most 32 choices); golden's island computes it."""
    buffer = np.arange(512, dtype=np.int64).reshape(1, 512) * 3
    order = np.arange(128, dtype=np.int64).reshape(1, 128)[:, ::-1].copy() - 200
    n = helper.make_node("GatherElements", ["d", "i"], ["o"], axis=1)
    out = golden._island(n, [buffer, order], golden.QDQUnsupported("GatherElements"))[0]
    np.testing.assert_array_equal(out, np.take_along_axis(buffer, order + 512, axis=1))


def _embedding_model(vocab=50, seq=8, d=16, buffer=64) -> onnx.ModelProto:
    """HF BERT's embeddings as torch's dynamo exports them: the token-type rows are gathered by
    GatherElements of a constant buffer (longer than onnx's reference can gather), all of it
    constant at the compiled shapes, added to the word rows gathered by the token ids."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (vocab, d)).astype(np.float32), "word"),
             numpy_helper.from_array(rng.normal(0, 0.5, (2, d)).astype(np.float32), "types"),
             numpy_helper.from_array(np.zeros((1, buffer), np.int64), "buffer"),
             numpy_helper.from_array(np.arange(seq, dtype=np.int64).reshape(1, seq), "positions"),
             numpy_helper.from_array(rng.normal(size=(d, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("GatherElements", ["buffer", "positions"], ["type_ids"], axis=1),
             helper.make_node("Gather", ["word", "ids"], ["rows"]),
             helper.make_node("Gather", ["types", "type_ids"], ["type_rows"]),
             helper.make_node("Add", ["rows", "type_rows"], ["e"]),
             helper.make_node("MatMul", ["e", "w"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, seq])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, 4])], inits)


def test_embedding_sum_is_integer_only(tmp_path):
    """The constant token-type rows fold at compile time (GatherElements included), so the sum is
    the gathered word rows plus a constant: integer-only, with no island, bit-exact with golden."""
    path = tmp_path / "emb.onnx"
    onnx.save(_embedding_model(), path)
    rng = np.random.default_rng(4)
    calib = {"ids": rng.integers(0, 50, (16, 8)).astype(np.int64)}
    art, qdq, variants = compile_with_golden(str(path), calib=calib)
    assert art.manifest.integer_only and not art.manifest.islands
    x = {"ids": rng.integers(0, 50, (1, 8)).astype(np.int64)}
    np.testing.assert_array_equal(art.run(x)["y"], golden.run_qdq(qdq, x, variants)["y"])
