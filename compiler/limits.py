"""The size limit that keeps a malformed or hostile model from exhausting memory.

A declared shape costs a few bytes to write and everything to allocate: a graph input of
[100000, 100000, 1000] floats is 40 TB, and so is an Expand to that shape.  Every tensor whose
size is known before anything runs is checked against ``MAX_TENSOR_BYTES`` before calibration,
constant folding or the build could allocate it: the ONNX graph's inputs, outputs and
initializers, what ONNX shape inference derives for each node's outputs, and every tensor of
the imported Relax module (the importer folds shapes that ONNX inference leaves open).
Symbolic dimensions count as 1: a tensor over the limit at batch 1 is over it at any batch.

2 GiB is far above any tensor of the models lowbit targets (the largest zoo activation is a few
MB) and is where TVM's int32 buffer indexing would overflow anyway.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from runtime.errors import UserError
from runtime.io import LIMIT, MAX_TENSOR_BYTES

# initializers at most this large keep their values for shape inference (Reshape / Expand
# targets); larger ones are passed as typed inputs, so inference copies no weights
SHAPE_CONSTANT_ELEMENTS = 1 << 12


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):       # strings, or an elem_type no dtype names
        return 1


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _check(dims: list[int | str], elem_type: int, what: str, path: str) -> None:
    elements = 1
    for d in dims:
        elements *= d if isinstance(d, int) and d >= 0 else 1
    nbytes = elements * _itemsize(elem_type)
    if nbytes > MAX_TENSOR_BYTES:
        shape = "(" + ", ".join(map(str, dims)) + ")"
        raise UserError(f"{path}: {what} has shape {shape}: {_human(nbytes)}, over {LIMIT}; the file is corrupt or "
                        "declares the wrong shape, fix the model's shapes")


def _known_type(elem_type: int, what: str, path: str) -> None:
    try:
        onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: {what} has element type {elem_type}, which no ONNX version defines; the file is "
                        "corrupt: re-export it") from None


def _value_dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    shape = vi.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def check_onnx(proto: onnx.ModelProto, path: str) -> None:
    """Refuse a model declaring, or computing by shape inference, a tensor over the limit.
    Runs before anything reads tensor data by its declared shape."""
    from onnx import numpy_helper

    g = proto.graph
    for t in g.initializer:
        _known_type(t.data_type, f"initializer {t.name!r}", path)
        _check(list(t.dims), t.data_type, f"initializer {t.name!r}", path)
        if t.data_location == onnx.TensorProto.EXTERNAL:        # not loaded: an in-memory model's
            continue
        try:        # the checker misses an unknown element type and data longer than the shape
            numpy_helper.to_array(t)
        except Exception as exc:        # noqa: BLE001 - numpy, onnx and protobuf each raise their own
            raise UserError(f"{path}: initializer {t.name!r} (shape {tuple(t.dims)}, element type {t.data_type}) "
                            f"does not decode ({str(exc).strip().splitlines()[0][:200]}); the file is corrupt: "
                            "re-export it") from None
    for vi in [*g.input, *g.output]:
        kind = "graph input" if vi in g.input else "graph output"
        if vi.type.HasField("tensor_type"):
            _known_type(vi.type.tensor_type.elem_type, f"{kind} {vi.name!r}", path)
        _check(_value_dims(vi), vi.type.tensor_type.elem_type, f"{kind} {vi.name!r}", path)
    for vi in g.value_info:
        _check(_value_dims(vi), vi.type.tensor_type.elem_type, f"tensor {vi.name!r}", path)
    inferred = _infer(proto)
    for n in g.node:            # graph order: the first node that blows up is named, not its consumers
        for o in n.output:
            if o in inferred:
                vi = inferred[o]
                _check(_value_dims(vi), vi.type.tensor_type.elem_type,
                       f"output {o!r} of node {n.name or o!r} ({n.op_type})", path)


def _infer(proto: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """ONNX shape inference on a copy without the weights' data (typed inputs instead), so a
    large model costs no copy of its weights and no 2 GB protobuf limit."""
    g = proto.graph
    small = [t for t in g.initializer if math.prod(t.dims) <= SHAPE_CONSTANT_ELEMENTS]
    inputs = {i.name for i in g.input}         # before IR 4 initializers were listed as inputs too
    typed = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
             for t in g.initializer if math.prod(t.dims) > SHAPE_CONSTANT_ELEMENTS and t.name not in inputs]
    # outputs without their declared shapes, which may be wrong: inference derives them
    outputs = [onnx.helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in g.output]
    light = onnx.helper.make_model(onnx.helper.make_graph(list(g.node), g.name, list(g.input) + typed, outputs, small),
                                   opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    try:
        light = onnx.shape_inference.infer_shapes(light)
    except Exception:               # noqa: BLE001 - inference is a best effort; check_relax is the backstop
        return {}
    return {vi.name: vi for vi in [*light.graph.value_info, *light.graph.output] if vi.type.HasField("tensor_type")}


def check_relax(mod, path: str) -> None:
    """Refuse an imported module with a tensor over the limit, before the build plans memory for it."""
    from tvm import relax

    tensors = []            # checked after the walk: an exception inside TVM's visitor loses its type

    def visit(expr):
        ty = getattr(expr, "ty", None) if isinstance(expr, relax.Var) else None
        if isinstance(ty, relax.TensorType) and hasattr(ty.shape, "values"):
            tensors.append((expr.name, [int(d.value) if hasattr(d, "value") else str(d) for d in ty.shape.values],
                            str(ty.dtype)))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    for name, dims, dtype in tensors:
        try:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        except (KeyError, TypeError, ValueError):
            elem = onnx.TensorProto.UINT8
        _check(dims, elem, f"the imported graph's tensor {name!r} ({dtype})", path)
