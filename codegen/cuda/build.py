"""CUDA code generation: integer-only kernels for NVIDIA GPUs, built without a GPU.

The integer graph of passes/lower_qdq.py (with the dp4a units of codegen/cuda/dp4a.py: int8
operands laid out for ``dp4a``) goes through the CPU backend's fusion (``codegen/llvm.fusion``: the same Relax
legalization and FuseOps, our epilogue and kernel merging, except that a GEMM does not join the
softmax or LayerNorm after it), then our GPU schedules:

* ``dp4a.Dp4a``: int8 GEMM and convolution, one ``dp4a`` per 4 bytes of the reduction, the
  requantize epilogue in the same kernel;
* dlight's ``Reduction`` and ``GeneralReduction``: row kernels (Shiftmax, I-LayerNorm, pooling
  sums) with the row spread over a thread block and reduced by warp shuffles / shared memory;
* dlight's ``Fallback`` for everything else (one thread per output element).

dlight's ``Matmul`` (its int8 tensor-core path fails in 0.27 with a fragment error) and ``GEMV``
(asserts on integer reduction chains) are left out.  A rule that raises on a kernel passes it
to the next (``Guarded``).

TVM 0.27 keeps CUDA *source* in the executable and compiles it when the library is loaded
(``tvm_callback_cuda_compile``).  So that a GPU machine needs no compiler, ``build`` also runs
nvcc here (codegen/cuda/nvcc.py): PTX for the architecture, and a fatbin with its cubin plus
the PTX for later GPUs; ``runtime.artifact`` hands the fatbin to TVM when it loads the library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import tvm
from tvm import relax
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.s_tir import dlight as dl

from codegen import llvm
from codegen.backend import Build
from codegen.cuda import nvcc
from codegen.cuda.dp4a import Dp4a
from codegen.cuda.loader import source_hash
from codegen.cuda.rows import Rows, Separate
from passes.fusion_report import FusionReport, RecordUnscheduled
from passes.shape_heap import after_shape_lowering

SOURCE, PTX, FATBIN = "kernels.cu", "kernels.ptx", "kernels.fatbin"


def target_dict(arch: str) -> dict:
    """The device, and a generic x86-64 host: the host code only launches kernels, and the GPU
    machine's CPU is not this one (code for this CPU's AVX-512 / AMX could fault there)."""
    return {"kind": "cuda", "arch": arch, "host": {"kind": "llvm", "mtriple": llvm.HOST_TRIPLE}}


class Guarded(dl.ScheduleRule):
    """A dlight rule whose failure on a kernel means "not mine": dlight 0.27's GPU rules raise on
    some integer kernels instead of returning None."""

    def __init__(self, rule: dl.ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except Exception:       # noqa: BLE001 -- any failure: the next rule schedules the kernel
            return None


RULES = (Dp4a(), Rows(), Guarded(dl.gpu.Reduction()), Separate())


@dataclass
class CudaBuild:
    """The device code of a build: CUDA source, and nvcc's PTX and fatbin when nvcc was found."""
    arch: str
    source: str
    ptx: bytes | None = None
    fatbin: bytes | None = None
    nvcc: str | None = None                 # nvcc's version, None when it was not found
    kernels: dict[str, dict] = field(default_factory=dict)   # kernel -> {"dp4a": n, "shuffles": n}
    dp4a_launches: int = 0                  # launches per inference on dp4a (one per int8 conv / matmul)

    def files(self) -> dict[str, bytes]:
        out = {SOURCE: self.source.encode()}
        if self.ptx is not None:
            out[PTX] = self.ptx
        if self.fatbin is not None:
            out[FATBIN] = self.fatbin
        return out

    def summary(self) -> dict:
        return {"arch": self.arch, "source": SOURCE, "source_sha256": source_hash(self.source),
                "ptx": PTX if self.ptx is not None else None, "fatbin": FATBIN if self.fatbin is not None else None,
                "nvcc": self.nvcc, "dp4a_launches": self.dp4a_launches,
                "dp4a_kernels": sorted(k for k, v in self.kernels.items() if v["dp4a"]),
                "row_reduction_kernels": sorted(k for k, v in self.kernels.items() if v["shuffles"])}


def kernel_sources(source: str) -> dict[str, str]:
    """Each ``__global__`` function's body in the CUDA source, by kernel name."""
    parts = re.split(r'(?=^extern "C" __global__ )', source, flags=re.M)
    out = {}
    for p in parts:
        m = re.match(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', p)
        if m and "{" in p.split("\n", 1)[0]:
            out[m.group(1)] = p
    return out


def _census(source: str) -> dict[str, dict]:
    return {name: {"dp4a": body.count("__dp4a("), "shuffles": body.count("__shfl")}
            for name, body in kernel_sources(source).items()}


def _called(mod: tvm.IRModule) -> list[str]:
    """The kernels ``main`` calls, once per launch."""
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e.args[0].name_hint) if isinstance(
        e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir" else None)
    return calls


def _on_dp4a(func: str, census: dict[str, dict]) -> bool:
    """Whether a PrimFunc's device code (its kernels ``<func>_kernel``, ``<func>_kernel_1``...)
    uses dp4a."""
    return any(v["dp4a"] for k, v in census.items() if k == f"{func}_kernel" or k.startswith(f"{func}_kernel_"))


def build(mod: tvm.IRModule, target: dict) -> Build:
    """Fuse, schedule, lower and build for CUDA, then compile the device code with nvcc when it is
    installed."""
    tgt = tvm.target.Target(target)
    report = FusionReport()
    with tgt:
        fused = llvm.fusion(tgt, report, row_contractions=False)(mod)
        scheduled = tvm.transform.Sequential([dl.ApplyDefaultSchedule(*RULES), RecordUnscheduled(report)])(fused)
        called = _called(scheduled)
        lowered = tvm.transform.Sequential(cuda_pipeline.dataflow_lower_passes(tgt)
                                           + after_shape_lowering(cuda_pipeline.finalize_passes(tgt)))(scheduled)
    with nvcc.compiling_for_tvm(target["arch"]) as built:
        executable = tvm.compile(lowered, target=tgt, relax_pipeline=None)
    source = device_module(executable).inspect_source()
    census = _census(source)
    device = CudaBuild(target["arch"], source, kernels=census,
                       dp4a_launches=sum(_on_dp4a(f, census) for f in called))
    compiled = built.get(source_hash(source)) or nvcc.compile(source, target["arch"])
    if compiled is not None:
        device.ptx, device.fatbin, device.nvcc = compiled
    return Build(files=device.files(), kernel_ops=llvm.kernel_ops(lowered, report), kernels_unfused=report.before,
                 launch_sequence=report.sequence, executable=executable, readers=report.readers,
                 unscheduled=report.unscheduled, summary=device.summary())


def device_module(executable):
    """The CUDA module inside a Relax executable (VM module -> host LLVM module -> CUDA)."""
    host = executable.mod.imports[0]
    return next(m for m in host.imports if m.kind == "cuda")
