"""Import checks: unsupported ops, unreadable files, shape overrides, symbolic dimensions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_model, mlp_model
from onnx import TensorProto, helper

from compiler import frontend
from compiler.options import CompileOptions, parse_input_shape
from runtime.errors import UserError


def _model_with_unknown_ops() -> onnx.ModelProto:
    then_g = helper.make_graph([helper.make_node("Frobnicate", ["a"], ["t"], name="inner_frob")], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Identity", ["a"], ["e"], name="inner_id")], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("QLinearFoo", ["x"], ["a"], name="/layer1/Foo_0"),
        helper.make_node("QLinearFoo", ["a"], ["b"], name="/layer2/Foo_0"),
        helper.make_node("Relu", ["b"], ["c"], name="relu", domain="acme.ops"),
        helper.make_node("Greater", ["c", "c"], ["cond"], name="cmp"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m.opset_import.append(helper.make_opsetid("acme.ops", 1))
    return m


def test_every_unsupported_op_is_listed_once_with_its_node():
    model = frontend.OnnxModel(_model_with_unknown_ops(), "bad.onnx", "0")
    with pytest.raises(UserError) as e:
        frontend.check_supported(model)
    msg = str(e.value)
    assert "\n" not in msg
    # TVM 0.27's importer has no control flow, so If itself is listed, and so is what its branches hold
    assert msg.startswith("bad.onnx: 4 unsupported ops: ")
    assert "If (node branch)" in msg and "Identity" not in msg
    assert "QLinearFoo (node /layer1/Foo_0 and 1 more)" in msg
    assert "acme.ops::Relu (node relu)" in msg          # known op_type, unknown domain: not silently converted
    assert "Frobnicate (node inner_frob)" in msg         # found inside an If subgraph


def test_supported_model_passes_the_op_check():
    frontend.check_supported(frontend.OnnxModel(mlp_model(), "mlp.onnx", "0"))


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.9])
def test_truncated_file_is_a_user_error(tmp_path, mlp_path, cut):
    raw = mlp_path.read_bytes()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(UserError, match="trunc.onnx"):
        src = frontend.load(bad)
        frontend.check_supported(src)
        frontend.validate(src)


def test_missing_file():
    with pytest.raises(UserError, match="no such file"):
        frontend.load("/nonexistent/model.onnx")


def test_dangling_edge_is_reported_by_the_checker():
    m = mlp_model()
    m.graph.node[1].input[0] = "nowhere"
    with pytest.raises(UserError, match="invalid ONNX model"):
        frontend.validate(frontend.OnnxModel(m, "m.onnx", "0"))


def test_symbolic_batch_stays_symbolic():
    src = frontend.OnnxModel(mlp_model(batch="N"), "mlp.onnx", "0")
    specs = frontend.input_specs(src)
    assert specs[0].shape == ("N", 8)
    mod = frontend.to_relax(src, specs)
    outs = frontend.relax_output_specs(mod, ["y"])
    assert outs[0].shape == ("N", 4)


def test_input_shape_override_makes_shapes_static():
    src = frontend.OnnxModel(mlp_model(batch="N"), "mlp.onnx", "0")
    specs = frontend.input_specs(src, {"x": (3, 8)})
    mod = frontend.to_relax(src, specs)
    assert frontend.relax_output_specs(mod, ["y"])[0].shape == (3, 4)


@pytest.mark.parametrize("override, match", [
    ({"nope": (1, 8)}, "model's inputs are \\['x'\\]"),
    ({"x": (1, 8, 1)}, "rank 3"),
    ({"x": (1, 9)}, "fixes it at 8"),
])
def test_bad_input_shape_override(override, match):
    with pytest.raises(UserError, match=match):
        frontend.input_specs(frontend.OnnxModel(mlp_model(), "mlp.onnx", "0"), override)


@pytest.mark.parametrize("text", ["x", "x=", "=1,2", "x=1,a", "x=0,3", "x=-1"])
def test_parse_input_shape_rejects(text):
    with pytest.raises(UserError, match="--input-shape"):
        parse_input_shape(text)


def test_parse_input_shape():
    assert parse_input_shape("images:0=1,3,224,224") == ("images:0", (1, 3, 224, 224))


def test_unknown_target():
    with pytest.raises(UserError, match="unknown target 'tpu'"):
        CompileOptions(target="tpu")


def test_input_dtype_comes_from_the_model():
    m = make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT, name="c")],
                   [helper.make_tensor_value_info("x", TensorProto.INT8, [2, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    specs = frontend.input_specs(frontend.OnnxModel(m, "m.onnx", "0"))
    assert specs[0].dtype == np.dtype(np.int8).name


def test_import_failure_with_dynamic_dims_suggests_input_shape(monkeypatch):
    import tvm.relax.frontend.onnx as rfo

    def fail(*a, **k):
        raise RuntimeError("Check failed: cannot infer shape of symbolic reshape")

    monkeypatch.setattr(rfo, "from_onnx", fail)
    src = frontend.OnnxModel(mlp_model(batch="N"), "m.onnx", "0")
    with pytest.raises(UserError) as e:
        frontend.to_relax(src, frontend.input_specs(src))
    msg = str(e.value)
    assert "\n" not in msg and "cannot infer shape" in msg
    assert "input 'x' dimension 0 is dynamic ('N')" in msg and "--input-shape x=1,8" in msg
    # with every dimension fixed, no hint
    with pytest.raises(UserError) as e:
        frontend.to_relax(src, frontend.input_specs(src, {"x": (2, 8)}))
    assert "--input-shape" not in str(e.value)
