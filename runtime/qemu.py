"""Running and profiling an rv32 artifact under QEMU.

The artifact directory is the generated C project (codegen/rv32).  A run quantizes the input on
the host with the header's parameters, links an ELF around it (the project's Makefile; objects
are built once per directory and reused), runs ``qemu-system-riscv32`` with a timeout, and
decodes the bytes the harness prints.  ``profile`` builds with ``-DLOWBIT_PROFILE``: ``minstret``
around every kernel call, exact under ``-icount shift=0``, and the stack's high-water mark.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codegen.rv32 import toolchain
from compiler.errors import UserError
from passes.integer_region import BoundaryTensor, dequantize, quantize

TIMEOUT_S = 120


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


def _boundary(d: dict) -> BoundaryTensor:
    return BoundaryTensor(d["name"], tuple(d["shape"]), d["dtype"], d["scale"], d["zero_point"])


def _make(directory: Path, *args: str) -> None:
    toolchain.require()
    r = subprocess.run(["make", "-s", "-C", str(directory), *args], capture_output=True, text=True,
                       timeout=TIMEOUT_S * 5)
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-3:]
        raise UserError(f"{directory}: building the ELF failed: {' | '.join(last)}")


def _qemu(mcu: dict, elf: Path) -> str:
    cmd = toolchain.qemu_command(toolchain.isa(mcu["isa"]), str(elf))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"{elf}: QEMU did not finish within {TIMEOUT_S} s (a hang in the model code?); "
                        "rerun with make -C OUTDIR run to watch it") from None
    if r.returncode != 0:
        raise UserError(f"{elf}: the model returned {r.returncode} under QEMU "
                        f"({(r.stdout + r.stderr).strip().splitlines()[-1:] or 'no output'})")
    return r.stdout


def run_int(directory: Path, mcu: dict, q: np.ndarray, *, profile: bool = False) -> tuple[np.ndarray, str]:
    """The integer output for integer input ``q`` (and the harness's full stdout)."""
    out = _boundary(mcu["outputs"][0])
    with tempfile.TemporaryDirectory(prefix="lowbit-qemu-") as tmp:
        inp, elf = Path(tmp) / "input.bin", Path(tmp) / "model.elf"
        inp.write_bytes(np.ascontiguousarray(q).tobytes())
        _make(directory, f"ELF={elf}", f"INPUT={inp}",
              *(["PROFILE=1"] if profile else []))
        stdout = _qemu(mcu, elf)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("LOWBIT_OUTPUT ")), None)
    if line is None:
        raise UserError(f"{directory}: the harness printed no output line")
    return np.frombuffer(bytes.fromhex(line.split()[1]), out.dtype).reshape(out.shape), stdout


def run(directory: Path, mcu: dict, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float in, float out, as the CPU backend: the host quantizes and dequantizes."""
    (inp,), (out,) = (_boundary(d) for d in mcu["inputs"]), (_boundary(d) for d in mcu["outputs"])
    x = np.asarray(feeds[inp.name])
    if x.shape[0] != 1 and tuple(x.shape) != inp.shape:
        outs = [run(directory, mcu, {inp.name: x[i:i + 1]})[out.name] for i in range(x.shape[0])]
        return {out.name: np.concatenate(outs)}
    q, _ = run_int(directory, mcu, quantize(x.reshape(inp.shape), inp))
    return {out.name: dequantize(q, out)}


def profile(directory: Path, mcu: dict, macs: dict[str, int]) -> Profile:
    inp = _boundary(mcu["inputs"][0])
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
