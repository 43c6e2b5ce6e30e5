"""ONNX canonicalization before quantization: one spelling per op, no shape arithmetic.

Exporters spell the same network many ways.  Before the quantizer plans its
Q/DQ pairs, the graph is rewritten at the compiled input shapes so that

* shape arithmetic disappears: ``Shape`` (and ``Size``) of a statically shaped
  tensor, with or without opset 15's ``start``/``end`` (torch's dynamo exporter
  reads ``x.shape[0]`` as ``Shape(x, start=0, end=1)``), and every node whose
  inputs are all constant, are evaluated (``onnx.reference``) into initializers,
  repeatedly until nothing more folds, so Reshape/Slice/Gather/Expand see constants;
* ``x * 0`` (the torch idiom that broadcasts a class token to the batch) becomes
  the zero tensor it is, and folds away with the Add that follows;
* ``Gather`` of one constant, non-negative index (the q/k/v split, the class
  token) becomes ``Slice`` + ``Squeeze``, which import as views with no index
  arithmetic;
* ``Split`` at constant sizes (TorchScript's ``qkv.unbind(0)``) becomes one
  ``Slice`` per output, the same views;
* GELU, exported as ``x * 0.5 * (1 + erf(x / sqrt 2))`` or as its tanh
  approximation ``x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``, becomes
  one ``Gelu`` node (domain com.microsoft, which ORT runs and TVM imports as
  ``relax.nn.gelu``), and so does ORT's ``FastGelu`` without a bias; ONNX ``Gelu``
  (opset 20, either approximation) is imported as is;
* LayerNorm decomposed as ReduceMean - Sub - Pow - ReduceMean - Add - Sqrt - Div
  (- Mul gamma - Add beta) over the last axis becomes ``LayerNormalization``.

Each rewrite preserves the FP32 function (tested against ORT; the tanh GELU to
within 5e-4).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.defined_semantics import integer_range
from runtime import onnx_reference
from runtime.golden import saturating_cast

MS_DOMAIN = "com.microsoft"


def canonicalize(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the rewrites above.  ``shapes`` fixes the inputs' shapes first, so
    that the shape arithmetic folds; without them only what does not depend on a symbolic
    dimension folds, and constant-only subgraphs always do (TorchScript writes a ReLU6's bounds as
    ``Constant`` nodes: left unfolded, the quantizer saw no constant bounds, quantized each
    convolution's output before its Clip as well as after it, and a dynamic-batch MobileNetV2 lost
    0.008 of cosine to FP32 against its static-batch export)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if shapes:
        _fix_input_shapes(m, shapes)
    for _ in range(64):                     # folding exposes x * 0 and new static shapes, which fold further
        folded = _fold_constants(m)
        if not _zero_products(m) and not folded:
            break
    _fuse_gelu(m)
    _fuse_layernorm(m)
    _gather_to_slice(m)
    _split_to_slice(m)
    _drop_dead(m)
    return m


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every node computed from constants alone (and Shape of a static
    shape) evaluated into an initializer, and nothing else rewritten: for a model quantized
    elsewhere, whose quantizer left such subgraphs (NNCF's Swin computes its shifted-window mask
    with ScatterND, Equal and Where at run time); quantize and dequantize nodes stay."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for _ in range(64):
        if not _fold_constants(m):
            break
    _drop_dead(m)
    return m


SYMBOL_VALUES = (2, 3, 5)     # each symbolic dimension bound to these in turn (distinct primes, none 1)


def fold_symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` (inputs with symbolic dimensions) whose shape arithmetic is constant
    wherever its value does not depend on the symbols.

    The shape arithmetic is every tensor computed from constants and ``Shape`` / ``Size`` alone:
    a function of the input shapes, never of the input values.  Its frontier (those tensors that
    the rest of the graph reads) is evaluated by ONNX Runtime with each symbol bound to 2, 3 and 5
    in turn.  A value equal at all three bindings is taken as a constant (BERT's token-type rows,
    gathered by positions computed from ``Shape``; the key layout of torch's attention).  A
    ``Reshape`` whose result differs in one axis only (``x.view(batch, -1)``) gets that result as
    its target with -1 on that axis: the entry ONNX infers from the element count.  A value that varies only by repeating one slice
    along the symbolic axes (a buffer expanded to the batch, then gathered) becomes that slice when
    every reader broadcasts it against an operand that has those axes: the readers' results are
    unchanged.  The rest is left to TVM's importer, which takes shape expressions but not a
    tensor-valued shape it cannot evaluate."""
    g = model.graph
    consts = {t.name for t in g.initializer}
    symbolic = [i for i in g.input if i.name not in consts and any(
        not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)]
    if not symbolic:
        return model
    model = _unify_symbols(model, symbolic)
    g = model.graph
    derived = set(consts)
    for n in g.node:
        if n.op_type in ("Shape", "Size") or (n.op_type not in ("RandomNormal", "RandomUniform", "Multinomial",
                                                                "RandomNormalLike", "RandomUniformLike")
                                              and all(i in derived for i in n.input if i)):
            derived.update(o for o in n.output if o)
    readers: dict[str, list] = {}
    for n in g.node:
        if not all(o in derived for o in n.output if o):
            for k, i in enumerate(n.input):
                readers.setdefault(i, []).append((n, k))
    frontier = [t for t in readers if t in derived and t not in consts and t]
    frontier += [o.name for o in g.output if o.name in derived and o.name not in consts]
    if not frontier:
        return model
    # the other operands of a broadcasting reader: whether they carry the axes a slice would drop
    others = sorted({i for t in frontier for n, _ in readers.get(t, []) if n.op_type in BROADCASTING
                     for i in n.input if i and i != t and i not in consts}
                    | {n.output[0] for t in frontier for n, k in readers.get(t, []) if n.op_type == "Reshape" and k == 1})
    values = _shape_values(model, frontier, others)
    if values is None:
        return model
    shapes = dict(zip(others, zip(*(v[len(frontier):] for v in values), strict=True), strict=True))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rename = {}
    for t, vs in zip(frontier, zip(*(v[:len(frontier)] for v in values), strict=True), strict=True):
        vs = [np.asarray(v) for v in vs]
        if (c := _broadcast_slice(vs)) is not None and all(
                n.op_type in BROADCASTING and _carries(c.shape, vs, [shapes[i] for i in n.input if i in shapes])
                for n, _ in readers.get(t, [])):
            vs = [c]
        first = np.asarray(vs[0])
        same = all(np.asarray(v).shape == first.shape and np.array_equal(v, first) for v in vs)
        reshapes = [n for n, k in readers.get(t, []) if n.op_type == "Reshape" and k == 1]
        if not same and reshapes and len(reshapes) == len(readers[t]):
            # the target as the reshapes resolved it (-1 and 0 entries filled in), -1 where it varies
            results = {tuple(tuple(int(d) for d in shapes[n.output[0]][k]) for k in range(len(vs))) for n in reshapes}
            out = results.pop() if len(results) == 1 else ()
            if out and len({len(r) for r in out}) == 1:
                varies = [a for a in range(len(out[0])) if len({r[a] for r in out}) > 1]
                if len(varies) == 1:
                    first = np.array([-1 if a == varies[0] else d for a, d in enumerate(out[0])], np.int64)
                    same = True
        if same:
            rename[t] = f"{t}__folded"
            m.graph.initializer.append(numpy_helper.from_array(first, rename[t]))
    for n in m.graph.node:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    for o in m.graph.output:
        if o.name in rename:            # a constant output keeps its name: an Identity of the constant
            m.graph.node.append(helper.make_node("Identity", [rename[o.name]], [o.name]))
    _drop_dead(m)
    return m


