"""Side-by-side latency and fidelity of lowbit, ONNX Runtime and OpenVINO variants.

The machine is shared and noisy, so runners are timed *interleaved* in one
process: after a warm-up, each round times every runner once, in a rotating
order (each sample after one untimed call of its own), and the statistics are
medians and p10/p90 over rounds.  Ratios from
one run are meaningful even when absolute times drift.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

import compiler
from codegen import registry
from codegen.tosa.runner import timing_runner
from compiler.frontend import input_specs, load
from compiler.options import CompileOptions
from compiler.quantize import is_quantized
from compiler.tools import ort, ov
from models import corpus, zoo
from runtime.errors import UserError
from runtime.io import read_tensors
from runtime.progress import bar, log, stage
from runtime.threads import TIMING_ENV, set_tvm_threads

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
    batch: int = 1
    where: str = "this machine"

    def table(self) -> str:
        head = f"{'runner':<16}{'median ms':>11}{'p10':>9}{'p90':>9}{'x ' + self.reference:>12}{'t/lowbit':>10}" \
               f"{'max|d|':>11}{'cosine':>9}{'top1':>7}"
        lines = [f"{self.model}: batch {self.batch}, {self.threads} thread(s) on {self.where}, {self.rounds} "
                 f"interleaved rounds, fidelity on {self.eval_samples} batches vs {self.reference}",
                 head, "-" * len(head)]
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
    def timed(name: str, k: int) -> float:
        """Milliseconds per call over ``k`` calls: by this process's clock, or by the board's for a
        remote runner (``time_ms``), so that the network round trip stays out.  One untimed call
        first: ORT's pool spin-waits after each run, which would bill its busy cores to the next
        runner."""
        run = runners[name]
        run(feeds)
        if hasattr(run, "time_ms"):
            return run.time_ms(feeds, k)
        t0 = time.perf_counter()
        for _ in range(k):
            run(feeds)
        return (time.perf_counter() - t0) / k * 1e3

    est = {}
    for name, run in runners.items():
        run(feeds)                                  # first call: lazy init, page faults
        est[name] = max(timed(name, 1) * 1e-3, 1e-6)
    calls = {n: max(1, int(2e-3 / t)) for n, t in est.items()}
    per_round = sum(est[n] * (calls[n] + 1) for n in runners)
    rounds = int(min(max_rounds, max(min_rounds, budget_s / per_round)))
    samples: dict[str, list[float]] = {n: [] for n in runners}
    names = list(runners)
    for r in bar(range(rounds), desc="benchmark rounds"):
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name].append(timed(name, calls[name]))
    return samples, calls


def _rows(out: Mapping[str, np.ndarray]) -> np.ndarray:
    """The first output, one row per sample of the batch."""
    first = np.asarray(next(iter(out.values())), np.float64)
    return first.reshape(first.shape[0] if first.ndim > 1 else 1, -1)


def fidelity(run: Runner, ref: Runner, inputs: list[Mapping[str, np.ndarray]]) -> tuple[float, float, float | None]:
    """(max |diff|, cosine, top-1 agreement) of the first output against the reference."""
    got = np.concatenate([_rows(run(x)) for x in inputs])
    want = np.concatenate([_rows(ref(x)) for x in inputs])
    cos = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want) + 1e-30))
    top1 = float((got.argmax(1) == want.argmax(1)).mean()) if got.shape[1] > 1 else None
    return float(np.abs(got - want).max()), cos, top1


def compare(model: str, runners: Mapping[str, Runner], feeds: Mapping[str, np.ndarray],
            eval_inputs: list[Mapping[str, np.ndarray]], threads: int, budget_s: float = 20.0,
            reference: str = "ort-fp32", batch: int = 1, where: str = "this machine") -> BenchResult:
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
    env = {**{k: os.environ.get(k) for k in TIMING_ENV}, **machine()}
    return BenchResult(model, threads, len(next(iter(samples.values()))), calls, len(eval_inputs), rows, env,
                       reference, batch, where)


def machine() -> dict[str, str]:
    """What the numbers were measured on: the CPU, its core count, the runtimes' versions."""
    import importlib.metadata as md
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {"onnxruntime": md.version("onnxruntime"), "apache-tvm": md.version("apache-tvm")}
    if ov.available():
        versions |= {"openvino": md.version("openvino"), "nncf": md.version("nncf")}
    return {"cpu": cpu, "cores": str(os.cpu_count()), **versions}


def batches(samples: list[Mapping[str, np.ndarray]], batch: int, count: int, specs, where: str
            ) -> list[dict[str, np.ndarray]]:
    """``count`` inputs of ``batch`` samples each, cycling through the batch-1 ``samples``."""
    for s in specs:
        if isinstance(s.shape[0], int) and s.shape[0] != batch:
            raise UserError(f"{where}: input {s.name!r} has a fixed batch of {s.shape[0]}; --batch {batch} needs "
                            "a model exported with a dynamic batch axis")
    picks = [[samples[(i * batch + j) % len(samples)] for j in range(batch)] for i in range(count)]
    return [{k: np.concatenate([p[k] for p in pick]) for k in pick[0]} for pick in picks]


