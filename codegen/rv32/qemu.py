"""Running and profiling an rv32 artifact under QEMU.

The artifact directory is the generated C project (codegen/rv32).  ``RUNNER`` is the run side of
the rv32 backend (codegen/registry.py).  A run quantizes the input on
the host with the header's parameters, links an ELF around it (the project's Makefile; objects
are built once per directory and reused), runs ``qemu-system-riscv32`` with a timeout, and
decodes the bytes the harness prints.  ``profile`` builds with ``-DLOWBIT_PROFILE``: ``minstret``
around every kernel call, exact under ``-icount shift=0``, and the stack's high-water mark.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codegen.rv32 import toolchain
from runtime.errors import UserError
from runtime.runner import Runner
from runtime.types import BoundaryTensor

TIMEOUT_S = 120                 # per run of the harness, plus PER_INPUT_S for each input it processes
PER_INPUT_S = 2


@dataclass(frozen=True)
class KernelProfile:
    index: int
    kernel: str
    instructions: int
    macs: int


@dataclass(frozen=True)
class Profile:
    calls: list[KernelProfile]
    stack_bytes: int
    text_bytes: int             # the model's code: kernels and the call sequence
    elf_text_bytes: int         # all code of the harness ELF (with picolibc's printf and start-up)
    weight_bytes: int           # the model's constants (flash)
    arena_bytes: int

    @property
    def instructions(self) -> int:
        return sum(c.instructions for c in self.calls)

    @property
    def macs(self) -> int:
        return sum(c.macs for c in self.calls)



def _run(cmd: list[str], limit: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` that kills the command's whole process group when it times out (or
    this process is interrupted): make's compilers, not only make, and nothing left running."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=limit)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _make(directory: Path, *args: str) -> None:
    toolchain.require()
    limit = TIMEOUT_S * 5
    try:
        r = _run(["make", "-s", "-C", str(directory), *args], limit)
    except subprocess.TimeoutExpired:
        raise UserError(f"{directory}: building the ELF did not finish within {limit} s; run make -C {directory} "
                        "to see where it stops") from None
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-3:]
        raise UserError(f"{directory}: building the ELF failed: {' | '.join(last)}")


def _qemu(mcu: dict, elf: Path, inputs: int) -> str:
    cmd = toolchain.qemu_command(toolchain.isa(mcu["isa"]), str(elf))
    limit = TIMEOUT_S + PER_INPUT_S * inputs
    try:
        r = _run(cmd, limit)
    except subprocess.TimeoutExpired:
        raise UserError(f"{elf}: QEMU did not finish within {limit} s (a hang in the model code?); "
                        "rerun with make -C OUTDIR run to watch it") from None
    if r.returncode != 0:
        raise UserError(f"{elf}: the model returned {r.returncode} under QEMU "
                        f"({(r.stdout + r.stderr).strip().splitlines()[-1:] or 'no output'})")
    return r.stdout


def run_int(directory: Path, mcu: dict, q: np.ndarray, *, profile: bool = False) -> tuple[np.ndarray, str]:
    """The integer outputs for integer inputs ``q`` (any number of the model's input, stacked on a
    leading axis; one QEMU run for all of them), and the harness's full stdout."""
    inp, out = BoundaryTensor.from_dict(mcu["inputs"][0]), BoundaryTensor.from_dict(mcu["outputs"][0])
    count = q.size // int(np.prod(inp.shape))
    with tempfile.TemporaryDirectory(prefix="lowbit-qemu-") as tmp:
        path, elf = Path(tmp) / "input.bin", Path(tmp) / "model.elf"
        path.write_bytes(np.ascontiguousarray(q).tobytes())
        _make(directory, f"ELF={elf}", f"INPUT={path}", *(["PROFILE=1"] if profile else []))
        stdout = _qemu(mcu, elf, count)
    lines = [ln.split()[1] for ln in stdout.splitlines() if ln.startswith("LOWBIT_OUTPUT ")]
    if len(lines) != count:
        raise UserError(f"{directory}: the harness printed {len(lines)} outputs for {count} inputs")
    return np.stack([np.frombuffer(bytes.fromhex(h), out.dtype).reshape(out.shape) for h in lines]), stdout


