"""Quantize / dequantize forms that TVM's importer cannot take, rewritten into ones it can.

ONNX (opset 21-25) quantizes into storage types TVM 0.27 has no tensors for, and with
parameter layouts the integer lowering does not apply:

* **4- and 2-bit integers** (``int4``, ``uint4``, ``int2``, ``uint2``) are carried in a byte
  (``int8`` / ``uint8``) with the same values.  ``QuantizeLinear`` to such a type saturates
  to its range, and since ``clip(clip(v, -128, 127), lo, hi) == clip(v, lo, hi)`` for any
  ``[lo, hi]`` inside the byte's range, quantizing to the byte and clipping is exact.
* **float8 / float4 codes** (``float8e4m3fn``, ``float8e5m2``, ``float4e2m1``) are carried as
  their bit patterns in a ``uint8``.  ``DequantizeLinear`` of a code is
  ``(decode(x) - decode(zero_point)) * scale``, and ``decode`` is a lookup in the type's
  table of 256 (16) values, built from the type's definition in ``ml_dtypes``.  Quantizing
  *to* a float code is refused: TVM's float8 casts on LLVM round wrongly (0.0 -> 2^-7).
* **blocked** parameters (``block_size``: one scale per block of a row) and **per-axis**
  parameters of an activation (other than one scale and zero point per channel of an NCHW
  feature map, which the integer lowering requantizes to and convolves depthwise) are expanded to a constant broadcast against ``x`` and applied as the spec's arithmetic,
  ``y = saturate(round(x / s) + zp)`` (``Round`` is half-to-even, as ``QuantizeLinear``)
  and ``x = (q - zp) * s``, so those nodes run in float (fake-quant) while the rest of the
  graph still lowers to integers.

Graph inputs and outputs in a narrow type keep it in the artifact's signature; ``Artifact.run``
converts them to and from their byte containers (runtime/types.py: ``to_container`` / ``from_container``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler.qoperator import Rewriter, attrs
from runtime.errors import UserError
from runtime.types import to_container

# narrow integer type -> (byte container, its range)
NARROW_INT = {TensorProto.INT4: (TensorProto.INT8, -8, 7), TensorProto.UINT4: (TensorProto.UINT8, 0, 15),
              TensorProto.INT2: (TensorProto.INT8, -2, 1), TensorProto.UINT2: (TensorProto.UINT8, 0, 3)}
FLOAT_CODES = (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2, TensorProto.FLOAT4E2M1)


def container(elem_type: int) -> int:
    """The ONNX type a tensor of ``elem_type`` is carried in."""
    if elem_type in NARROW_INT:
        return NARROW_INT[elem_type][0]
    return TensorProto.UINT8 if elem_type in FLOAT_CODES else elem_type


def decode_table(elem_type: int, dtype: np.dtype) -> np.ndarray:
    """Every code of a float8 / float4 type, as ``dtype`` values (index = bit pattern)."""
    codes = 16 if elem_type == TensorProto.FLOAT4E2M1 else 256
    return np.arange(codes, dtype=np.uint8).view(helper.tensor_dtype_to_np_dtype(elem_type)).astype(dtype)


def needs_rewrite(model: onnx.ModelProto) -> bool:
    g = model.graph
    types = [vi.type.tensor_type.elem_type for vi in (*g.input, *g.output, *g.value_info)]
    types += [t.data_type for t in g.initializer]
    if any(container(t) != t for t in types):
        return True
    inits = {t.name: t for t in g.initializer}
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and _expanded(n, inits) for n in g.node)


def rewrite(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """A copy of ``model`` in the forms above (``model`` itself when nothing needs them)."""
    if not needs_rewrite(model):
        return model
    # value_info gives the rank and sizes that per-axis and blocked parameters broadcast against
    m = onnx.shape_inference.infer_shapes(model)
    g = m.graph
    types = _elem_types(g)
    rw = Rewriter(m)
    for t in g.initializer:
        if container(t.data_type) != t.data_type:
            t.CopyFrom(numpy_helper.from_array(to_container(numpy_helper.to_array(t)), t.name))
    for vi in (*g.input, *g.output, *g.value_info):
        tt = vi.type.tensor_type
        tt.elem_type = container(tt.elem_type)
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        here = f"{where}: node {n.name or n.output[0]!r} ({n.op_type})"
        if n.op_type == "QuantizeLinear":
            _quantize(rw, n, types, nodes, here)
        elif n.op_type == "DequantizeLinear":
            _dequantize(rw, n, types, nodes, here)
        elif n.op_type == "CastLike" and types.get(n.input[1]) in NARROW_INT:
            # the type to cast to, before its input becomes a byte (Cast saturates to the narrow range)
            nodes.append(helper.make_node("Cast", [n.input[0]], list(n.output), name=n.name, to=types[n.input[1]]))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(rw.new_inits)
    return m


def _elem_types(g: onnx.GraphProto) -> dict[str, int]:
    """Element types of the tensors whose type decides a Q/DQ node's form (before the rewrite)."""
    out = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.input, *g.output, *g.value_info)}
    out.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:            # a QuantizeLinear output has its zero point's type or output_dtype
        if n.op_type == "QuantizeLinear":
            a = attrs(n)
            zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
            out[n.output[0]] = a.get("output_dtype") or (out.get(zp) if zp else TensorProto.UINT8)
    return out


