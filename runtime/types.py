"""The plain data every layer shares: the tensors at a model's boundary and how narrow types are
carried.  A leaf (numpy only), so the compiler, the backends and the artifact loader all read the
same definitions without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes  # noqa: F401  (registers int4, float8_e4m3fn, ... as numpy dtype names)
import numpy as np


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


@dataclass(frozen=True)
class BoundaryTensor:
    """A graph input or output at the edge of the integer region: real = scale * (q - zero_point),
    with one scale and zero point, or (``axis`` set) one per index along that axis (a last layer
    whose accumulator leaves at s_x * s_w[c], as NNCF's classifiers do)."""
    name: str                       # the ONNX tensor name
    shape: tuple[int, ...]
    dtype: str                      # the integer type the integer program passes
    scale: float | tuple[float, ...]
    zero_point: int | tuple[int, ...]
    axis: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> BoundaryTensor:
        per_axis = d.get("axis") is not None
        return cls(d["name"], tuple(d["shape"]), d["dtype"], tuple(d["scale"]) if per_axis else d["scale"],
                   tuple(d["zero_point"]) if per_axis else d["zero_point"], d.get("axis"))

    def _along(self, v, dtype) -> np.ndarray:
        """A parameter broadcast against the tensor: a scalar, or a vector along ``axis``."""
        a = np.asarray(v, dtype)
        if self.axis is None:
            return a
        shape = [1] * len(self.shape)
        shape[self.axis] = -1
        return a.reshape(shape)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """The host side of the input quantize (ONNX QuantizeLinear: round half to even, saturate;
        NaN to the maximum, as the compiled quantize does: passes/defined_semantics.py)."""
        info = np.iinfo(self.dtype)
        with np.errstate(invalid="ignore"):
            q = np.clip(np.round(np.asarray(x, np.float32) / self._along(self.scale, np.float32))
                        + self._along(self.zero_point, np.int64), info.min, info.max)
        return np.where(np.isnan(q), info.max, q).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """As the compiled dequantize computes it (TVM's legalization): (q - z) on int32, then
        float32 times the float32 scale."""
        centered = np.asarray(q).astype(np.int32) - self._along(self.zero_point, np.int32)
        return centered.astype(np.float32) * self._along(self.scale, np.float32)


# narrow types (ONNX INT4/UINT4/INT2/UINT2, FLOAT8/FLOAT4) by numpy dtype name -> the byte type that
# carries them through TVM: integers by value, float codes by bit pattern
CONTAINERS = {"int4": "int8", "uint4": "uint8", "int2": "int8", "uint2": "uint8",
              "float8_e4m3fn": "uint8", "float8_e5m2": "uint8", "float4_e2m1fn": "uint8"}
FLOAT_CODES = {"float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"}


def to_container(a: np.ndarray) -> np.ndarray:
    """An array of a narrow type in its byte: integers by value, float codes by bit pattern."""
    box = CONTAINERS.get(a.dtype.name)
    if box is None:
        return a
    return a.view(box) if a.dtype.name in FLOAT_CODES else a.astype(box)


def from_container(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype not in CONTAINERS:
        return a
    return a.view(dtype) if dtype in FLOAT_CODES else a.astype(dtype)