def inputs(model: str, calib_path: str | None, count: int):
    """(model path, calibration dict, ``count`` evaluation samples of batch 1) for a file, a zoo name or
    a corpus file's name (resnet18.dynamo: its calibration crops, and evaluation crops it was not
    calibrated on); a file's samples come from its calibration data, as many as it has.  With no data
    at all, random normal inputs, with a warning: ORT INT8's fidelity numbers then mean little."""
    if not os.path.exists(model) and model in zoo.ENTRIES:
        files = zoo.ensure(model)
        entry = zoo.get(model)
        samples = entry.samples(count, seed=entry.seed + 3)
        return str(files.onnx), files.calibration(), [{zoo.INPUT: samples[i : i + 1]} for i in range(len(samples))]
    if not os.path.exists(model) and (variant := {v.name: v for v in corpus.variants()}.get(model)):
        files = corpus.ensure(variant)
        held_out = files.evaluation()
        n = min(count, len(next(iter(held_out.values()))))
        return str(files.onnx), files.calibration(), [{k: v[i : i + 1] for k, v in held_out.items()} for i in range(n)]
    specs = input_specs(load(model))
    if calib_path:
        calib = read_tensors(calib_path, specs)
    else:
        log.warning("no --calib given: ORT INT8 is calibrated on random normal inputs, so its fidelity numbers "
                    "mean little")
        rng = np.random.default_rng(0)
        calib = {}
        for s in specs:
            shape = [8] + [d if isinstance(d, int) else 1 for d in s.shape[1:]]
            if not np.issubdtype(np.dtype(s.dtype), np.floating):
                raise UserError(f"{model}: input {s.name!r} is {s.dtype}; pass --calib with real inputs")
            calib[s.name] = rng.normal(size=shape).astype(s.dtype)
    n = min(count, len(next(iter(calib.values()))))
    return model, calib, [{k: v[i : i + 1] for k, v in calib.items()} for i in range(n)]


BASELINES = ("ort", "openvino")
HOST = "llvm"       # the build lowbit's own rows time when the target is another engine's (bench_peer)


def sweep(model: str, calib_path: str | None, *, target: str, target_options: Mapping, batch_sizes: list[int],
          threads: list[int], seconds: float, samples: int, shapes: Mapping, remote=None,
          vs: tuple[str, ...] = BASELINES,
          report: Callable[[BenchResult], None] = lambda r: None) -> list[BenchResult]:
    """``lowbit bench``: lowbit INT8 (for an FP32 model) and FP32 against the ORT and OpenVINO
    baselines (``vs``), each batch size compiled once, each thread count timed interleaved; with
    ``remote`` lowbit runs on the board and its own FP32 is the reference.  ``report`` sees each
    result as it comes."""
    backend = CompileOptions(target=target, target_options=target_options).backend
    peer_options: Mapping = {}
    if backend.bench_peer:      # e.g. tosa: IREE runs that build, beside lowbit's own for this machine
        vs, peer_options, target, target_options = (*vs, backend.bench_peer), target_options, HOST, {}
        backend = CompileOptions(target=target).backend
    if not (registry.runner(target).remote if remote else backend.measures_latency):
        raise UserError(f"bench times wall-clock latency on this machine or a board over TVM RPC, and a {target} "
                        "build runs on neither (an rv32 build's exact instruction counts: `lowbit profile OUTDIR`)")
    if "openvino" in vs and not remote:
        ov.require()
    if remote and len(threads) > 1:
        raise UserError("--threads sets this machine's runtimes; a board's thread count is its rpc_server's "
                        "TVM_NUM_THREADS: give one --threads value with --rpc/--tracker")
    model_path, calib, picked = inputs(model, calib_path, samples * max(batch_sizes))
    specs = input_specs(load(model_path))
    quantized = is_quantized(load(model_path).proto)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ov_models = []
        if not remote:
            with stage("ORT baselines (quantize)"):
                ort_models = ort.variants(model_path, calib, tmp)
            if "openvino" in vs:
                with stage("OpenVINO baselines (NNCF)"):
                    ov_models = ov.variants(model_path, calib)
        for batch in batch_sizes:
            feeds = batches(picked, batch, samples, specs, where=model)
            fixed = {**{k: v.shape for k, v in feeds[0].items()}, **shapes}
            common = {"target": target, "target_options": target_options, "input_shapes": fixed}
            # every activation on 8 bits (no fidelity target): the program an int8 engine is timed against
            int8 = CompileOptions(calib=calib, fidelity=None, **common)
            arts = [] if quantized else [compiler.compile(model_path, options=int8)]
            arts.append(compiler.compile(model_path, options=CompileOptions(**common)))
            # IREE on the integer program lowbit's int8 row runs, as TOSA (the given one for a quantized model)
            tosa = compiler.compile(model_path, options=CompileOptions(
                calib=None if quantized else calib, fidelity=None, target="tosa", target_options=peer_options,
                input_shapes=fixed)) if "iree" in vs and not remote else None
            # first: the row t/lowbit refers to
            session = remote.connect() if remote else None
            lowbit = {f"lowbit-{a.manifest.precision}": (remote.load(a, session) if remote else a) for a in arts}
            for t in threads:
                runners = {n: (a if remote else a.run) for n, a in lowbit.items()}
                if remote:              # ORT runs here, not on the board: lowbit's own FP32 is the reference
                    reference = next(reversed(runners))
                else:
                    set_tvm_threads(t)
                    baselines = ort.baselines(model_path, calib, t, tmp, ort_models)
                    runners.update((r.name, r) for r in [*baselines, *ov.baselines(ov_models, t)])
                    if tosa is not None:
                        runners["iree-int8"] = timing_runner(tosa, t)
                    reference = baselines[0].name
                result = compare(os.path.basename(model), runners, feeds[0], feeds, t, seconds, reference=reference,
                                 batch=batch, where=remote.describe() if remote else "this machine")
                # the precision OpenVINO ran each model at (ov-int8's float remainder: bf16 on AMX)
                result.env |= {f"{n} precision": r.ran_at for n, r in runners.items() if isinstance(r, ov.OvRunner)}
                report(result)
                results.append(result)
    return results


