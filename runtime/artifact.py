"""The compiled artifact: a library plus ``manifest.json``, saved atomically.

Layout of an artifact directory::

    OUTDIR/
      manifest.json   what was compiled, for which target, with which tensors
      model.so        the Relax VM executable (kernels + graph), loadable by TVM's runtime

plus, for ``--target cuda``, kernels.cu (the CUDA source the library also embeds), and where nvcc
was found kernels.ptx (for --arch) and kernels.fatbin (its cubin + PTX): loading hands the fatbin
to TVM, so the GPU machine compiles nothing (codegen/cuda);
or, for ``--target rv32``, the C project of codegen/rv32 (model.h, model.c, kernels.c|o, main.c,
input.S, input.bin, Makefile) next to the manifest; runs go through QEMU (runtime/qemu.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import UserError

FORMAT = 1
NON_COMPUTE_OPS = {"quantize", "dequantize", "shape_func"}    # float boundary, symbolic-shape arithmetic
MANIFEST = "manifest.json"
LIBRARY = "model.so"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]    # a str is a symbolic dimension, e.g. "batch"
    dtype: str

    def shape_str(self) -> str:
        return "(" + ", ".join(map(str, self.shape)) + ")"


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization of a graph input or output: real = scale * (q - zero_point)."""
    scale: float
    zero_point: int
    dtype: str


@dataclass
class Manifest:
    model: str                      # source model file name
    model_sha256: str
    target: dict
    precision: str                  # "fp32" | "int8" | "mixed"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kernels: list[str]
    op_histogram: dict[str, int]
    weight_bytes: int
    versions: dict[str, str]
    quant: dict[str, QuantParams] | None = None
    integer_only: bool = False
    integer_region: str = ""        # the verifier's one-line verdict (passes/verify_integer.py)
    quantization: dict | None = None    # where the scales came from: calibration settings, or "as given"
    kernel_ops: dict[str, list[str]] | None = None     # kernel -> the source ops fused into it
    kernels_unfused: int = 0        # kernel launches without fusion (one per op)
    kernel_launches: int = 0        # kernel launches per inference after fusion
    launch_sequence: list[str] | None = None    # the kernels in the order one inference calls them
    tuning: dict | None = None      # --tune: codegen/tune.TuneReport (which kernels meta_schedule scheduled)
    unscheduled: list[str] | None = None    # kernels that kept TVM's naive loop nests (no rule fit)
    mcu: dict | None = None         # rv32: ISA, memory plan, flash, MACs, the C interface's tensors
    gpu: dict | None = None         # cuda: arch, the device code's files, nvcc, dp4a and row-reduction kernels
    format: int = FORMAT
    library: str = LIBRARY

    def compute_kernels(self) -> list[str]:
        """Kernels that do more than the float boundary (input quantize, output dequantize) or
        the VM's shape arithmetic for symbolic dimensions."""
        ops = self.kernel_ops or {}
        return [k for k in self.kernels if not set(ops.get(k, [k])) <= NON_COMPUTE_OPS]

    def repeated_block(self) -> tuple[int, int, int] | None:
        """(start, length, repeats) of the longest stretch of launches that repeats a block of
        kernels computing the same ops (a transformer's encoder blocks), or None."""
        ops = self.kernel_ops or {}
        sig = [tuple(ops.get(k, [k])) for k in self.launch_sequence or []]
        best = None
        for length in range(1, len(sig) // 2 + 1):
            for start in range(len(sig) - 2 * length + 1):
                reps = 1
                while sig[start + reps * length:start + (reps + 1) * length] == sig[start:start + length]:
                    reps += 1
                if reps > 1 and (best is None or reps * length > best[1] * best[2]):
                    best = (start, length, reps)
        return best

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        for key in ("inputs", "outputs"):
            d[key] = [TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in d[key]]
        if d.get("quant"):
            d["quant"] = {k: QuantParams(**v) for k, v in d["quant"].items()}
        return cls(**d)


# instruction sets the kernels may use; running code for one the host lacks dies with SIGILL
CPU_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "amx-tile", "amx-int8")


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


def gpu_present() -> bool:
    import tvm

    return bool(tvm.cuda().exist)


