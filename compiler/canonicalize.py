"""ONNX canonicalization before quantization: one spelling per op, no shape arithmetic.

Exporters spell the same network many ways.  Before the quantizer plans its
Q/DQ pairs, the graph is rewritten at the compiled input shapes so that

* shape arithmetic disappears: ``Shape`` of a statically shaped tensor, and every
  node whose inputs are all constant, are evaluated (``onnx.reference``) into
  initializers, so Reshape/Slice/Gather see constants;
* ``x * 0`` (the torch idiom that broadcasts a class token to the batch) becomes
  the zero tensor it is, and folds away with the Add that follows;
* ``Gather`` of one constant, non-negative index (the q/k/v split, the class
  token) becomes ``Slice`` + ``Squeeze``, which import as views with no index
  arithmetic;
* GELU, exported as ``x * 0.5 * (1 + erf(x / sqrt 2))`` or as ONNX ``Gelu``
  (opset 20), becomes one ``Gelu`` node (domain com.microsoft, which ORT runs and
  TVM imports as ``relax.nn.gelu``); the tanh form ``Gelu(approximate=tanh)``
  becomes ``FastGelu``.

Each rewrite preserves the FP32 function (tested against ORT).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


def canonicalize(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the rewrites above; shape arithmetic is folded only when
    ``shapes`` fixes every input's shape."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if shapes:
        _fix_input_shapes(m, shapes)
        for _ in range(3):                  # folding exposes x * 0, which exposes more folding
            _fold_constants(m)
            if not _zero_products(m):
                break
    _fuse_gelu(m)
    _gather_to_slice(m)
    _drop_dead(m)
    return m


def needs_static_shapes(model: onnx.ModelProto) -> bool:
    """Graphs that compute shapes at run time (``Shape`` ops) are canonicalized at fixed shapes."""
    return any(n.op_type == "Shape" for n in model.graph.node)


def _fix_input_shapes(m: onnx.ModelProto, shapes: dict) -> None:
    for i in m.graph.input:
        if i.name in shapes:
            dims = i.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[i.name], strict=True):
                d.Clear()
                d.dim_value = int(v)
    del m.graph.value_info[:]               # stale at the new shapes; inference recomputes them


def _opset(m: onnx.ModelProto) -> int:
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def _fold_constants(m: onnx.ModelProto) -> None:
    from onnx.reference import ReferenceEvaluator

    g = m.graph
    inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    shape_of = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shape_of[vi.name] = [d.dim_value for d in dims]
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    keep, opset = [], _opset(m)
    for n in g.node:
        value = None
        if n.op_type == "Constant":
            value = ReferenceEvaluator(n).run(None, {})
        elif n.op_type == "Shape" and n.input[0] in shape_of and not n.attribute:
            value = [np.array(shape_of[n.input[0]], np.int64)]
        elif n.domain in ("", "ai.onnx") and n.input and all(i == "" or i in consts for i in n.input) \
                and n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            node_model = helper.make_model(helper.make_graph(
                [n], "fold", [helper.make_tensor_value_info(i, numpy_helper.from_array(consts[i]).data_type, None)
                              for i in n.input if i], [helper.make_empty_tensor_value_info(o) for o in n.output]),
                opset_imports=[helper.make_opsetid("", opset)])
            value = ReferenceEvaluator(node_model).run(None, {i: consts[i] for i in n.input if i})
        if value is None:
            keep.append(n)
            continue
        for name, v in zip(n.output, value, strict=False):
            consts[name] = np.asarray(v)
            g.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    del g.node[:]
    g.node.extend(keep)


def _zero_products(m: onnx.ModelProto) -> bool:
    """Mul by an all-zero constant -> a zero initializer of the product's shape."""
    g = m.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {vi.name: vi.type.tensor_type for vi in inferred.graph.value_info}
    changed, keep = False, []
    for n in g.node:
        zero = n.op_type == "Mul" and any(i in consts and not np.any(consts[i]) for i in n.input)
        t = types.get(n.output[0])
        if zero and t is not None and all(d.HasField("dim_value") for d in t.shape.dim):
            shape = [d.dim_value for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            g.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype), n.output[0]))
            changed = True
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return changed


