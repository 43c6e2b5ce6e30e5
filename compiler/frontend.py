"""ONNX -> Relax import, with the input checks a user needs before a long compile.

Every problem found here is a ``UserError`` naming the model file, and the
node and op where there is one, so the CLI can print it on one line.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import tvm

from compiler.errors import UserError
from runtime.artifact import TensorSpec

ONNX_DOMAINS = ("", "ai.onnx")
# TVM matches com.microsoft contrib ops by op_type (SkipLayerNormalization, FastGelu, ...)
CONTRIB_DOMAINS = ("com.microsoft",)


@dataclass
class OnnxModel:
    proto: onnx.ModelProto
    path: str                   # what error messages call the model
    sha256: str


def load(model: str | os.PathLike | onnx.ModelProto | OnnxModel) -> OnnxModel:
    """Read an ONNX model (with external data) and fail cleanly on unreadable files."""
    import hashlib

    if isinstance(model, OnnxModel):
        return model
    if isinstance(model, onnx.ModelProto):
        proto, path = model, model.graph.name or "<in-memory model>"
        raw = model.SerializeToString()
    else:
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file; pass the path of an .onnx model")
        raw = Path(path).read_bytes()
        try:
            proto = onnx.load_model_from_string(raw)
            if proto.graph.node or proto.graph.input:
                onnx.load_external_data_for_model(proto, os.path.dirname(os.path.abspath(path)))
        except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ... on garbage
            raise UserError(f"{path}: not a readable ONNX model ({first_line(exc)}); "
                            "the file is truncated or corrupt, re-export it") from None
    if not proto.graph.node:
        raise UserError(f"{path}: the ONNX graph has no nodes; the file is truncated, empty or not an ONNX model")
    return OnnxModel(proto, path, hashlib.sha256(raw).hexdigest())


def validate(model: OnnxModel) -> None:
    """ONNX's structural checker (dangling edges, bad attributes).  Run after
    ``check_supported``, which reports unknown ops better than the checker does."""
    try:
        onnx.checker.check_model(model.proto)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"{model.path}: invalid ONNX model: {first_line(exc)}") from None


def supported_op_types() -> frozenset[str]:
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map())


def _walk_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:           # If / Loop / Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _walk_nodes(sub)


def check_supported(model: OnnxModel) -> None:
    """Fail with one error that lists every unsupported op, not just the first one hit."""
    known = supported_op_types()
    missing: OrderedDict[str, list[str]] = OrderedDict()
    for node in _walk_nodes(model.proto.graph):
        domain_ok = node.domain in ONNX_DOMAINS or node.domain in CONTRIB_DOMAINS
        if node.op_type not in known or not domain_ok:
            key = node.op_type if domain_ok else f"{node.domain}::{node.op_type}"
            missing.setdefault(key, []).append(node.name or f"#{len(missing)}")
    if missing:
        parts = []
        for op, nodes in missing.items():
            more = f" and {len(nodes) - 1} more" if len(nodes) > 1 else ""
            parts.append(f"{op} (node {nodes[0]}{more})")
        raise UserError(f"{model.path}: {len(missing)} unsupported op{'s' * (len(missing) > 1)}: "
                        f"{', '.join(parts)}; replace them in the exporter or file an issue with the model")


def _initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}


def _spec(vi: onnx.ValueInfoProto, model: OnnxModel) -> TensorSpec:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        raise UserError(f"{model.path}: graph input/output {vi.name!r} is not a tensor; lowbit compiles tensor graphs only")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
    dims: list[int | str] = []
    for i, d in enumerate(t.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or f"{vi.name}_dim{i}")
    return TensorSpec(vi.name, tuple(dims), dtype)


def input_specs(model: OnnxModel, overrides: dict[str, tuple[int, ...]] | None = None) -> list[TensorSpec]:
    """Graph inputs (initializers excluded), with ``--input-shape`` overrides applied."""
    overrides = dict(overrides or {})
    inits = _initializer_names(model.proto.graph)
    specs = [_spec(vi, model) for vi in model.proto.graph.input if vi.name not in inits]
    names = [s.name for s in specs]
    for name in overrides:
        if name not in names:
            raise UserError(f"{model.path}: --input-shape names {name!r}, but the model's inputs are {names}")
    out = []
    for s in specs:
        if s.name not in overrides:
            out.append(s)
            continue
        new = tuple(overrides[s.name])
        if len(new) != len(s.shape):
            raise UserError(f"{model.path}: --input-shape {s.name}={','.join(map(str, new))} has rank {len(new)}, "
                            f"but input {s.name!r} is {s.shape_str()} (rank {len(s.shape)})")
        for i, (old, val) in enumerate(zip(s.shape, new, strict=True)):
            if isinstance(old, int) and old != val:
                raise UserError(f"{model.path}: --input-shape sets dimension {i} of {s.name!r} to {val}, "
                                f"but the model fixes it at {old} (input shape {s.shape_str()})")
        out.append(TensorSpec(s.name, new, s.dtype))
    return out


def to_relax(model: OnnxModel, specs: list[TensorSpec]):
    """Import into a Relax IRModule; symbolic dimensions become shape variables."""
    from tvm.relax.frontend.onnx import from_onnx

    shape_dict = {s.name: list(s.shape) for s in specs if all(isinstance(d, int) for d in s.shape)}
    dtype_dict = {s.name: s.dtype for s in specs}
    try:
        with _constant_clip():
            return from_onnx(model.proto, shape_dict=shape_dict, dtype_dict=dtype_dict)
    except Exception as exc:  # the importer raises bare TVM errors for unsupported attribute combinations
        raise UserError(f"{model.path}: TVM's ONNX importer rejected the model: {first_line(exc)}"
                        f"{symbolic_hint(specs)}") from None


@contextlib.contextmanager
def _constant_clip():
    """Import Clip with constant bounds as ``relax.clip``.  TVM's converter emits maximum and
    minimum kernels behind NaN guards on the bounds, which hides them from the integer lowering
    (passes/lower_qdq.py folds a Clip into its requantize's clamp, as ReLU6 and u4 need).  The
    importer looks its converters up through one module function, swapped here for the call."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

    def bound(expr, unbounded: float) -> float | None:
        if expr is None:
            return unbounded
        if not isinstance(expr, tvm.ir.GenericConst) or expr.value.numpy().size != 1:
            return None
        value = float(expr.value.numpy().reshape(-1)[0])
        return unbounded if np.isnan(value) else value         # ONNX: a NaN bound is no bound

    class Clip(tvm_onnx.Clip):
        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            lo, hi = bound(inputs[1], -np.inf), bound(inputs[2], np.inf)
            if lo is None or hi is None or not str(inputs[0].ty.dtype).startswith("float"):
                return super()._impl_v13(bb, inputs, attr, params)
            return relax.op.clip(inputs[0], lo, hi)

    original = tvm_onnx._get_convert_map

    def convert_map():
        return {**original(), "Clip": Clip}

    tvm_onnx._get_convert_map = convert_map
    try:
        yield
    finally:
        tvm_onnx._get_convert_map = original


def symbolic_hint(specs: list[TensorSpec]) -> str:
    """When dynamic dimensions are involved, name them and show the --input-shape that fixes them."""
    for s in specs:
        dyn = [(i, d) for i, d in enumerate(s.shape) if isinstance(d, str)]
        if dyn:
            i, d = dyn[0]
            example = ",".join(str(x) if isinstance(x, int) else "1" for x in s.shape)
            return (f"; input {s.name!r} dimension {i} is dynamic ({d!r}): if the model cannot be compiled "
                    f"with it symbolic, pass --input-shape {s.name}={example}")
    return ""


def relax_output_specs(mod, names: list[str]) -> list[TensorSpec]:
    """Output specs from the imported function's return type (static dims resolved by overrides)."""
    from tvm import relax

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    if len(fields) != len(names):
        raise UserError(f"the imported graph returns {len(fields)} tensors for {len(names)} ONNX outputs")
    return [TensorSpec(n, tuple(int(d) if hasattr(d, "value") else str(d) for d in f.shape.values), str(f.dtype))
            for n, f in zip(names, fields, strict=True)]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TVM errors put the useful sentence last, after a C++ backtrace
    msg = next((ln for ln in reversed(lines) if "Error" in ln or "Check failed" in ln), lines[0])
    return msg[:300]


def check_qdq_params(model: OnnxModel) -> None:
    """Reject quantization parameters the integer lowering cannot honour, naming the node:
    per-axis scales on activations (one scale per tensor is what a requantize applies),
    blocked quantization, and per-channel weights not along the output channel."""
    g = model.proto.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        scale = inits.get(n.input[1])
        size = int(np.prod(scale.dims)) if scale is not None else 1
        where = f"{model.path}: node {n.name or n.output[0]!r} ({n.op_type})"
        if attrs.get("block_size", 0):
            raise UserError(f"{where}: blocked quantization (block_size={attrs['block_size']}) is not supported; "
                            "quantize weights per output channel instead")
        if size <= 1:
            continue
        if n.input[0] not in inits:
            raise UserError(f"{where}: per-axis parameters ({size} scales, axis={attrs.get('axis', 1)}) on an "
                            "activation are not supported; quantize activations per tensor")
        for user in consumers.get(n.output[0], []):
            dims = inits[n.input[0]].dims
            axis = attrs.get("axis", 1) % max(len(dims), 1)
            want = {"Conv": 0, "MatMul": len(dims) - 1}.get(user.op_type)
            if want is not None and user.input[1:2] == [n.output[0]] and axis != want:
                raise UserError(f"{where}: {user.op_type} weights quantized along axis {axis}; the integer "
                                f"lowering needs per-output-channel scales (axis {want})")


def static_specs(model: OnnxModel, specs: list[TensorSpec],
                 why: str = "this graph computes shapes at run time") -> list[TensorSpec]:
    """Input specs with every symbolic dimension fixed (to 1, with a warning naming it and ``why``):
    for graphs whose shape arithmetic must be folded before integer lowering, and microcontrollers."""
    from compiler.progress import log

    out = []
    for s in specs:
        symbolic = [d for d in s.shape if not isinstance(d, int)]
        if symbolic:
            log.warning("%s: input %r dimension(s) %s fixed to 1 (%s); use --input-shape %s=... to choose",
                        model.path, s.name, ", ".join(map(str, symbolic)), why, s.name)
        out.append(TensorSpec(s.name, tuple(d if isinstance(d, int) else 1 for d in s.shape), s.dtype))
    return out
