"""Running a CUDA artifact without a compiler on the GPU machine.

TVM 0.27's library keeps the kernels as CUDA source and, when it is loaded, asks the global
function ``tvm_callback_cuda_compile`` to compile them (NVRTC or nvcc).  ``provide`` registers
a callback that answers with the artifact's fatbin (built by nvcc at compile time, for the
same source: matched by its SHA-256) and defers to TVM's own for any other source.  ``RUNNER``
is the run side of the CUDA backend (codegen/registry.py): the Relax VM on the GPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import tvm_ffi

from runtime.errors import UserError
from runtime.runner import VM

_FATBINS: dict[str, bytes] = {}


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def _compile(code: str, *_target) -> bytes:
    fatbin = _FATBINS.get(source_hash(code))
    if fatbin is not None:
        return fatbin
    from tvm.support import nvcc

    return nvcc.tvm_callback_cuda_compile(code)


def provide(source: str, fatbin: bytes | None) -> None:
    """Make ``fatbin`` the compiled form of ``source`` for the libraries loaded from now on."""
    if fatbin is None:          # built without nvcc: TVM compiles the source at load
        return
    _FATBINS[source_hash(source)] = fatbin
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile, override=True)


def gpu_present() -> bool:
    import tvm

    return bool(tvm.cuda().exist)


class CudaVM(VM):
    """The Relax VM on this machine's GPU, its kernels from the artifact's fatbin."""

    remote = False

    def device(self):
        import tvm

        return tvm.cuda()

    def load(self, directory: Path, manifest) -> Any:
        if not gpu_present():                   # no CUDA here: inspected and copied, not run
            return None
        block = manifest.build
        fatbin = (directory / block["fatbin"]).read_bytes() if block.get("fatbin") else None
        provide((directory / block["source"]).read_text(), fatbin)
        return super().load(directory, manifest)

    def check(self, manifest) -> None:
        if not gpu_present():
            raise UserError(f"{manifest.model}: compiled for CUDA {manifest.build['arch']}, and this machine has no "
                            "CUDA GPU (or no driver); run it on a GPU machine (copy the artifact directory)")


RUNNER = CudaVM()
