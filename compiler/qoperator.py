"""QOperator -> QDQ: rewrite ONNX Runtime's quantized operators into the QDQ form
that TVM's importer reads (and that the integer lowering consumes).

TVM 0.27 imports QuantizeLinear / DequantizeLinear and MatMulInteger but none
of the QLinear* operators.  Each QLinear op is, by its ONNX / ORT definition,
``Q(op(DQ(a), DQ(b)))`` with the op's own scales and zero points, so it is
rewritten to exactly that.  The int32 bias of QLinearConv / QGemm is
dequantized with scale ``s_a * s_b`` (per output channel), as the operator
specs define it.  ConvInteger is rewritten to an int32 convolution of the
zero-point-shifted operands (exact; not expressible as float math).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_OPSET = 13          # per-axis DequantizeLinear


class Rewriter:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.new_inits: list[onnx.TensorProto] = []
        self.ids = itertools.count()
        self.types = {vi.name: vi.type.tensor_type.elem_type
                      for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]}

    def name(self, base: str) -> str:
        return f"{base}__qdq{next(self.ids)}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.new_inits.append(numpy_helper.from_array(value, name))
        return name

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def scale_type(self, scale: str) -> int:
        s = self.array(scale)
        return helper.np_dtype_to_tensor_dtype(s.dtype) if s is not None else self.types.get(scale, TensorProto.FLOAT)

    def f32(self, out_nodes, scale: str) -> str:
        """``scale`` as float32.  A float16 scale would make the op between DQ and Q float16 arithmetic
        (a MatMul's sum and the division by y_scale rounded to 11 bits: ONNX's own QLinearMatMul case
        gave 254 for 254.58), where the QLinear specs compute the real-valued result and round once,
        at the quantize."""
        if self.scale_type(scale) == TensorProto.FLOAT:
            return scale
        if (s := self.array(scale)) is not None:
            return self.const(scale + "_f32", s.astype(np.float32))
        y = self.name(scale + "_f32")
        out_nodes.append(helper.make_node("Cast", [scale], [y], to=TensorProto.FLOAT, name=self.name(scale)))
        return y

    def q(self, out_nodes, x, scale, zp, y, base="q") -> None:
        inputs = [x, self.f32(out_nodes, scale)] + ([zp] if zp else [])
        out_nodes.append(helper.make_node("QuantizeLinear", inputs, [y], name=self.name(base)))

    def dq(self, out_nodes, x, scale, zp, axis=None, base="dq") -> str:
        y = self.name(base)
        inputs = [x, self.f32(out_nodes, scale)] + ([zp] if zp else [])
        kw = {"axis": axis} if axis is not None else {}
        out_nodes.append(helper.make_node("DequantizeLinear", inputs, [y], name=self.name(base), **kw))
        return y

    def per_axis(self, scale: str, axis: int) -> int | None:
        s = self.array(scale)
        return axis if s is not None and s.size > 1 else None

    def bias_scale(self, out_nodes, a_scale: str, b_scale: str, base: str) -> str:
        """s_a * s_b, the scale of an int32 bias (a 1-D vector when b is per channel)."""
        sa, sb = self.array(a_scale), self.array(b_scale)
        if sa is not None and sb is not None:
            return self.const(base + "_bias_scale", (sa.astype(np.float32) * sb.astype(np.float32)).reshape(-1))
        y = self.name(base + "_bias_scale")
        out_nodes.append(helper.make_node("Mul", [self.f32(out_nodes, a_scale), self.f32(out_nodes, b_scale)], [y],
                                          name=self.name(base)))
        return y


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _qlinear_conv(rw: Rewriter, n: onnx.NodeProto, out: list) -> None:
    x, xs, xz, w, ws, wz, ys, yz = n.input[:8]
    xf = rw.dq(out, x, xs, xz, base=n.name + "_x")
    wf = rw.dq(out, w, ws, wz, axis=rw.per_axis(ws, 0), base=n.name + "_w")
    inputs = [xf, wf]
    if len(n.input) > 8 and n.input[8]:
        bs = rw.bias_scale(out, xs, ws, n.name)
        inputs.append(rw.dq(out, n.input[8], bs, "", axis=0 if rw.per_axis(ws, 0) is not None else None,
                            base=n.name + "_b"))
    yf = rw.name(n.name + "_y")
    out.append(helper.make_node("Conv", inputs, [yf], name=rw.name(n.name), **attrs(n)))
    rw.q(out, yf, ys, yz, n.output[0], n.name + "_q")


def _qlinear_binary(op: str):
    def rewrite(rw: Rewriter, n: onnx.NodeProto, out: list) -> None:
        a, as_, az, b, bs, bz, ys, yz = n.input[:8]
        b_axis = rw.per_axis(bs, 1) if op == "MatMul" else None       # MatMul weights: per output column
        af = rw.dq(out, a, as_, az, base=n.name + "_a")
        bf = rw.dq(out, b, bs, bz, axis=b_axis, base=n.name + "_b")
        yf = rw.name(n.name + "_y")
        out.append(helper.make_node(op, [af, bf], [yf], name=rw.name(n.name)))
        rw.q(out, yf, ys, yz, n.output[0], n.name + "_q")
    return rewrite


def _qlinear_unary(op: str, drop: tuple[str, ...] = ()):
    """ORT's one-input QLinear ops (x, x_scale, x_zero, y_scale, y_zero): Q(op(DQ(x))), the op's
    attributes kept but ORT's own (``drop``).  A pool with channels_last=1 is left unconverted, so
    the unsupported-op check reports it."""
    def rewrite(rw: Rewriter, n: onnx.NodeProto, out: list) -> None:
        kw = {k: v for k, v in attrs(n).items() if k not in drop}
        if kw.pop("channels_last", 0):
            out.append(n)
            return
        x, xs, xz, ys, yz = n.input[:5]
        xf = rw.dq(out, x, xs, xz, base=n.name + "_x")
        yf = rw.name(n.name + "_y")
        out.append(helper.make_node(op, [xf], [yf], name=rw.name(n.name), **kw))
        rw.q(out, yf, ys, yz, n.output[0], n.name + "_q")
    return rewrite


def _qlinear_concat(rw: Rewriter, n: onnx.NodeProto, out: list) -> None:
    """com.microsoft QLinearConcat(Y_scale, Y_zero_point, (X, X_scale, X_zero_point)...)."""
    ys, yz = n.input[:2]
    parts = [rw.dq(out, *n.input[i:i + 3], base=n.name + "_x") for i in range(2, len(n.input), 3)]
    yf = rw.name(n.name + "_y")
    out.append(helper.make_node("Concat", parts, [yf], name=rw.name(n.name), axis=attrs(n)["axis"]))
    rw.q(out, yf, ys, yz, n.output[0], n.name + "_q")


def _qgemm(rw: Rewriter, n: onnx.NodeProto, out: list) -> None:
    a, as_, az, b, bs, bz = n.input[:6]
    c = n.input[6] if len(n.input) > 6 else ""
    kw = attrs(n)
    trans_b = kw.get("transB", 0)
    b_axis = rw.per_axis(bs, 0 if trans_b else 1)
    af = rw.dq(out, a, as_, az, base=n.name + "_a")
    bf = rw.dq(out, b, bs, bz, axis=b_axis, base=n.name + "_b")
    inputs = [af, bf]
    if c:
        scale = rw.bias_scale(out, as_, bs, n.name)
        inputs.append(rw.dq(out, c, scale, "", axis=0 if b_axis is not None else None, base=n.name + "_c"))
    gemm_attrs = {k: v for k, v in kw.items() if k in ("alpha", "transA", "transB")}
    quantized_out = len(n.input) > 7 and n.input[7]
    yf = rw.name(n.name + "_y") if quantized_out else n.output[0]
    out.append(helper.make_node("Gemm", inputs, [yf], name=rw.name(n.name), **gemm_attrs))
    if quantized_out:
        yz = n.input[8] if len(n.input) > 8 else ""
        rw.q(out, yf, n.input[7], yz, n.output[0], n.name + "_q")


def _conv_integer(rw: Rewriter, n: onnx.NodeProto, out: list) -> None:
    x, w = n.input[0], n.input[1]
    xz = n.input[2] if len(n.input) > 2 else ""
    wz = n.input[3] if len(n.input) > 3 else ""

    def shifted(v: str, zp: str, zp_shape: tuple) -> str:
        v32 = rw.name(n.name + "_i32")
        out.append(helper.make_node("Cast", [v], [v32], to=TensorProto.INT32, name=rw.name(n.name)))
        if not zp:
            return v32
        z32 = rw.name(n.name + "_z32")
        out.append(helper.make_node("Cast", [zp], [z32], to=TensorProto.INT32, name=rw.name(n.name)))
        if zp_shape:
            zr = rw.name(n.name + "_zr")
            out.append(helper.make_node("Reshape", [z32, rw.const(n.name + "_zshape", np.array(zp_shape, np.int64))],
                                        [zr], name=rw.name(n.name)))
            z32 = zr
        d = rw.name(n.name + "_sub")
        out.append(helper.make_node("Sub", [v32, z32], [d], name=rw.name(n.name)))
        return d

    wz_arr = rw.array(wz) if wz else None
    w_zp_shape = (-1, 1, 1, 1) if wz_arr is not None and wz_arr.size > 1 else ()
    out.append(helper.make_node("Conv", [shifted(x, xz, ()), shifted(w, wz, w_zp_shape)], [n.output[0]],
                                name=rw.name(n.name), **attrs(n)))


CONVERTERS = {
    "QLinearConv": _qlinear_conv,
    "QLinearMatMul": _qlinear_binary("MatMul"),
    "QLinearAdd": _qlinear_binary("Add"),
    "QLinearMul": _qlinear_binary("Mul"),
    "QGemm": _qgemm,
    "QLinearConcat": _qlinear_concat,
    "QLinearGlobalAveragePool": _qlinear_unary("GlobalAveragePool"),
    "QLinearAveragePool": _qlinear_unary("AveragePool"),
    "QLinearSigmoid": _qlinear_unary("Sigmoid"),
    "QLinearLeakyRelu": _qlinear_unary("LeakyRelu"),
    "QLinearSoftmax": _qlinear_unary("Softmax", drop=("opset",)),
    "ConvInteger": _conv_integer,
}


def has_qoperators(model: onnx.ModelProto) -> bool:
    return any(n.op_type in CONVERTERS for n in model.graph.node)


def to_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every QOperator node replaced by its QDQ equivalent."""
    if not has_qoperators(model):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rw = Rewriter(m)
    nodes: list[onnx.NodeProto] = []
    for n in m.graph.node:
        convert = CONVERTERS.get(n.op_type)
        if convert is None:
            nodes.append(n)
        else:
            convert(rw, n, nodes)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(rw.new_inits)
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < MIN_OPSET:
            imp.version = MIN_OPSET
    return m
