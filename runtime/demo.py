"""`make demo`: digits_cnn through lowbit and ONNX Runtime, side by side.

    python -m runtime.demo ARTIFACT_DIR MODEL.onnx CALIB.npz

Rows: lowbit FP32 (the artifact), ORT FP32, ORT INT8 (ORT's own QDQ quantization on
CALIB.npz), and lowbit INT8: the same QDQ model compiled integer-only.  Columns:
clean and perturbed test accuracy, top-1 agreement with FP32 on the perturbed set,
max |logit diff| against ORT FP32, and batch-1 latency from one interleaved run.
"""

from __future__ import annotations

import os
import sys
import tempfile

from runtime.threads import configure_threads

configure_threads(os.cpu_count() or 1)

import numpy as np  # noqa: E402

import compiler  # noqa: E402
import runtime  # noqa: E402
from compiler.errors import UserError  # noqa: E402
from models import data  # noqa: E402
from runtime import ort  # noqa: E402
from runtime.bench import time_interleaved  # noqa: E402


def main(artifact_dir: str, model_path: str, calib_path: str, threads: int = os.cpu_count() or 1) -> None:
    art = runtime.load(artifact_dir)
    name = art.manifest.inputs[0].name
    with np.load(calib_path) as z:
        calib = {k: z[k] for k in z.files}
    with tempfile.TemporaryDirectory() as tmp:
        qdq = ort.quantize(model_path, calib, os.path.join(tmp, "qdq.onnx"), "static")
        art8 = compiler.compile(qdq)
        runners = {"lowbit " + art.manifest.precision: art.run,
                   "ort fp32": ort.OrtRunner("ort fp32", model_path, threads),
                   "ort int8": ort.OrtRunner("ort int8", qdq, threads),
                   "lowbit " + art8.manifest.precision: art8.run}
        sets = {split: data.digits(split) for split in ("test", "perturbed")}
        logits = {r: {s: next(iter(run({name: d.x}).values())) for s, d in sets.items()}
                  for r, run in runners.items()}
        samples, _ = time_interleaved(runners, {name: sets["test"].x[:1]}, budget_s=6.0)
    ref = logits["ort fp32"]
    ref_ms = np.median(samples["ort fp32"])

    print(f"\ndigits_cnn on {len(sets['test'].y)} test digits ({art.manifest.target['kind']} "
          f"{art.manifest.target.get('mcpu', '')}, {threads} threads); int8 = ORT QDQ u8/s8 per-channel, "
          f"lowbit int8 integer-only: {'yes' if art8.manifest.integer_only else 'no'}")
    head = f"{'runner':<14}{'clean acc':>10}{'perturbed acc':>15}{'agree w/ fp32':>15}{'max|diff| vs ORT':>18}" \
           f"{'batch-1 ms':>12}{'vs ORT':>9}"
    print(head + "\n" + "-" * len(head))
    for r in runners:
        acc = {s: (logits[r][s].argmax(1) == d.y).mean() for s, d in sets.items()}
        agree = (logits[r]["perturbed"].argmax(1) == ref["perturbed"].argmax(1)).mean()
        diff = max(np.abs(logits[r][s] - ref[s]).max() for s in sets)
        ms = np.median(samples[r])
        print(f"{r:<14}{100 * acc['test']:>9.1f}%{100 * acc['perturbed']:>14.1f}%{100 * agree:>14.1f}%"
              f"{diff:>18.2e}{ms:>12.3f}{ms / ref_ms:>8.2f}x")
    print("agree w/ fp32: top-1 agreement with ORT FP32 on the perturbed set; vs ORT: latency relative to "
          "ORT FP32 (lower is faster), medians of interleaved rounds.")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    try:
        main(*sys.argv[1:])
    except UserError as exc:
        sys.exit(f"error: {exc}")
