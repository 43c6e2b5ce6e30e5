"""How well each sensitivity predicts the damage: Spearman's rank correlation, over the layers of
a zoo classifier, between its Omega(l, b) and the measured top-1 drop on the digits test sets when
only layer l's weights are quantized to b bits (everything else FP32, run in ORT).

    .venv/bin/python scripts/sensitivity_spearman.py [digits_cnn digits_vit] [--bits 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from scipy.stats import spearmanr

from compiler import calibration, quantize
from compiler.planning import sensitivity
from compiler.tools.evaluate import labeled_splits
from models import zoo


def accuracy(model: onnx.ModelProto, splits) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    hits = [(sess.run(None, {name: d.x[i:i + 1]})[0].argmax(1) == d.y[i:i + 1]).sum()
            for d in splits.values() for i in range(len(d.x))]
    return float(np.mean(hits))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="*", default=["digits_cnn", "digits_vit"])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    results = {}
    splits = labeled_splits("digits")
    for name in args.models:
        files = zoo.ensure(name)
        model, calib = onnx.load(files.onnx), files.calibration()
        shapes = {zoo.INPUT: (1, *zoo.get(name).sample_shape)}
        folded, plan, _ = quantize.prepare(model, shapes)
        base = accuracy(folded, splits)
        drops = []
        for w_name in plan.layers.values():
            m = onnx.ModelProto()
            m.CopyFrom(folded)
            t = next(t for t in m.graph.initializer if t.name == w_name)
            w, axis = numpy_helper.to_array(t), plan.weights[w_name]
            q, scale = calibration.weight_params(w, axis=axis, bits=args.bits)
            shape = [1] * w.ndim
            shape[axis] = -1
            t.CopyFrom(numpy_helper.from_array((q * scale.reshape(shape)).astype(np.float32), w_name))
            drops.append(base - accuracy(m, splits))
        row = {"layers": len(drops), "top1_fp32": base, "max_drop": max(drops)}
        for method in sensitivity.METHODS:
            layers = sensitivity.measure(model, calib, method=method, shapes=shapes)
            rho = spearmanr([layer.sensitivity[args.bits] for layer in layers], drops).statistic
            row[f"spearman_{method}"] = float(rho)
        results[name] = row
        print(f"{name}: {row['layers']} layers at {args.bits} bits, FP32 top-1 {100 * base:.1f}%, largest drop "
              f"{100 * row['max_drop']:.1f} points; Spearman vs drop: perturb {row['spearman_perturb']:.2f}, "
              f"hessian {row['spearman_hessian']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