def _fuse_gelu(m: onnx.ModelProto) -> None:
    """x * 0.5 * (1 + erf(x / sqrt 2)) in any association, and ONNX Gelu -> com.microsoft Gelu/FastGelu."""
    g = m.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def scalar(name, value):
        return name in consts and consts[name].size == 1 and np.isclose(float(consts[name].reshape(-1)[0]), value,
                                                                       rtol=1e-4)

    def other(n, name):
        return n.input[1] if n.input[0] == name else n.input[0]

    def only_user(name, op):
        u = users.get(name, [])
        return u[0] if len(u) == 1 and u[0].op_type == op else None

    replace: dict[int, onnx.NodeProto] = {}
    dead: set[int] = set()
    for erf in [n for n in g.node if n.op_type == "Erf"]:
        scaled = producer.get(erf.input[0])
        if scaled is None or not ((scaled.op_type == "Div" and scalar(scaled.input[1], np.sqrt(2)))
                                  or (scaled.op_type == "Mul" and scalar(other(scaled, scaled.input[0]), 1 / np.sqrt(2)))):
            continue
        x = scaled.input[0] if scaled.op_type == "Div" else next(i for i in scaled.input if i not in consts)
        add = only_user(erf.output[0], "Add")
        if add is None or not scalar(other(add, erf.output[0]), 1.0):
            continue
        # (x * (1 + erf)) * 0.5  or  (x * 0.5) * (1 + erf)  or  x * ((1 + erf) * 0.5)
        chain = [scaled, erf, add]
        mul = only_user(add.output[0], "Mul")
        if mul is None:
            continue
        partner = other(mul, add.output[0])
        if partner == x:
            half = only_user(mul.output[0], "Mul")
            if half is None or not scalar(other(half, mul.output[0]), 0.5):
                continue
            chain += [mul, half]
        elif scalar(partner, 0.5):
            final = only_user(mul.output[0], "Mul")
            if final is None or other(final, mul.output[0]) != x:
                continue
            chain += [mul, final]
        elif partner in producer and producer[partner].op_type == "Mul" and \
                set(producer[partner].input) - {x} and scalar(other(producer[partner], x), 0.5):
            chain += [producer[partner], mul]
        else:
            continue
        out = chain[-1].output[0]
        replace[id(chain[-1])] = helper.make_node("Gelu", [x], [out], name=(chain[-1].name or out) + "_gelu",
                                                  domain=MS_DOMAIN)
        dead.update(id(c) for c in chain[:-1])
    for n in g.node:
        if n.op_type == "Gelu" and n.domain in ("", "ai.onnx"):
            tanh = any(a.name == "approximate" and a.s == b"tanh" for a in n.attribute)
            replace[id(n)] = helper.make_node("FastGelu" if tanh else "Gelu", [n.input[0]], [n.output[0]],
                                              name=n.name, domain=MS_DOMAIN)
    if not replace:
        return
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in dead]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _gather_to_slice(m: onnx.ModelProto) -> None:
    g = m.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    nodes = []
    for n in g.node:
        index = consts.get(n.input[1]) if n.op_type == "Gather" and len(n.input) > 1 else None
        if index is None or index.ndim != 0 or int(index) < 0 or n.input[0] in consts:
            nodes.append(n)
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        i, base = int(index), n.output[0]
        for name, value in ((base + "_starts", [i]), (base + "_ends", [i + 1]), (base + "_axes", [axis])):
            g.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
        nodes += [helper.make_node("Slice", [n.input[0], base + "_starts", base + "_ends", base + "_axes"],
                                   [base + "_slice"], name=(n.name or base) + "_slice"),
                  helper.make_node("Squeeze", [base + "_slice", base + "_axes"], [base],
                                   name=(n.name or base) + "_squeeze")]
    del g.node[:]
    g.node.extend(nodes)


def _drop_dead(m: onnx.ModelProto) -> None:
    g = m.graph
    live = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(i for i in n.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)
