"""Loading a CUDA artifact without a compiler on the GPU machine.

TVM 0.27's library keeps the kernels as CUDA source and, when it is loaded, asks the global
function ``tvm_callback_cuda_compile`` to compile them (NVRTC or nvcc).  ``provide`` registers
a callback that answers with the artifact's fatbin (built by nvcc at compile time, for the
same source: matched by its SHA-256) and defers to TVM's own for any other source.
"""

from __future__ import annotations

import tvm_ffi

from codegen.cuda import source_hash

_FATBINS: dict[str, bytes] = {}


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
