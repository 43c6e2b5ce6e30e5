"""Graphs that compute shapes quantize like any other: the calibration path never puts a
quantize/dequantize pair on shape arithmetic (compiler/quantize.shape_tensors), and
canonicalization folds it at fixed shapes (compiler/canonicalize.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler import quantize
from compiler.canonicalize import canonicalize, fold_symbolic_shapes
from compiler.options import CompileOptions

# the tensors of shape_model() that are shape arithmetic
SHAPE_NAMES = {"shp", "b", "b1", "bs", "bp", "tgt_cls", "tgt", "zero_i64", "idx0", "axes0", "one_eight", "forty"}


def shape_model(seed=0) -> onnx.ModelProto:
    """x[N,4,8] -> MatMul+bias -> Concat with a class token Expand-ed to the batch -> Reshape to
    [N, 40] by a target computed from Shape -> Gather -> Unsqueeze -> Concat -> MatMul -> y[N,10].
    The batch is read both ways exporters read it: Shape + Gather (TorchScript) and
    Shape(start=0, end=1) (dynamo), and goes through int64 arithmetic (an Add of a constant)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a, name) for name, a in (
        ("w1", rng.normal(0, 0.3, (8, 8)).astype(np.float32)), ("bias1", rng.normal(0, 0.1, 8).astype(np.float32)),
        ("w2", rng.normal(0, 0.2, (40, 10)).astype(np.float32)),
        ("cls", rng.normal(0, 0.5, (1, 1, 8)).astype(np.float32)),
        ("idx0", np.array(0, np.int64)), ("axes0", np.array([0], np.int64)), ("zero_i64", np.array([0], np.int64)),
        ("one_eight", np.array([1, 8], np.int64)), ("forty", np.array([40], np.int64)))]
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "idx0"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes0"], ["b1"]),
        helper.make_node("Shape", ["x"], ["bs"], start=0, end=1),
        helper.make_node("Add", ["bs", "zero_i64"], ["bp"]),
        helper.make_node("Concat", ["bp", "one_eight"], ["tgt_cls"], axis=0),
        helper.make_node("Expand", ["cls", "tgt_cls"], ["cls_e"]),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "bias1"], ["hb"]),
        helper.make_node("Concat", ["cls_e", "hb"], ["cat"], axis=1),
        helper.make_node("Concat", ["b1", "forty"], ["tgt"], axis=0),
        helper.make_node("Reshape", ["cat", "tgt"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits, opset=18)


def _calib(n=16, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 4, 8)).astype(np.float32)


def _ort(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_shape_tensors_marks_shape_arithmetic_only():
    marked = quantize.shape_tensors(shape_model())
    assert SHAPE_NAMES <= marked
    assert not marked & {"x", "h", "hb", "cls_e", "cat", "r", "y", "cls", "w1", "w2"}


@pytest.mark.parametrize("shapes", [None, {"x": (2, 4, 8)}], ids=["symbolic", "folded"])
def test_no_quantize_on_shape_tensors(shapes):
    model = shape_model()
    qdq, report = quantize.quantize(model, {"x": _calib()}, shapes=shapes)
    inferred = onnx.shape_inference.infer_shapes(qdq).graph
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in (*inferred.value_info, *inferred.input)}
    elem.update({t.name: t.data_type for t in qdq.graph.initializer})
    qs = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert qs and report.tensors == len(qs)
    for n in qs:
        src = n.input[0].removesuffix("_float")
        assert src not in SHAPE_NAMES, f"{n.name} quantizes shape arithmetic {src!r}"
        assert elem.get(n.input[0]) == TensorProto.FLOAT, f"{n.name} quantizes a non-float tensor {n.input[0]!r}"
    for n in qdq.graph.node:                    # nor are int64 constants turned into int8 ones
        if n.op_type == "DequantizeLinear":
            assert n.output[0] not in SHAPE_NAMES
    x = _calib(3, seed=5)
    if shapes is None:                          # the QDQ model keeps its symbolic batch
        want, got = _ort(model, x), _ort(quantize.ort_loadable(qdq), x)
    else:
        want, got = _ort(model, x[:2]), _ort(quantize.ort_loadable(qdq), x[:2])
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_compiles_integer_only(tmp_path):
    path = tmp_path / "shape_model.onnx"
    model = shape_model()
    onnx.save(model, path)
    art = compiler.compile(path, options=CompileOptions(calib={"x": _calib()}))
    m = art.manifest
    assert m.precision == "int8" and m.integer_only, m.integer_region
    x = _calib(4, seed=5)
    got = art.run({"x": x})["y"]                # batch fixed to 1 at compile time: run slice by slice
    want = _ort(model, x)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 8 * m.quant["y"].scale + 0.05 * np.abs(want).max()


