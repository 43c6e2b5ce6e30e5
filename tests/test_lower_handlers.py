"""Each handler of the integer lowering (passes/lower_qdq.HANDLERS) on a tiny model of its own.

Every case is a few ONNX nodes around the op under test, quantized by lowbit's quantizer (or, for
a BatchNorm that the quantizer would fold, written as QDQ by hand).  The test records which
handlers the lowering dispatched to, requires the op's own handler among them and the build to be
integer-only, and compares the outputs with the golden interpreter (runtime/golden.run_qdq)
exactly, on inputs three times wider than the calibration data so that every clamp is hit.
A last test checks that the cases together reach every handler in the table.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import compile_with_golden, make_model
from onnx import TensorProto, helper, numpy_helper

from passes import lower_qdq
from runtime import golden

IMAGE = (2, 4, 6, 6)
SEQUENCE = (2, 6, 8)
_node = helper.make_node


def _param(rng, name, *shape, scale=0.3):
    return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.array(value, dtype), name)


def _model(nodes, inits, x_shape) -> onnx.ModelProto:
    """x -> nodes -> y, with y's type from ONNX shape inference."""
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))], [], inits,
                   opset=20)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    m.graph.output.append(next(v for v in inferred.graph.value_info if v.name == "y"))
    return m


class _Case:
    """A tiny FP32 graph: ``layers`` are (node, initializers) pairs or nodes, on input ``x`` of ``shape``."""

    def __init__(self, handlers: set[str], shape, layers, inits=()):
        self.handlers, self.shape, self.layers, self.inits = handlers, shape, layers, inits

    def model(self, seed: int) -> onnx.ModelProto:
        rng = np.random.default_rng(seed)
        nodes, inits = [], [f(rng) if callable(f) else f for f in self.inits]
        for layer in self.layers:
            node, make = layer if isinstance(layer, tuple) else (layer, ())
            nodes.append(node)
            inits += [f(rng) for f in make]
        return _model(nodes, inits, self.shape)


