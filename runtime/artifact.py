"""The compiled artifact: its files plus ``manifest.json``, saved atomically.

Layout of an artifact directory::

    OUTDIR/
      manifest.json   what was compiled, for which backend, with which tensors
      model.so        the Relax VM executable (kernels + graph), loadable by TVM's runtime

plus the backend's own files, listed in the manifest's ``files``: for ``--target cuda`` the CUDA
source and, where nvcc was found, its PTX and fatbin (codegen/cuda); for ``--target rv32`` the C
project instead of the library (codegen/rv32).  How an artifact loads and runs is its backend's
runner (runtime/runner.py), found by the manifest's ``backend`` in codegen/registry.py; this
module imports nothing from the compiler, the passes or code generation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codegen import registry
from runtime.errors import UserError
from runtime.io import run_batched
from runtime.types import QuantParams, TensorSpec, from_container, to_container

# 2: the backend by name with its own block (``build``) and the file list, instead of "mcu" / "gpu"
FORMAT = 2
NON_COMPUTE_OPS = {"quantize", "dequantize", "shape_func"}    # float boundary, symbolic-shape arithmetic
MANIFEST = "manifest.json"
LIBRARY = "model.so"


@dataclass
class Manifest:
    model: str                      # source model file name
    model_sha256: str
    backend: str                    # the target's name in codegen/registry.py: who builds and runs it
    target: dict                    # the TVM target (or the backend's own description of it)
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
    # ops with no integer form run in float between a dequantize and a quantize: {op, node, reason}
    islands: list[dict] = field(default_factory=list)
    quantization: dict | None = None    # where the scales came from: calibration settings, or "as given"
    kernel_ops: dict[str, list[str]] | None = None     # kernel -> the source ops fused into it
    kernels_unfused: int = 0        # kernel launches without fusion (one per op)
    kernel_launches: int = 0        # kernel launches per inference after fusion
    launch_sequence: list[str] | None = None    # the kernels in the order one inference calls them
    tuning: dict | None = None      # --tune: codegen/tune.TuneReport (which kernels meta_schedule scheduled)
    unscheduled: list[str] | None = None    # kernels that kept TVM's naive loop nests (no rule fit)
    build: dict | None = None       # the backend's own block (rv32: ISA, memory plan, C interface; cuda: arch, nvcc)
    files: list[str] = field(default_factory=list)      # the backend's files beside the library
    format: int = FORMAT
    library: str | None = LIBRARY   # the Relax VM library; None: the backend's files are the program

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
    """A compiled model.  ``run`` executes it (through its backend's runner); ``save`` writes it
    as a directory."""

    def __init__(self, manifest: Manifest, module: Any, library_path: Path | None = None,
                 files: Mapping[str, bytes] | None = None, directory: Path | None = None, fcompile: Any = None):
        self.manifest = manifest
        self.runner = registry.runner(manifest.backend)
        self._module = module               # tvm Executable (fresh), runtime.Module (loaded) or None
        self._library_path = library_path
        self._files = dict(files or {})     # a fresh build's files, until saved
        self._directory = directory         # a loaded artifact's directory
        self._fcompile = fcompile           # export_library's linker: a cross gcc, or None (the host's)
        self._scratch = None
        self._vm = None

    @property
    def vm(self):
        """The Relax VM over the library, on the runner's device."""
        if self._vm is None:
            self.runner.check(self.manifest)
            self._vm = self.runner.vm(self._module)
        return self._vm

    def kernel_library(self):
        """The compiled kernels as one runtime module, for timing a kernel alone."""
        module = getattr(self._module, "mod", self._module)     # a fresh Executable wraps the VM module
        return module.imports[0]

    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Run on numpy inputs keyed by ONNX input name (a bare array for a single-input model).
        A model compiled for a fixed batch B takes any multiple of B samples, B at a time."""
        return run_batched(self._run_checked, inputs, self.manifest.inputs, self.manifest.outputs, "inputs")

    def _run_checked(self, checked: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.runner.run(self, [to_container(checked[s.name]) for s in self.manifest.inputs])
        return {s.name: from_container(o, s.dtype) for s, o in zip(self.manifest.outputs, outs, strict=True)}

    def directory(self) -> Path:
        """A directory holding the artifact: the loaded one, or a fresh build saved to a temporary
        one first (an rv32 C project builds there)."""
        if self._directory is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="lowbit-artifact-")
            self._directory = Path(self._scratch.name) / "artifact"
            self.save(self._directory)
        return self._directory

    def library_file(self, directory: Path) -> Path:
        """The shared library: the loaded one, or the fresh build exported into ``directory``
        (linked by the target's cross gcc when it is another architecture's)."""
        if self._library_path is not None:
            return self._library_path
        path = directory / LIBRARY
        self._module.export_library(str(path), fcompile=self._fcompile)
        return path

    def save(self, outdir: str | os.PathLike) -> Path:
        """Write the artifact directory atomically: a failure leaves no OUTDIR behind."""
        with atomic_directory(outdir) as tmp:
            if self._module is not None or self._library_path is not None:
                library = self.library_file(tmp)
                if library != tmp / LIBRARY:
                    shutil.copyfile(library, tmp / LIBRARY)
            for name in self.manifest.files:
                data = self._files[name] if name in self._files else (self._directory / name).read_bytes()
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
        raw = json.loads(mpath.read_text())
    except ValueError as exc:
        raise UserError(f"{mpath}: unreadable manifest ({exc}); recompile the model") from None
    if isinstance(raw, dict) and raw.get("format") != FORMAT:
        raise UserError(f"{mpath}: artifact format {raw.get('format')}, this lowbit reads {FORMAT}; recompile the model")
    try:
        manifest = Manifest.from_dict(raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{mpath}: unreadable manifest ({exc}); recompile the model") from None
    if manifest.backend not in registry.TARGETS:
        raise UserError(f"{mpath}: compiled for target {manifest.backend!r}, which this lowbit does not know; "
                        "recompile the model")
    for name in ([manifest.library] if manifest.library else []) + manifest.files:
        if not (d / name).is_file():
            raise UserError(f"{d}: {name} is missing; recompile the model")
    module = registry.runner(manifest.backend).load(d, manifest)      # None: this machine does not run it
    return Artifact(manifest, module, library_path=d / manifest.library if manifest.library else None, directory=d)
