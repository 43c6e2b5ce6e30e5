"""The targets lowbit compiles for: one line per target, as data.

Each line names, by module, the target's backend (the compile side: codegen/backend.Backend) and
its runner (the run side: runtime/runner.Runner), and carries what the command line shows before
either is imported: a description and the target's own options.  The two halves are looked up by name, not
imported here, because they sit in different layers: loading and running an artifact
(runtime/artifact.py) must not import the compiler, the passes or LLVM code generation, and a
runner module imports nothing from them (tests/test_layers.py checks both, through every module
named here).  A new target is a package under codegen/ plus one line below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """A target's own compile option: ``--name`` on the command line (underscores as dashes),
    ``CompileOptions.target_options[name]`` in Python; its backend validates the value."""
    name: str
    help: str
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Entry:
    backend: str                        # "module:attribute" of its Backend
    runner: str                         # "module:attribute" of its Runner
    help: str                           # what it compiles for, one line
    options: tuple[Option, ...] = ()


MCPU = Option("mcpu", metavar="CPU", help="LLVM CPU to compile for instead of this machine's, e.g. haswell (AVX2), "
              "alderlake (AVX-VNNI), icelake-server (AVX-512 VNNI), sapphirerapids (AMX): its ISA picks the int8 "
              "kernels. With aarch64-linux the board's, e.g. cortex-a72 (default: Armv8.2 with NEON dot product)")

TARGETS: dict[str, Entry] = {
    "llvm": Entry("codegen.cpu:HOST", "runtime.runner:RUNNER", "this machine's CPU (default)", (MCPU,)),
    "aarch64-linux": Entry("codegen.cpu:AARCH64_LINUX", "runtime.runner:RUNNER", "a 64-bit Arm Linux board, "
                           "cross-compiled (run it there with lowbit run --rpc)", (MCPU,)),
    "cuda": Entry("codegen.cuda.backend:BACKEND", "codegen.cuda.loader:RUNNER", "an NVIDIA GPU (int8 on dp4a; "
                  "PTX and cubin from nvcc, no GPU needed to compile)",
                  (Option("arch", "the GPU architecture, sm_75, sm_80 (default), sm_86, sm_89 or sm_90"),)),
    "rv32": Entry("codegen.rv32.backend:BACKEND", "codegen.rv32.qemu:RUNNER", "a RISC-V microcontroller, as a C "
                  "project with a static memory plan (run it under QEMU with lowbit run)",
                  (Option("march", "the ISA, rv32imc (default), rv32imac, rv32gc, or rv32imc+zve32x (RVV, with "
                          "--codegen llvm)"),
                   Option("codegen", "kernels as C compiled by gcc (c, default) or an LLVM object (llvm)"),
                   Option("ram_limit", "fail unless the arena fits, e.g. 64K", metavar="BYTES"))),
    "tosa": Entry("codegen.tosa.backend:BACKEND", "codegen.tosa.runner:RUNNER", "TOSA MLIR for IREE (the integer "
                  "region as model.tosa.mlir, compiled by iree-compile into model.vmfb and run by IREE's runtime)",
                  (Option("iree_target", "the CPU IREE compiles for: host (default) or an LLVM target triple, "
                          "e.g. aarch64-linux-gnu", metavar="TRIPLE"),)),
}


def options() -> dict[str, tuple[Option, list[str]]]:
    """Every target option once, with the targets that take it."""
    out: dict[str, tuple[Option, list[str]]] = {}
    for name, entry in TARGETS.items():
        for o in entry.options:
            out.setdefault(o.name, (o, []))[1].append(name)
    return out


def _resolve(ref: str):
    module, attribute = ref.split(":")
    return getattr(importlib.import_module(module), attribute)


def backend(name: str):
    """The Backend of target ``name`` (a key of TARGETS)."""
    return _resolve(TARGETS[name].backend)


def runner(name: str):
    """The Runner of target ``name`` (a key of TARGETS)."""
    return _resolve(TARGETS[name].runner)