def check_runs_here(manifest: Manifest) -> None:
    """Refuse, in one line, an artifact this machine cannot execute: cross-compiled for another
    architecture (pointing at the board), for instruction sets it lacks (instead of SIGILL), or
    for a GPU it does not have."""
    from codegen.llvm import foreign_arch

    if manifest.gpu is not None and not gpu_present():
        raise UserError(f"{manifest.model}: compiled for CUDA {manifest.gpu['arch']}, and this machine has no CUDA "
                        "GPU (or no driver); run it on a GPU machine (copy the artifact directory)")

    if foreign_arch(manifest.target):
        raise UserError(f"{manifest.model}: compiled for {manifest.target['mtriple']}, and this machine is "
                        f"{platform.machine()}; run it on the board: lowbit run OUTDIR --rpc HOST:PORT")
    if missing := missing_cpu_features(manifest.target):
        raise UserError(f"{manifest.model}: compiled for CPU {manifest.target.get('mcpu')}, whose "
                        f"{', '.join(missing)} this machine lacks; recompile without --mcpu (or with "
                        "one this machine has)")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("lowbit", "apache-tvm", "apache-tvm-ffi", "onnx"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "unknown"
    return out


class Artifact:
    """A compiled model.  ``run`` executes it; ``save`` writes it as a directory."""

    def __init__(self, manifest: Manifest, module: Any, library_path: Path | None = None,
                 files: Mapping[str, bytes] | None = None, directory: Path | None = None):
        self.manifest = manifest
        self._module = module               # tvm Executable (fresh) or runtime.Module (loaded)
        self._library_path = library_path
        self._files = dict(files or {})     # rv32: the C project, until saved; cuda: the device code
        self._directory = directory         # rv32: where the project is (builds happen there)
        self._scratch = None
        self._vm = None

    @property
    def vm(self):
        if self._vm is None:
            import tvm
            from tvm import relax

            from compiler.progress import native_stderr_to_debug

            check_runs_here(self.manifest)

            with native_stderr_to_debug():
                device = tvm.cuda() if self.manifest.gpu is not None else tvm.cpu()
                self._vm = relax.VirtualMachine(self._module, device)
        return self._vm

    def kernel_library(self):
        """The compiled kernels as one runtime module, for timing a kernel alone."""
        module = getattr(self._module, "mod", self._module)     # a fresh Executable wraps the VM module
        return module.imports[0]

    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Run on numpy inputs keyed by ONNX input name (a bare array for a single-input model).
        A model compiled for a fixed batch B takes any multiple of B samples, B at a time."""
        from runtime.io import run_batched

        return run_batched(self._run_checked, inputs, self.manifest.inputs, self.manifest.outputs, "inputs")

    def _run_checked(self, checked: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        from compiler.narrow_qdq import from_container, to_container

        feeds = {k: to_container(v) for k, v in checked.items()}
        if self.manifest.mcu is not None:
            from runtime import qemu

            outs = list(qemu.run(self.project(), self.manifest.mcu, feeds).values())
        else:
            device = tvm.cuda() if self.manifest.gpu is not None else tvm.cpu()
            out = self.vm["main"](*[tvm.runtime.tensor(feeds[s.name], device) for s in self.manifest.inputs])
            outs = [o.numpy() for o in (list(out) if not hasattr(out, "numpy") else [out])]
        return {s.name: from_container(o, s.dtype) for s, o in zip(self.manifest.outputs, outs, strict=True)}

    def project(self) -> Path:
        """rv32: the C project's directory (a fresh build is written to a temporary one first)."""
        if self._directory is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="lowbit-rv32-")
            self._directory = Path(self._scratch.name) / "project"
            self.save(self._directory)
        return self._directory

    def library_file(self, directory: Path) -> Path:
        """The shared library: the loaded one, or the fresh build exported into ``directory``
        (linked by the target's cross gcc when it is another architecture's)."""
        if self._library_path is not None:
            return self._library_path
        from codegen.llvm import linker

        path = directory / LIBRARY
        self._module.export_library(str(path), fcompile=linker(self.manifest.target))
        return path

    def save(self, outdir: str | os.PathLike) -> Path:
        """Write the artifact directory atomically: a failure leaves no OUTDIR behind."""
        with atomic_directory(outdir) as tmp:
            if self.manifest.mcu is not None:
                source = self._directory
                for name in self._files or (p.name for p in source.iterdir() if p.is_file()):
                    data = self._files[name] if self._files else (source / name).read_bytes()
                    (tmp / name).write_bytes(data)
                (tmp / MANIFEST).write_text(self.manifest.to_json())
                return Path(outdir)
            library = self.library_file(tmp)
            if library != tmp / LIBRARY:
                shutil.copyfile(library, tmp / LIBRARY)
            for name, data in self._files.items():      # cuda: the device code beside the library
                (tmp / name).write_bytes(data)
            (tmp / MANIFEST).write_text(self.manifest.to_json())
        return Path(outdir)


