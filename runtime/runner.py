"""How an artifact runs: one ``Runner`` per backend, found through codegen/registry.py by the
manifest's ``backend``.  Runners import nothing from the compiler, so loading and running an
artifact needs no ONNX, no quantizer and no code generator.

``VM`` runs a Relax VM library on this machine's CPU; the CUDA runner (codegen/cuda/loader.py)
is the same VM on a GPU, and the QEMU runner (codegen/rv32/qemu.py) runs a C project.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import UserError
from runtime.progress import native_stderr_to_debug

# instruction sets the kernels may use; running code for one the host lacks dies with SIGILL
CPU_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "amx-tile", "amx-int8")


def foreign_arch(target: dict) -> str | None:
    """The architecture a target compiles for when this machine cannot run it (a cross triple
    for another machine), else None."""
    triple = target.get("mtriple")
    arch = triple.split("-")[0] if triple else None
    return arch if arch and arch != platform.machine() else None


def missing_cpu_features(target: dict) -> list[str]:
    """The instruction sets ``target`` compiles for that this machine does not have.  The host's
    features come from CPUID through LLVM, not from its CPU name: a VM may report an older model
    (this one says Rocket Lake and has AVX-VNNI and AMX)."""
    if target.get("kind") != "llvm" or not target.get("mcpu"):
        return []
    import tvm
    from tvm.target import codegen

    host = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")()
    built = tvm.target.Target({k: v for k, v in target.items() if k in ("kind", "mcpu", "mattr")})
    return [f for f in CPU_FEATURES if codegen.target_has_features(f, built) and not bool(host.get(f, False))]


class Runner:
    """The run side of a backend."""

    remote = False          # its libraries also run on a board over TVM RPC (runtime/remote.py)

    def load(self, directory: Path, manifest) -> Any:
        """The executable module of a saved artifact, or None where this machine cannot run it
        (it is then inspected, copied or sent elsewhere)."""
        return None

    def check(self, manifest) -> None:
        """Refuse, in one line, an artifact this machine cannot execute."""

    def run(self, artifact, feeds: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


class VM(Runner):
    """A Relax VM library (``model.so``) on a TVM device of this machine."""

    remote = True

    def device(self):
        import tvm

        return tvm.cpu()

    def load(self, directory: Path, manifest) -> Any:
        if foreign_arch(manifest.target):       # a cross-compiled library: inspected, copied, sent over RPC
            return None
        import tvm

        with native_stderr_to_debug():
            return tvm.runtime.load_module(str(directory / manifest.library))

    def check(self, manifest) -> None:
        """Cross-compiled for another architecture (pointing at the board), or for instruction
        sets this machine lacks (instead of SIGILL)."""
        if foreign_arch(manifest.target):
            raise UserError(f"{manifest.model}: compiled for {manifest.target['mtriple']}, and this machine is "
                            f"{platform.machine()}; run it on the board: lowbit run OUTDIR --rpc HOST:PORT")
        if missing := missing_cpu_features(manifest.target):
            raise UserError(f"{manifest.model}: compiled for CPU {manifest.target.get('mcpu')}, whose "
                            f"{', '.join(missing)} this machine lacks; recompile without --mcpu (or with "
                            "one this machine has)")

    def vm(self, module):
        from tvm import relax

        with native_stderr_to_debug():
            return relax.VirtualMachine(module, self.device())

    def run(self, artifact, feeds: list[np.ndarray]) -> list[np.ndarray]:
        import tvm

        out = artifact.vm["main"](*[tvm.runtime.tensor(f, self.device()) for f in feeds])
        return [o.numpy() for o in (list(out) if not hasattr(out, "numpy") else [out])]


RUNNER = VM()
