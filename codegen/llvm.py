"""LLVM CPU code generation through the Relax VM.

``tvm.compile`` on a CPU target does not fuse by default (its "default" Relax
pipeline only legalizes).  We run TVM's CPU pipeline, which fuses elementwise
chains into their producer's kernel (FuseOps/FuseTIR), with one stage added
after fusion: ``CPUDefault`` schedules, since TVM 0.27 leaves CPU kernels
as naive loop nests.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.s_tir import dlight as dl

from codegen.cpu_schedule import CPUDefault


def host_target() -> dict:
    """The machine we run on, as a TVM target dict with its CPU detected for LLVM."""
    mcpu = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
    return {"kind": "llvm", "mcpu": mcpu}


def pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CPU pipeline (relax.backend.cpu_generic) with our schedules after fusion."""
    stages = (cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
              + [dl.ApplyDefaultSchedule(CPUDefault())]
              + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
    return tvm.transform.Sequential(stages, name="lowbit_llvm")


def build(mod: tvm.IRModule, target: dict):
    """Fuse, schedule, lower and build.  Returns (executable, kernel names)."""
    tgt = tvm.target.Target(target)
    with tgt:
        lowered = pipeline(tgt)(mod)
    kernels = sorted(gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc))
    return tvm.compile(lowered, target=tgt, relax_pipeline=None), kernels
