"""The CUDA backend: int8 on dp4a for sm_75 and later, built here without a GPU
(codegen/cuda/build.py), run on the GPU machine from the shipped fatbin (codegen/cuda/loader.py)."""

from __future__ import annotations

import tvm

from codegen.backend import Backend, Build, BuildContext
from codegen.cuda import build, dp4a
from passes.contraction import ContractionUnit
from runtime.errors import UserError

ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_ARCH = "sm_80"


def cuda_units() -> tuple[ContractionUnit, ...]:
    """The contraction units for CUDA: int8 convolutions and matmuls on dp4a (codegen/cuda/dp4a.py)."""
    return (dp4a.ConvUnit(), dp4a.MatmulUnit())


class Cuda(Backend):
    name = "cuda"
    activations = "u8"          # dp4a.u32.s32

    def defaults(self):
        return {"arch": DEFAULT_ARCH}

    def validate(self, opts) -> None:
        super().validate(opts)
        arch = opts.target_options["arch"]
        if arch not in ARCHS:
            raise UserError(f"--arch {arch}: choose one of {', '.join(ARCHS)} (dp4a needs sm_61 or "
                            "later; CUDA 13 compiles sm_75 and later)")

    def target(self, opts) -> dict:
        return build.target_dict(opts.target_options["arch"])

    def units(self, target: dict) -> tuple[ContractionUnit, ...]:
        return cuda_units()

    def stage(self, opts) -> str:
        return f"build cuda {opts.target_options['arch']}"

    def build(self, mod: tvm.IRModule, target: dict, ctx: BuildContext) -> Build:
        return build.build(mod, target)

    def summary_lines(self, s: dict) -> list[str]:
        files = ", ".join(f for f in (s["source"], s["ptx"], s["fatbin"]) if f)
        return [f"cuda {s['arch']}: {len(s['dp4a_kernels'])} dp4a kernels, {s['dp4a_launches']} dp4a launches per "
                f"inference, {len(s['row_reduction_kernels'])} row-reduction kernels; {files}"
                + ("" if s["nvcc"] else " (nvcc not found: TVM compiles the source when the library is loaded)")]


BACKEND = Cuda()
