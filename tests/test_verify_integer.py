"""The integer-only verifier on hand-built Relax graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from conftest import mlp_model
from tvm import relax

import compiler
from compiler import frontend
from compiler.tools import ort
from passes.dyadic import dyadic_from_ratio, requantize
from passes.verify_integer import VerifyIntegerOnly, check_integer_only
from runtime import golden


def _module(body) -> tvm.IRModule:
    """main(x: float32[4, 8]) with ``body(x) -> output expr`` emitted in one dataflow block."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _quantize(bb, x):
    return bb.emit(relax.op.quantize(x, relax.const(0.05, "float32"), relax.const(3, "int8"), axis=-1,
                                     out_dtype="int8"))


def _dequantize(bb, q):
    return bb.emit(relax.op.dequantize(q, relax.const(0.1, "float32"), relax.const(0, "int8"), axis=-1,
                                       out_dtype="float32"))


def integer_body(bb, x):
    q = _quantize(bb, x)
    acc = bb.emit(relax.op.matmul(relax.op.astype(q, "int32"),
                                  relax.const(np.ones((8, 8), np.int32)), out_dtype="int32"))
    y = bb.emit(requantize(acc, dyadic_from_ratio(0.01), -128, 127, "int8"))
    y = bb.emit(relax.op.reshape(y, (8, 4)))
    return _dequantize(bb, y)


def smuggled_body(bb, x):
    q = _quantize(bb, x)
    f = _dequantize(bb, q)                         # a QDQ pair around a float op
    g = bb.emit(relax.op.nn.gelu(f))
    return _dequantize(bb, _quantize(bb, g))


def test_integer_graph_passes():
    verdict = check_integer_only(_module(integer_body))
    assert verdict.integer_only, verdict.reason
    assert "1 input quantize(s)" in verdict.reason and "1 output dequantize(s)" in verdict.reason
    VerifyIntegerOnly()(_module(integer_body))


def test_smuggled_float_op_is_named():
    verdict = check_integer_only(_module(smuggled_body))
    assert not verdict.integer_only
    ops = [o.split(" ")[0] for o in verdict.offenders]
    assert "relax.nn.gelu" in ops and "relax.dequantize" in ops
    with pytest.raises(ValueError, match="float op inside the integer region: relax"):
        VerifyIntegerOnly()(_module(smuggled_body))


def test_float_constant_operand_is_caught():
    def body(bb, x):
        q = _quantize(bb, x)
        y = bb.emit(relax.op.astype(relax.op.multiply(relax.op.astype(q, "float32"),
                                                      relax.const(2.0, "float32")), "int8"))
        return _dequantize(bb, y)

    verdict = check_integer_only(_module(body))
    assert not verdict.integer_only and any("relax.multiply" in o for o in verdict.offenders)


def test_float_compute_with_no_output_dequantize_is_caught():
    """A float head after the last dequantize, leaving the model with no output dequantize: the
    region used to be empty and called integer-only; the float matmul is named now."""
    def body(bb, x):
        f = _dequantize(bb, _quantize(bb, x))
        return bb.emit(relax.op.matmul(f, relax.const(np.ones((8, 8), np.float32))))

    verdict = check_integer_only(_module(body))
    assert not verdict.integer_only and verdict.reason.startswith("float op inside the integer region: relax.matmul")


def test_a_region_that_computes_nothing_is_not_integer_only():
    verdict = check_integer_only(_module(lambda bb, x: _dequantize(bb, _quantize(bb, x))))
    assert not verdict.integer_only and verdict.reason.startswith("empty integer region")


def test_float_model_has_no_region():
    verdict = check_integer_only(_module(lambda bb, x: bb.emit(relax.op.nn.relu(x))))
    assert not verdict.integer_only and verdict.offenders == []
    assert "no quantized region" in verdict.reason


def test_views_after_the_output_dequantize_are_outside():
    def body(bb, x):
        q = _quantize(bb, x)
        y = bb.emit(relax.op.add(relax.op.astype(q, "int32"), relax.const(1, "int32")))
        f = _dequantize(bb, bb.emit(relax.op.astype(relax.op.clip(y, -128, 127), "int8")))
        return bb.emit(relax.op.reshape(f, (32,)))

    verdict = check_integer_only(_module(body))
    assert verdict.integer_only, verdict.reason


def test_imported_qdq_model_is_fake_quantized_until_lowered(tmp_path):
    """ORT's QDQ format imports as float math between Q/DQ pairs; the verifier says so."""
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), path)
    calib = {"x": np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)}
    qdq = ort.quantize(str(path), calib, str(tmp_path / "qdq.onnx"), "static")
    src = frontend.load(qdq)
    verdict = check_integer_only(frontend.to_relax(src, frontend.input_specs(src)))
    assert not verdict.integer_only
    assert any(o.startswith("relax.matmul") for o in verdict.offenders)

    # compiled, the same model is lowered to integers and passes the verifier
    art = compiler.compile(qdq)
    assert art.manifest.precision == "int8" and art.manifest.integer_only
    np.testing.assert_array_equal(art.run(calib)["y"], golden.run_qdq(onnx.load(qdq), calib)["y"])
