"""The loss gradient by TVM Relax's Gradient pass (compiler/planning/gradient.py), with lowbit's rules for
GELU, squeeze and strided_slice, against central differences of the loss itself."""

from __future__ import annotations

import numpy as np
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

from compiler import quantize
from compiler.planning.gradient import LossGradient


def _transformer_head(seed=0):
    """x[N,3,4] -> MatMul -> GELU -> LayerNorm -> Slice token 0 -> Squeeze -> MatMul -> logits[N,5]:
    every op digits_vit's classifier path needs, including the three without TVM gradients."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.7, s).astype(np.float32), n)
             for n, s in (("w1", (4, 6)), ("w2", (6, 5)), ("gamma", (6,)), ("beta", (6,)))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("starts", [0]), ("ends", [1]), ("axes", [1]))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Gelu", ["h"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("LayerNormalization", ["g", "gamma", "beta"], ["n"], name="ln", axis=-1),
             helper.make_node("Slice", ["n", "starts", "ends", "axes"], ["s"], name="cls"),
             helper.make_node("Squeeze", ["s", "axes"], ["t"], name="squeeze"),
             helper.make_node("MatMul", ["t", "w2"], ["y"], name="head")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 3, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 5])], inits)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def test_gradient_matches_central_differences_of_the_loss():
    model = _transformer_head()
    folded, plan, _ = quantize.prepare(model)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(16, 3, 4)).astype(np.float32), rng.integers(0, 5, 16)
    grad = LossGradient(folded, list(plan.weights), {"x": x}, y)
    assert grad.batch == 8                                  # two batches, averaged
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in folded.graph.initializer}
    base, g = grad({})
    logits = []
    import onnxruntime as ort

    sess = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"x": x[i:i + 8]})[0] for i in (0, 8)]).astype(np.float64)
    z = logits - logits.max(1, keepdims=True)
    expected = float(-(z[np.arange(16), y] - np.log(np.exp(z).sum(1))).mean())
    assert abs(base - expected) < 1e-5                      # the loss is the mean cross-entropy
    for name in plan.weights:
        d = rng.normal(size=inits[name].shape)
        e = 1e-3
        up, _ = grad({name: (inits[name] + e * d).astype(np.float32)})
        down, _ = grad({name: (inits[name] - e * d).astype(np.float32)})
        numeric, analytic = (up - down) / (2 * e), float((g[name] * d).sum())
        assert abs(numeric - analytic) <= 2e-2 * max(abs(analytic), 1e-2), (name, numeric, analytic)
