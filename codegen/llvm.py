"""LLVM CPU code generation through the Relax VM.

``tvm.compile`` on a CPU target does not fuse by default (its "default" Relax
pipeline only legalizes).  We run TVM's CPU pipeline, which fuses elementwise
chains into their producer's kernel (FuseOps/FuseTIR), with three stages of
ours: ``ReduceEpilogue`` before fusion (a pool's requantize joins its sum),
``CountKernels``/``RecordFusion`` around it (for ``lowbit inspect``), and
``CPUDefault`` schedules after it, since TVM 0.27 leaves CPU kernels as naive
loop nests.  Between fusion and our schedules, ``--tune`` may schedule kernels
from meta_schedule's database (codegen/tune.py).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.s_tir import dlight as dl
from tvm.target.codegen import target_has_features

from codegen import amx
from codegen.cpu_schedule import CPUDefault
from codegen.tile_epilogue import FuseTileEpilogue
from passes.defined_semantics import DefinedSemantics
from passes.fold_offsets import FoldOffsets
from passes.fusion_report import CountKernels, FusionReport, RecordFusion, RecordUnscheduled
from passes.merge_kernels import MergeKernels
from passes.narrow_constants import NarrowConstants
from passes.pool_first import PoolFirst
from passes.reduce_epilogue import ReduceEpilogue
from passes.shape_heap import after_shape_lowering
from runtime.errors import UserError


@dataclass(frozen=True)
class CrossTarget:
    """A Linux board compiled for from this machine: LLVM emits its object code, a Debian cross
    gcc links the shared library that TVM's runtime on the board loads."""
    triple: str
    linker: str             # the cross gcc export_library links with
    crt: str                # its C runtime start files, which -shared links too
    packages: str           # the Debian packages that provide both
    mattr: tuple[str, ...]  # features assumed when no --mcpu names the board's CPU


# NEON dot product (sdot/udot, Armv8.2+: Cortex-A55/A76/A78, Neoverse N1, Raspberry Pi 5, Jetson Orin);
# an older board's CPU (--mcpu cortex-a72) brings its own features instead
CROSS = {"aarch64-linux": CrossTarget("aarch64-linux-gnu", "aarch64-linux-gnu-gcc", "/usr/aarch64-linux-gnu/lib/crti.o",
                                      "gcc-aarch64-linux-gnu libc6-dev-arm64-cross", ("+neon", "+dotprod"))}
TARGETS = ("llvm", *CROSS)
HOST_TRIPLE = "x86_64-pc-linux-gnu"


def host_target() -> dict:
    """The machine we run on, as a TVM target dict with its CPU detected for LLVM."""
    return cpu_target(None)


def cpu_target(cpu: str | None) -> dict:
    """An x86-64 target for LLVM CPU ``cpu`` (its ISA: ``haswell`` AVX2, ``alderlake`` AVX-VNNI,
    ``icelake-server`` AVX-512 VNNI, ``sapphirerapids`` AMX), or this machine's CPU.  A VM may name an
    older CPU than it is (Rocket Lake for a Sapphire Rapids); features its CPUID shows beyond the
    name's are added."""
    if cpu:
        target, extra = {"kind": "llvm", "mcpu": cpu}, []
    else:
        target = {"kind": "llvm", "mcpu": tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()}
        host = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")()
        extra = [f"+{f}" for f in amx.LLVM_FEATURES if bool(host.get(f, False))
                 and not amx.available(tvm.target.Target(target))]
    # the kernels are written for 512-bit vectors (codegen/cpu_schedule.VECTOR_BYTES); LLVM's Intel
    # tuning would split each into two 256-bit halves (the 64-bit integer epilogues ran 1.4x slower)
    if target_has_features("avx512f", tvm.target.Target(target)):
        extra.append("-prefer-256-bit")
    return {**target, "mattr": extra} if extra else target


def target_dict(target: str, cpu: str | None) -> dict:
    """The TVM target for a ``--target`` name and an optional ``--mcpu``."""
    if target not in CROSS:
        return cpu_target(cpu)
    cross = CROSS[target]
    return {"kind": "llvm", "mtriple": cross.triple, **({"mcpu": cpu} if cpu else {"mattr": list(cross.mattr)})}