def _conv(src, dst, w, channels=4, k=3):
    return (_node("Conv", [src, w, w + "_b"], [dst], pads=[k // 2] * 4),
            (lambda rng: _param(rng, w, channels, IMAGE[1], k, k), lambda rng: _param(rng, w + "_b", channels)))


def _matmul(src, dst, w, n=8):
    return _node("MatMul", [src, w], [dst]), (lambda rng: _param(rng, w, SEQUENCE[-1], n),)


CASES = {
    "conv_relu": _Case({"relax.nn.conv2d", "relax.nn.relu"}, IMAGE, [_conv("x", "c", "w"), _node("Relu", ["c"], ["y"])]),
    "clip": _Case({"relax.clip"}, IMAGE, [_conv("x", "c", "w"), _node("Clip", ["c", "lo", "hi"], ["y"])],
                  [_const("lo", 0.0), _const("hi", 0.5)]),
    "matmul_bias": _Case({"relax.matmul", "relax.add"}, SEQUENCE,
                         [_matmul("x", "m", "w"), _node("Add", ["m", "b"], ["y"])], [lambda rng: _param(rng, "b", 8)]),
    "residual_add": _Case({"relax.add"}, IMAGE,
                          [_conv("x", "c", "w"), _node("Add", ["c", "x"], ["s"]), _node("Relu", ["s"], ["y"])]),
    "concat": _Case({"relax.concat"}, IMAGE,
                    [_conv("x", "a", "w1"), _conv("x", "b", "w2"), _node("Concat", ["a", "b"], ["y"], axis=1)]),
    "max_pool": _Case({"relax.nn.max_pool2d"}, IMAGE,
                      [_conv("x", "c", "w"), _node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]),
    # Swin pads its windows: the integers padded with the zero point (an ONNX Pad becomes relax.nn.pad)
    "pad": _Case({"relax.nn.pad"}, IMAGE, [_conv("x", "c", "w"), _node("Pad", ["c", "pads"], ["y"])],
                 [_const("pads", [0, 0, 1, 0, 0, 0, 2, 3], np.int64)]),
    # GoogLeNet's pools: ceil mode adds a last, partial window (6 -> 3, not 2)
    "max_pool_ceil": _Case({"relax.nn.max_pool2d"}, IMAGE,
                           [_conv("x", "c", "w"), _node("MaxPool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                                        ceil_mode=1)]),
    "avg_pool": _Case({"relax.nn.avg_pool2d"}, IMAGE,
                      [_conv("x", "c", "w"), _node("AveragePool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]),
    # a divisor per window: the cells inside the input (Inception's pools), ceil mode's cut last window
    "avg_pool_exclude_pad": _Case({"relax.nn.avg_pool2d"}, IMAGE, [
        _conv("x", "c", "w"), _node("AveragePool", ["c"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]),
    "avg_pool_ceil": _Case({"relax.nn.avg_pool2d"}, IMAGE, [
        _conv("x", "c", "w"), _node("AveragePool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)]),
    "avg_pool_ceil_counting_pad": _Case({"relax.nn.avg_pool2d"}, IMAGE, [
        _conv("x", "c", "w"), _node("AveragePool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                    ceil_mode=1, count_include_pad=1)]),
    "mean": _Case({"relax.mean"}, IMAGE, [_conv("x", "c", "w"), _node("ReduceMean", ["c", "axes"], ["y"], keepdims=0)],
                  [_const("axes", [2, 3], np.int64)]),
    "views": _Case({"relax.permute_dims", "relax.reshape"}, IMAGE,
                   [_conv("x", "c", "w"), _node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
                    _node("Reshape", ["t", "shape"], ["r"]), _node("MatMul", ["r", "wm"], ["y"])],
                   [_const("shape", [IMAGE[0], 36, 4], np.int64), lambda rng: _param(rng, "wm", 4, 4)]),
    "table": _Case({"relax.sigmoid"}, IMAGE, [_conv("x", "c", "w"), _node("Sigmoid", ["c"], ["y"])]),
    "float_binary": _Case({"relax.subtract"}, IMAGE,   # then Pow of that function: a closure (no handler)
                          [_conv("x", "c", "w"), _node("Sub", ["c", "k"], ["d"]), _node("Pow", ["d", "two"], ["y"])],
                          [_const("k", 0.5), _const("two", 2.0)]),
    "product": _Case({"relax.multiply"}, IMAGE,
                     [_conv("x", "a", "w1"), _conv("x", "b", "w2"), _node("Mul", ["a", "b"], ["y"])]),
    "scalar_divide": _Case({"relax.divide"}, SEQUENCE, [_matmul("x", "m", "w"), _node("Div", ["m", "k"], ["y"])],
                           [_const("k", 2.8)]),
    "softmax": _Case({"relax.nn.softmax"}, SEQUENCE, [_matmul("x", "m", "w"), _node("Softmax", ["m"], ["y"], axis=-1)]),
    "gelu": _Case({"relax.nn.gelu"}, SEQUENCE, [_matmul("x", "m", "w"), _node("Gelu", ["m"], ["y"])]),
    # SDPA as torch's dynamo exporter writes it: scores + an all-zero mask, softmax, where(isnan(p), 0, p)
    "isnan_where": _Case({"relax.isnan", "relax.where", "relax.add"}, SEQUENCE,
                         [_matmul("x", "m", "w"), _node("Add", ["m", "mask"], ["s"]),
                          _node("Softmax", ["s"], ["p"], axis=-1), _node("IsNaN", ["p"], ["nan"]),
                          _node("Where", ["nan", "zero", "p"], ["y"])],
                         [_const("mask", np.zeros((SEQUENCE[1], 8))), _const("zero", 0.0)]),
    # LayerScale: a per-channel constant gain, one gain negative and one zero (the sign term)
    "layer_scale": _Case({"relax.multiply"}, IMAGE, [_conv("x", "c", "w"), _node("Mul", ["c", "gamma"], ["y"])],
                         [_const("gamma", np.array([0.3, -0.2, 0.0, 1.7]).reshape(4, 1, 1))]),
    "layer_norm": _Case({"relax.nn.layer_norm"}, SEQUENCE,
                        [_matmul("x", "m", "w"), _node("LayerNormalization", ["m", "g", "beta"], ["y"], axis=-1)],
                        [lambda rng: _param(rng, "g", 8), lambda rng: _param(rng, "beta", 8)]),
}


def _batch_norm_qdq() -> onnx.ModelProto:
    """DQ -> BatchNormalization -> Q -> DQ, as a quantizer that does not fold BatchNorm leaves it,
    with a negative gamma on one channel (the sign term)."""
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sy", 0.08), _const("zy", 120, np.uint8),
             _const("gamma", [1.5, -0.7, 0.3, 2.0]), _const("beta", [0.1, -0.2, 0.0, 0.4]),
             _const("mean", [0.05, 0.0, -0.1, 0.2]), _const("var", [0.8, 1.2, 0.5, 2.0])]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("BatchNormalization", ["xd", "gamma", "beta", "mean", "var"], ["b"]),
             _node("QuantizeLinear", ["b", "sy", "zy"], ["bq"]), _node("DequantizeLinear", ["bq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, IMAGE)


def _same_grid_concat_qdq() -> onnx.ModelProto:
    """NNCF's layout: a Concat of two tensors on one grid (unified scales) read by a Conv with no
    quantize between them."""
    rng = np.random.default_rng(4)
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sy", 0.2), _const("zy", 120, np.uint8),
             numpy_helper.from_array(rng.integers(-127, 128, size=(4, 8, 3, 3)).astype(np.int8), "wq"),
             _const("sw", 0.01), _const("zw", 0, np.int8)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("Relu", ["xd"], ["r"]), _node("Concat", ["xd", "r"], ["c"], axis=1),
             _node("DequantizeLinear", ["wq", "sw", "zw"], ["w"]), _node("Conv", ["c", "w"], ["o"], pads=[1, 1, 1, 1]),
             _node("QuantizeLinear", ["o", "sy", "zy"], ["oq"]), _node("DequantizeLinear", ["oq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, IMAGE)


def _split_qdq() -> onnx.ModelProto:
    """ORT's layout of ShuffleNet's channel split: Split of a dequantized tensor, each part quantized
    again with the same parameters (lowbit's own quantizer makes slices of a split at known sizes)."""
    rng = np.random.default_rng(5)
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sy", 0.2), _const("zy", 120, np.uint8),
             numpy_helper.from_array(rng.integers(-127, 128, size=(4, 2, 3, 3)).astype(np.int8), "wq"),
             _const("sw", 0.01), _const("zw", 0, np.int8)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("Split", ["xd"], ["a", "b"], axis=1, num_outputs=2),
             *(n for part in "ab" for n in (_node("QuantizeLinear", [part, "sx", "zx"], [part + "q"]),
                                            _node("DequantizeLinear", [part + "q", "sx", "zx"], [part + "d"]))),
             _node("DequantizeLinear", ["wq", "sw", "zw"], ["w"]), _node("Conv", ["bd", "w"], ["o"], pads=[1, 1, 1, 1]),
             _node("QuantizeLinear", ["o", "sx", "zx"], ["oq"]), _node("DequantizeLinear", ["oq", "sx", "zx"], ["od"]),
             _node("Concat", ["od", "ad"], ["c"], axis=1),
             _node("QuantizeLinear", ["c", "sy", "zy"], ["cq"]), _node("DequantizeLinear", ["cq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, IMAGE)


def _quantized_layer_scale_qdq() -> onnx.ModelProto:
    """ORT's layout of ConvNeXt's LayerScale: the per-channel gain is a uint8 constant with one scale,
    multiplied with a dequantized activation."""
    rng = np.random.default_rng(6)
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sy", 0.01), _const("zy", 100, np.uint8),
             numpy_helper.from_array(rng.integers(0, 256, size=(1, IMAGE[1], 1, 1)).astype(np.uint8), "gq"),
             _const("sg", 0.002), _const("zg", 0, np.uint8)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("DequantizeLinear", ["gq", "sg", "zg"], ["g"]), _node("Mul", ["g", "xd"], ["o"]),
             _node("QuantizeLinear", ["o", "sy", "zy"], ["oq"]), _node("DequantizeLinear", ["oq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, IMAGE)


def _recording(monkeypatch) -> set[str]:
    """Wrap every handler so that the names the lowering dispatches land in the returned set."""
    seen: set[str] = set()
    for name, fn in list(lower_qdq.HANDLERS.items()):
        def wrapped(self, call, fn=fn, name=name):
            seen.add(name)
            return fn(self, call)
        monkeypatch.setitem(lower_qdq.HANDLERS, name, wrapped)
    return seen


def _shape(model) -> list[int]:
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def _compile_and_compare(model, path, calib, monkeypatch) -> set[str]:
    seen = _recording(monkeypatch)
    onnx.save(model, path)
    # a given QDQ model's reference: the model as the compile loads it (constant subgraphs folded)
    art, qdq, variants = compile_with_golden(path, calib=calib)
    assert art.manifest.precision == "int8" and art.manifest.integer_only, art.manifest.integer_region
    x = {"x": np.random.default_rng(1).normal(size=_shape(model)).astype(np.float32) * 3}
    np.testing.assert_array_equal(art.run(x)["y"], golden.run_qdq(qdq, x, variants)["y"])
    return seen


@pytest.mark.parametrize("name", sorted(CASES))
def test_handler_is_integer_and_bit_exact(name, tmp_path, monkeypatch):
    case = CASES[name]
    model = case.model(seed=sorted(CASES).index(name))
    calib = {"x": np.random.default_rng(0).normal(size=(16, *case.shape[1:])).astype(np.float32)}
    seen = _compile_and_compare(model, tmp_path / "m.onnx", calib, monkeypatch)
    assert case.handlers <= seen, f"{sorted(case.handlers - seen)} not dispatched; saw {sorted(seen)}"


def test_batch_norm_left_in_a_quantized_graph(tmp_path, monkeypatch):
    seen = _compile_and_compare(_batch_norm_qdq(), tmp_path / "bn.onnx", None, monkeypatch)
    assert {"relax.nn.batch_norm", "TupleGetItem", "relax.quantize", "relax.dequantize"} <= seen


def test_a_concat_on_one_grid_feeds_a_conv_directly(tmp_path, monkeypatch):
    seen = _compile_and_compare(_same_grid_concat_qdq(), tmp_path / "cat.onnx", None, monkeypatch)
    assert {"relax.concat", "relax.nn.conv2d"} <= seen


def test_split_of_an_integer_tensor(tmp_path, monkeypatch):
    seen = _compile_and_compare(_split_qdq(), tmp_path / "split.onnx", None, monkeypatch)
    assert {"relax.split", "TupleGetItem", "relax.concat"} <= seen


def test_split_of_raw_integers(tmp_path, monkeypatch):
    """QOperator's layout (to_qdq keeps it): Split reads the quantized tensor itself, each part then
    dequantized on its grid."""
    m = _split_qdq()
    g = m.graph
    split = next(n for n in g.node if n.op_type == "Split")
    split.input[0] = "xq"
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in ("aq", "bq"):
            n.input[0] = n.input[0][0]
    keep = [n for n in g.node if not (n.op_type == "QuantizeLinear" and n.input[0] in ("a", "b"))]
    del g.node[:]
    g.node.extend(keep)
    seen = _compile_and_compare(m, tmp_path / "split_q.onnx", None, monkeypatch)
    assert {"relax.split", "TupleGetItem"} <= seen


def test_layer_scale_quantized_per_tensor(tmp_path, monkeypatch):
    seen = _compile_and_compare(_quantized_layer_scale_qdq(), tmp_path / "ls.onnx", None, monkeypatch)
    assert "relax.multiply" in seen


def test_the_cases_reach_every_handler():
    """Each distinct handler function is the one under test in some case above (families such as
    the views or the float unary ops share one function, so one member stands for it)."""
    covered = set().union(*(c.handlers for c in CASES.values()),
                          {"relax.nn.batch_norm", "TupleGetItem", "relax.quantize", "relax.dequantize", "relax.split"})
    missing = {fn.__name__ for fn in lower_qdq.HANDLERS.values()} - {lower_qdq.HANDLERS[n].__name__ for n in covered}
    assert not missing, f"handlers without a case: {sorted(missing)}"


def _pooled_concat_qdq() -> onnx.ModelProto:
    """NNCF's GoogLeNet head: a Concat of two grids pooled by ReduceMean, quantized after the pool."""
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sr", 0.03), _const("zr", 0, np.uint8),
             _const("sy", 0.02), _const("zy", 110, np.uint8), _const("axes", [2, 3], np.int64)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("Relu", ["x"], ["r"]), _node("QuantizeLinear", ["r", "sr", "zr"], ["rq"]),
             _node("DequantizeLinear", ["rq", "sr", "zr"], ["rd"]), _node("Concat", ["xd", "rd"], ["c"], axis=1),
             _node("ReduceMean", ["c", "axes"], ["m"], keepdims=0),
             _node("QuantizeLinear", ["m", "sy", "zy"], ["mq"]), _node("DequantizeLinear", ["mq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, IMAGE)


def test_mean_of_a_concat_of_two_grids(tmp_path, monkeypatch):
    """Each part's mean requantized to the pool's grid, then joined (a mutation that requantizes the
    parts before pooling, or joins them unscaled, fails)."""
    seen = _compile_and_compare(_pooled_concat_qdq(), tmp_path / "pool_cat.onnx", None, monkeypatch)
    assert {"relax.concat", "relax.mean"} <= seen


def _qoperator_pad_qdq() -> onnx.ModelProto:
    """ORT's QOperator Swin: Pad reads the quantized tensor and pads it with the zero point (an
    integer, not a real value)."""
    inits = [_const("sx", 0.05), _const("zx", 130, np.uint8), _const("pads", [0, 0, 1, 2, 0, 0, 3, 0], np.int64)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("Pad", ["xq", "pads", "zx"], ["pq"]),
             _node("DequantizeLinear", ["pq", "sx", "zx"], ["y"])]
    return _model(nodes, inits, IMAGE)


def test_pad_of_raw_integers_with_the_zero_point(tmp_path, monkeypatch):
    model = _qoperator_pad_qdq()
    seen = _compile_and_compare(model, tmp_path / "pad_q.onnx", None, monkeypatch)
    assert "relax.nn.pad" in seen
    x = {"x": np.random.default_rng(1).normal(size=_shape(model)).astype(np.float32)}
    y = golden.run_qdq(model, x)["y"]
    assert (y[:, :, 0] == 0).all() and (y[:, :, :, :2] == 0).all()      # the padding is real 0


def _class_token_of_layernorm_qdq() -> onnx.ModelProto:
    """ORT QOperator's ViT head: LayerNorm (per-channel result awaiting its quantize) and the class
    token taken by Gather along the sequence before the quantize."""
    rng = np.random.default_rng(7)
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sy", 0.03), _const("zy", 128, np.uint8),
             _const("zero", 0, np.int64), numpy_helper.from_array(rng.normal(1, 0.3, SEQUENCE[-1]).astype(np.float32),
                                                                   "g"),
             numpy_helper.from_array(rng.normal(0, 0.3, SEQUENCE[-1]).astype(np.float32), "b")]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("LayerNormalization", ["xd", "g", "b"], ["n"], axis=-1),
             _node("Gather", ["n", "zero"], ["t"], axis=1),
             _node("QuantizeLinear", ["t", "sy", "zy"], ["tq"]), _node("DequantizeLinear", ["tq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, SEQUENCE)


def test_class_token_of_a_per_channel_result(tmp_path, monkeypatch):
    seen = _compile_and_compare(_class_token_of_layernorm_qdq(), tmp_path / "cls.onnx", None, monkeypatch)
    assert {"relax.take", "relax.nn.layer_norm"} <= seen


def _per_channel_depthwise_qdq(zeros: bool) -> onnx.ModelProto:
    """NNCF's MobileNetV2 layout: a pointwise convolution's ReLU6 quantized with one scale per
    channel (one zero point, or one per channel: ``zeros``), read by a depthwise convolution whose
    bias is a float Add."""
    rng = np.random.default_rng(8)
    c = IMAGE[1]
    zc = rng.integers(0, 40, c) if zeros else np.zeros(c)
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sy", 0.04), _const("zy", 0, np.uint8),
             _const("sc", rng.uniform(0.01, 0.05, c)), _const("zc", zc, np.uint8),
             numpy_helper.from_array(rng.integers(-127, 128, size=(c, c, 1, 1)).astype(np.int8), "w1q"),
             numpy_helper.from_array(rng.integers(-127, 128, size=(c, 1, 3, 3)).astype(np.int8), "w2q"),
             _const("sw1", rng.uniform(0.002, 0.01, c)), _const("sw2", rng.uniform(0.002, 0.01, c)),
             _const("zw", np.zeros(c), np.int8), _const("b2", rng.normal(0, 0.2, (1, c, 1, 1))),
             _const("six", 6.0), _const("nil", 0.0)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("DequantizeLinear", ["w1q", "sw1", "zw"], ["w1"], axis=0), _node("Conv", ["xd", "w1"], ["a"]),
             _node("Clip", ["a", "nil", "six"], ["r"]),
             _node("QuantizeLinear", ["r", "sc", "zc"], ["rq"], axis=1),
             _node("DequantizeLinear", ["rq", "sc", "zc"], ["rd"], axis=1),
             _node("DequantizeLinear", ["w2q", "sw2", "zw"], ["w2"], axis=0),
             _node("Conv", ["rd", "w2"], ["d"], group=c, pads=[1, 1, 1, 1]), _node("Add", ["d", "b2"], ["db"]),
             _node("Clip", ["db", "nil", "six"], ["o"]),
             _node("QuantizeLinear", ["o", "sy", "zy"], ["oq"]), _node("DequantizeLinear", ["oq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, IMAGE)


@pytest.mark.parametrize("zeros", [False, True], ids=["one-zero-point", "zero-point-per-channel"])
def test_per_channel_input_of_a_depthwise_convolution(zeros, tmp_path, monkeypatch):
    """Requantized to one scale per channel (ReLU6's top per channel), then convolved depthwise
    at s_x[c] * s_w[c]; a zero point per channel is subtracted before the convolution (q - z_c in
    int16, padded with 0): integer-only, bit-exact with golden."""
    seen = _compile_and_compare(_per_channel_depthwise_qdq(zeros), tmp_path / "dw.onnx", None, monkeypatch)
    assert {"relax.nn.conv2d", "relax.quantize", "relax.dequantize"} <= seen


def _silu_per_channel_qdq(zeros: bool) -> onnx.ModelProto:
    """NNCF's EfficientNet layout: Conv -> SiLU (x * sigmoid(x)) left unquantized, then one scale per
    channel for the depthwise convolution that reads it (and, in MobileViT, one zero point per
    channel: ``zeros``)."""
    rng = np.random.default_rng(9)
    c = IMAGE[1]
    zc = rng.integers(-126, -110, c) if zeros else np.zeros(c)
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sc", rng.uniform(0.005, 0.03, c)),
             _const("zc", zc, np.int8), _const("sy", 0.02), _const("zy", 0, np.int8),
             numpy_helper.from_array(rng.integers(-127, 128, size=(c, c, 1, 1)).astype(np.int8), "w1q"),
             numpy_helper.from_array(rng.integers(-127, 128, size=(c, 1, 3, 3)).astype(np.int8), "w2q"),
             _const("sw1", rng.uniform(0.002, 0.01, c)), _const("sw2", rng.uniform(0.002, 0.01, c)),
             _const("zw", np.zeros(c), np.int8)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("DequantizeLinear", ["w1q", "sw1", "zw"], ["w1"], axis=0), _node("Conv", ["xd", "w1"], ["a"]),
             _node("Sigmoid", ["a"], ["g"]), _node("Mul", ["a", "g"], ["s"]),
             _node("QuantizeLinear", ["s", "sc", "zc"], ["sq"], axis=1),
             _node("DequantizeLinear", ["sq", "sc", "zc"], ["sd"], axis=1),
             _node("DequantizeLinear", ["w2q", "sw2", "zw"], ["w2"], axis=0),
             _node("Conv", ["sd", "w2"], ["o"], group=c, pads=[1, 1, 1, 1]),
             _node("QuantizeLinear", ["o", "sy", "zy"], ["oq"]), _node("DequantizeLinear", ["oq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, IMAGE)


@pytest.mark.parametrize("zeros", [False, True], ids=["one-zero-point", "zero-point-per-channel"])
def test_float_function_quantized_per_channel(zeros, tmp_path, monkeypatch):
    """f on one 16-bit grid for every channel, in fixed point, each channel requantized by its own
    ratio (and zero point): integer-only, bit-exact with golden."""
    seen = _compile_and_compare(_silu_per_channel_qdq(zeros), tmp_path / "silu_pc.onnx", None, monkeypatch)
    assert {"relax.sigmoid", "relax.quantize"} <= seen


def _function_joins_a_sum_qdq() -> onnx.ModelProto:
    """NNCF's MobileViT block: SiLU of a convolution left unquantized is the residual operand of a
    second convolution's result, both float until the sum's quantize."""
    rng = np.random.default_rng(12)
    c = IMAGE[1]
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sy", 0.03), _const("zy", 0, np.int8),
             numpy_helper.from_array(rng.integers(-127, 128, size=(c, c, 1, 1)).astype(np.int8), "w1q"),
             numpy_helper.from_array(rng.integers(-127, 128, size=(c, c, 1, 1)).astype(np.int8), "w2q"),
             _const("sw1", rng.uniform(0.002, 0.01, c)), _const("sw2", rng.uniform(0.002, 0.01, c)),
             _const("zw", np.zeros(c), np.int8)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("DequantizeLinear", ["w1q", "sw1", "zw"], ["w1"], axis=0), _node("Conv", ["xd", "w1"], ["a"]),
             _node("Sigmoid", ["a"], ["g"]), _node("Mul", ["a", "g"], ["s"]),
             _node("DequantizeLinear", ["w2q", "sw2", "zw"], ["w2"], axis=0), _node("Conv", ["xd", "w2"], ["b"]),
             _node("Add", ["s", "b"], ["o"]),
             _node("QuantizeLinear", ["o", "sy", "zy"], ["oq"]), _node("DequantizeLinear", ["oq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, IMAGE)


def test_a_float_function_of_an_accumulator_joins_a_sum(tmp_path, monkeypatch):
    """The function tabulated on the 16-bit grid its accumulator's bound fixes, then one term of the
    sum: integer-only, bit-exact with golden."""
    seen = _compile_and_compare(_function_joins_a_sum_qdq(), tmp_path / "fsum.onnx", None, monkeypatch)
    assert {"relax.sigmoid", "relax.add"} <= seen


def _norm_of_concat_qdq(pool: bool) -> onnx.ModelProto:
    """DenseNet: BatchNormalization -> ReLU of a Concat of two grids, quantized after (NNCF), or
    of one dequantized tensor pooled before the quantize (``pool``: ORT's QOperator head)."""
    c = IMAGE[1]
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sr", 0.03), _const("zr", 0, np.uint8),
             _const("sy", 0.02), _const("zy", 0, np.uint8), _const("axes", [2, 3], np.int64),
             _const("gamma", np.linspace(-1.2, 1.5, 2 * c)), _const("beta", np.linspace(-0.3, 0.4, 2 * c)),
             _const("mean", np.linspace(0.1, -0.1, 2 * c)), _const("var", np.linspace(0.5, 2.0, 2 * c))]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("Relu", ["x"], ["r"]), _node("QuantizeLinear", ["r", "sr", "zr"], ["rq"]),
             _node("DequantizeLinear", ["rq", "sr", "zr"], ["rd"]),
             _node("Concat", ["xd", "rd"], ["c"], axis=1)]
    if pool:        # one grid: the concat requantized first, the pool of the norm's unquantized ReLU
        nodes += [_node("QuantizeLinear", ["c", "sx", "zx"], ["cq"]), _node("DequantizeLinear", ["cq", "sx", "zx"], ["cd"])]
    nodes += [_node("BatchNormalization", ["cd" if pool else "c", "gamma", "beta", "mean", "var"], ["b"]),
              _node("Relu", ["b"], ["n"])]
    if pool:
        nodes += [_node("ReduceMean", ["n", "axes"], ["m"], keepdims=1), _node("QuantizeLinear", ["m", "sy", "zy"], ["q"])]
    else:
        nodes += [_node("QuantizeLinear", ["n", "sy", "zy"], ["q"])]
    nodes += [_node("DequantizeLinear", ["q", "sy", "zy"], ["y"])]
    return _model(nodes, inits, IMAGE)


@pytest.mark.parametrize("pool", [False, True], ids=["concat", "pooled"])
def test_batch_norm_of_a_concat_and_its_pool(pool, tmp_path, monkeypatch):
    seen = _compile_and_compare(_norm_of_concat_qdq(pool), tmp_path / "bn_cat.onnx", None, monkeypatch)
    assert {"relax.nn.batch_norm", "relax.nn.relu"} <= seen


def _pool_then_conv_qdq() -> onnx.ModelProto:
    """A squeeze-excitation's pool left unquantized before its 1x1 convolution (NNCF)."""
    rng = np.random.default_rng(10)
    c = IMAGE[1]
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sy", 0.01), _const("zy", 128, np.uint8),
             _const("axes", [2, 3], np.int64), _const("sw", rng.uniform(0.002, 0.01, c)), _const("zw", np.zeros(c), np.int8),
             numpy_helper.from_array(rng.integers(-127, 128, size=(c, c, 1, 1)).astype(np.int8), "wq")]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("ReduceMean", ["xd", "axes"], ["m"], keepdims=1),
             _node("DequantizeLinear", ["wq", "sw", "zw"], ["w"], axis=0), _node("Conv", ["m", "w"], ["o"]),
             _node("QuantizeLinear", ["o", "sy", "zy"], ["oq"]), _node("DequantizeLinear", ["oq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, IMAGE)


def test_convolution_of_a_pool(tmp_path, monkeypatch):
    """The mean read on its 16-bit grid s_x / 128, then convolved: integer-only, bit-exact."""
    seen = _compile_and_compare(_pool_then_conv_qdq(), tmp_path / "se.onnx", None, monkeypatch)
    assert {"relax.mean", "relax.nn.conv2d"} <= seen


def _pool_then_layer_norm_qdq() -> onnx.ModelProto:
    """ConvNeXt's head in ORT's QOperator file: the pool left unquantized, then LayerNorm over the
    channels (moved last by a Transpose), quantized after."""
    rng = np.random.default_rng(11)
    c = IMAGE[1]
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sy", 0.02), _const("zy", 128, np.uint8),
             _const("axes", [2, 3], np.int64), numpy_helper.from_array(rng.normal(1, 0.3, c).astype(np.float32), "g"),
             numpy_helper.from_array(rng.normal(0, 0.3, c).astype(np.float32), "b")]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("ReduceMean", ["xd", "axes"], ["m"], keepdims=1), _node("Transpose", ["m"], ["t"], perm=[0, 2, 3, 1]),
             _node("LayerNormalization", ["t", "g", "b"], ["n"], axis=-1),
             _node("QuantizeLinear", ["n", "sy", "zy"], ["nq"]), _node("DequantizeLinear", ["nq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, IMAGE)


def test_layer_norm_of_a_pool(tmp_path, monkeypatch):
    seen = _compile_and_compare(_pool_then_layer_norm_qdq(), tmp_path / "ln_pool.onnx", None, monkeypatch)
    assert {"relax.mean", "relax.nn.layer_norm"} <= seen


def _norm_then_norm_qdq() -> onnx.ModelProto:
    """Swin's patch embedding in ORT's QOperator file: LayerNorm read by the first block's
    LayerNorm and by a zero Pad, with no quantize between."""
    rng = np.random.default_rng(12)
    d = SEQUENCE[-1]
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sy", 0.02), _const("zy", 128, np.uint8),
             _const("pads", [0, 1, 0, 0, 2, 0], np.int64)] + [
        numpy_helper.from_array(rng.normal(m, 0.3, d).astype(np.float32), n) for n, m in
        (("g1", 1.0), ("b1", 0.0), ("g2", 1.0), ("b2", 0.0))]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("LayerNormalization", ["xd", "g1", "b1"], ["n1"], axis=-1),
             _node("LayerNormalization", ["n1", "g2", "b2"], ["n2"], axis=-1), _node("Pad", ["n2", "pads"], ["p"]),
             _node("QuantizeLinear", ["p", "sy", "zy"], ["pq"]), _node("DequantizeLinear", ["pq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, SEQUENCE)


def test_layer_norm_of_a_layer_norm_and_its_padding(tmp_path, monkeypatch):
    """Each unquantized norm read on the 16-bit grid its bound |gamma| sqrt(C) + |beta| fixes."""
    seen = _compile_and_compare(_norm_then_norm_qdq(), tmp_path / "ln_ln.onnx", None, monkeypatch)
    assert {"relax.nn.layer_norm", "relax.nn.pad"} <= seen


def _float_excitation_qdq(middle: str) -> onnx.ModelProto:
    """NNCF's squeeze-excitation: quantized at the pool's input and the gate's output only, with
    float weights in between: mean -> Conv(W1, b1) -> ReLU | SiLU -> Conv(W2) -> Sigmoid -> Q -> x * gate."""
    rng = np.random.default_rng(13)
    c, r = IMAGE[1], 3
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sg", 1 / 255), _const("zg", 0, np.uint8),
             _const("sy", 0.04), _const("zy", 128, np.uint8), _const("axes", [2, 3], np.int64),
             numpy_helper.from_array((rng.normal(size=(r, c, 1, 1)) * 0.5).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.normal(size=r) * 0.3).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.normal(size=(c, r, 1, 1)) * 0.8).astype(np.float32), "w2")]
    act = [_node("Relu", ["h"], ["a"])] if middle == "relu" else \
        [_node("Sigmoid", ["h"], ["hs"]), _node("Mul", ["h", "hs"], ["a"])]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("ReduceMean", ["xd", "axes"], ["m"], keepdims=1), _node("Conv", ["m", "w1", "b1"], ["h"]), *act,
             _node("Conv", ["a", "w2"], ["e"]), _node("Sigmoid", ["e"], ["s"]),
             _node("QuantizeLinear", ["s", "sg", "zg"], ["sq"]), _node("DequantizeLinear", ["sq", "sg", "zg"], ["g"]),
             _node("Mul", ["xd", "g"], ["p"]),
             _node("QuantizeLinear", ["p", "sy", "zy"], ["pq"]), _node("DequantizeLinear", ["pq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, IMAGE)


@pytest.mark.parametrize("middle", ["relu", "silu"])
def test_squeeze_excitation_with_float_weights(middle, tmp_path, monkeypatch):
    """Float weights become int8 per channel; each unquantized result is read on the 16-bit grid its
    proven bound fixes, SiLU's through a table of that grid (passes/wide_grid.py): integer-only, bit-exact."""
    seen = _compile_and_compare(_float_excitation_qdq(middle), tmp_path / "se_float.onnx", None, monkeypatch)
    assert {"relax.mean", "relax.nn.conv2d", "relax.multiply"} <= seen


def _norm_unfolded_qdq() -> onnx.ModelProto:
    """MobileViT's fold in ORT's QOperator file: a LayerNorm's result (a ratio per channel) reshaped so
    that its channels merge with the tokens, transposed, scaled and clamped, quantized only after."""
    rng = np.random.default_rng(14)
    d = SEQUENCE[-1]
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sy", 0.02), _const("zy", 128, np.uint8),
             _const("half", 0.5), _const("shape", [2, 4, 12], np.int64),
             numpy_helper.from_array(rng.normal(1, 0.3, d).astype(np.float32), "g"),
             numpy_helper.from_array(rng.normal(0, 0.3, d).astype(np.float32), "b")]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("LayerNormalization", ["xd", "g", "b"], ["n"], axis=-1), _node("Reshape", ["n", "shape"], ["r"]),
             _node("Transpose", ["r"], ["t"], perm=[0, 2, 1]), _node("Mul", ["t", "half"], ["h"]),
             _node("Relu", ["h"], ["a"]),
             _node("QuantizeLinear", ["a", "sy", "zy"], ["aq"]), _node("DequantizeLinear", ["aq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, SEQUENCE)


def test_views_that_move_a_per_channel_ratio_apart(tmp_path, monkeypatch):
    """The requantize to one scale commutes with the views: applied first, the views replayed on its integers."""
    seen = _compile_and_compare(_norm_unfolded_qdq(), tmp_path / "unfold.onnx", None, monkeypatch)
    assert {"relax.nn.layer_norm", "relax.reshape", "relax.permute_dims", "relax.multiply"} <= seen


def _nncf_encoder_qdq() -> onnx.ModelProto:
    """A transformer block as NNCF quantizes one: the residual stream float (a patch projection, a float
    class token and position embedding, two residual adds), SmoothQuant factors per channel before
    each quantize (after LayerNorm, attention and an erf GELU, some negative), the scores unquantized
    into Softmax; quantized only at the inputs of the matmuls."""
    rng = np.random.default_rng(15)
    t, d = 5, 8
    f32 = lambda name, *shape, scale=0.5, mean=0.0: numpy_helper.from_array(   # noqa: E731
        (rng.normal(mean, scale, size=shape)).astype(np.float32), name)
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sa", 0.04), _const("za", 0, np.int8),
             _const("sp", 1 / 255), _const("zp", 0, np.uint8), _const("half", 0.5), _const("root2", 1.4142135),
             _const("one", 1.0), f32("cls", 1, 1, d), f32("pos", 1, t + 1, d), f32("g1", d, mean=1.0, scale=0.2),
             f32("b1", d, scale=0.2), f32("g2", d, mean=1.0, scale=0.2), f32("b2", d, scale=0.2),
             numpy_helper.from_array(rng.uniform(0.5, 2, d).astype(np.float32).reshape(1, 1, d), "c1"),
             numpy_helper.from_array(rng.uniform(0.5, 2, d).astype(np.float32).reshape(1, 1, d), "c2"),
             numpy_helper.from_array(rng.uniform(0.5, 2, d).astype(np.float32).reshape(1, 1, d), "c3"),
             numpy_helper.from_array((rng.uniform(0.5, 2, d) * rng.choice([-1, 1], d)).astype(np.float32)
                                     .reshape(1, 1, d), "c4"),
             f32("bo", d, scale=0.2), f32("bm", d, scale=0.2)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"])]
    for w in ("wp", "wq", "wk", "wv", "wo", "wm", "wf"):      # int8 per output channel, as NNCF writes weights
        inits += [numpy_helper.from_array(rng.integers(-127, 128, size=(d, d)).astype(np.int8), w + "_q"),
                  _const(w + "_s", rng.uniform(0.002, 0.01, d)), _const(w + "_z", np.zeros(d), np.int8)]
        nodes.append(_node("DequantizeLinear", [w + "_q", w + "_s", w + "_z"], [w], axis=1))

    def quantized(src, dst, s="sa", z="za"):
        return [_node("QuantizeLinear", [src, s, z], [dst + "_q"]), _node("DequantizeLinear", [dst + "_q", s, z], [dst])]

    nodes += [_node("MatMul", ["xd", "wp"], ["patches"]), _node("Concat", ["cls", "patches"], ["tokens"], axis=1),
              _node("Add", ["tokens", "pos"], ["r0"]),
              _node("LayerNormalization", ["r0", "g1", "b1"], ["n1"], axis=-1), _node("Mul", ["n1", "c1"], ["n1s"]),
              *quantized("n1s", "h1"),
              _node("MatMul", ["h1", "wq"], ["q"]), *quantized("q", "qd"),
              _node("MatMul", ["h1", "wk"], ["k"]), _node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
              *quantized("kt", "ktd"), _node("MatMul", ["h1", "wv"], ["v"]), *quantized("v", "vd"),
              _node("MatMul", ["qd", "ktd"], ["scores"]), _node("Softmax", ["scores"], ["p"], axis=-1),
              *quantized("p", "pd", "sp", "zp"), _node("MatMul", ["pd", "vd"], ["att"]),
              _node("Mul", ["att", "c2"], ["atts"]), *quantized("atts", "ad"),
              _node("MatMul", ["ad", "wo"], ["o"]), _node("Add", ["o", "bo"], ["ob"]), _node("Add", ["ob", "r0"], ["r1"]),
              _node("LayerNormalization", ["r1", "g2", "b2"], ["n2"], axis=-1), _node("Mul", ["n2", "c3"], ["n2s"]),
              *quantized("n2s", "h2"), _node("MatMul", ["h2", "wm"], ["m"]), _node("Add", ["m", "bm"], ["mb"]),
              _node("Div", ["mb", "root2"], ["md"]), _node("Erf", ["md"], ["me"]), _node("Add", ["me", "one"], ["m1"]),
              _node("Mul", ["mb", "half"], ["mh"]), _node("Mul", ["mh", "m1"], ["gelu"]),
              _node("Mul", ["gelu", "c4"], ["gs"]), *quantized("gs", "g"),
              # a second residual add reads the first's sum: kept as one int32 stream before the new term joins
              _node("MatMul", ["g", "wf"], ["f"]), _node("Add", ["f", "r1"], ["r2"]),
              _node("LayerNormalization", ["r2", "g1", "b1"], ["n3"], axis=-1), *quantized("n3", "y")]
    return _model(nodes, inits, (1, t, d))


def test_transformer_block_with_a_float_residual_stream(tmp_path, monkeypatch):
    """Integer-only and bit-exact: the class token and position embedding on the projection's grid, the
    residual sums as terms read on the 16-bit grid their bound fixes (by LayerNorm), the scores on theirs
    (by Softmax), each SmoothQuant factor a ratio per channel (a table's sign per channel after the GELU)."""
    seen = _compile_and_compare(_nncf_encoder_qdq(), tmp_path / "nncf_block.onnx", None, monkeypatch)
    assert {"relax.concat", "relax.add", "relax.nn.layer_norm", "relax.nn.softmax", "relax.quantize"} <= seen


def _window_attention_qdq() -> onnx.ModelProto:
    """Window attention as NNCF quantizes Swin's: q and k quantized, the scores scaled by a constant
    and the probabilities and V left float (P.V of two unquantized operands), the block's output
    rolled back (two slices joined the other way round) before the residual add and LayerNorm."""
    rng = np.random.default_rng(16)
    t, d = 6, 8
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sa", 0.04), _const("za", 0, np.int8),
             _const("root", 2.0), _const("g", rng.uniform(0.5, 1.5, d)), _const("b", rng.normal(0, 0.2, d)),
             _const("bo", rng.normal(0, 0.2, d)), _const("c2", rng.uniform(0.5, 2, d).reshape(1, 1, d)),
             _const("s0", [0], np.int64), _const("s2", [2], np.int64), _const("s9", [t], np.int64),
             _const("ax", [1], np.int64)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"])]
    for w in ("wq", "wk", "wv", "wo"):
        inits += [numpy_helper.from_array(rng.integers(-127, 128, size=(d, d)).astype(np.int8), w + "_q"),
                  _const(w + "_s", rng.uniform(0.002, 0.01, d)), _const(w + "_z", np.zeros(d), np.int8)]
        nodes.append(_node("DequantizeLinear", [w + "_q", w + "_s", w + "_z"], [w], axis=1))

    def quantized(src, dst):
        return [_node("QuantizeLinear", [src, "sa", "za"], [dst + "_q"]),
                _node("DequantizeLinear", [dst + "_q", "sa", "za"], [dst])]

    nodes += [_node("MatMul", ["xd", "wq"], ["q"]), *quantized("q", "qd"),
              _node("MatMul", ["xd", "wk"], ["k"]), _node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
              *quantized("kt", "ktd"), _node("MatMul", ["xd", "wv"], ["v"]),
              _node("MatMul", ["qd", "ktd"], ["scores"]), _node("Div", ["scores", "root"], ["scaled"]),
              _node("Softmax", ["scaled"], ["p"], axis=-1), _node("MatMul", ["p", "v"], ["att"]),
              _node("Mul", ["att", "c2"], ["atts"]), *quantized("atts", "ad"),
              _node("MatMul", ["ad", "wo"], ["o"]), _node("Add", ["o", "bo"], ["ob"]),
              _node("Slice", ["ob", "s0", "s2", "ax"], ["head"]), _node("Slice", ["ob", "s2", "s9", "ax"], ["tail"]),
              _node("Concat", ["tail", "head"], ["rolled"], axis=1), _node("Add", ["xd", "rolled"], ["r"]),
              _node("LayerNormalization", ["r", "g", "b"], ["n"], axis=-1), *quantized("n", "y")]
    return _model(nodes, inits, (1, t, d))


def test_window_attention_with_float_probabilities(tmp_path, monkeypatch):
    """Integer-only and bit-exact: the scores' scale keeps their bound (Softmax reads them on its grid),
    P.V reads the softmax's own integers (rows summing to 2^15) times V on its 16-bit grid, and the
    roll's slices of one result rejoin as one result awaiting its requantize."""
    seen = _compile_and_compare(_window_attention_qdq(), tmp_path / "window.onnx", None, monkeypatch)
    assert {"relax.nn.softmax", "relax.matmul", "relax.concat", "relax.nn.layer_norm"} <= seen


def _unfolded_patches_qdq() -> onnx.ModelProto:
    """MobileViT's unfold as NNCF leaves it: a pointwise convolution's result (a ratio per channel) seen
    through views that move its channels apart, added to a linear result, both float until LayerNorm."""
    rng = np.random.default_rng(17)
    c = IMAGE[1]
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sa", 0.04), _const("za", 0, np.int8),
             numpy_helper.from_array(rng.integers(-127, 128, size=(c, c, 1, 1)).astype(np.int8), "wc_q"),
             _const("wc_s", rng.uniform(0.002, 0.01, c)), _const("wc_z", np.zeros(c), np.int8),
             numpy_helper.from_array(rng.integers(-127, 128, size=(c, c)).astype(np.int8), "wl_q"),
             _const("wl_s", rng.uniform(0.002, 0.01, c)), _const("wl_z", np.zeros(c), np.int8),
             _const("g", rng.uniform(0.5, 1.5, c)), _const("b", rng.normal(0, 0.2, c)),
             _const("fold", [IMAGE[0] * c * 3, 2, 3, 2], np.int64), _const("patches", [IMAGE[0], c, 9, 4], np.int64),
             _const("tokens", [IMAGE[0] * 4, 9, c], np.int64)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("DequantizeLinear", ["wc_q", "wc_s", "wc_z"], ["wc"], axis=0), _node("Conv", ["xd", "wc"], ["a"]),
             _node("Reshape", ["a", "fold"], ["a1"]), _node("Transpose", ["a1"], ["a2"], perm=[0, 2, 1, 3]),
             _node("Reshape", ["a2", "patches"], ["a3"]), _node("Transpose", ["a3"], ["a4"], perm=[0, 3, 2, 1]),
             _node("Reshape", ["a4", "tokens"], ["u"]),
             _node("QuantizeLinear", ["u", "sa", "za"], ["uq"]), _node("DequantizeLinear", ["uq", "sa", "za"], ["ud"]),
             _node("DequantizeLinear", ["wl_q", "wl_s", "wl_z"], ["wl"], axis=1), _node("MatMul", ["ud", "wl"], ["l"]),
             _node("Add", ["l", "u"], ["r"]), _node("LayerNormalization", ["r", "g", "b"], ["n"], axis=-1),
             _node("QuantizeLinear", ["n", "sa", "za"], ["nq"]), _node("DequantizeLinear", ["nq", "sa", "za"], ["y"])]
    return _model(nodes, inits, IMAGE)


def test_unfolded_patches_join_a_float_sum(tmp_path, monkeypatch):
    """The viewed per-channel result on the 16-bit grid its bound fixes, then views, one term of the sum:
    integer-only and bit-exact."""
    seen = _compile_and_compare(_unfolded_patches_qdq(), tmp_path / "unfold.onnx", None, monkeypatch)
    assert {"relax.reshape", "relax.permute_dims", "relax.add", "relax.nn.layer_norm"} <= seen


def _constant_mask_qdq() -> onnx.ModelProto:
    """A quantized graph that computes a constant at run time from constants alone (NNCF's Swin builds
    its shifted-window mask with ScatterND, Equal and Where): x + sum(where(a == b, 0, -1))."""
    inits = [_const("sx", 0.05), _const("zx", 128, np.uint8), _const("sy", 0.05), _const("zy", 128, np.uint8),
             _const("a", [0, 1, 2], np.int64), _const("b", [0, 0, 2], np.int64), _const("axes", [0], np.int64),
             _const("zero", 0.0), _const("minus", -1.0)]
    nodes = [_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), _node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             _node("Equal", ["a", "b"], ["same"]), _node("Where", ["same", "zero", "minus"], ["each"]),
             _node("ReduceSum", ["each", "axes"], ["mask"], keepdims=0), _node("Add", ["xd", "mask"], ["s"]),
             _node("QuantizeLinear", ["s", "sy", "zy"], ["sq"]), _node("DequantizeLinear", ["sq", "sy", "zy"], ["y"])]
    return _model(nodes, inits, SEQUENCE)


def test_constant_subgraph_of_a_given_model_folds(tmp_path, monkeypatch):
    """Computed once at compile time, the mask is a constant the add's table absorbs: no island."""
    _compile_and_compare(_constant_mask_qdq(), tmp_path / "mask.onnx", None, monkeypatch)
