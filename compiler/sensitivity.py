"""Per-layer sensitivity to weight quantization, the ILP's objective (compiler/bitplan.py).

``perturbation`` is the cheap proxy of HAWQ-V3's second-order metric: quantize one layer's
weights to b bits (symmetric per channel, as the quantizer will), keep every other layer and
every activation in float, run the model in ONNX Runtime on calibration inputs and measure how
far the outputs move:

    Omega(l, b) = mean over samples of KL(softmax(f(x)) || softmax(f_{l,b}(x)))     classifiers
                  mean squared output change / output variance                      otherwise

Each layer's parameter count and multiply-accumulates per sample (from its output size in one
probe run) come along, for the size and BOPs budgets.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler import calibration, quantize
from compiler.bitplan import BITS, Layer
from compiler.errors import UserError

SAMPLES = 64            # calibration samples per measurement


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _divergence(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    if ref.ndim == 2 and ref.shape[1] > 1:
        def log_softmax(z):
            z = z - z.max(1, keepdims=True)
            return z - np.log(np.exp(z).sum(1, keepdims=True))
        lp, lq = log_softmax(ref), log_softmax(out)
        return float((np.exp(lp) * (lp - lq)).sum(1).mean())
    return float(((out - ref) ** 2).mean() / max(ref.var(), 1e-12))


def perturbation(model: onnx.ModelProto, calib: Mapping[str, np.ndarray], *, where: str = "model",
                 shapes: dict[str, tuple[int, ...]] | None = None, samples: int = SAMPLES,
                 choices=BITS) -> list[Layer]:
    """The weighted layers in graph order, each with its sensitivity at every bit-width."""
    folded, plan, _ = quantize.prepare(model, shapes)
    inits = {t.name: t for t in folded.graph.initializer}
    nodes = {quantize.layer_name(n): n for n in folded.graph.node}
    feeds = {k: np.asarray(v, np.float32)[:samples] for k, v in calib.items()}
    fixed = {i.name: i.type.tensor_type.shape.dim[0].dim_value for i in folded.graph.input if i.name in feeds}
    batch = max(fixed.values(), default=0)         # a model with a fixed batch runs one sample batch at a time
    n = len(next(iter(feeds.values())))
    if batch and n % batch:                         # wrap around to whole batches
        wrap = np.arange(-(-n // batch) * batch) % n
        feeds = {k: v[wrap] for k, v in feeds.items()}

    def run(m: onnx.ModelProto) -> np.ndarray:
        sess = _session(m)
        total = len(next(iter(feeds.values())))
        step = batch or total
        return np.concatenate([sess.run(None, {k: v[i:i + step] for k, v in feeds.items()})[0]
                               for i in range(0, total, step)])

    # one probe run with every layer's output exposed gives the output sizes, hence the MACs
    probe = onnx.ModelProto()
    probe.CopyFrom(folded)
    outs = [nodes[name].output[0] for name in plan.layers]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in outs
                              if t not in {o.name for o in folded.graph.output})
    try:
        sess = _session(probe)
        first = {k: v[:batch or 1] for k, v in feeds.items()}
        values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, first), strict=True))
        ref = run(folded)
    except Exception as exc:                                    # noqa: BLE001 - ORT raises its own types
        raise UserError(f"{where}: ONNX Runtime cannot run the model on the calibration data: "
                        f"{str(exc).splitlines()[0]}") from None
    sizes = {t: values[t].size // len(next(iter(first.values()))) for t in outs}
    layers = []
    for name, w_name in plan.layers.items():
        w = numpy_helper.to_array(inits[w_name])
        axis = plan.weights[w_name]
        sens = {}
        for bits in choices:
            q, scale = calibration.weight_params(w, axis=axis, bits=bits)
            shape = [1] * w.ndim
            shape[axis] = -1
            m = onnx.ModelProto()
            m.CopyFrom(folded)
            target = next(t for t in m.graph.initializer if t.name == w_name)
            target.CopyFrom(numpy_helper.from_array((q * scale.reshape(shape)).astype(np.float32), w_name))
            sens[bits] = _divergence(ref, run(m))
        out = sizes[nodes[name].output[0]]
        layers.append(Layer(name, int(w.size), out * int(w.size // w.shape[axis]), sens))
    return layers
