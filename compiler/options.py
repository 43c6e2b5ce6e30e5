"""Compile options, shared by the CLI and the Python API."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from compiler.errors import UserError

# activation encoding each target's int8 dot product wants: x86 VNNI (vpdpbusd) multiplies u8 x s8;
# on aarch64 LLVM widens either encoding into smlal (no sdot tensorization yet), and a scalar rv32 core
# loads either with one instruction, so both keep x86's: one calibration gives the same integer model
# (and bit-identical outputs) on every target
ACTIVATIONS = {"llvm": "u8", "aarch64-linux": "u8", "rv32": "u8", "cuda": "u8"}     # dp4a.u32.s32 on CUDA


@dataclass(frozen=True)
class CompileOptions:
    target: str = "llvm"
    cpu: str | None = None                  # LLVM CPU to compile for (default this machine's): its ISA picks kernels
    tune: int = 0                           # meta_schedule trials over the kernels (0: lowbit's own schedules)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calib: str | os.PathLike | Mapping[str, np.ndarray] | None = None    # FP32 models: quantize on this data
    weight_bits: int | str | None = None    # with calib: 8 (default), 4, 2, or "mixed" (a bit plan by ILP)
    # with "mixed": a bare number <= 1 is HAWQ's fraction between the cheapest plan and all-8, else absolute
    # (bytes, BOPs, ms); a unit suffix ("0.8ms") makes it absolute (compiler/bitplan.Budget.parse)
    size_budget: float | str | None = None
    bops_budget: float | str | None = None
    latency_budget: float | str | None = None   # kernel time measured on the target (runtime/latency.py)
    pin: bool = True                        # below 8 bits, the first and last weighted layers stay at 8
    sensitivity: str = "perturb"            # with "mixed": perturb (output KL) or hessian (Hutchinson trace)
    observer: str = "minmax"                # with calib: minmax, percentile or mse
    nonlinear: str = "auto"                 # softmax / GELU: shift (I-ViT), poly (I-BERT), auto (per layer)
    residual_bits: int = 16                 # with calib: a transformer's residual stream in 16 or 8 bits
    softmax_bits: int = 8                   # with calib: softmax outputs (attention probabilities) in 8 or 16 bits
    activation_bits: int = 8                # with calib: 4 puts each layer's ReLU output on the u4 grid
    march: str = "rv32imc"                  # rv32: the ISA (codegen/rv32/toolchain.ISAS)
    codegen: str = "c"                      # rv32: kernels as C (gcc) or an LLVM object
    ram_limit: int | None = None            # rv32: bytes of RAM the arena must fit in
    arch: str | None = None                 # cuda: the GPU architecture (default codegen/cuda.DEFAULT_ARCH)

    def __post_init__(self):
        from codegen import cuda
        from codegen.llvm import TARGETS, valid_cpu
        from codegen.rv32 import toolchain

        if self.target not in (*TARGETS, "rv32", "cuda"):
            raise UserError(f"unknown target {self.target!r}; choose one of: {', '.join((*TARGETS, 'rv32', 'cuda'))}")
        if self.target == "cuda":
            if self.arch is None:
                object.__setattr__(self, "arch", cuda.DEFAULT_ARCH)
            if self.arch not in cuda.ARCHS:
                raise UserError(f"--arch {self.arch}: choose one of {', '.join(cuda.ARCHS)} (dp4a needs sm_61 or "
                                "later; CUDA 13 compiles sm_75 and later)")
            if self.cpu is not None:
                raise UserError("--mcpu picks an LLVM CPU for llvm and aarch64-linux; for cuda use --arch")
            if self.latency_budget is not None:
                raise UserError("--latency-budget times kernels on this machine's CPU, not the GPU; plan with "
                                "--size-budget or --bops-budget")
        elif self.arch is not None:
            raise UserError("--arch is for --target cuda")
        if self.target == "rv32":
            isa = toolchain.isa(self.march)
            if self.codegen not in toolchain.CODEGENS:
                raise UserError(f"--codegen {self.codegen}: choose one of {', '.join(toolchain.CODEGENS)}")
            if isa.vector and self.codegen != "llvm":
                raise UserError(f"--march {self.march}: GCC 12 does not vectorize for RVV; add --codegen llvm")
            if self.cpu is not None:
                raise UserError("--mcpu picks an LLVM CPU for llvm and aarch64-linux; for rv32 use --march")
            if self.latency_budget is not None:
                raise UserError("--latency-budget times kernels on this machine, which cannot run rv32 code; "
                                "plan with --size-budget or --bops-budget")
        elif (self.march, self.codegen, self.ram_limit) != ("rv32imc", "c", None):
            raise UserError("--march, --codegen and --ram-limit are for --target rv32")
        if self.cpu is not None and not valid_cpu(self.cpu, self.target):
            examples = ("cortex-a76 (dot product), cortex-a72 (none), neoverse-n1" if self.target == "aarch64-linux"
                        else "haswell (AVX2), alderlake (AVX-VNNI), icelake-server (AVX-512 VNNI), znver5")
            raise UserError(f"--mcpu {self.cpu}: not a CPU LLVM knows for {self.target}; e.g. {examples}, "
                            "or omit it")
        if self.tune < 0:
            raise UserError(f"--tune {self.tune}: the number of candidates to measure per kernel, >= 1")
        if self.tune and self.target != "llvm":
            raise UserError(f"--tune measures kernels on this machine and cannot for {self.target} yet; "
                            "compile without it (lowbit's own schedules)")
        from compiler.quantize import check_nonlinear

        check_nonlinear(self.nonlinear)        # also for quantized models: it picks their softmax / GELU
        budgets = self.budgets()
        if self.weight_bits == "mixed" and not budgets:
            raise UserError("--bits mixed needs a budget: --size-budget, --bops-budget and/or --latency-budget F "
                            "(F <= 1: a fraction from the cheapest plan to all-8-bit; F > 1: absolute)")
        from compiler.sensitivity import METHODS

        if self.sensitivity not in METHODS:
            raise UserError(f"--sensitivity {self.sensitivity}: choose one of {', '.join(METHODS)}")
        if self.sensitivity != "perturb" and self.weight_bits != "mixed":
            raise UserError("--sensitivity chooses how --bits mixed ranks the layers; add --bits mixed and a budget")
        if budgets and self.weight_bits != "mixed":
            raise UserError("--size-budget, --bops-budget and --latency-budget choose a mixed-precision plan; "
                            "add --bits mixed")
        if self.calib is None and (self.weight_bits is not None or self.observer != "minmax"
                                   or self.residual_bits != 16 or self.softmax_bits != 8
                                   or self.activation_bits != 8):
            raise UserError("--bits, --act-bits, --observer, --residual-bits and --softmax-bits choose how an FP32 "
                            "model is quantized; add --calib DATA.npz")

    def budgets(self) -> list:
        from compiler.bitplan import Budget

        return [Budget.parse(metric, v) for metric, v in (("size", self.size_budget), ("bops", self.bops_budget),
                                                          ("latency", self.latency_budget)) if v is not None]

    def quant_config(self, layer_bits=None):
        """``layer_bits``: the bit plan of ``--bits mixed`` (node name -> bits)."""
        from compiler.quantize import QuantConfig

        uniform = 8 if self.weight_bits in (None, "mixed") else int(self.weight_bits)
        return QuantConfig(activations=ACTIVATIONS[self.target], weight_bits=uniform, pin_ends=self.pin,
                           layer_bits=dict(layer_bits or {}),
                           observer=self.observer, nonlinear=self.nonlinear, residual_bits=self.residual_bits,
                           softmax_bits=self.softmax_bits, activation_bits=self.activation_bits)


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``name=1,3,224,224`` -> ("name", (1, 3, 224, 224))."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise UserError(f"--input-shape {text!r}: expected NAME=D1,D2,... with positive integers, e.g. input=1,3,224,224")
    return name, shape
