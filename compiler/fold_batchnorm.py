"""Fold inference-mode BatchNormalization into the Conv or Gemm that feeds it.

HAWQ-V3 §3.3 (phase 2, frozen statistics), per output channel c:

    g[c] = gamma[c] / sqrt(var[c] + eps)
    W'   = W * g[c]                       (along W's output-channel axis)
    b'   = (b - mean) * g + beta          (b = 0 when the layer has no bias)

Folding happens before weight quantization, so each channel's scale is chosen
for the weights that actually run.  A BatchNormalization whose producer is not
a Conv/Gemm with initializer weights, or whose producer's output has other
consumers, is left alone.
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

    dropped = set()
    for bn in g.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) > 1 and any(bn.output[1:]):
            continue
        layer = producer.get(bn.input[0])
        if layer is None or layer.op_type not in ("Conv", "Gemm") or uses.get(bn.input[0]) != 1:
            continue
        if not all(i in inits for i in bn.input[1:5]) or layer.input[1] not in inits:
            continue
        axis = output_axis(layer, len(inits[layer.input[1]].dims))
        if axis is None:
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        w = numpy_helper.to_array(inits[layer.input[1]]).astype(np.float64)
        shape = [1] * w.ndim
        shape[axis] = -1
        w_new = (w * scale.reshape(shape)).astype(np.float32)
        b = numpy_helper.to_array(inits[layer.input[2]]).astype(np.float64).reshape(-1) \
            if len(layer.input) > 2 and layer.input[2] else np.zeros_like(scale)
        b_new = ((b - mean) * scale + beta).astype(np.float32)
        # fresh names: the originals may be shared with other layers
        w_name, b_name = f"{layer.input[1]}_bnfold_{bn.name or bn.output[0]}", f"{bn.output[0]}_bias"
        g.initializer.extend([numpy_helper.from_array(w_new, w_name), numpy_helper.from_array(b_new, b_name)])
        layer.input[1] = w_name
        if len(layer.input) > 2:
            layer.input[2] = b_name
        else:
            layer.input.append(b_name)
        layer.output[0] = bn.output[0]
        dropped.add(id(bn))

    keep = [n for n in g.node if id(n) not in dropped]
    del g.node[:]
    g.node.extend(keep)
    _drop_unused_initializers(m)
    return m


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
