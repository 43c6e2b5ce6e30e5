"""Compile options, shared by the CLI and the Python API."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codegen import registry
from codegen.backend import Backend
from compiler.planning.bitplan import Budget
from compiler.planning.sensitivity import METHODS
from compiler.quantize import FIDELITY, QuantConfig, Rounding, check_nonlinear
from runtime.errors import UserError


@dataclass(frozen=True)
class CompileOptions:
    target: str = "llvm"                    # a target of codegen/registry.py
    # the target's own options, by the names its backend declares (codegen/backend.Option: --mcpu,
    # --arch, --march, ...); those not given take the backend's defaults
    target_options: Mapping[str, Any] = field(default_factory=dict)
    tune: int = 0                           # meta_schedule trials over the kernels (0: lowbit's own schedules)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calib: str | os.PathLike | Mapping[str, np.ndarray] | None = None    # FP32 models: quantize on this data
    weight_bits: int | str | None = None    # with calib: 8 (default), 4, 2, or "mixed" (a bit plan by ILP)
    # with "mixed": a bare number <= 1 is HAWQ's fraction between the cheapest plan and all-8, else absolute
    # (bytes, BOPs, ms); a unit suffix ("0.8ms") makes it absolute (compiler/planning/bitplan.Budget.parse)
    size_budget: float | str | None = None
    bops_budget: float | str | None = None
    latency_budget: float | str | None = None   # kernel time measured on the target (compiler/planning/latency.py)
    pin: bool = True                        # below 8 bits, the first and last weighted layers stay at 8
    sensitivity: str = "perturb"            # with "mixed": perturb (output KL) or hessian (Hutchinson trace)
    observer: str = "auto"                  # with calib: auto (minmax where a matmul reads, else mse), minmax, ...
    nonlinear: str = "auto"                 # softmax / GELU: shift (I-ViT), poly (I-BERT), auto (per layer)
    residual_bits: int = 16                 # with calib: a transformer's residual stream in 16 or 8 bits
    softmax_bits: int = 8                   # with calib: softmax outputs (attention probabilities) in 8 or 16 bits
    activation_bits: int = 8                # with calib: 4 puts each layer's ReLU output on the u4 grid
    fidelity: float | None = FIDELITY       # with calib: 16-bit activations where 8 miss this cosine; None: off
    rounding: Rounding = "optq"             # with calib: weights rounded by OPTQ, or to nearest
    integer_only: bool = False              # an op with no integer form is an error, not a float island

    def __post_init__(self):
        if self.target not in registry.TARGETS:
            raise UserError(f"unknown target {self.target!r}; choose one of: {', '.join(registry.TARGETS)}")
        backend = self.backend
        known = registry.options()
        for name, value in self.target_options.items():
            if value is None:
                continue
            if name not in known:
                raise UserError(f"target option {name!r}: no target has it; they are {', '.join(known)}")
            option, targets = known[name]
            if self.target not in targets:
                raise UserError(f"{option.flag} is for --target {' or '.join(targets)}")
        given = {k: v for k, v in self.target_options.items() if v is not None}
        object.__setattr__(self, "target_options", {**backend.defaults(), **given})
        backend.validate(self)
        if self.tune < 0:
            raise UserError(f"--tune {self.tune}: the number of candidates to measure per kernel, >= 1")
        check_nonlinear(self.nonlinear)        # also for quantized models: it picks their softmax / GELU
        budgets = self.budgets()
        if self.weight_bits == "mixed" and not budgets:
            raise UserError("--bits mixed needs a budget: --size-budget, --bops-budget and/or --latency-budget F "
                            "(F <= 1: a fraction from the cheapest plan to all-8-bit; F > 1: absolute)")
        if self.sensitivity not in METHODS:
            raise UserError(f"--sensitivity {self.sensitivity}: choose one of {', '.join(METHODS)}")
        if self.sensitivity != "perturb" and self.weight_bits != "mixed":
            raise UserError("--sensitivity chooses how --bits mixed ranks the layers; add --bits mixed and a budget")
        if budgets and self.weight_bits != "mixed":
            raise UserError("--size-budget, --bops-budget and --latency-budget choose a mixed-precision plan; "
                            "add --bits mixed")
        if self.calib is None and (self.weight_bits is not None or self.observer != "auto"
                                   or self.residual_bits != 16 or self.softmax_bits != 8
                                   or self.activation_bits != 8 or self.fidelity != FIDELITY
                                   or self.rounding != "optq"):
            raise UserError("--bits, --act-bits, --observer, --residual-bits, --softmax-bits, --fidelity and "
                            "--rounding choose how an FP32 model is quantized; add --calib DATA.npz")

    @property
    def backend(self) -> Backend:
        return registry.backend(self.target)

    def budgets(self) -> list:
        return [Budget.parse(metric, v) for metric, v in (("size", self.size_budget), ("bops", self.bops_budget),
                                                          ("latency", self.latency_budget)) if v is not None]

    def quant_config(self, layer_bits=None):
        """``layer_bits``: the bit plan of ``--bits mixed`` (node name -> bits)."""
        uniform = 8 if self.weight_bits in (None, "mixed") else int(self.weight_bits)
        return QuantConfig(activations=self.backend.activations, weight_bits=uniform, pin_ends=self.pin,
                           layer_bits=dict(layer_bits or {}),
                           observer=self.observer, nonlinear=self.nonlinear, residual_bits=self.residual_bits,
                           softmax_bits=self.softmax_bits, activation_bits=self.activation_bits,
                           fidelity=self.fidelity, rounding=self.rounding)


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