def _expanded(n: onnx.NodeProto, inits: dict[str, onnx.TensorProto], rank: int | None = None) -> bool:
    """Blocked parameters, or per-axis ones on an activation: applied as explicit arithmetic --
    except one scale and zero point per channel of an NCHW feature map (NNCF quantizes a depthwise
    convolution's input so), which the integer lowering takes as it is."""
    if attrs(n).get("block_size", 0):
        return True
    scale = inits.get(n.input[1])
    per_axis = scale is not None and int(np.prod(scale.dims)) > 1
    if not per_axis or n.input[0] in inits:
        return False
    return not (rank == 4 and attrs(n).get("axis", 1) % 4 == 1)


def _params(rw: Rewriter, n: onnx.NodeProto, here: str) -> tuple[np.ndarray, np.ndarray | None]:
    scale = rw.array(n.input[1])
    zp = rw.array(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    if scale is None or (len(n.input) > 2 and n.input[2] and zp is None):
        raise UserError(f"{here}: blocked or per-axis quantization of an activation needs constant scales and "
                        "zero points (initializers); fold them into the model")
    return scale, zp


def _broadcast(n: onnx.NodeProto, p: np.ndarray, rank: int, dim: int | None, here: str) -> np.ndarray:
    """Per-axis (1-D) or blocked parameters as an array that broadcasts against ``x``."""
    a = attrs(n)
    axis = a.get("axis", 1) % rank
    block = a.get("block_size", 0)
    if not block:
        return p.reshape([-1 if i == axis else 1 for i in range(rank)])
    if dim is None:
        raise UserError(f"{here}: blocked quantization needs a static size along axis {axis}; "
                        "compile with --input-shape")
    return np.repeat(p, block, axis=axis).take(np.arange(dim), axis=axis)


def _x_shape(rw: Rewriter, name: str) -> list[int | None] | None:
    if (a := rw.array(name)) is not None:
        return list(a.shape)
    g = rw.model.graph
    for vi in (*g.input, *g.value_info):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return None


def _rank(rw: Rewriter, name: str) -> int | None:
    shape = _x_shape(rw, name)
    return None if shape is None else len(shape)


def _quantize(rw: Rewriter, n: onnx.NodeProto, types: dict[str, int], out: list, here: str) -> None:
    y_type = types.get(n.output[0], TensorProto.UINT8)
    if y_type in FLOAT_CODES:
        raise UserError(f"{here}: quantizing to {np.dtype(helper.tensor_dtype_to_np_dtype(y_type)).name} is not supported "
                        "(TVM's float8 casts round wrongly); quantize to int8/uint8/int4/uint4")
    box = container(y_type)
    if _expanded(n, rw.inits, _rank(rw, n.input[0])):
        scale, zp = _params(rw, n, here)
        shape = _x_shape(rw, n.input[0])
        if shape is None:
            raise UserError(f"{here}: the input's rank is unknown; compile with --input-shape")
        axis = attrs(n).get("axis", 1) % len(shape)
        s = rw.const(n.output[0] + "_scale", _broadcast(n, scale, len(shape), shape[axis], here))
        z = _broadcast(n, zp if zp is not None else np.zeros_like(scale, np.int8), len(shape), shape[axis], here)
        info = np.iinfo(helper.tensor_dtype_to_np_dtype(box))
        lo, hi = NARROW_INT.get(y_type, (box, info.min, info.max))[1:]
        steps = [("Div", [s]), ("Round", []),
                 ("Add", [rw.const(n.output[0] + "_zp", z.astype(np.float32))]),
                 ("Clip", [rw.const(n.output[0] + "_lo", np.array(lo, np.float32)),
                           rw.const(n.output[0] + "_hi", np.array(hi, np.float32))])]
        x = _chain(rw, steps, out, n.input[0], n.output[0])
        out.append(helper.make_node("Cast", [x], [n.output[0]], name=rw.name(n.output[0]), to=box))
        return
    a = attrs(n)
    if "output_dtype" in a:
        del n.attribute[:]
        n.attribute.extend(helper.make_attribute(k, container(v) if k == "output_dtype" else v) for k, v in a.items())
    if y_type not in NARROW_INT:
        out.append(n)
        return
    lo, hi = NARROW_INT[y_type][1:]
    y, wide = n.output[0], rw.name(n.output[0] + "_byte")
    np_box = helper.tensor_dtype_to_np_dtype(box)
    n.output[0] = wide
    out.append(n)
    out.append(helper.make_node("Clip", [wide, rw.const("lo", np.array(lo, np_box)), rw.const("hi", np.array(hi, np_box))],
                                [y], name=rw.name(y)))


def _dequantize(rw: Rewriter, n: onnx.NodeProto, types: dict[str, int], out: list, here: str) -> None:
    x_type = types.get(n.input[0])
    codes = x_type in FLOAT_CODES
    if not codes and not _expanded(n, rw.inits, _rank(rw, n.output[0])):
        out.append(n)
        return
    s_type = types.get(n.input[1], TensorProto.FLOAT)
    s_np = helper.tensor_dtype_to_np_dtype(s_type)
    has_zp = len(n.input) > 2 and bool(n.input[2])
    if codes:
        table = rw.const(n.output[0] + "_table", decode_table(x_type, s_np))

        def decode(name: str) -> str:
            return _chain(rw, [("Cast", [], {"to": TensorProto.INT32}), ("Gather", [], {}, table)], out, name, name)

        x = decode(n.input[0])
        if has_zp:
            x = _chain(rw, [("Sub", [decode(n.input[2])])], out, x, n.output[0])
        out.append(helper.make_node("Mul", [x, n.input[1]], [n.output[0]], name=rw.name(n.output[0])))
        return
    scale, zp = _params(rw, n, here)
    shape = _x_shape(rw, n.input[0])
    rank = len(shape) if shape is not None else 1
    dim = shape[attrs(n).get("axis", 1) % rank] if shape is not None else None
    steps = [("Cast", [], {"to": s_type})]
    if zp is not None:
        steps.append(("Sub", [rw.const(n.output[0] + "_zp", _broadcast(n, zp, rank, dim, here).astype(s_np))]))
    x = _chain(rw, steps, out, n.input[0], n.output[0])
    s = rw.const(n.output[0] + "_scale", _broadcast(n, scale, rank, dim, here).astype(s_np))
    out.append(helper.make_node("Mul", [x, s], [n.output[0]], name=rw.name(n.output[0])))


def _chain(rw: Rewriter, steps, out: list, x: str, base: str | None = None) -> str:
    """Append ``x -> op(x, *extra) -> ...``; a step is (op, extra inputs[, attributes[, first input]]),
    where a first input puts ``x`` second (Gather's indices)."""
    for op, extra, *rest in steps:
        kw = rest[0] if rest else {}
        ins = [rest[1], x] if len(rest) > 1 else [x, *extra]
        y = rw.name(f"{base or x}_{op.lower()}")
        out.append(helper.make_node(op, ins, [y], name=rw.name(op), **kw))
        x = y
    return x
