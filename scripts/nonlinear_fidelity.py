"""Cosine of integer-only logits to FP32 for each --nonlinear family, on a zoo transformer.

    .venv/bin/python scripts/nonlinear_fidelity.py [deit_tiny] [--samples 32] [--json FILE]

Compiles the model integer-only three times (shift, poly, auto; batch 1, its bundled
calibration set) and runs the same seeded inputs through each and through ORT FP32.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnx
import onnxruntime as ort

import compiler
from compiler.options import CompileOptions
from models import zoo


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="deit_tiny")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--json")
    args = p.parse_args()
    files, entry = zoo.ensure(args.model), zoo.get(args.model)
    model, calib = onnx.load(files.onnx), files.calibration()
    xs = entry.samples(args.samples, seed=11)
    sess = ort.InferenceSession(str(files.onnx), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {zoo.INPUT: xs[i:i + 1]})[0] for i in range(len(xs))])
    results = {}
    print(f"{args.model}, {len(xs)} inputs, batch 1: cosine of logits to ORT FP32")
    print(f"{'nonlinear':<10}{'mean cos':>10}{'min cos':>10}{'top-1 agree':>13}{'integer-only':>14}{'compile s':>11}")
    for family in ("shift", "poly", "auto"):
        t0 = time.perf_counter()
        art = compiler.compile(model, options=CompileOptions(
            calib=calib, input_shapes={zoo.INPUT: (1, *entry.sample_shape)}, nonlinear=family))
        seconds = time.perf_counter() - t0
        out = np.concatenate([art.run({zoo.INPUT: xs[i:i + 1]})[zoo.OUTPUT] for i in range(len(xs))])
        cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
        results[family] = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                           "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
                           "integer_only": art.manifest.integer_only, "compile_s": seconds}
        r = results[family]
        print(f"{family:<10}{r['mean_cosine']:>10.4f}{r['min_cosine']:>10.4f}{100 * r['top1_agreement']:>12.0f}%"
              f"{'yes' if r['integer_only'] else 'no':>14}{seconds:>11.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