def _is_artifact(directory: Path) -> bool:
    """A manifest lowbit wrote, not any ``manifest.json`` (a web app's would have its directory
    replaced, and deleted, by a compile)."""
    try:
        d = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and {"format", "model_sha256", "library"} <= d.keys()


def check_outdir(outdir: str | os.PathLike) -> Path:
    """Refuse to replace anything that is not an earlier lowbit artifact (or an empty directory)."""
    out = Path(outdir)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a directory; choose another -o")
        if any(out.iterdir()) and not _is_artifact(out):
            raise UserError(f"{out}: exists and is not a lowbit artifact; refusing to overwrite it, choose another -o")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{parent}: is a file, so {out} cannot be created under it; choose another -o")
    try:        # a real write, not os.access: root passes permission bits but not a read-only filesystem
        os.rmdir(tempfile.mkdtemp(prefix=".lowbit-probe-", dir=parent))
    except OSError as exc:
        raise UserError(f"{parent}: directory is not writable ({exc.strerror}); choose another -o") from None
    return out


def _scratch_prefix(out: Path, kind: str) -> str:
    # the owner's pid and host let a later save tell a killed compile's leftovers from a running one's
    return f".{out.name}.{kind}-{os.getpid()}@{socket.gethostname()}~"


def _remove_leftovers(out: Path) -> None:
    """Scratch directories of saves to ``out`` that were killed (their process is gone)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)@(.*)~[^~]*")
    for entry in out.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m is None or m.group(3) != socket.gethostname():
            continue
        try:
            os.kill(int(m.group(2)), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (PermissionError, OverflowError):      # another user's live process; a pid no kernel has
            continue


def _fresh_directory(parent: Path, prefix: str) -> Path:
    """Like mkdtemp, but with the mode a plain mkdir gives (mkdtemp's 0700 would become the
    artifact's mode after the rename)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE), so no moment exists at which
    ``b`` is missing.  False where the system or the filesystem cannot."""
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_directory(outdir: str | os.PathLike) -> Iterator[Path]:
    check_outdir(outdir)
    out = Path(os.path.abspath(outdir))       # "-o ." names the directory, not "."
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    tmp = _fresh_directory(out.parent, _scratch_prefix(out, "tmp"))
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
        elif not _exchange(tmp, out):       # swap: the old artifact stays valid until the rename
            old = _fresh_directory(out.parent, _scratch_prefix(out, "old"))
            os.replace(out, old / "a")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.is_symlink():                # an OUTDIR that was a link, exchanged
            tmp.unlink()
        shutil.rmtree(tmp, ignore_errors=True)      # after an exchange: the old artifact


def load(directory: str | os.PathLike) -> Artifact:
    """Load an artifact directory written by ``Artifact.save`` / ``lowbit compile``."""
    d = Path(directory)
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{d}: not a lowbit artifact (no {MANIFEST}); create one with `lowbit compile`")
    try:
        manifest = Manifest.from_dict(json.loads(mpath.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{mpath}: unreadable manifest ({exc}); recompile the model") from None
    if manifest.format != FORMAT:
        raise UserError(f"{mpath}: artifact format {manifest.format}, this lowbit reads {FORMAT}; recompile the model")
    lib = d / manifest.library
    if not lib.is_file():
        raise UserError(f"{d}: {manifest.library} is missing; recompile the model")
    if manifest.mcu is not None:
        return Artifact(manifest, None, directory=d)
    from codegen.llvm import foreign_arch

    if foreign_arch(manifest.target):           # a cross-compiled library: inspected, copied, sent over RPC
        return Artifact(manifest, None, library_path=lib)
    if manifest.gpu is not None:
        names = [manifest.gpu[k] for k in ("source", "ptx", "fatbin") if manifest.gpu.get(k)]
        files = {name: (d / name).read_bytes() for name in names}
        if not gpu_present():                   # no CUDA here: inspected and copied, not run
            return Artifact(manifest, None, library_path=lib, files=files)
        from codegen.cuda import loader

        loader.provide(files[manifest.gpu["source"]].decode(), files.get(manifest.gpu["fatbin"]))
    import tvm

    from compiler.progress import native_stderr_to_debug

    with native_stderr_to_debug():
        module = tvm.runtime.load_module(str(lib))
    return Artifact(manifest, module, library_path=lib)
