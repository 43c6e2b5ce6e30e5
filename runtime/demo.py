"""`make demo`: digits_cnn through lowbit and ONNX Runtime, side by side.

    python -m runtime.demo ARTIFACT_DIR MODEL.onnx

Prints, for each runner, clean and perturbed test accuracy, top-1 agreement
with ORT FP32 on the perturbed set, max |logit diff| against ORT FP32, and the
batch-1 latency ratio from an interleaved timing run.
"""

from __future__ import annotations

import os
import sys

from runtime.threads import configure_threads

configure_threads(os.cpu_count() or 1)

import numpy as np  # noqa: E402

import runtime  # noqa: E402
from compiler.errors import UserError  # noqa: E402
from models import data  # noqa: E402
from runtime.bench import time_interleaved  # noqa: E402
from runtime.ort import OrtRunner  # noqa: E402


def main(artifact_dir: str, model_path: str, threads: int = os.cpu_count() or 1) -> None:
    art = runtime.load(artifact_dir)
    ort = OrtRunner("ort-fp32", model_path, threads)
    name = art.manifest.inputs[0].name
    runners = {"lowbit " + art.manifest.precision: art.run, "ort fp32": ort}
    sets = {split: data.digits(split) for split in ("test", "perturbed")}
    logits = {r: {s: next(iter(run({name: d.x}).values())) for s, d in sets.items()} for r, run in runners.items()}
    ref = logits["ort fp32"]
    samples, _ = time_interleaved(runners, {name: sets["test"].x[:1]}, budget_s=5.0)
    ref_ms = np.median(samples["ort fp32"])

    print(f"\ndigits_cnn on {len(sets['test'].y)} test digits ({art.manifest.target['kind']} "
          f"{art.manifest.target.get('mcpu', '')}, {threads} threads)")
    head = f"{'runner':<14}{'clean acc':>10}{'perturbed acc':>15}{'top-1 agree':>13}{'max|diff| vs ORT':>18}" \
           f"{'batch-1 ms':>12}{'vs ORT':>9}"
    print(head + "\n" + "-" * len(head))
    for r in runners:
        acc = {s: (logits[r][s].argmax(1) == d.y).mean() for s, d in sets.items()}
        agree = (logits[r]["perturbed"].argmax(1) == ref["perturbed"].argmax(1)).mean()
        diff = max(np.abs(logits[r][s] - ref[s]).max() for s in sets)
        ms = np.median(samples[r])
        print(f"{r:<14}{100 * acc['test']:>9.1f}%{100 * acc['perturbed']:>14.1f}%{100 * agree:>12.1f}%"
              f"{diff:>18.2e}{ms:>12.3f}{ms / ref_ms:>8.2f}x")
    print("vs ORT: latency relative to ORT FP32 (lower is faster); medians of interleaved rounds.")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    try:
        main(sys.argv[1], sys.argv[2])
    except UserError as exc:
        sys.exit(f"error: {exc}")