def results_json(results: list[BenchResult]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)


def best_int8(result: BenchResult, min_cosine: float = 0.99, engine: str = "ort") -> Row | None:
    """The fastest INT8 variant of ``engine`` ("ort" or "ov") whose output keeps ``min_cosine`` with
    FP32 (the fair bar), else the fastest of them all."""
    int8 = [r for r in result.rows if r.name.startswith(f"{engine}-int8") or r.name == f"{engine}-as-given"]
    ok = [r for r in int8 if r.cosine >= min_cosine] or int8
    return min(ok, key=lambda r: r.median_ms, default=None)


def markdown(results: list[BenchResult]) -> str:
    """One row per model, batch and thread count: medians (p10-p90), lowbit's ratios to OpenVINO INT8,
    ORT INT8 and (FP32) ORT FP32, and the INT8 cosines to FP32."""
    cols = ["model", "batch", "threads", "lowbit INT8 ms", "OpenVINO INT8 ms",
            "ORT INT8 ms (fastest with cos >= 0.99, else fastest)", "lowbit FP32 ms", "ORT FP32 ms",
            "lowbit INT8 / OpenVINO INT8", "lowbit INT8 / ORT INT8", "lowbit FP32 / ORT FP32",
            "cosine lowbit INT8 / OpenVINO INT8"]
    peers = any(row.name == "iree-int8" for r in results for row in r.rows)
    if peers:                       # IREE on lowbit's integer program (bench --target tosa)
        cols += ["iree-int8 ms (lowbit's program)", "lowbit INT8 / iree-int8"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def cell(row: Row | None) -> str:
        return "-" if row is None else f"{row.median_ms:.3g} ({row.p10_ms:.3g}-{row.p90_ms:.3g})"

    def named(row: Row | None) -> str:
        return "" if row is None else f"{row.name} " + (f"(cos {row.cosine:.3f}) " if row.cosine < 0.99 else "")

    def ratio(low: Row | None, other: Row | None) -> str:
        return f"{low.median_ms / other.median_ms:.2f}x" if low and other else "-"

    def cos(row: Row | None) -> str:
        return f"{row.cosine:.4f}" if row else "-"

    for r in results:
        by = {row.name: row for row in r.rows}
        low, low32, ov8, ort8, ort32 = (by.get("lowbit-int8"), by.get("lowbit-fp32"), best_int8(r, engine="ov"),
                                        best_int8(r), by.get("ort-fp32"))
        cells = [r.model, str(r.batch), str(r.threads), cell(low), named(ov8) + cell(ov8), named(ort8) + cell(ort8),
                 cell(low32), cell(ort32), ratio(low, ov8), ratio(low, ort8), ratio(low32, ort32),
                 f"{cos(low)} / {cos(ov8)}"]
        if peers:
            cells += [cell(by.get("iree-int8")), ratio(low, by.get("iree-int8"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":          # python -m compiler.tools.bench bench/results/*.json: the README table
    import sys

    loaded = []
    for path in sys.argv[1:]:
        with open(path) as fh:
            loaded += [BenchResult(**{**d, "rows": [Row(**row) for row in d["rows"]]}) for d in json.load(fh)]
    print(markdown(loaded))
