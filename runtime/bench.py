"""Side-by-side latency and fidelity of lowbit and ONNX Runtime variants.

The machine is shared and noisy, so runners are timed *interleaved* in one
process: after a warm-up, each round times every runner once, in a rotating
order, and the statistics are medians and p10/p90 over rounds.  Ratios from
one run are meaningful even when absolute times drift.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from compiler.progress import bar, stage
from runtime.threads import TIMING_ENV

Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass
class Row:
    name: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    speedup_vs_reference: float     # reference median / this median (> 1 is faster)
    time_vs_lowbit: float           # this median / the lowbit runner's median (the first runner)
    max_abs_diff: float             # vs the reference's outputs over the evaluation samples
    cosine: float
    top1_agreement: float | None    # share of samples whose argmax matches the reference (classifiers)


@dataclass
class BenchResult:
    model: str
    threads: int
    rounds: int
    calls_per_sample: dict[str, int]
    eval_samples: int
    rows: list[Row]
    env: dict[str, str | None]
    reference: str = "ort-fp32"

    def table(self) -> str:
        head = f"{'runner':<16}{'median ms':>11}{'p10':>9}{'p90':>9}{'x ' + self.reference:>12}{'t/lowbit':>10}" \
               f"{'max|d|':>11}{'cosine':>9}{'top1':>7}"
        lines = [f"{self.model}: {self.threads} thread(s), {self.rounds} interleaved rounds, "
                 f"fidelity on {self.eval_samples} samples vs {self.reference}", head, "-" * len(head)]
        for r in self.rows:
            top1 = "-" if r.top1_agreement is None else f"{100 * r.top1_agreement:.0f}%"
            lines.append(f"{r.name:<16}{r.median_ms:>11.3f}{r.p10_ms:>9.3f}{r.p90_ms:>9.3f}"
                         f"{r.speedup_vs_reference:>11.2f}x{r.time_vs_lowbit:>10.2f}"
                         f"{r.max_abs_diff:>11.2e}{r.cosine:>9.5f}{top1:>7}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def time_interleaved(runners: Mapping[str, Runner], feeds: Mapping[str, np.ndarray],
                     budget_s: float = 20.0, min_rounds: int = 10, max_rounds: int = 300,
                     ) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per-call milliseconds for each runner, one sample per round per runner.

    Fast runners are called several times per sample (``calls``) so a sample
    is at least ~2 ms long and timer/loop overhead stays negligible.
    """
    est = {}
    for name, run in runners.items():
        run(feeds)                                  # first call: lazy init, page faults
        t0 = time.perf_counter()
        run(feeds)
        est[name] = max(time.perf_counter() - t0, 1e-6)
    calls = {n: max(1, int(2e-3 / t)) for n, t in est.items()}
    per_round = sum(est[n] * calls[n] for n in runners)
    rounds = int(min(max_rounds, max(min_rounds, budget_s / per_round)))
    samples: dict[str, list[float]] = {n: [] for n in runners}
    names = list(runners)
    for r in bar(range(rounds), desc="benchmark rounds"):
        for name in names[r % len(names):] + names[: r % len(names)]:
            run, k = runners[name], calls[name]
            t0 = time.perf_counter()
            for _ in range(k):
                run(feeds)
            samples[name].append((time.perf_counter() - t0) / k * 1e3)
    return samples, calls


def fidelity(run: Runner, ref: Runner, inputs: list[Mapping[str, np.ndarray]]) -> tuple[float, float, float | None]:
    """(max |diff|, cosine, top-1 agreement) of the first output against the reference."""
    got = np.concatenate([np.asarray(next(iter(run(x).values())), np.float64).reshape(1, -1) for x in inputs])
    want = np.concatenate([np.asarray(next(iter(ref(x).values())), np.float64).reshape(1, -1) for x in inputs])
    cos = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want) + 1e-30))
    top1 = float((got.argmax(1) == want.argmax(1)).mean()) if got.shape[1] > 1 else None
    return float(np.abs(got - want).max()), cos, top1


def compare(model: str, runners: Mapping[str, Runner], feeds: Mapping[str, np.ndarray],
            eval_inputs: list[Mapping[str, np.ndarray]], threads: int, budget_s: float = 20.0,
            reference: str = "ort-fp32") -> BenchResult:
    """Time and compare; the first runner is lowbit's, ``reference`` must be among them."""
    with stage("interleaved timing"):
        samples, calls = time_interleaved(runners, feeds, budget_s)
    med = {n: float(np.median(s)) for n, s in samples.items()}
    lowbit = next(iter(runners))
    rows = []
    for name, s in samples.items():
        with stage(f"fidelity {name}"):
            d, cos, top1 = fidelity(runners[name], runners[reference], eval_inputs)
        rows.append(Row(name, med[name], float(np.percentile(s, 10)), float(np.percentile(s, 90)),
                        med[reference] / med[name], med[name] / med[lowbit], d, cos, top1))
    env = {k: os.environ.get(k) for k in TIMING_ENV}
    return BenchResult(model, threads, len(next(iter(samples.values()))), calls, len(eval_inputs), rows, env,
                       reference)
