"""nvcc and ptxas: PTX, cubin and fatbin for the generated CUDA source, on a machine without a GPU.

nvcc is looked up in ``$CUDA_PATH/bin`` when CUDA_PATH is set (and only there), else on PATH,
else in /usr/local/cuda/bin.  Without it a build still succeeds: the library keeps the CUDA
source, and the GPU machine compiles it when it loads the library (TVM's NVRTC or nvcc
callback), which this module's warning says.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from codegen.cuda.loader import source_hash
from runtime.errors import UserError
from runtime.progress import log

TIMEOUT_S = 600


def _tool(name: str) -> str | None:
    root = os.environ.get("CUDA_PATH")
    if root is not None:
        path = Path(root) / "bin" / name
        return str(path) if os.access(path, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    path = Path("/usr/local/cuda/bin") / name
    return str(path) if os.access(path, os.X_OK) else None


def find() -> str | None:
    return _tool("nvcc")


def version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"{what}: {Path(cmd[0]).name} did not finish within {TIMEOUT_S} s") from None
    if proc.returncode != 0:
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:300])
        # our generated code failing to compile is a lowbit bug, not the user's: say where it is
        raise RuntimeError(f"{what} failed: {first}")


def compile(source: str, arch: str) -> tuple[bytes, bytes, str] | None:
    """(PTX for ``arch``, a fatbin with its cubin and PTX, nvcc's version), or None with a warning
    when nvcc is not installed."""
    tool = find()
    if tool is None:
        log.warning("nvcc not found (CUDA_PATH, PATH, /usr/local/cuda): the artifact has no PTX or cubin, only "
                    "the CUDA source in model.so, which the GPU machine compiles when it loads it (NVRTC from "
                    "`pip install cuda-bindings`, or nvcc with TVM_CUDA_COMPILE_MODE=nvcc); install the CUDA "
                    "toolkit here to ship compiled kernels")
        return None
    compute = arch.replace("sm_", "compute_")
    with tempfile.TemporaryDirectory(prefix="lowbit-nvcc-") as tmp:
        src = Path(tmp) / "kernels.cu"
        src.write_text(source)
        ptx, fatbin = Path(tmp) / "kernels.ptx", Path(tmp) / "kernels.fatbin"
        _run([tool, "-O3", "--ptx", f"-arch={arch}", "-o", str(ptx), str(src)], f"nvcc --ptx -arch={arch}")
        _run([tool, "-O3", "--fatbin", f"-gencode=arch={compute},code=[{arch},{compute}]", "-o", str(fatbin),
              str(src)], f"nvcc --fatbin for {arch}")
        return ptx.read_bytes(), fatbin.read_bytes(), version(tool)


def assemble(ptx: bytes, arch: str) -> bytes:
    """ptxas: the PTX assembled into a cubin for ``arch`` (raises if ptxas rejects it)."""
    tool = _tool("ptxas")
    if tool is None:
        raise UserError("ptxas not found (CUDA_PATH, PATH, /usr/local/cuda); install the CUDA toolkit")
    with tempfile.TemporaryDirectory(prefix="lowbit-ptxas-") as tmp:
        src, out = Path(tmp) / "kernels.ptx", Path(tmp) / "kernels.cubin"
        src.write_bytes(ptx)
        _run([tool, f"-arch={arch}", "-o", str(out), str(src)], f"ptxas -arch={arch}")
        return out.read_bytes()


@contextlib.contextmanager
def compiling_for_tvm(arch: str) -> Iterator[dict[str, tuple[bytes, bytes, str]]]:
    """Within: TVM's build compiles CUDA source with nvcc (``compile``) where it compiles at all,
    and the results are kept, keyed by source hash, so the artifact's fatbin is that same build.
    On a machine with CUDA's Python bindings TVM would otherwise compile with NVRTC, which failed
    on lowbit's kernels on an H100 machine with no message; elsewhere it keeps the source for later.
    Nothing changes where nvcc is missing."""
    import tvm.support.nvcc  # noqa: F401  (registers TVM's own callback: the one restored after)
    import tvm_ffi

    built: dict[str, tuple[bytes, bytes, str]] = {}
    if find() is None:
        yield built
        return
    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)

    def with_nvcc(code: str, *_target) -> bytes:
        built[source_hash(code)] = compile(code, arch)
        return built[source_hash(code)][1]

    tvm_ffi.register_global_func(name, with_nvcc, override=True)
    try:
        yield built
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
