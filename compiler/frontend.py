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

from compiler.qoperator import CONVERTERS
from passes.defined_semantics import integer_range, saturate
from runtime.errors import UserError
from runtime.golden import saturating_cast
from runtime.progress import log
from runtime.types import CONTAINERS, TensorSpec

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
            check_text(proto, path)
            if proto.graph.node or proto.graph.input:
                base = os.path.dirname(os.path.abspath(path))
                check_external_data(proto, base, path)
                onnx.load_external_data_for_model(proto, base)
        except UserError:
            raise
        except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ... on garbage
            raise UserError(f"{path}: not a readable ONNX model ({first_line(exc)}); "
                            "the file is truncated or corrupt, re-export it") from None
    if not proto.graph.node:
        raise UserError(f"{path}: the ONNX graph has no nodes; the file is truncated, empty or not an ONNX model")
    return OnnxModel(proto, path, hashlib.sha256(raw).hexdigest())


def validate(model: OnnxModel) -> None:
    """ONNX's structural checker (dangling edges, bad attributes).  Run after
    ``check_supported``, which reports unknown ops better than the checker does."""
    check_edges(model)
    try:
        onnx.checker.check_model(model.proto)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"{model.path}: invalid ONNX model: {first_line(exc)}") from None


def supported_op_types() -> frozenset[str]:
    """TVM's importer's ops, and the QOperator ops compiler/qoperator.py rewrites into them."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map()) | frozenset(CONVERTERS)


def _walk_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:           # If / Loop / Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _walk_nodes(sub)


def unsupported_ops(proto: onnx.ModelProto) -> OrderedDict[str, list[str]]:
    """Each op lowbit cannot compile (``domain::op`` outside the ONNX and contrib domains), with
    the names of the nodes that use it, in graph order."""
    known = supported_op_types()
    missing: OrderedDict[str, list[str]] = OrderedDict()
    for node in _walk_nodes(proto.graph):
        domain_ok = node.domain in ONNX_DOMAINS or node.domain in CONTRIB_DOMAINS
        if node.op_type not in known or not domain_ok:
            key = node.op_type if domain_ok else f"{node.domain}::{node.op_type}"
            missing.setdefault(key, []).append(node.name or f"#{len(missing)}")
    return missing


def check_supported(model: OnnxModel) -> None:
    """Fail with one error that lists every unsupported op, not just the first one hit."""
    missing = unsupported_ops(model.proto)
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


def rebatch(model: OnnxModel, overrides: dict[str, tuple[int, ...]] | None) -> OnnxModel:
    """``model`` with its static batch (dimension 0 of every input and output) set to the one
    ``--input-shape`` asks for, where the graph allows it: ONNX's shape inference at the new batch
    must carry it to every output.  An exporter that baked the batch into a Reshape or Expand
    constant does not allow it, and that is said in one line."""
    inits = _initializer_names(model.proto.graph)
    inputs = [vi for vi in model.proto.graph.input if vi.name not in inits]
    wanted = {}
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        new = (overrides or {}).get(vi.name)
        if new and dims and len(new) == len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value != new[0] \
                and all(not d.HasField("dim_value") or d.dim_value == n for d, n in zip(dims[1:], new[1:], strict=True)):
            wanted[vi.name] = (dims[0].dim_value, new[0])
    if not wanted:
        return model
    olds = {b for b, _ in wanted.values()}
    news = {n for _, n in wanted.values()}
    old_b, new_b = olds.pop(), news.pop()
    fixed = [vi.name for vi in inputs if vi.name not in wanted and vi.type.tensor_type.shape.dim
             and vi.type.tensor_type.shape.dim[0].dim_value == old_b]
    if olds or news or fixed:
        raise UserError(f"{model.path}: --input-shape re-batches {sorted(wanted)} but not every input with batch "
                        f"{old_b} the same way; give every input the same new batch")
    m = onnx.ModelProto()
    m.CopyFrom(model.proto)
    for vi in m.graph.input:
        if vi.name in wanted:
            vi.type.tensor_type.shape.dim[0].dim_value = new_b
    del m.graph.value_info[:]
    for o in m.graph.output:
        if o.type.tensor_type.shape.dim:
            o.type.tensor_type.shape.dim[0].dim_param = "batch"
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
    except Exception as exc:    # noqa: BLE001 - onnx raises InferenceError and others, all about the graph
        raise UserError(f"{model.path}: --input-shape cannot re-batch it from {old_b} to {new_b}: "
                        f"{first_line(exc)}") from None
    for o in inferred.graph.output:
        dims = o.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value != new_b:
            got = ",".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
            raise UserError(f"{model.path}: --input-shape cannot re-batch it from {old_b} to {new_b}: output "
                            f"{o.name!r} stays ({got}), since the exporter fixed the batch inside the graph; "
                            f"compile it as it is (lowbit run takes any multiple of {old_b} samples) or "
                            "re-export with a dynamic batch axis")
    for o, io in zip(m.graph.output, inferred.graph.output, strict=True):
        o.CopyFrom(io)
    return OnnxModel(m, model.path, model.sha256)


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
    dtype_dict = {s.name: CONTAINERS.get(s.dtype, s.dtype) for s in specs}     # int4 & co. travel in a byte
    try:
        with _converters():
            return from_onnx(model.proto, shape_dict=shape_dict, dtype_dict=dtype_dict)
    except Exception as exc:  # the importer raises bare TVM errors for unsupported attribute combinations
        message = f"{model.path}: TVM's ONNX importer rejected the model: {first_line(exc)}{symbolic_hint(specs)}"
    # raised outside the handler, so that no __context__ keeps the importer's frames (and its
    # BlockBuilder, which warns on fd 2 when freed) alive after the compile
    raise UserError(message)


@contextlib.contextmanager
def _converters():
    """lowbit's own converters for a few ONNX ops, in place of TVM's for one import (the importer
    looks its converters up through one module function, swapped here for the call), and each
    node's name kept on the op it becomes:

    - Clip with constant bounds as ``relax.clip``.  TVM's converter emits maximum and minimum
      kernels behind NaN guards on the bounds, which hides them from the integer lowering
      (passes/lower_qdq.py folds a Clip into its requantize's clamp, as ReLU6 and u4 need).
    - Pad with constants as ``relax.nn.pad`` (TVM's converter emits a ``call_tir`` of topi's pad,
      opaque to the lowering), so that the integer lowering pads the integers with the zero point.
    - Cast / CastLike from a float to an integer type saturate (``saturating_cast``'s rule): ONNX
      leaves that conversion undefined out of range, and TVM's converter wraps it through an int32
      or int64 whose own conversion is undefined past its range.  A narrow type (int4, uint2) is
      clamped to its own range and carried in its byte.  passes/defined_semantics.py states the
      rule; constants fold by it too (runtime/golden.saturating_cast).
    - Range(c0, n, c1) of a dimension n (``torch.arange(batch)``, which dynamo exports for the
      attention mask's batch index) as ``relax.arange``, whose length is the expression of n.  TVM's
      converter computes the length into a tensor and a fresh symbol, which then no longer matches
      the batch it came from, and every broadcast against it loses its shape.
    """
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

    class Cast(tvm_onnx.Cast):
        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            x, to = inputs[0], tvm_onnx.get_type(attr["to"])
            bounds = integer_range(to) if to not in ("bool", "uint1") else None
            if bounds is None:
                return super()._impl_v13(bb, inputs, attr, params)
            box = CONTAINERS.get(to, to)
            if isinstance(x, tvm.ir.GenericConst) and x.value.numpy().dtype.kind == "f":
                return relax.const(saturating_cast(x.value.numpy(), *bounds).astype(box), box)
            src = str(x.ty.dtype) if isinstance(getattr(x, "ty", None), relax.TensorType) else None
            if src in ("float16", "float32", "float64"):
                return saturate(x, src, to, box)
            if to != box and src is not None:       # integer -> narrow: keep the low bits, sign-extended
                bits = tvm.DataType(to).bits
                low = relax.op.bitwise_and(relax.op.astype(x, "int32"), relax.const((1 << bits) - 1, "int32"))
                if bounds[0] < 0:
                    low = relax.op.where(relax.op.greater(low, relax.const(bounds[1], "int32")),
                                         relax.op.subtract(low, relax.const(1 << bits, "int32")), low)
                return relax.op.astype(low, box)
            return super()._impl_v13(bb, inputs, attr, params)

    class CastLike(tvm_onnx.CastLike):
        @classmethod
        def _impl_v15(cls, bb, inputs, attr, params):
            like = inputs[1]
            if isinstance(like, relax.ShapeExpr) or not isinstance(getattr(like, "ty", None), relax.TensorType):
                return super()._impl_v15(bb, inputs, attr, params)
            return Cast._impl_v13(bb, [inputs[0]], {"to": str(like.ty.dtype)}, params)

    class Pad(tvm_onnx.Pad):
        @classmethod
        def _lower_pad(cls, bb, inputs, attr, params, allowed_modes):
            before, after, value = cls._parse_pads_and_axes(inputs, params)
            if attr.get("mode", b"constant").decode("utf-8") != "constant" or min(before + after) < 0:
                return super()._lower_pad(bb, inputs, attr, params, allowed_modes)
            return relax.op.nn.pad(inputs[0], [int(v) for pair in zip(before, after, strict=True) for v in pair],
                                   "constant", float(value))

    class Range(tvm_onnx.Range):
        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            start, limit, delta = (tvm_onnx.get_constant(i, params) for i in inputs)
            steps = [int(c.value.numpy().reshape(-1)[0]) if isinstance(c, tvm.ir.GenericConst) and
                     c.value.numpy().size == 1 and c.value.numpy().dtype.kind == "i" else None for c in (start, delta)]
            if None in steps or not tvm.ir.is_prim_expr(limit):
                return super()._impl_v12(bb, inputs, attr, params)
            return relax.op.arange(steps[0], limit, steps[1], str(start.ty.dtype))

    original = tvm_onnx._get_convert_map

    def convert_map():
        return {**original(), "Clip": Clip, "Cast": Cast, "CastLike": CastLike, "Pad": Pad, "Range": Range}

    importer = tvm_onnx.ONNXGraphImporter
    convert_operator = importer._convert_operator

    def convert_named(self, op_name, inputs, attrs, opset):
        """The op a node converts to carries the node's name as its span (a float island names
        its ONNX node with it; spans take no part in equality or code generation)."""
        name = attrs.get("tvm_custom", {}).get("name")
        sym = convert_operator(self, op_name, inputs, attrs, opset)
        if name and isinstance(sym, relax.Call) and isinstance(sym.op, tvm.ir.Op):
            sym = self.bb.normalize(relax.Call(sym.op, sym.args, sym.attrs, sym.ty_args,
                                               span=tvm.ir.Span(tvm.ir.SourceName(name), 0, 0, 0, 0)))
        return sym

    tvm_onnx._get_convert_map = convert_map
    importer._convert_operator = convert_named
    try:
        yield
    finally:
        tvm_onnx._get_convert_map = original
        importer._convert_operator = convert_operator


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


def output_dtypes(model: OnnxModel) -> dict[str, str]:
    return {vi.name: _spec(vi, model).dtype for vi in model.proto.graph.output}


def relax_output_specs(mod, names: list[str], declared: dict[str, str] | None = None) -> list[TensorSpec]:
    """Output specs from the imported function's return type (static dims resolved by overrides);
    an output ``declared`` in a type carried in a byte (runtime/types.CONTAINERS) keeps that type."""
    from tvm import relax

    def dtype(name: str, got: str) -> str:
        want = (declared or {}).get(name)
        return want if want is not None and CONTAINERS.get(want) == got else got

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    if len(fields) != len(names):
        raise UserError(f"the imported graph returns {len(fields)} tensors for {len(names)} ONNX outputs")
    for n, f in zip(names, fields, strict=True):
        if getattr(f, "shape", None) is None:       # a shape that depends on input values (a window's size)
            raise UserError(f"output {n!r}: its shape depends on the input values, not only their shapes; "
                            "lowbit compiles graphs whose shapes follow from the input shapes")
    return [TensorSpec(n, tuple(int(d) if hasattr(d, "value") else str(d) for d in f.shape.values),
                       dtype(n, str(f.dtype))) for n, f in zip(names, fields, strict=True)]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TVM errors put the useful sentence last, after a C++ backtrace
    msg = next((ln for ln in reversed(lines) if "Error" in ln or "Check failed" in ln), lines[0])
    return msg[:300]


def check_qdq_params(model: OnnxModel) -> None:
    """Reject per-channel weights not along the output channel, naming the node: the integer
    lowering cannot honour them.  (Blocked parameters and per-axis ones on activations were
    rewritten into float arithmetic by compiler/narrow_qdq.py.)"""
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
        if size <= 1 or n.input[0] not in inits:
            continue
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
    out = []
    for s in specs:
        symbolic = [d for d in s.shape if not isinstance(d, int)]
        if symbolic:
            log.warning("%s: input %r dimension(s) %s fixed to 1 (%s); use --input-shape %s=... to choose",
                        model.path, s.name, ", ".join(map(str, symbolic)), why, s.name)
        out.append(TensorSpec(s.name, tuple(d if isinstance(d, int) else 1 for d in s.shape), s.dtype))
    return out


# ---- hostile or corrupt files: what the ONNX checker misses or reports without naming the node ----

MIN_OPSET = 7       # TVM's converters assume the NumPy-style broadcasting ONNX adopted in opset 7


def check_opset(model: OnnxModel) -> None:
    """The default domain's opset must be one TVM's importer reads with the right meaning: below
    7 it would apply newer ops' semantics (broadcasting, attributes), above the newest opset this
    onnx knows the ops may have changed."""
    newest = onnx.defs.onnx_opset_version()
    for o in model.proto.opset_import:
        if o.domain in ONNX_DOMAINS and not MIN_OPSET <= o.version <= newest:
            raise UserError(f"{model.path}: ONNX opset {o.version} is not supported; lowbit reads opsets {MIN_OPSET} "
                            f"to {newest} (onnx {onnx.__version__}): convert the model with "
                            "onnx.version_converter.convert_version(model, 17) or re-export it")


def check_text(proto: onnx.ModelProto, path: str) -> None:
    """Every string field must be UTF-8.  Protobuf hands a corrupt one over as ``bytes``, which
    fails far from here (in a name comparison, an f-string, TVM's importer)."""
    from google.protobuf.message import Message

    stack: list = [proto]
    while stack:
        for field, value in stack.pop().ListFields():
            if field.message_type is not None:
                stack.extend([value] if isinstance(value, Message) else value)
            elif field.type == field.TYPE_STRING:
                bad = [v for v in ([value] if isinstance(value, (str, bytes)) else value) if isinstance(v, bytes)]
                if bad:
                    raise UserError(f"{path}: not a readable ONNX model (field {field.name!r} holds {bad[0][:40]!r}, "
                                    "which is not UTF-8 text); the file is truncated or corrupt, re-export it")


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    yield from (s.values for s in graph.sparse_initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def check_external_data(proto: onnx.ModelProto, base: str, path: str) -> None:
    """Before anything is read: external data must be a file in the model's directory (or below
    it).  A location that leaves it (``../../etc/passwd``, an absolute path, a link pointing out)
    would make compiling an untrusted model read any file on the machine into the artifact."""
    root = os.path.realpath(base)
    for t in _tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        try:
            target = os.path.realpath(os.path.join(root, location))
            inside = bool(location) and not os.path.isabs(location) and os.path.commonpath([root, target]) == root
        except ValueError:          # a NUL byte in the location
            inside = False
        if not inside:
            raise UserError(f"{path}: tensor {t.name!r} points its external data at {location!r}, outside the "
                            "model's directory; lowbit reads external data only from beside the model: move the "
                            "file there and set the location to its bare name")
        if not os.path.isfile(target):
            raise UserError(f"{path}: tensor {t.name!r} keeps its data in {location!r}, which is missing from "
                            f"{base}; copy the model's external data file beside it")


def _label(n: onnx.NodeProto) -> str:
    return f"node {n.name or n.output[0]!r} ({n.op_type})"


def check_edges(model: OnnxModel) -> None:
    """Cycles, dangling edges and nodes out of order, each named by node.  The checker stops at
    the first out-of-order input and prints the node as a multi-line dump."""
    g = model.proto.graph
    known = {i.name for i in g.input} | _initializer_names(g) | {""}
    producer: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            producer.setdefault(o, i)
    deps = [[producer[x] for x in n.input if x not in known and x in producer] for n in g.node]
    cycle = _find_cycle(deps)
    if cycle is not None:
        names = [_label(g.node[i]) for i in reversed(cycle)]        # in data-flow order
        chain = " -> ".join(names[:6] + (["..."] if len(names) > 6 else []) + [names[0]])
        raise UserError(f"{model.path}: invalid ONNX model: the graph has a cycle: {chain}; ONNX graphs are "
                        "acyclic, the file is corrupt: re-export it")
    for i, n in enumerate(g.node):
        for x in n.input:
            if x in known:
                continue
            if x not in producer:
                raise UserError(f"{model.path}: invalid ONNX model: {_label(n)} reads tensor {x!r}, which no node, "
                                "graph input or initializer produces; the graph is truncated or corrupt, re-export it")
            if producer[x] > i:
                raise UserError(f"{model.path}: invalid ONNX model: {_label(n)} reads tensor {x!r} before "
                                f"{_label(g.node[producer[x]])} produces it; ONNX needs nodes in topological "
                                "order, re-export the model")


def _find_cycle(deps: list[list[int]]) -> list[int] | None:
    """A cycle of the dependency graph (node -> the nodes it reads from), as node indices, or None.
    Iterative: exported graphs have thousands of nodes, deeper than Python's recursion limit."""
    state = [0] * len(deps)             # 0 unseen, 1 on the current path, 2 finished
    for root in range(len(deps)):
        if state[root]:
            continue
        state[root], path, stack = 1, [root], [iter(deps[root])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt):]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(deps[nxt]))
    return None


def check_scales(model: OnnxModel) -> None:
    """QuantizeLinear / DequantizeLinear scales must be positive and finite: a zero scale divides
    by zero in the requantize, a NaN, Inf or negative one computes garbage without an error.  A
    constant's DequantizeLinear may have zeros (a pruned channel's weights, all 0 at any scale)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.proto.graph.initializer}
    for n in model.proto.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64).reshape(-1)
        constant = n.op_type == "DequantizeLinear" and n.input[0] in inits
        bad = scale[~(np.isfinite(scale) & ((scale >= 0) if constant else (scale > 0)))]
        if bad.size:
            raise UserError(f"{model.path}: {_label(n)}: scale {n.input[1]!r} holds {bad[0]}; quantization scales "
                            f"must be {'non-negative' if constant else 'positive'} and finite, the model is corrupt: "
                            "re-quantize it")