def run(directory: Path, mcu: dict, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float in, float out, as the CPU backend: the host quantizes and dequantizes.  A batch runs
    sample by sample (the C interface takes one), all in one QEMU run."""
    (inp,), (out,) = (BoundaryTensor.from_dict(d) for d in mcu["inputs"]), (BoundaryTensor.from_dict(d) for d in mcu["outputs"])
    x = np.asarray(feeds[inp.name])
    if x.ndim != len(inp.shape) or tuple(x.shape[1:]) != inp.shape[1:]:
        raise UserError(f"input {inp.name!r}: shape {x.shape}, the model takes {inp.shape} (any batch)")
    q, _ = run_int(directory, mcu, inp.quantize(x))
    y = q.reshape((-1, *out.shape[1:])) if len(out.shape) > 1 else q.reshape(-1)
    return {out.name: out.dequantize(y)}


def profile(directory: Path, mcu: dict, macs: dict[str, int]) -> Profile:
    inp = BoundaryTensor.from_dict(mcu["inputs"][0])
    zero = np.full(inp.shape, inp.zero_point, inp.dtype)
    _, stdout = run_int(directory, mcu, zero, profile=True)
    calls, stack = [], 0
    for ln in stdout.splitlines():
        parts = ln.split()
        if parts[:1] == ["LOWBIT_PROFILE"]:
            calls.append(KernelProfile(int(parts[1]), parts[3], int(parts[2]), macs.get(parts[3], 0)))
        elif parts[:1] == ["LOWBIT_STACK"]:
            stack = int(parts[1])
    with tempfile.TemporaryDirectory(prefix="lowbit-qemu-") as tmp:
        elf = Path(tmp) / "model.elf"
        _make(directory, f"ELF={elf}")
        functions = _functions(elf)
    model = {c.kernel for c in calls} | {mcu["function"]}
    return Profile(calls, stack, sum(n for name, n in functions.items() if name in model),
                   sum(functions.values()), mcu["weight_bytes"], mcu["arena_bytes"])


def _functions(elf: Path) -> dict[str, int]:
    """Code symbols and their sizes.  picolibc's linker script puts .rodata in the .text output
    section, so the model's constants (c0, c1, ...) and the linked-in input are told apart by
    name; aliases (one address, two names) count once."""
    r = subprocess.run(["riscv64-unknown-elf-nm", "-S", "--defined-only", str(elf)], capture_output=True,
                       text=True, check=True)
    seen, out = set(), {}
    for ln in r.stdout.splitlines():
        f = ln.split()
        if len(f) == 4 and f[2] in "tTwW" and f[0] not in seen and not re.fullmatch(r"c\d+|lowbit_input", f[3]):
            seen.add(f[0])
            out[f[3]] = int(f[1], 16)
    return out


def markdown(profiles: dict[str, dict]) -> str:
    """The README's rv32 table from ``lowbit profile --json`` files, by model."""
    lines = ["| model | ISA | MACs | instructions | instr/MAC | arena B (lower bound; no reuse) | stack B "
             "| flash weights B | code B |", "|---|---|---|---|---|---|---|---|---|"]
    for name, p in profiles.items():
        lines.append(f"| {name} | {p['isa']} | {p['macs']:,} | {p['instructions']:,} | "
                     f"{p['instructions'] / max(p['macs'], 1):.2f} | {p['arena_bytes']:,} "
                     f"({p['arena_lower_bound']:,}; {p['arena_no_reuse']:,}) | {p['stack_bytes']:,} | "
                     f"{p['weight_bytes']:,} | {p['text_bytes']:,} |")
    return "\n".join(lines)


class Qemu(Runner):
    """An rv32 artifact is its C project's directory; a run builds and runs it under QEMU."""

    def run(self, artifact, feeds: list[np.ndarray]) -> list[np.ndarray]:
        named = {s.name: f for s, f in zip(artifact.manifest.inputs, feeds, strict=True)}
        return list(run(artifact.directory(), artifact.manifest.build, named).values())

    def profile(self, artifact) -> Profile:
        """Per-kernel instruction counts of one inference (``lowbit profile``)."""
        block = artifact.manifest.build
        return profile(artifact.directory(), block, block["kernel_macs"])


RUNNER = Qemu()


if __name__ == "__main__":          # python -m codegen.rv32.qemu NAME=PROFILE.json ...: the README table
    import json
    import sys

    print(markdown({arg.split("=", 1)[0]: json.loads(Path(arg.split("=", 1)[1]).read_text())
                    for arg in sys.argv[1:]}))
