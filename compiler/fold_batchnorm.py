"""Fold inference-mode BatchNormalization into the Conv, Gemm or MatMul that feeds it.

HAWQ-V3 §3.3 (phase 2, frozen statistics), per output channel c:

    g[c] = gamma[c] / sqrt(var[c] + eps)
    W'   = W * g[c]                       (along W's output-channel axis)
    b'   = (b - mean) * g + beta          (b = 0 when the layer has no bias)

A linear layer's result may reach the norm through a bias Add and views that keep
its channels last (LeViT's ``bn(linear(x).flatten(0, 1))``: MatMul -> Add ->
Flatten -> BatchNormalization over a 2-D [tokens, C]); the weights fold the same
way, the bias joins the Add (one is inserted after a MatMul that has none), and
the views stay.

Folding happens before weight quantization, so each channel's scale is chosen
for the weights that actually run.  A BatchNormalization whose producer is not
such a layer with initializer weights, or whose chain has other consumers, is
left alone.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def resolve_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop Identity nodes (the torch exporter routes shared weights through them)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.output[0] not in outputs}

    def root(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    keep = [n for n in g.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = root(name)
    del g.node[:]
    g.node.extend(keep)
    return model


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with every foldable BatchNormalization folded."""
    m = resolve_identities(_copy(model))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 1

    dims = _static_dims(m)
    dropped, added = set(), []
    for bn in g.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) > 1 and any(bn.output[1:]):
            continue
        if not all(i in inits for i in bn.input[1:5]):
            continue
        chain = _linear_chain(bn, producer, uses, inits, dims)
        if chain is None:
            continue
        layer, bias_add, views = chain
        axis = output_axis(layer, len(inits[layer.input[1]].dims))
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        w = numpy_helper.to_array(inits[layer.input[1]]).astype(np.float64)
        shape = [1] * w.ndim
        shape[axis] = -1
        w_new = (w * scale.reshape(shape)).astype(np.float32)
        if bias_add is not None:
            b_in = next(i for i in bias_add.input if i in inits)
            b = numpy_helper.to_array(inits[b_in]).astype(np.float64).reshape(-1)
        else:
            b = numpy_helper.to_array(inits[layer.input[2]]).astype(np.float64).reshape(-1) \
                if len(layer.input) > 2 and layer.input[2] else np.zeros_like(scale)
        b_new = ((b - mean) * scale + beta).astype(np.float32)
        # fresh names: the originals may be shared with other layers
        w_name, b_name = f"{layer.input[1]}_bnfold_{bn.name or bn.output[0]}", f"{bn.output[0]}_bias"
        g.initializer.extend([numpy_helper.from_array(w_new, w_name), numpy_helper.from_array(b_new, b_name)])
        layer.input[1] = w_name
        if bias_add is not None:
            bias_add.input[list(bias_add.input).index(b_in)] = b_name
        elif layer.op_type == "MatMul":     # the folded shift needs a bias: an Add right after the product
            product = f"{layer.output[0]}_bnfold"
            added.append((layer, helper.make_node("Add", [product, b_name], [layer.output[0]],
                                                  name=f"{bn.name or bn.output[0]}_bias_add")))
            layer.output[0] = product
        elif len(layer.input) > 2:
            layer.input[2] = b_name
        else:
            layer.input.append(b_name)
        inserted = added[-1][1] if added and added[-1][0] is layer else None
        last = views[-1] if views else bias_add or inserted or layer      # the chain's end takes the norm's name
        last.output[0] = bn.output[0]
        dropped.add(id(bn))

    for layer, add in added:                # each inserted Add right after its MatMul (topological order)
        nodes = list(g.node)
        g.node.insert(next(i for i, n in enumerate(nodes) if n is layer) + 1, add)
    keep = [n for n in g.node if id(n) not in dropped]
    del g.node[:]
    g.node.extend(keep)
    _drop_unused_initializers(m)
    return m


VIEWS = ("Reshape", "Flatten")


def _static_dims(m: onnx.ModelProto) -> dict[str, list]:
    """Each tensor's dimensions from ONNX shape inference (ints where known)."""
    inferred = onnx.shape_inference.infer_shapes(m)
    g = inferred.graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*g.value_info, *g.input, *g.output] if v.type.tensor_type.HasField("shape")}


def _linear_chain(bn, producer, uses, inits, dims):
    """(layer, bias Add or None, views) when ``bn`` normalizes a linear layer's output channels:
    the layer feeds it directly, or through a bias Add and views that keep the channels on the last
    axis of a 2-D norm input; None otherwise."""
    t, views = bn.input[0], []
    while (n := producer.get(t)) is not None and n.op_type in VIEWS and uses.get(t) == 1:
        views.append(n)
        t = n.input[0]
    bias_add = None
    n = producer.get(t)
    if n is not None and n.op_type == "Add" and uses.get(t) == 1 and sum(i in inits for i in n.input) == 1:
        bias_add, t = n, next(i for i in n.input if i not in inits)
    layer = producer.get(t)
    if layer is None or layer.op_type not in ("Conv", "Gemm", "MatMul") or uses.get(t) != 1 \
            or layer.input[1] not in inits or (axis := output_axis(layer, len(inits[layer.input[1]].dims))) is None:
        return None
    channels = inits[layer.input[1]].dims[axis]
    if layer.op_type == "Conv":
        return (layer, None, []) if not views and bias_add is None else None
    # the norm's channel axis (1) is the product's last axis only for a 2-D norm input, and a view keeps
    # that axis where its input's and output's last dimensions are both C (row-major order)
    shaped = [bn.input[0], *(v.input[0] for v in views)]
    if len(dims.get(bn.input[0], [])) != 2 or any(not dims.get(s) or dims[s][-1] != channels for s in shaped):
        return None
    if bias_add is not None:
        b = next(i for i in bias_add.input if i in inits)
        if int(np.prod(inits[b].dims)) != channels or (inits[b].dims and inits[b].dims[-1] != channels):
            return None
        if layer.op_type == "Gemm" and len(layer.input) > 2 and layer.input[2]:
            return None
    return layer, bias_add, views[::-1]


def output_axis(layer: onnx.NodeProto, weight_ndim: int) -> int | None:
    """The output-channel axis of a Conv / Gemm / MatMul weight, or None for layouts that are
    not one weight per output channel (Gemm with alpha/beta != 1 or transA, non-2-D MatMul)."""
    if layer.op_type == "Conv":
        return 0 if weight_ndim == 4 else None
    if weight_ndim != 2:
        return None
    if layer.op_type == "MatMul":
        return 1
    a = {x.name: helper.get_attribute_value(x) for x in layer.attribute}
    if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
        return None
    return 0 if a.get("transB", 0) else 1


def _drop_unused_initializers(m: onnx.ModelProto) -> None:
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m
