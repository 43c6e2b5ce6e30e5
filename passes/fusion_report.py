"""RecordFusion: which source ops each fused kernel computes, in which order the kernels run,
how many kernels fusion saved, and which kernel reads each large constant (a layer's weights).

Runs between our ``MergeKernels`` (after TVM's ``FuseOps``) and ``FuseTIR``.  At that point every kernel-to-be
is a Relax function marked ``Primitive`` whose body calls the legalized
per-op PrimFuncs; their names (``conv2d``, ``add3``, ``right_shift1``...) are
the source ops, up to TVM's numeric de-duplication suffix.  ``FuseTIR`` then
gives the fused PrimFunc the group function's name, so the record is keyed by
the final kernel name.  The count before fusion is the number of ``call_tir``
in ``main`` before ``FuseOps`` (one kernel per op).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import tvm
from tvm import relax, tirx

from passes.analysis import digest


@dataclass
class FusionReport:
    before: int = 0                                     # kernels without fusion: one per op
    launches: int = 0                                   # kernel calls per inference after fusion
    groups: dict[str, list[str]] = field(default_factory=dict)
    sequence: list[str] = field(default_factory=list)   # the kernels in call order
    readers: dict[str, str] = field(default_factory=dict)   # constant's digest -> the kernel passed it
    unscheduled: list[str] = field(default_factory=list)    # kernels no schedule rule took: naive loops


def _calls(func: relax.Function) -> list[str]:
    names: list[str] = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            names.append(re.sub(r"\d+$", "", e.args[0].name_hint))

    relax.analysis.post_order_visit(func, visit)
    return names


@tvm.transform.module_pass(opt_level=0, name="lowbit.CountKernels")
class CountKernels:
    """Before FuseOps: one kernel per legalized op."""

    def __init__(self, report: FusionReport):
        self.report = report

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.report.before = sum(len(_calls(f)) for _, f in mod.functions_items() if isinstance(f, relax.Function))
        return mod


@tvm.transform.module_pass(opt_level=0, name="lowbit.RecordFusion")
class RecordFusion:
    """After FuseOps: the source ops of each group (a future kernel)."""

    def __init__(self, report: FusionReport):
        self.report = report

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        groups = set()
        for gv, f in mod.functions_items():
            if isinstance(f, relax.Function) and f.attrs is not None and "Primitive" in f.attrs:
                self.report.groups[gv.name_hint] = _calls(f)
                groups.add(gv.name_hint)
        sequence = []

        def visit(e):
            if not isinstance(e, relax.Call):
                return
            if isinstance(e.op, relax.GlobalVar) and e.op.name_hint in groups:
                kernel, args = e.op.name_hint, e.args
            elif isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
                kernel, args = e.args[0].name_hint, e.args[1].fields
            else:
                return
            sequence.append(kernel)
            for a in args:
                if isinstance(a, tvm.ir.GenericConst):
                    self.report.readers[digest(a.value.numpy())] = kernel

        relax.analysis.post_order_visit(mod["main"], visit)
        self.report.sequence = sequence
        self.report.launches = len(sequence)
        return mod


@tvm.transform.module_pass(opt_level=0, name="lowbit.RecordUnscheduled")
class RecordUnscheduled:
    """After the schedules: the kernels no rule (nor tuning) scheduled, which TVM would run as the
    naive loop nests it legalized them to."""

    def __init__(self, report: FusionReport):
        self.report = report

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.report.unscheduled = sorted(
            gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_scheduled", False)))
        return mod
