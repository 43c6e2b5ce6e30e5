"""LLVM CPU code generation through the Relax VM.

``tvm.compile`` on a CPU target does not fuse by default (its "default" Relax
pipeline only legalizes); ``relax.get_default_pipeline(target)`` runs
FuseOps/FuseTIR first, so elementwise chains land in their producer's kernel.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx


def host_target() -> dict:
    """The machine we run on, as a TVM target dict with its CPU detected for LLVM."""
    mcpu = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
    return {"kind": "llvm", "mcpu": mcpu}


def build(mod: tvm.IRModule, target: dict):
    """Lower with the fusing pipeline, then build.  Returns (executable, kernel names)."""
    tgt = tvm.target.Target(target)
    with tgt:
        lowered = relax.get_default_pipeline(tgt)(mod)
    kernels = sorted(gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc))
    return tvm.compile(lowered, target=tgt, relax_pipeline=None), kernels
