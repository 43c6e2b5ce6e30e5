"""``make bench-gpu``: lowbit INT8 on CUDA against lowbit FP32, TVM FP16 and ORT's CUDA provider.

For each model and batch, on this machine's GPU: lowbit's integer-only INT8 build and its FP32
build (both ``--target cuda``), stock TVM on the FP32 model and on it cast to FP16 (ToMixedPrecision, TVM's
default CUDA pipeline: dlight's tensor-core matmuls), and ONNX Runtime's CUDAExecutionProvider
where onnxruntime-gpu is installed.  Runners are timed interleaved in one process
(compiler/tools/bench.py: medians and p10/p90 over rounds); every call copies its input to the GPU and
its output back, for all runners alike.  The reference for the ratios and fidelity is lowbit FP32.

    python -m compiler.tools.bench_gpu deit_tiny resnet18 --batch 1,8 --out bench/results/gpu
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np

import compiler
from codegen.cuda.backend import ARCHS
from codegen.cuda.loader import gpu_present
from compiler.options import CompileOptions
from compiler.tools import bench
from models import zoo
from runtime.errors import UserError


def gpu_arch() -> str:
    """The lent GPU's architecture as an ``--arch`` (the newest lowbit knows at or below it)."""
    import tvm

    if not gpu_present():
        raise UserError("make bench-gpu: this machine has no CUDA GPU (tvm.cuda() does not exist); run it on a "
                        "GPU machine: nothing was measured")
    major, minor = tvm.cuda().compute_version.split(".")
    have = int(major) * 10 + int(minor)
    known = [a for a in ARCHS if int(a.removeprefix("sm_")) <= have]
    if not known:
        raise UserError(f"GPU compute capability {major}.{minor}: lowbit's CUDA target needs sm_75 or later")
    return known[-1]


def stock_tvm(onnx_path: Path, shapes: dict, arch: str, fp16: bool):
    """Stock TVM's default CUDA pipeline (dlight's matmul rules, tensor cores for FP16) on the FP32
    model, or on it cast to FP16."""
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(onnx.load(onnx_path), shape_dict=shapes, keep_params_in_input=False)
    if fp16:
        mod = relax.transform.ToMixedPrecision(out_dtype="float16")(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "cuda", "arch": arch})),
                              tvm.cuda())
    name = next(iter(shapes))

    def run(feeds):
        out = vm["main"](tvm.runtime.tensor(feeds[name], tvm.cuda()))
        return {"output": (out[0] if not hasattr(out, "numpy") else out).numpy().astype(np.float32)}
    return run


def ort_cuda(onnx_path: Path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    sess = ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])
    return lambda feeds: dict(zip([o.name for o in sess.get_outputs()], sess.run(None, dict(feeds)), strict=True))


def measure(name: str, batch: int, arch: str, seconds: float) -> bench.BenchResult:
    import tvm

    files = zoo.ensure(name)
    shapes = {zoo.INPUT: (batch, *zoo.get(name).sample_shape)}
    calib = files.calibration()
    int8 = compiler.compile(files.onnx, options=CompileOptions(target="cuda", target_options={"arch": arch}, calib=calib,
                                                               input_shapes=shapes))
    fp32 = compiler.compile(files.onnx, options=CompileOptions(target="cuda", target_options={"arch": arch}, input_shapes=shapes))
    # lowbit's FP32 build runs float matmuls on its fallback schedule (its GPU rules are for integer
    # kernels), so stock TVM FP32 is timed too: the fair FP32 bar
    runners = {"lowbit-int8": int8.run, "lowbit-fp32": fp32.run,
               "tvm-fp32": stock_tvm(files.onnx, shapes, arch, fp16=False),
               "tvm-fp16": stock_tvm(files.onnx, shapes, arch, fp16=True)}
    if (ort := ort_cuda(files.onnx)) is not None:
        runners["ort-cuda-fp32"] = ort
    samples = [{zoo.INPUT: s[None]} for s in zoo.get(name).samples(16, seed=3)]
    inputs = bench.batches(samples, batch, 4, int8.manifest.inputs, name)
    return bench.compare(name, runners, inputs[0], inputs, threads=1, budget_s=seconds, reference="lowbit-fp32",
                         batch=batch, where=f"{tvm.cuda().device_name} ({arch})")


def _cell(by: dict, key: str) -> str:
    row = by.get(key)
    return "-" if row is None else f"{row.median_ms:.3g} ({row.p10_ms:.3g}-{row.p90_ms:.3g})"


def _speedup(by: dict, low: bench.Row, key: str) -> str:
    return f"{by[key].median_ms / low.median_ms:.2f}x" if key in by else "-"


def markdown(results: list[bench.BenchResult]) -> str:
    cols = ["model", "batch", "GPU", "lowbit INT8 ms", "lowbit FP32 ms", "TVM FP32 ms", "TVM FP16 ms",
            "ORT CUDA FP32 ms", "lowbit FP32 / INT8", "TVM FP32 / INT8", "TVM FP16 / INT8", "INT8 cosine vs FP32"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        by = {row.name: row for row in r.rows}
        low = by["lowbit-int8"]
        cell = partial(_cell, by)
        speedup = partial(_speedup, by, low)

        lines.append("| " + " | ".join([r.model, str(r.batch), r.where, cell("lowbit-int8"), cell("lowbit-fp32"),
                                        cell("tvm-fp32"), cell("tvm-fp16"), cell("ort-cuda-fp32"),
                                        speedup("lowbit-fp32"), speedup("tvm-fp32"), speedup("tvm-fp16"),
                                        f"{low.cosine:.4f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compiler.tools.bench_gpu", description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--out", type=Path, required=True, help="directory for <model>.json and table.md")
    args = p.parse_args(argv)
    try:
        arch = gpu_arch()
        results = [measure(m, int(b), arch, args.seconds) for m in args.models for b in args.batch.split(",")]
    except UserError as exc:
        print(f"lowbit: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for m in args.models:
        (args.out / f"{m}.json").write_text(bench.results_json([r for r in results if r.model == m]))
    for r in results:
        print(r.table())
    table = markdown(results)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
