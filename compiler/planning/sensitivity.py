"""Per-layer sensitivity to weight quantization, the ILP's objective (compiler/planning/bitplan.py).

Two measures, both computed from the ONNX model in ONNX Runtime (no training framework):

``perturb`` (the cheap proxy): quantize one layer's weights to b bits (symmetric per channel,
as the quantizer will), keep everything else in float, and measure how far the outputs move:

    Omega(l, b) = mean KL(softmax(f(x)) || softmax(f_{l,b}(x)))        classifiers
                  mean squared output change / output variance         otherwise

``hessian`` (HAWQ-V3 §3.4, second order): Omega(l, b) = tr(H_l) / n_l * ||W_l - Q_b(W_l)||^2,
with tr(H_l), the trace of the loss Hessian's block in layer l's n_l weights, by Hutchinson's
estimator.  One Rademacher vector v spans every layer at once; the Hessian-vector product is a
central difference of the loss gradient, H E v ~ (g(W + E v) - g(W - E v)) / 2, exact for a
quadratic loss and O(e^2) otherwise, with E scaling each layer by e_l = STEP * rms(W_l).  Then
v_l^T (H E v)_l / e_l has mean tr(H_l): the cross-layer terms average out since the layers'
signs are independent.  The gradient comes from TVM Relax's Gradient pass on the ONNX model
(compiler/planning/gradient.py).  The loss is cross-entropy against the labels when given, else against
the FP32 model's own predictions.

Weights are fed to one ORT session as inputs that override their initializers, so every
perturbation trial reuses it.  Each layer's parameter count and multiply-accumulates per sample
(from its output size in one probe run) come along, for the size and BOPs budgets.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler import calibration, quantize
from compiler.planning.bitplan import BITS, Layer
from compiler.planning.gradient import LossGradient
from runtime.errors import UserError

SAMPLES = 64            # calibration samples per measurement
PROBES = 32             # Hutchinson vectors per layer
STEP = 1e-2             # finite-difference step, relative to the layer's RMS weight
METHODS = ("perturb", "hessian")


class _Runner:
    """The folded model in one ORT session, with its weights as overridable inputs and every
    weighted layer's output exposed (for the MAC counts)."""

    def __init__(self, folded: onnx.ModelProto, plan, feeds: Mapping[str, np.ndarray], where: str):
        import onnxruntime as ort

        m = onnx.ModelProto()
        m.CopyFrom(folded)
        inits = {t.name: t for t in m.graph.initializer}
        m.graph.input.extend(helper.make_tensor_value_info(w, inits[w].data_type, list(inits[w].dims))
                             for w in dict.fromkeys(plan.layers.values()))
        nodes = {quantize.layer_name(n): n for n in m.graph.node}
        self.outs = {name: nodes[name].output[0] for name in plan.layers}
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in self.outs.values() if t not in have)
        fixed = [i.type.tensor_type.shape.dim[0].dim_value for i in folded.graph.input if i.name in feeds]
        self.batch = max(fixed, default=0)          # a fixed batch runs one batch at a time
        n = len(next(iter(feeds.values())))
        if self.batch and n % self.batch:           # wrap around to whole batches
            wrap = np.arange(-(-n // self.batch) * self.batch) % n
            feeds = {k: v[wrap] for k, v in feeds.items()}
        self.feeds, self.n = feeds, len(next(iter(feeds.values())))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            self.names = [o.name for o in self.sess.get_outputs()]
            self.ref, values = self.run({}, keep=True)
        except Exception as exc:                                # noqa: BLE001 - ORT raises its own types
            raise UserError(f"{where}: ONNX Runtime cannot run the model on the calibration data: "
                            f"{str(exc).splitlines()[0]}") from None
        self.out_size = {name: values[t].size // (self.batch or self.n) for name, t in self.outs.items()}

    def run(self, weights: Mapping[str, np.ndarray], keep: bool = False):
        """The first output over all samples (and, with ``keep``, every output of the first batch)."""
        step = self.batch or self.n
        first, outs = None, []
        for i in range(0, self.n, step):
            feed = {**{k: v[i:i + step] for k, v in self.feeds.items()}, **weights}
            res = self.sess.run(None if keep and i == 0 else self.names[:1], feed)
            if keep and i == 0:
                first = dict(zip(self.names, res, strict=True))
            outs.append(res[0])
        out = np.concatenate(outs)
        return (out, first) if keep else out


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _divergence(ref: np.ndarray, out: np.ndarray) -> float:
    if ref.ndim == 2 and ref.shape[1] > 1:
        lp, lq = _log_softmax(ref), _log_softmax(out)
        return float((np.exp(lp) * (lp - lq)).sum(1).mean())
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(((out - ref) ** 2).mean() / max(ref.var(), 1e-12))


def _quantized(w: np.ndarray, axis: int, bits: int) -> np.ndarray:
    q, scale = calibration.weight_params(w, axis=axis, bits=bits)
    shape = [1] * w.ndim
    shape[axis] = -1
    return (q * scale.reshape(shape)).astype(np.float32)


def hessian_traces(gradient, weights: Mapping[str, np.ndarray], probes: int = PROBES,
                   seed: int = 0) -> dict[str, float]:
    """Hutchinson's tr(H_l) for every weight tensor at once: the mean over Rademacher v of
    v_l^T (H E v)_l / e_l, each Hessian-vector product a central difference of ``gradient``
    (weights -> (loss, {weight: gradient}))."""
    rng = np.random.default_rng(seed)
    eps = {k: STEP * max(float(np.sqrt(np.mean(w.astype(np.float64) ** 2))), 1e-8) for k, w in weights.items()}
    total = dict.fromkeys(weights, 0.0)
    for _ in range(probes):
        v = {k: rng.choice(np.array([-1.0, 1.0], np.float32), size=w.shape) for k, w in weights.items()}
        _, up = gradient({k: w + eps[k] * v[k] for k, w in weights.items()})
        _, down = gradient({k: w - eps[k] * v[k] for k, w in weights.items()})
        for k in weights:
            hv = (up[k].astype(np.float64) - down[k]) / 2
            total[k] += float((v[k] * hv).sum()) / eps[k]
    return {k: t / probes for k, t in total.items()}


def _traces(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], target: np.ndarray, plan,
            where: str) -> dict[str, float]:
    """tr(H_l) per layer name, from the loss gradient of the model at a batch that splits the
    samples (its own fixed batch, else all of them at once)."""
    first = next(i for i in model.graph.input if i.name in feeds)
    batch = first.type.tensor_type.shape.dim[0].dim_value or len(target)
    folded, grad_plan, _ = quantize.prepare(model, {k: (batch, *v.shape[1:]) for k, v in feeds.items()})
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    weights = {grad_plan.layers[name]: inits[grad_plan.layers[name]] for name in plan.layers}
    gradient = LossGradient(folded, list(weights), feeds, target, where)
    traces = hessian_traces(gradient, weights)
    return {name: traces[grad_plan.layers[name]] for name in plan.layers}


def measure(model: onnx.ModelProto, calib: Mapping[str, np.ndarray], *, method: str = "perturb",
            where: str = "model", shapes: dict[str, tuple[int, ...]] | None = None,
            labels: np.ndarray | None = None, samples: int = SAMPLES, choices=BITS,
            activation_bits: int = 8) -> list[Layer]:
    """The weighted layers in graph order, each with its sensitivity at every bit-width (and
    its input's bits under ``activation_bits``, for the BOPs)."""
    if method not in METHODS:
        raise UserError(f"--sensitivity {method}: choose one of {', '.join(METHODS)}")
    folded, plan, _ = quantize.prepare(model, shapes)
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    feeds = {k: np.asarray(v, np.float32)[:samples] for k, v in calib.items()}
    runner = _Runner(folded, plan, feeds, where)
    config = quantize.QuantConfig(activation_bits=activation_bits)
    inputs = {quantize.layer_name(n): n.input[0] for n in folded.graph.node}
    if method == "hessian":
        if runner.ref.ndim != 2:
            raise UserError(f"{where}: the Hessian sensitivity needs a classifier's (N, classes) output")
        target = np.asarray(labels)[:samples] if labels is not None else runner.ref.argmax(1)
        target = target[np.arange(runner.n) % len(target)]
        traces = _traces(model, runner.feeds, target, plan, where)
    layers = []
    for name, w_name in plan.layers.items():
        w, axis = inits[w_name], plan.weights[w_name]
        if method == "perturb":
            sens = {b: _divergence(runner.ref, runner.run({w_name: _quantized(w, axis, b)})) for b in choices}
        else:
            per_param = traces[name] / w.size
            sens = {b: per_param * float(((w - _quantized(w, axis, b)).astype(np.float64) ** 2).sum())
                    for b in choices}
        layers.append(Layer(name, int(w.size), runner.out_size[name] * int(w.size // w.shape[axis]), sens,
                            activation_bits=quantize.activation_bits(inputs[name], plan, config)))
    return layers
