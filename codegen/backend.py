"""The backend interface: what the target-neutral driver asks of a target.

A backend owns everything that differs between targets:

* the validation of its own compile options (declared on its line of codegen/registry.py:
  CLI flags and ``CompileOptions.target_options`` keys) and of the shared ones;
* the TVM target it compiles for;
* the int8 contraction units it offers the lowering (passes/contraction.py), as data;
* its build: integer Relax -> one ``Build`` (files, executable or none, kernel map, summary);
* how its artifacts run: the runner named beside it in codegen/registry.py.

The driver (compiler/driver.py) calls these in the same order for every target and switches on
nothing; TVM's ``relax/backend/<target>/pipeline.py`` and tinygrad's ``Renderer`` are the models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import tvm

from runtime.errors import UserError
from runtime.types import TensorSpec


@dataclass(frozen=True)
class BuildContext:
    """What a build needs beyond the module: where the model came from and its boundary."""
    name: str                       # the model file's stem (the rv32 C interface's name)
    source: str                     # the model file's name, for messages
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    options: Any                    # compiler/options.CompileOptions
    remote: Any = None              # --tune: runtime/remote.Remote, where kernels are measured


@dataclass
class Build:
    """One backend's build of an integer (or float) Relax module."""
    files: dict[str, bytes]                 # the artifact's files beside the manifest (the library aside)
    kernel_ops: dict[str, list[str]]        # kernel -> the source ops fused into it
    kernels_unfused: int                    # launches without fusion (one per op)
    launch_sequence: list[str]              # the kernels in the order one inference calls them
    executable: Any = None                  # a Relax VM executable, exported as the library; None: files only
    library: str | None = "model.so"        # the Relax VM library; None: the files are the program
    readers: dict[str, str] = field(default_factory=dict)  # a stored weight's digest -> the kernel reading it
    unscheduled: list[str] | None = None    # kernels left as TVM's naive loop nests
    tuning: dict | None = None              # --tune: which kernels meta_schedule scheduled
    summary: dict | None = None             # the backend's own manifest block
    fcompile: Any = None                    # export_library's linker (a cross gcc) or None (the host's)


class Backend:
    """A target.  Subclasses set the fields and override what differs."""

    name: str = ""
    activations: Literal["u8", "s8"] = "u8"     # the activation encoding its int8 dot product wants
    integer_only = False        # it runs integer-only models only (the integer region: int in, int out)
    one_sample: str | None = None   # why its program takes one sample at a time (None: it takes a batch)
    tunes = False               # --tune: meta_schedule can measure its kernels on this machine
    measures_latency = False    # --latency-budget: its kernels can be timed on this machine
    bench_peer: str | None = None   # `lowbit bench --target T` times this engine (a --vs name) running T's
                                    # build beside lowbit's own build for this machine

    def validate(self, opts) -> None:
        """Refuse, in one line, options this target cannot honour (its own and the shared ones)."""
        if opts.tune and not self.tunes:
            raise UserError(f"--tune measures kernels on this machine and cannot for {self.name} yet; "
                            "compile without it (lowbit's own schedules)")
        if opts.latency_budget is not None and not self.measures_latency:
            raise UserError(f"--latency-budget times kernels on this machine, which cannot run {self.name} code; "
                            "plan with --size-budget or --bops-budget")

    def defaults(self) -> Mapping[str, Any]:
        """Its options' values when not given."""
        return {}

    def require(self) -> None:
        """Fail before any work when a toolchain the build needs is missing."""

    def target(self, opts) -> dict:
        raise NotImplementedError

    def units(self, target: dict) -> tuple:
        """The int8 contraction units it offers the lowering, in priority order (passes/contraction.py)."""
        return ()

    def stage(self, opts) -> str:
        """The build stage's name in the progress output."""
        return f"build {self.name}"

    def build(self, mod: tvm.IRModule, target: dict, ctx: BuildContext) -> Build:
        raise NotImplementedError

    def summary_lines(self, summary: dict) -> list[str]:
        """What ``lowbit compile`` and ``lowbit inspect`` print about its manifest block."""
        return []