def valid_cpu(cpu: str, target: str = "llvm") -> bool:
    from tvm.target import codegen

    return codegen.llvm_is_valid_cpu(cpu, CROSS[target].triple if target in CROSS else HOST_TRIPLE)


def cross_of(target: dict) -> CrossTarget | None:
    """The cross target a target dict was made for, or None for this machine."""
    return next((c for c in CROSS.values() if c.triple == target.get("mtriple")), None)



def linker(target: dict):
    """``export_library``'s fcompile for the target: None (TVM's host default) or the cross gcc,
    which must be installed."""
    cross = cross_of(target)
    if cross is None:
        return None
    if shutil.which(cross.linker) is None or not os.path.isfile(cross.crt):
        raise UserError(f"{cross.linker} or {cross.crt} not found: linking for {cross.triple} needs Debian's cross "
                        f"toolchain; apt-get install {cross.packages} (make setup does)")
    from tvm.support import cc

    return cc.cross_compiler(cross.linker)


def fusion(target: tvm.target.Target, report: FusionReport, narrow: bool = False,
           row_contractions: bool = True) -> tvm.transform.Pass:
    """TVM's CPU legalization and fusion (relax.backend.cpu_generic), recorded for ``lowbit inspect``:
    the result's kernels are the unscheduled PrimFuncs that tuning and our schedules work on.
    ``narrow``: int64 constants that fit store as int32 (passes/narrow_constants.py): a 32-bit core's
    ``mulh`` + ``mul``, and on x86 with FoldOffsets a requantize's ``vpmuldq`` instead of ``vpmullq``.
    ``row_contractions``: a GEMM may join the softmax / LayerNorm after it (passes/merge_kernels.py)."""
    legalize = []
    for p in cpu.legalize_passes(target):
        if p.info.name == "FuseOps":
            legalize += [NarrowConstants()] if narrow else []
            legalize += [ReduceEpilogue(), CountKernels(report)]
        legalize.append(p)
        if p.info.name == "FuseOps":
            legalize += [MergeKernels(row_contractions), RecordFusion(report)]
        if p.info.name == "FuseTIR":
            legalize.append(FuseTileEpilogue(report))
    # conversions and shifts made total first, so no backend compiles undefined behaviour; pools
    # moved and offsets folded while the requantizes are still Relax ops
    return tvm.transform.Sequential([DefinedSemantics(), PoolFirst(), FoldOffsets(),
                                     *cpu.library_dispatch_passes(target), *legalize], name="lowbit_fusion")


def lowering(target: tvm.target.Target, report: FusionReport) -> tvm.transform.Pass:
    """Our schedules for every kernel not scheduled yet (dlight skips tuned ones), the kernels left
    unscheduled recorded, then TVM's lowering to the VM."""
    stages = ([dl.ApplyDefaultSchedule(CPUDefault()), RecordUnscheduled(report)] + cpu.dataflow_lower_passes(target)
              + after_shape_lowering(cpu.finalize_passes(target)))
    return tvm.transform.Sequential(stages, name="lowbit_lowering")


def build(mod: tvm.IRModule, target: dict, schedule=None):
    """Fuse, schedule, lower and build.  ``schedule`` (codegen/tune.py) may schedule some fused
    kernels first.  Returns (executable, {kernel: source ops}, FusionReport)."""
    tgt = tvm.target.Target(target)
    report = FusionReport()
    with tgt:
        fused = fusion(tgt, report, narrow=True)(mod)
        if schedule is not None:
            fused = schedule(fused, target)
        lowered = lowering(tgt, report)(fused)
    return tvm.compile(lowered, target=tgt, relax_pipeline=None), kernel_ops(lowered, report), report


def kernel_ops(lowered: tvm.IRModule, report: FusionReport) -> dict[str, list[str]]:
    """Every kernel of the lowered module with the source ops fused into it."""
    names = sorted(gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc))
    return {n: report.groups.get(n, [re.sub(r"\d+$", "", n)]) for n in names}
