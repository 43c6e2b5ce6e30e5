"""Reading and validating user tensors (.npz / .npy), writing outputs atomically, the cache."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers int4, float8_e4m3fn, ... as numpy dtype names)
import numpy as np

from runtime.errors import UserError
from runtime.types import TensorSpec

# numpy allocates an array header's declared size before reading: one cap for every tensor lowbit reads
MAX_TENSOR_BYTES = 2 << 30
LIMIT = "lowbit's limit of 2 GiB per tensor"


def cache_root() -> Path:
    """Where models built from recipes and measured tables are kept ($LOWBIT_CACHE)."""
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold the cache entry ``path`` exclusively: two processes filling one entry (two test workers, or
    a report beside a compile) build it once; the second waits, then finds it complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    locks = cache_root() / "locks"          # beside the entries, not among them
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{path.parent.name}-{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_tensors(path: str | os.PathLike, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """``.npz`` keyed by ONNX input name, or a plain ``.npy`` for a single-input model."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file; pass an .npz keyed by input name (or .npy for one input)")
    check_array_headers(p)
    try:
        data = np.load(p, allow_pickle=False)
        if not isinstance(data, np.ndarray):
            with data:                  # an .npz reads its members lazily: a corrupt one fails here
                data = {k: data[k] for k in data.files}
    except Exception as exc:
        raise UserError(f"{p}: not a readable .npz/.npy file ({exc})") from None
    if isinstance(data, np.ndarray):
        if len(specs) != 1:
            raise UserError(f"{p}: a plain .npy works only for single-input models; this one has inputs "
                            f"{[s.name for s in specs]}, so pass an .npz keyed by those names")
        return {specs[0].name: data}
    return data


def check_array_headers(path: str | os.PathLike) -> None:
    """Refuse an .npy / .npz whose array headers declare more bytes than the file holds, or more
    than compiler/limits allows: numpy allocates the declared size before it reads any data, so a
    100-byte file can ask for terabytes.  Files numpy cannot parse are left to np.load's error."""
    import math
    import zipfile


    def check(fp, stored: int, name: str) -> None:
        try:
            version = np.lib.format.read_magic(fp)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, _, dtype = read[version](fp)
        except Exception:               # noqa: BLE001 - not an array header numpy reads: np.load says why
            return
        need, have = math.prod(shape) * dtype.itemsize, stored - fp.tell()
        if need > MAX_TENSOR_BYTES:
            raise UserError(f"{path}: array {name!r} declares shape {shape} {dtype}, {need} bytes, over {LIMIT}")
        if need > have:
            raise UserError(f"{path}: array {name!r} declares shape {shape} {dtype} ({need} bytes) but the file holds "
                            f"{max(have, 0)}; it is truncated or corrupt, write it again")

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.filename.endswith(".npy"):
                        with zf.open(info) as fp:
                            check(fp, info.file_size, info.filename[:-4])
        else:
            with open(path, "rb") as fp:
                check(fp, os.path.getsize(path), Path(path).stem)
    except UserError:
        raise
    except Exception:                   # noqa: BLE001 - a corrupt archive: np.load reports it
        return


def as_feeds(inputs: Mapping[str, np.ndarray] | np.ndarray, specs: list[TensorSpec], where: str) -> Mapping:
    """Inputs keyed by name; a bare array for a single-input model."""
    if isinstance(inputs, np.ndarray):
        if len(specs) != 1:
            raise UserError(f"{where}: a bare array works only for single-input models; "
                            f"pass a dict keyed by {[s.name for s in specs]}")
        return {specs[0].name: inputs}
    return inputs


def fixed_batches(inputs: Mapping[str, np.ndarray], specs: list[TensorSpec],
                  outputs: list[TensorSpec]) -> list[dict[str, np.ndarray]] | None:
    """A model compiled for a fixed batch B (the torch exporter's default is 1) given N = k * B
    samples: the k slices of B to run one after the other, or None when the inputs are not that.
    Every input and output must lead with the same static B; the other dimensions are checked
    per slice, by ``check_inputs``."""
    leading = {s.shape[0] if s.shape and isinstance(s.shape[0], int) else None for s in (*specs, *outputs)}
    if len(leading) != 1 or None in leading or set(inputs) != {s.name for s in specs}:
        return None
    b = leading.pop()
    sizes = {np.shape(inputs[s.name])[0] if np.ndim(inputs[s.name]) == len(s.shape) else None for s in specs}
    if len(sizes) != 1 or None in sizes or (n := sizes.pop()) == b or n == 0 or n % b:
        return None
    return [{k: np.asarray(v)[i : i + b] for k, v in inputs.items()} for i in range(0, n, b)]


def run_batched(run, inputs: Mapping[str, np.ndarray] | np.ndarray, specs: list[TensorSpec],
                outputs: list[TensorSpec], where: str) -> dict[str, np.ndarray]:
    """``run`` (checked feeds -> outputs by name) on ``inputs``: all at once, or for a fixed-batch
    model given a multiple of its batch, slice by slice with the outputs concatenated."""
    inputs = as_feeds(inputs, specs, where)
    slices = fixed_batches(inputs, specs, outputs)
    if slices is None:
        return run(check_inputs(inputs, specs, where))
    runs = [run(check_inputs(part, specs, f"{where} (samples {i * len(next(iter(part.values())))}...)"))
            for i, part in enumerate(slices)]
    return {s.name: np.concatenate([r[s.name] for r in runs]) for s in outputs}


def check_inputs(inputs: Mapping[str, np.ndarray] | np.ndarray, specs: list[TensorSpec],
                 where: str) -> dict[str, np.ndarray]:
    """Exact names, dtypes and shapes; a symbolic dimension must be consistent across inputs."""
    inputs = as_feeds(inputs, specs, where)
    names = [s.name for s in specs]
    missing = [n for n in names if n not in inputs]
    extra = [k for k in inputs if k not in names]
    if missing or extra:
        raise UserError(f"{where}: input names {sorted(inputs)} do not match the model's inputs {names}"
                        + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else ""))
    bound: dict[str, int] = {}
    out = {}
    for s in specs:
        a = np.asarray(inputs[s.name])
        if a.dtype != np.dtype(s.dtype):
            raise UserError(f"{where}: input {s.name!r} has dtype {a.dtype}, the model expects {s.dtype}; "
                            f"convert it with .astype('{s.dtype}')")
        ok = a.ndim == len(s.shape)
        for dim, n in zip(s.shape, a.shape, strict=True) if ok else ():
            if isinstance(dim, int):
                ok &= dim == n
            else:
                ok &= bound.setdefault(dim, n) == n
        if not ok:
            raise UserError(f"{where}: input {s.name!r} has shape {tuple(a.shape)}, the model expects "
                            f"{s.shape_str()}; reshape the data or recompile with --input-shape")
        out[s.name] = np.require(a, requirements="C")     # ascontiguousarray would make 0-d 1-d
    return out


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write to a temporary file beside ``path`` and rename, so a failure leaves no partial file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:     # a file object stops numpy from appending ".npz"
            np.savez(fh, **arrays)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p
