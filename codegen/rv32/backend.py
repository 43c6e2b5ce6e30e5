"""The rv32 backend: a RISC-V microcontroller runs the integer region only (int8 in, int8 out),
one sample at a time, as a C project with a static memory plan (codegen/rv32/build.py); runs go
through QEMU (codegen/rv32/qemu.py)."""

from __future__ import annotations

import tvm

from codegen import integer_region
from codegen.backend import Backend, Build, BuildContext
from codegen.rv32 import build, program, toolchain
from runtime.errors import UserError


class Rv32(Backend):
    name = "rv32"
    activations = "u8"          # a scalar core loads either encoding with one instruction; x86's keeps one model
    integer_only = True
    one_sample = "a microcontroller runs one sample at a time"

    def defaults(self):
        return {"march": "rv32imc", "codegen": "c", "ram_limit": None}

    def validate(self, opts) -> None:
        super().validate(opts)
        o = opts.target_options
        isa = toolchain.isa(o["march"])
        if o["codegen"] not in toolchain.CODEGENS:
            raise UserError(f"--codegen {o['codegen']}: choose one of {', '.join(toolchain.CODEGENS)}")
        if isa.vector and o["codegen"] != "llvm":
            raise UserError(f"--march {o['march']}: GCC 12 does not vectorize for RVV; add --codegen llvm")
        if o["ram_limit"] is not None:
            build.parse_bytes(o["ram_limit"])

    def require(self) -> None:
        toolchain.require()

    def target(self, opts) -> dict:
        return {"kind": "rv32", "march": opts.target_options["march"], "codegen": opts.target_options["codegen"]}

    def stage(self, opts) -> str:
        return f"build {opts.target_options['march']} C project"

    def build(self, mod: tvm.IRModule, target: dict, ctx: BuildContext) -> Build:
        """The C interface takes one sample; the manifest keeps the model's declared inputs (a
        symbolic batch), since ``run`` takes a batch and runs it sample by sample."""
        o = ctx.options.target_options
        try:
            region, ins, outs = integer_region.extract(mod, [s.name for s in ctx.inputs], [s.name for s in ctx.outputs])
            b = build.build(region, ins, outs, name=ctx.name, source=ctx.source, isa=toolchain.isa(o["march"]),
                            codegen=o["codegen"],
                            ram_limit=None if o["ram_limit"] is None else build.parse_bytes(o["ram_limit"]))
        except (integer_region.RegionError, program.ProgramError) as exc:
            raise UserError(f"{ctx.source}: {exc}; the rv32 target cannot compile this model yet") from None
        return Build(files=b.files, kernel_ops=b.kernel_ops, kernels_unfused=b.unfused, launch_sequence=b.calls,
                     library=None, readers=b.readers, summary=b.summary)

    def summary_lines(self, s: dict) -> list[str]:
        return [f"rv32       {s['function']} for {s['isa']} ({s['codegen']} kernels): arena {s['arena_bytes']} B "
                f"({s['arena_method']}; lower bound {s['arena_lower_bound']} B, no reuse {s['arena_no_reuse']} B), "
                f"flash weights {s['weight_bytes']} B, {s['macs']} MACs, {s['calls']} kernel calls"]


BACKEND = Rv32()
