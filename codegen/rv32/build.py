"""RISC-V microcontroller code generation: an integer-only model as a self-contained C project.

    integer Relax (codegen/integer_region.py: int8 in, int8 out)
      --fuse (codegen/llvm.fusion, the CPU backend's kernels)--> call_tir sequence
      --kernels.compile_kernels--> kernels.c (or kernels.o from LLVM): raw-pointer C functions
      --program.Program.of--> calls over input / output / flash constants / arena tensors
      --memory_plan.plan--> one arena, every offset fixed at compile time
      --> model.h, model.c, kernels.c|o, main.c, input.S, input.bin, Makefile
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, tirx

from codegen import memory_plan
from codegen.llvm import fusion
from codegen.rv32 import kernels, program, toolchain
from passes.fusion_report import FusionReport
from passes.high_word_rescale import HighWordRescale
from runtime.errors import UserError
from runtime.types import BoundaryTensor


@dataclass
class Rv32Build:
    files: dict[str, bytes]                 # the project, by file name
    calls: list[str]                        # the kernels in call order
    kernel_ops: dict[str, list[str]]
    unfused: int                            # kernel calls before fusion (one per op)
    readers: dict[str, str] = field(default_factory=dict)  # a stored weight's digest -> the kernel reading it
    summary: dict = field(default_factory=dict)     # for the manifest


def parse_bytes(text: str | int) -> int:
    """``64K``, ``1.5M``, ``65536`` -> bytes."""
    if isinstance(text, int):
        return text
    units = {"K": 1024, "M": 1024 * 1024}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise UserError(f"--ram-limit {text!r}: a byte count such as 65536, 64K or 1.5M") from None


def build(mod: tvm.IRModule, inputs: list[BoundaryTensor], outputs: list[BoundaryTensor], *, name: str,
          source: str, isa: toolchain.Isa, codegen: str, ram_limit: int | None = None) -> Rv32Build:
    if len(inputs) != 1 or len(outputs) != 1:
        raise UserError(f"{source}: {len(inputs)} inputs and {len(outputs)} outputs; the rv32 interface "
                        "takes one of each")
    report = FusionReport()
    tgt = tvm.target.Target(isa.tvm_target(codegen))
    mod = HighWordRescale()(mod)
    with tgt:
        fused = fusion(tgt, report, narrow=True)(mod)
        fused = relax.transform.RewriteDataflowReshape()(fused)
    funcs = {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)}
    macs = {n: kernels.macs(f) for n, f in funcs.items()}
    compiled = kernels.compile_kernels(funcs, isa.tvm_target(codegen))
    in_place = {n: kernels.in_place_inputs(f) for n, f in funcs.items()}
    prog = program.Program.of(name, fused["main"], inputs, outputs, compiled.scratch, macs, in_place)
    plan = memory_plan.plan(prog.lifetimes(), prog.inplace)
    if ram_limit is not None and plan.arena > ram_limit:
        big = prog.buffers[plan.largest]
        raise UserError(f"{source}: needs a {plan.arena} B arena (peak of the static plan; lower bound "
                        f"{plan.lower_bound} B) but --ram-limit is {ram_limit} B; the largest tensor is "
                        f"{plan.largest} ({big.nbytes} B {big.dtype}). Use fewer bits, a smaller input, or "
                        "a larger limit")
    (inp,) = inputs
    files = {
        "model.h": program.header(prog, plan, isa.name, source).encode(),
        "model.c": program.model_c(prog, plan).encode(),
        "main.c": program.main_c(prog).encode(),
        "input.S": toolchain.input_asm().encode(),
        # the harness's default input: every element at the zero point (a real-valued zero)
        "input.bin": np.full(inp.shape, inp.zero_point, inp.dtype).tobytes(),
        "Makefile": toolchain.makefile(isa, codegen).encode(),
    }
    if compiled.source is not None:
        files["kernels.c"] = clean_source(compiled.source, {k for k, v in in_place.items() if v}).encode()
    else:
        files["kernels.o"] = compiled.obj
    calls = [c.kernel for c in prog.calls]
    kernel_ops = {k: report.groups.get(k, [k]) for k in sorted(set(calls))}
    summary = {"isa": isa.name, "codegen": codegen, "function": f"lowbit_{prog.name}_run",
               "arena_bytes": plan.arena, "arena_lower_bound": plan.lower_bound, "arena_no_reuse": plan.total,
               "arena_method": plan.method, "in_place": plan.inplace,
               "weight_bytes": prog.weight_bytes(), "macs": prog.macs(),
               "calls": len(prog.calls), "kernel_macs": {k: macs[k] for k in sorted(set(calls))},
               "inputs": [vars(t) for t in inputs], "outputs": [vars(t) for t in outputs]}
    return Rv32Build(files, calls, kernel_ops, report.before, report.readers, summary)


def clean_source(source: str, aliased: set[str] = frozenset()) -> str:
    """TVM's C for raw-pointer kernels, without the TVM runtime includes and the packed-API entry
    stub it appends (tvm-0.27 notes, section 9), and with ``restrict`` pointers: every kernel's
    buffers are disjoint in the memory plan (except the ``aliased`` kernels, which may write over
    an input), and without it each byte store of the output forces GCC to reload the per-channel
    requantize parameters for every output element."""
    import re

    def restrict(m: re.Match) -> str:
        if m.group(1) in aliased:
            return m.group(0)
        return m.group(0).replace("* ", "* restrict ").replace("*)", "* restrict)")

    source = source.split("// CodegenC: NOTE: Auto-generated entry function")[0]
    source = re.sub(r"TVM_DLL void (\w+)\(([^)]*)\)", restrict, source)
    source = re.sub(r'#include "tvm/[^"]+"\n', "", source)
    source = source.replace("void* __tvm_ffi__library_ctx = NULL;\n", "")
    return source.replace("#define TVM_EXPORTS\n", "#include <stdint.h>\n#include <stdbool.h>\n"
                          "#ifndef TVM_DLL\n#define TVM_DLL\n#endif\n")