def test_canonicalize_folds_sliced_shape_and_splits():
    """Shape(start, end) folds at fixed shapes; a Split at constant sizes becomes Slices."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([2, 1, 1], np.int64), "sizes"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(rng.normal(size=(3, 6)).astype(np.float32), "w")]
    nodes = [helper.make_node("Shape", ["x"], ["bs"], start=0, end=1),
             helper.make_node("Concat", ["bs", "minus1"], ["tgt"], axis=0),
             helper.make_node("Split", ["x", "sizes"], ["p", "q", "s"], axis=1),
             helper.make_node("Add", ["q", "s"], ["qs"]),
             helper.make_node("Concat", ["qs", "p"], ["c"], axis=1),
             helper.make_node("Split", ["c"], ["u", "v"], axis=2, num_outputs=2),
             helper.make_node("Sub", ["u", "v"], ["d"]),
             helper.make_node("MatMul", ["d", "w"], ["e"]),
             helper.make_node("Reshape", ["e", "tgt"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, opset=18)
    canon = canonicalize(model, {"x": (2, 4, 6)})
    ops = [n.op_type for n in canon.graph.node]
    assert "Shape" not in ops and "Split" not in ops and ops.count("Slice") == 5
    x = rng.normal(size=(2, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(_ort(canon, x), _ort(model, x), rtol=1e-6, atol=1e-6)


def _computed_reshape_model() -> onnx.ModelProto:
    """x (1, 4, 6, 6) -> Reshape(x, [1, ceil(C / 2), -1]) computed in float from Shape, as HF's
    MobileViT unfolds patches: TVM's importer rejects a Reshape whose shape is a tensor."""
    c = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
         (("one", [1], np.int64), ("minus", [-1], np.int64), ("idx", 1, np.int64), ("two", 2.0, np.float32),
          ("ax", [0], np.int64))]
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "idx"], ["ch"]),
             helper.make_node("Cast", ["ch"], ["chf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["chf", "two"], ["half"]), helper.make_node("Ceil", ["half"], ["up"]),
             helper.make_node("Cast", ["up"], ["hi"], to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["hi", "ax"], ["h1"]),
             helper.make_node("Concat", ["one", "h1", "minus"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 72])], c, opset=17)


def test_fp32_model_at_static_shapes_folds_its_shape_arithmetic():
    """An FP32 model with static inputs is canonicalized as calibration canonicalizes it: the
    computed Reshape target folds to a constant and the model compiles, equal to ORT."""
    model = _computed_reshape_model()
    art = compiler.compile(model)
    x = np.random.default_rng(0).normal(size=(1, 4, 6, 6)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(art.run({"x": x})["y"], want)


def _symbolic_batch_model() -> onnx.ModelProto:
    """What torch's exporters make of a symbolic batch in HF's BERT, in small: the token-type rows
    gathered from a constant buffer expanded to Shape(ids)[0] (the target computed as TorchScript
    spells ``expand(batch, -1)``), the mask rows picked by
    Range(0, batch) (two inputs whose batch symbols the exporter names apart), and a Reshape to
    [batch, -1] computed from Shape."""
    rng = np.random.default_rng(5)
    c = [numpy_helper.from_array(v, n) for n, v in (
        ("word", rng.normal(size=(50, 16)).astype(np.float32)), ("types", rng.normal(size=(2, 16)).astype(np.float32)),
        ("buffer", np.zeros((1, 8), np.int64)), ("zero", np.array(0, np.int64)), ("one", np.array(1, np.int64)),
        ("ax0", np.array([0], np.int64)), ("ax2", np.array([2], np.int64)), ("eight", np.array([8], np.int64)),
        ("minus", np.array([-1], np.int64)), ("w", rng.normal(size=(128, 4)).astype(np.float32)))]
    nodes = [helper.make_node("Shape", ["ids"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["b"]),
             helper.make_node("Unsqueeze", ["b", "ax0"], ["bu"]),
             helper.make_node("Concat", ["bu", "eight"], ["tgt"], axis=0),
             # TorchScript's expand(batch, -1): -1 entries replaced by ones, computed on shape tensors
             helper.make_node("Reshape", ["tgt", "minus"], ["tgt1"]), helper.make_node("Shape", ["tgt1"], ["n"]),
             helper.make_node("ConstantOfShape", ["n"], ["ones"], value=numpy_helper.from_array(np.array([1], np.int64))),
             helper.make_node("Mul", ["ones", "minus"], ["negs"]), helper.make_node("Equal", ["tgt1", "negs"], ["eq"]),
             helper.make_node("Where", ["eq", "ones", "tgt1"], ["tgt2"]),
             helper.make_node("Expand", ["buffer", "tgt2"], ["type_ids"]),
             helper.make_node("Gather", ["types", "type_ids"], ["type_rows"]),
             helper.make_node("Gather", ["word", "ids"], ["rows"]),
             helper.make_node("Add", ["rows", "type_rows"], ["e"]),
             helper.make_node("Range", ["zero", "b", "one"], ["r"]),
             helper.make_node("Gather", ["mask", "r"], ["mask_rows"], axis=0),
             helper.make_node("Unsqueeze", ["mask_rows", "ax2"], ["m3"]),
             helper.make_node("Mul", ["e", "m3"], ["em"]),
             helper.make_node("Concat", ["bu", "minus"], ["flat"], axis=0),
             helper.make_node("Reshape", ["em", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["s0", 8]),
                              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["s1", 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s0", 4])], c, opset=18)


def test_symbolic_batch_shape_arithmetic_compiles():
    """The model at a symbolic batch: the buffer's rows fold to one broadcast row, the coupled
    batch symbols become one, Range(0, batch) keeps the batch's symbol, and the Reshape target
    folds to [-1, 128].  It compiles once and equals ORT at batch 1 and 3."""
    model = _symbolic_batch_model()
    folded = fold_symbolic_shapes(model)
    ops = {n.op_type for n in folded.graph.node}
    assert not ops & {"ConstantOfShape", "Expand", "Equal", "Where", "Concat"}, ops     # Range(0, batch) keeps its Shape
    assert {d.dim_param for i in folded.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param} == {"s0"}
    consts = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    reshape = next(n for n in folded.graph.node if n.op_type == "Reshape")
    assert consts[reshape.input[1]].tolist() == [-1, 128]
    assert next(n for n in folded.graph.node if n.op_type == "Add").input[1] in consts     # one broadcast row
    art = compiler.compile(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(6)
    for batch in (1, 3):
        x = {"ids": rng.integers(0, 50, (batch, 8)).astype(np.int64),
             "mask": (rng.random((batch, 8)) > 0.3).astype(np.float32)}
        np.testing.assert_allclose(art.run(x)["y"], sess.run(None, x)[0], rtol=1e-5, atol=1e-5)
