"""Accuracy against weight size and speed: uniform 8/4/2-bit next to mixed plans over a sweep of
size budgets, each compiled integer-only and run on the labeled test splits.

    lowbit pareto MODEL --data digits [--budgets 0.25,0.5,0.75] -o pareto.png [--json FILE]

Size is the stored weight bytes of the linear layers (packed sub-byte widths), the part a bit
plan changes.  Speed is milliseconds per sample over the first split run as one batch, every
configuration timed interleaved with the others (compiler/tools/bench.py), medians.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from compiler.tools.bench import time_interleaved
from compiler.tools.evaluate import compile_for_splits, labeled_splits

BUDGETS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class ParetoPoint:
    config: str                         # "int8", "int4", "int2", "mixed 0.5"
    weight_bytes: int
    ms_per_sample: float
    top1: dict[str, float]
    agreement: dict[str, float]         # top-1 agreement with the FP32 model, per split


def sweep(model_path: str, calib: Mapping[str, np.ndarray], dataset: str = "digits",
          budgets: Sequence[float] = BUDGETS, timing_s: float = 10.0, **quantization) -> list[ParetoPoint]:
    import onnxruntime as ort

    splits = labeled_splits(dataset)
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    ref = {s: np.concatenate([sess.run(None, {name: d.x[i:i + 1]})[0] for i in range(len(d.x))]).argmax(1)
           for s, d in splits.items()}
    configs = [(f"int{b}", {"weight_bits": b}) for b in (8, 4, 2)]
    configs += [(f"mixed {t:g}", {"weight_bits": "mixed", "size_budget": t}) for t in budgets]
    arts, points = {}, []
    for label, bits in configs:
        arts[label], _ = compile_for_splits(model_path, calib, splits, **quantization, **bits)
    timed = next(iter(splits.values()))
    samples, _ = time_interleaved({label: art.run for label, art in arts.items()}, {name: timed.x}, timing_s)
    for label, art in arts.items():
        out = {s: next(iter(art.run({name: d.x}).values())).argmax(1) for s, d in splits.items()}
        stored = sum(r["bytes"] for r in art.manifest.quantization.get("weights", []))
        points.append(ParetoPoint(label, stored, float(np.median(samples[label])) / len(timed.x),
                                  {s: float((out[s] == d.y).mean()) for s, d in splits.items()},
                                  {s: float((out[s] == ref[s]).mean()) for s in splits}))
    return points


def table(points: Sequence[ParetoPoint]) -> str:
    splits = list(points[0].top1)
    head = f"{'config':<12}{'weight bytes':>14}{'ms/sample':>11}" + \
        "".join(f"{'top-1 ' + s:>17}" for s in splits) + "".join(f"{'agree ' + s:>17}" for s in splits)
    rows = [head, "-" * len(head)]
    for p in points:
        rows.append(f"{p.config:<12}{p.weight_bytes:>14}{p.ms_per_sample:>11.4f}"
                    + "".join(f"{100 * p.top1[s]:>16.1f}%" for s in splits)
                    + "".join(f"{100 * p.agreement[s]:>16.1f}%" for s in splits))
    return "\n".join(rows)


def to_json(points: Sequence[ParetoPoint]) -> str:
    return json.dumps([asdict(p) for p in points], indent=2)


def plot(points: Sequence[ParetoPoint], path: str, title: str, split: str = "perturbed") -> None:
    """Agreement with FP32 on ``split`` against weight bytes and against ms per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, xlabel in ((axes[0], "weight_bytes", "stored weight bytes (linear layers)"),
                            (axes[1], "ms_per_sample", "ms per sample")):
        mixed = sorted((p for p in points if p.config.startswith("mixed")), key=lambda p: getattr(p, key))
        ax.plot([getattr(p, key) for p in mixed], [100 * p.agreement[split] for p in mixed], "o-",
                label="mixed (ILP)")
        for p in points:
            if not p.config.startswith("mixed"):
                ax.plot(getattr(p, key), 100 * p.agreement[split], "s", label=f"uniform {p.config}")
            ax.annotate(p.config, (getattr(p, key), 100 * p.agreement[split]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"top-1 agreement with FP32, {split} (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
