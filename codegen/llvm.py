"""LLVM CPU code generation through the Relax VM.

``tvm.compile`` on a CPU target does not fuse by default (its "default" Relax
pipeline only legalizes).  We run TVM's CPU pipeline, which fuses elementwise
chains into their producer's kernel (FuseOps/FuseTIR), with three stages of
ours: ``ReduceEpilogue`` before fusion (a pool's requantize joins its sum),
``CountKernels``/``RecordFusion`` around it (for ``lowbit inspect``), and
``CPUDefault`` schedules after it, since TVM 0.27 leaves CPU kernels as naive
loop nests.
"""

from __future__ import annotations

import re

import tvm
from tvm import tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.s_tir import dlight as dl

from codegen import vnni
from codegen.cpu_schedule import CPUDefault
from passes.fusion_report import CountKernels, FusionReport, RecordFusion
from passes.merge_kernels import MergeKernels
from passes.reduce_epilogue import ReduceEpilogue


def host_target() -> dict:
    """The machine we run on, as a TVM target dict with its CPU detected for LLVM."""
    return cpu_target(None)


def cpu_target(cpu: str | None) -> dict:
    """An x86-64 target for LLVM CPU ``cpu`` (its ISA: ``haswell`` AVX2, ``alderlake`` AVX-VNNI,
    ``icelake-server`` AVX-512 VNNI), or this machine's CPU."""
    return {"kind": "llvm", "mcpu": cpu or tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()}


def valid_cpu(cpu: str) -> bool:
    from tvm.target import codegen

    return codegen.llvm_is_valid_cpu(cpu, "x86_64-pc-linux-gnu")


def vnni_isa(target: dict) -> str | None:
    """The target's VNNI flavour (codegen/vnni.py), or None."""
    return vnni.isa(tvm.target.Target(target))


def pipeline(target: tvm.target.Target, report: FusionReport) -> tvm.transform.Pass:
    """TVM's CPU pipeline (relax.backend.cpu_generic) with our schedules after fusion,
    and the fusion recorded for ``lowbit inspect``."""
    legalize = []
    for p in cpu.legalize_passes(target):
        if p.info.name == "FuseOps":
            legalize += [ReduceEpilogue(), CountKernels(report)]
        legalize.append(p)
        if p.info.name == "FuseOps":
            legalize += [MergeKernels(), RecordFusion(report)]
    stages = (cpu.library_dispatch_passes(target) + legalize + [dl.ApplyDefaultSchedule(CPUDefault())]
              + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
    return tvm.transform.Sequential(stages, name="lowbit_llvm")


def build(mod: tvm.IRModule, target: dict):
    """Fuse, schedule, lower and build.  Returns (executable, {kernel: source ops}, FusionReport)."""
    tgt = tvm.target.Target(target)
    report = FusionReport()
    with tgt:
        lowered = pipeline(tgt, report)(mod)
    names = sorted(gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc))
    kernels = {n: report.groups.get(n, [re.sub(r"\d+$", "", n)]) for n in names}
    return tvm.compile(lowered, target=tgt, relax_pipeline=None), kernels, report