def _symbols(inputs) -> list[str]:
    return list(dict.fromkeys(d.dim_param for i in inputs for d in i.type.tensor_type.shape.dim
                              if d.HasField("dim_param")))


def _feeds(model: onnx.ModelProto, bind: dict[str, int], default: int) -> dict[str, np.ndarray]:
    """Zero inputs with the symbolic dimensions bound (an unnamed one to ``default``)."""
    consts = {t.name for t in model.graph.initializer}
    return {i.name: np.zeros([d.dim_value if d.HasField("dim_value") else bind.get(d.dim_param, default)
                              for d in i.type.tensor_type.shape.dim],
                             helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in model.graph.input if i.name not in consts}


def _unify_symbols(model: onnx.ModelProto, symbolic) -> onnx.ModelProto:
    """One symbol for two input dimensions the model couples (torch's dynamo names BERT's
    ``input_ids`` batch and ``attention_mask`` batch apart, then gathers mask rows by the ids' batch
    index): ONNX Runtime runs the model with both at 2 but refuses it with them at 2 and 3 or at 3
    and 2.  The compiled model then takes them equal, the one case every such model is built for;
    TVM would otherwise see two unrelated symbols and lose every shape they meet in."""
    import onnxruntime as ort

    names = _symbols(symbolic)
    if len(names) < 2 or len(names) > 4:
        return model
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        sess.run(None, _feeds(model, {}, 2))
    except Exception:                       # noqa: BLE001 - no verdict without a run at equal values
        return model
    same = {}
    for k, a in enumerate(names):
        for b in names[k + 1:]:
            if b in same:
                continue
            for x, y in ((2, 3), (3, 2)):
                try:
                    sess.run(None, _feeds(model, {a: x, b: y}, 2))
                except Exception:           # noqa: BLE001 - ORT's shape errors have no one type
                    same[b] = same.get(a, a)
                    break
    if not same:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in (*m.graph.input, *m.graph.output, *m.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in same:
                d.dim_param = same[d.dim_param]
    return m


# elementwise ops that broadcast their operands (numpy rules)
BROADCASTING = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "And", "Or", "Xor", "Equal", "Greater",
                "Less", "GreaterOrEqual", "LessOrEqual")


def _broadcast_slice(vs: list[np.ndarray]) -> np.ndarray | None:
    """The one slice (size 1 on the axes whose length varies) that every value in ``vs`` repeats,
    or None."""
    if len({v.ndim for v in vs}) != 1:
        return None
    axes = [a for a in range(vs[0].ndim) if len({v.shape[a] for v in vs}) > 1]
    if not axes:
        return None
    slices = []
    for v in vs:
        c = v[tuple(slice(0, 1) if a in axes else slice(None) for a in range(v.ndim))]
        if not np.array_equal(np.broadcast_to(c, v.shape), v):
            return None
        slices.append(c)
    return slices[0] if all(np.array_equal(c, slices[0]) for c in slices) else None


def _carries(small: tuple, full: list[np.ndarray], other_shapes: list[list]) -> bool:
    """Whether, at every binding, some other operand has the full length wherever ``small`` has 1
    in place of a longer axis (aligned from the right): the broadcast result keeps its shape."""
    for k, v in enumerate(full):
        for a in range(v.ndim):
            if small[a] == v.shape[a]:
                continue
            back = v.ndim - a
            if not any(len(s[k]) >= back and int(s[k][len(s[k]) - back]) == v.shape[a] for s in other_shapes):
                return False
    return True


def _shape_values(model: onnx.ModelProto, frontier: list[str], others: list[str]) -> list[list] | None:
    """``frontier``'s values, then the shapes of ``others``, with the symbolic input dimensions
    bound to each of ``SYMBOL_VALUES`` (zero inputs: shape arithmetic does not read values); None
    where ONNX Runtime cannot run it."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for i, t in enumerate(others):
        probe.graph.node.append(helper.make_node("Shape", [t], [f"__lowbit_shape{i}"]))
    outputs = [*frontier, *(f"__lowbit_shape{i}" for i in range(len(others)))]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in outputs)
    so = ort.SessionOptions()
    so.log_severity_level = 4            # a graph ORT cannot run is left to TVM: no error log
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        runs = [sess.run(outputs, _feeds(model, {}, value)) for value in SYMBOL_VALUES]
    except Exception:                       # noqa: BLE001 - folding is an optimisation; TVM's importer judges
        return None
    return runs


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


def _fold_constants(m: onnx.ModelProto) -> bool:
    """Evaluate Constant, Shape/Size of statically shaped tensors and all-constant nodes into
    initializers.  Returns whether anything folded."""
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
            value = onnx_reference.evaluator(n).run(None, {})
        elif n.op_type == "Shape" and n.input[0] in shape_of:
            attrs = {a.name: a.i for a in n.attribute}
            dims = shape_of[n.input[0]]     # slicing clamps and wraps as Shape's start/end do
            value = [np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], np.int64)]
        elif n.op_type == "Size" and n.input[0] in shape_of:
            value = [np.array(int(np.prod(shape_of[n.input[0]], dtype=np.int64)), np.int64)]
        elif n.op_type == "Cast" and n.input[0] in consts and consts[n.input[0]].dtype.kind == "f" and \
                (bounds := integer_range(onnx.helper.tensor_dtype_to_np_dtype(
                    next(a.i for a in n.attribute if a.name == "to")).name)) is not None:
            # float -> integer saturates, as everywhere in lowbit (passes/defined_semantics.py): the reference
            # evaluator's cast is numpy's, undefined out of range
            to = onnx.helper.tensor_dtype_to_np_dtype(next(a.i for a in n.attribute if a.name == "to"))
            value = [saturating_cast(consts[n.input[0]], *bounds).astype(to)]
        elif n.domain in ("", "ai.onnx") and n.input and all(i == "" or i in consts for i in n.input) \
                and n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            node_model = helper.make_model(helper.make_graph(
                [n], "fold", [helper.make_tensor_value_info(i, numpy_helper.from_array(consts[i]).data_type, None)
                              for i in n.input if i], [helper.make_empty_tensor_value_info(o) for o in n.output]),
                opset_imports=[helper.make_opsetid("", opset)])
            try:
                value = onnx_reference.evaluator(node_model).run(None, {i: consts[i] for i in n.input if i})
            except Exception:   # noqa: BLE001  an op onnx's reference cannot evaluate: folding is an
                value = None    # optimisation, the node runs in the compiled model instead
        if value is None:
            keep.append(n)
            continue
        for name, v in zip(n.output, value, strict=False):
            consts[name] = np.asarray(v)
            g.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    folded = len(keep) < len(g.node)
    del g.node[:]
    g.node.extend(keep)
    return folded


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


class _Graph:
    """Lookups a pattern matcher needs: constants, producers, single consumers."""

    def __init__(self, m: onnx.ModelProto):
        self.consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        self.producer = {o: n for n in m.graph.node for o in n.output}
        self.users: dict[str, list] = {}
        for n in m.graph.node:
            for i in n.input:
                self.users.setdefault(i, []).append(n)

    def scalar(self, name, value=None) -> bool:
        c = self.consts.get(name)
        return c is not None and c.size == 1 and (value is None or np.isclose(float(c.reshape(-1)[0]), value,
                                                                              rtol=1e-4))

    @staticmethod
    def other(n, name):
        return n.input[1] if n.input[0] == name else n.input[0]

    def only_user(self, name, op):
        u = self.users.get(name, [])
        return u[0] if len(u) == 1 and u[0].op_type == op else None

    def made_by(self, name, op):
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op else None

    def gelu_tail(self, add, x) -> list | None:
        """From ``1 + f`` to the end of ``x * 0.5 * (1 + f)``, in any association."""
        mul = self.only_user(add.output[0], "Mul")
        if mul is None:
            return None
        partner = self.other(mul, add.output[0])
        if partner == x:
            half = self.only_user(mul.output[0], "Mul")
            return [mul, half] if half is not None and self.scalar(self.other(half, mul.output[0]), 0.5) else None
        if self.scalar(partner, 0.5):
            final = self.only_user(mul.output[0], "Mul")
            return [mul, final] if final is not None and self.other(final, mul.output[0]) == x else None
        pre = self.made_by(partner, "Mul")
        if pre is not None and x in pre.input and self.scalar(self.other(pre, x), 0.5):
            return [pre, mul]
        return None


def _fuse_gelu(m: onnx.ModelProto) -> None:
    """x * 0.5 * (1 + erf(x / sqrt 2)) and x * 0.5 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in
    any association -> com.microsoft Gelu.  The tanh form is within 5e-4 of GELU, far inside the
    integer GELU's own error, and TVM decomposes ORT's FastGelu into float ops."""
    g, G = m.graph, _Graph(m)
    replace: dict[int, onnx.NodeProto] = {}
    dead: set[int] = set()
    for f in [n for n in g.node if n.op_type in ("Erf", "Tanh")]:
        head = _erf_head(G, f) if f.op_type == "Erf" else _tanh_head(G, f)
        if head is None:
            continue
        x, chain = head
        add = G.only_user(f.output[0], "Add")
        if add is None or not G.scalar(G.other(add, f.output[0]), 1.0):
            continue
        tail = G.gelu_tail(add, x)
        if tail is None:
            continue
        chain += [f, add] + tail
        out = chain[-1].output[0]
        replace[id(chain[-1])] = helper.make_node("Gelu", [x], [out], name=(chain[-1].name or out) + "_gelu",
                                                  domain=MS_DOMAIN)
        dead.update(id(c) for c in chain[:-1])
    for n in g.node:
        if n.op_type == "FastGelu" and n.domain == MS_DOMAIN and len([i for i in n.input if i]) == 1:
            replace[id(n)] = helper.make_node("Gelu", [n.input[0]], [n.output[0]], name=n.name, domain=MS_DOMAIN)
    _replace(m, replace, dead)


def _erf_head(G: _Graph, erf) -> tuple[str, list] | None:
    """erf(x / sqrt 2) or erf(x * (1 / sqrt 2)): (x, nodes)."""
    scaled = G.producer.get(erf.input[0])
    if scaled is not None and scaled.op_type == "Div" and G.scalar(scaled.input[1], np.sqrt(2)):
        return scaled.input[0], [scaled]
    if scaled is not None and scaled.op_type == "Mul" and any(G.scalar(i, 1 / np.sqrt(2)) for i in scaled.input):
        return next(i for i in scaled.input if i not in G.consts), [scaled]
    return None


def _tanh_head(G: _Graph, tanh) -> tuple[str, list] | None:
    """tanh(sqrt(2/pi) * (x + 0.044715 * x^3)), x^3 as Pow(x, 3) or x*x*x: (x, nodes)."""
    scaled = G.made_by(tanh.input[0], "Mul")
    if scaled is None or not any(G.scalar(i, np.sqrt(2 / np.pi)) for i in scaled.input):
        return None
    inner = G.made_by(next(i for i in scaled.input if i not in G.consts), "Add")
    if inner is None:
        return None
    for x in inner.input:
        cubic = G.made_by(G.other(inner, x), "Mul")
        if cubic is None or not any(G.scalar(i, 0.044715) for i in cubic.input):
            continue
        cube = G.producer.get(next(i for i in cubic.input if i not in G.consts))
        if cube is not None and cube.op_type == "Pow" and cube.input[0] == x and G.scalar(cube.input[1], 3.0):
            return x, [cube, cubic, inner, scaled]
    return None


def _fuse_layernorm(m: onnx.ModelProto) -> None:
    """ReduceMean -> Sub -> Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Div [-> Mul gamma -> Add beta]
    over the last axis -> LayerNormalization."""
    g, G = m.graph, _Graph(m)
    replace: dict[int, onnx.NodeProto] = {}
    dead: set[int] = set()
    last_dims: dict[str, int] | None = None
    for sqrt in [n for n in g.node if n.op_type == "Sqrt"]:
        add_eps = G.made_by(sqrt.input[0], "Add")
        var = G.made_by(add_eps.input[0], "ReduceMean") if add_eps is not None else None
        if var is None or not G.scalar(add_eps.input[1]):
            continue
        sq = G.made_by(var.input[0], "Pow")
        if sq is None or not G.scalar(sq.input[1], 2.0):
            continue
        sub = G.made_by(sq.input[0], "Sub")
        mean = G.made_by(sub.input[1], "ReduceMean") if sub is not None else None
        if mean is None or mean.input[0] != sub.input[0] or not all(_last_axis(G, r) for r in (mean, var)):
            continue
        div = G.only_user(sqrt.output[0], "Div")
        if div is None or div.input[0] != sub.output[0]:
            continue
        chain, out = [mean, sub, sq, var, add_eps, sqrt, div], div.output[0]
        last_dims = _last_dims(m) if last_dims is None else last_dims
        channels = last_dims.get(sub.input[0])
        gamma = beta = None
        if (mul := G.only_user(out, "Mul")) is not None and G.other(mul, out) in G.consts:
            gamma, out = G.other(mul, out), mul.output[0]
            chain.append(mul)
            if (add := G.only_user(out, "Add")) is not None and G.other(add, out) in G.consts:
                beta, out = G.other(add, out), add.output[0]
                chain.append(add)
        if channels is None and (gamma is None or beta is None):
            continue
        c = channels or G.consts[gamma].size
        for name, value in (("gamma", 1.0), ("beta", 0.0)):
            if (gamma if name == "gamma" else beta) is None:
                const = f"{out}_{name}"
                g.initializer.append(numpy_helper.from_array(np.full(c, value, np.float32), const))
                gamma, beta = (const, beta) if name == "gamma" else (gamma, const)
        eps = float(G.consts[add_eps.input[1]].reshape(-1)[0])
        replace[id(chain[-1])] = helper.make_node("LayerNormalization", [sub.input[0], gamma, beta], [out],
                                                  name=(chain[-1].name or out) + "_layernorm", axis=-1, epsilon=eps)
        dead.update(id(n) for n in chain[:-1])
    _replace(m, replace, dead)


def _last_axis(G: _Graph, reduce) -> bool:
    axes = next((list(a.ints) for a in reduce.attribute if a.name == "axes"), None)
    if axes is None and len(reduce.input) > 1:
        axes = G.consts.get(reduce.input[1], np.array([])).tolist()
    return axes == [-1]


def _last_dims(m: onnx.ModelProto) -> dict[str, int]:
    """Tensor -> its last dimension, where shape inference knows it."""
    inferred = onnx.shape_inference.infer_shapes(m)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            out[vi.name] = dims[-1].dim_value
    return out


def _replace(m: onnx.ModelProto, replace: dict, dead: set) -> None:
    if not replace:
        return
    nodes = [replace.get(id(n), n) for n in m.graph.node if id(n) not in dead]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    if any(n.domain == MS_DOMAIN for n in nodes) and not any(o.domain == MS_DOMAIN for o in m.opset_import):
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


def _split_to_slice(m: onnx.ModelProto) -> None:
    """Split at known sizes (the ``split`` input or attribute, or equal parts of a dimension
    shape inference knows) -> one Slice per used output."""
    g = m.graph
    if not any(n.op_type == "Split" for n in g.node):
        return
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    dims = {}
    for vi in list(onnx.shape_inference.infer_shapes(m).graph.value_info) + list(g.input):
        d = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape"):
            dims[vi.name] = [x.dim_value if x.HasField("dim_value") else None for x in d]
    nodes = []
    for n in g.node:
        if n.op_type != "Split" or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        axis, sizes = attrs.get("axis", 0), attrs.get("split")
        given = len(n.input) > 1 and bool(n.input[1])
        if given:
            sizes = consts[n.input[1]].tolist() if n.input[1] in consts else None
        shape = dims.get(n.input[0])
        if sizes is None and not given and shape is not None and -len(shape) <= axis < len(shape) and shape[axis]:
            parts, total = len(n.output), shape[axis]
            step = -(-total // parts)           # opset 18: equal parts, the last one smaller
            sizes = [min(step, total - k * step) for k in range(parts)]
        if sizes is None or len(sizes) != len(n.output) or min(sizes) < 0:
            nodes.append(n)
            continue
        start = 0
        for k, (out, size) in enumerate(zip(n.output, sizes, strict=True)):
            if out:
                base = f"{out}_split{k}"
                for name, value in (("_starts", start), ("_ends", start + size), ("_axes", axis)):
                    g.initializer.append(numpy_helper.from_array(np.array([value], np.int64), base + name))
                nodes.append(helper.make_node("Slice", [n.input[0], base + "_starts", base + "_ends", base + "_axes"],
                                              [out], name=f"{n.name or n.output[0]}_slice{k}"))
            start += size
    del g.node[:]
    g.node.extend(nodes)
