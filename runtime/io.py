"""Reading and validating user tensors (.npz / .npy), writing outputs atomically, the cache."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from compiler.errors import UserError
from runtime.artifact import TensorSpec


def cache_root() -> Path:
    """Where models built from recipes and measured tables are kept ($LOWBIT_CACHE)."""
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")


def read_tensors(path: str | os.PathLike, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """``.npz`` keyed by ONNX input name, or a plain ``.npy`` for a single-input model."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file; pass an .npz keyed by input name (or .npy for one input)")
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"{p}: not a readable .npz/.npy file ({exc})") from None
    if isinstance(data, np.ndarray):
        if len(specs) != 1:
            raise UserError(f"{p}: a plain .npy works only for single-input models; this one has inputs "
                            f"{[s.name for s in specs]}, so pass an .npz keyed by those names")
        return {specs[0].name: data}
    with data:
        return {k: data[k] for k in data.files}


def check_inputs(inputs: Mapping[str, np.ndarray] | np.ndarray, specs: list[TensorSpec],
                 where: str) -> dict[str, np.ndarray]:
    """Exact names, dtypes and shapes; a symbolic dimension must be consistent across inputs."""
    if isinstance(inputs, np.ndarray):
        if len(specs) != 1:
            raise UserError(f"{where}: a bare array works only for single-input models; "
                            f"pass a dict keyed by {[s.name for s in specs]}")
        inputs = {specs[0].name: inputs}
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
        out[s.name] = np.ascontiguousarray(a)
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
