"""The CPU backends: this machine's x86-64 (VNNI / AMX where it has them) and 64-bit Arm Linux
boards, cross-compiled.  LLVM code generation through the Relax VM (codegen/llvm.py), with
meta_schedule where ``--tune`` asks (codegen/tune.py)."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial

import tvm

from codegen import amx, depthwise, llvm, tune, vnni
from codegen.backend import Backend, Build, BuildContext
from passes.contraction import ContractionUnit
from runtime.errors import UserError


def cpu_units(target: dict) -> tuple[ContractionUnit, ...]:
    """The contraction units (passes/contraction.py) for an LLVM CPU target, in order of preference:
    AMX's tiles first where it has AMX-INT8, then VNNI's (avx512_vnni or avx_vnni), which still run
    what the tiles do not fit (a 16-channel conv, a matmul over fewer tokens than a tile block,
    attention's runtime operands); none on other CPUs (AVX2, Arm), whose int8 products the
    generic kernels and schedules cover."""
    t = tvm.target.Target(target)
    if vnni.isa(t) is None:
        return ()
    units = (vnni.MatmulUnit(), vnni.ConvUnit(), vnni.ActivationMatmulUnit())
    if amx.available(t):
        # the depthwise unit keeps the tiles' NHWC between them (it fits channels-last inputs only)
        units = (amx.ConvUnit(), amx.TokenMatmulUnit(), depthwise.DepthwiseUnit(), *units)
    return units


class CPU(Backend):
    def __init__(self, name: str, examples: str):
        self.name = name
        self.examples = examples            # CPUs to suggest when --mcpu names none LLVM knows
        self.cross = llvm.CROSS.get(name)   # None: this machine
        self.tunes = self.cross is None
        self.measures_latency = self.cross is None

    def validate(self, opts) -> None:
        super().validate(opts)
        cpu = opts.target_options.get("mcpu")
        if cpu is not None and not llvm.valid_cpu(cpu, self.name):
            raise UserError(f"--mcpu {cpu}: not a CPU LLVM knows for {self.name}; e.g. {self.examples}, or omit it")

    def require(self) -> None:
        llvm.linker({"mtriple": self.cross.triple} if self.cross else {})

    def target(self, opts) -> dict:
        return llvm.target_dict(self.name, opts.target_options.get("mcpu"))

    def units(self, target: dict) -> tuple[ContractionUnit, ...]:
        return cpu_units(target)

    def stage(self, opts) -> str:
        return "tune + build llvm" if opts.tune else "build llvm"

    def build(self, mod: tvm.IRModule, target: dict, ctx: BuildContext) -> Build:
        tuning = tune.TuneReport(ctx.options.tune) if ctx.options.tune else None
        # --tune: meta_schedule's kernels, where they beat ours, between fusion and our schedules
        schedule = partial(tune.schedule, trials=ctx.options.tune, remote=ctx.remote,
                           report=tuning) if tuning else None
        executable, kernel_ops, fusion = llvm.build(mod, target, schedule=schedule)
        return Build(files={}, kernel_ops=kernel_ops, kernels_unfused=fusion.before, launch_sequence=fusion.sequence,
                     executable=executable, readers=fusion.readers, unscheduled=fusion.unscheduled,
                     tuning=asdict(tuning) if tuning else None, fcompile=llvm.linker(target))


HOST = CPU("llvm", "haswell (AVX2), alderlake (AVX-VNNI), icelake-server (AVX-512 VNNI), znver5")
AARCH64_LINUX = CPU("aarch64-linux", "cortex-a76 (dot product), cortex-a72 (none), neoverse-n1")
