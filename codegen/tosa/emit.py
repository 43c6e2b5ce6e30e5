"""The integer region of a lowered model as TOSA 1.0 MLIR text, for the pinned IREE (3.13).

One handler per Relax op (``HANDLERS``), over the bindings in order.  Every op is written in MLIR's
generic form (``"tosa.op"(operands) <{properties}> : (types) -> type``), which is what IREE 3.13
parses for every TOSA op alike (the pretty forms differ per op and between versions).

Types.  TOSA 1.0's integer profiles have int8, int16 and int32 tensors (and 48-bit accumulators
inside conv, matmul and rescale).  The lowered graph computes requantize products and I-ViT's
arithmetic in int64; each int64 tensor whose values provably fit int32 (passes/value_ranges.py) is
an i32 tensor here.  The 64-bit product of a requantize, ``(x * m + 2^(e-1)) >> e``
(passes/dyadic.py), is exactly ``tosa.rescale``'s SINGLE_ROUND arithmetic (TOSA 1.0 spec,
apply_scale_32): that pattern becomes one rescale and the product is never materialized.  What
still needs 64 bits (I-LayerNorm's sum of squares, up to 2^54, and its integer square root) is
written on i64 tensors, which MLIR's TOSA dialect and IREE take; the manifest counts those ops.

Unsigned tensors (u8 activations from other quantizers, u16 probabilities and nonnegative outputs)
are carried as signed views, ``stored = value - 2^(bits-1)``: TOSA's convolutions and matmuls take no
uint8, and a view is what they read, with the offset folded into the zero point operand
(sum (stored - (z - 2^(b-1))) w = sum (value - z) w).  Views pass through reshapes, transposes,
slices, pads and max pools unchanged; arithmetic first widens a view (cast, then + 2^(b-1)).

Elementwise arithmetic runs on i32 (TOSA 1.0's ADD, SUB, MAXIMUM and the comparisons take i32 only),
or i64 where an operand or the result needs it: narrower operands are cast up first, and a narrower
result is cast back; the casts are exact, as the ranges prove the values fit.  Layout: the graph is NCHW, TOSA's convolutions and pools are
NHWC, so each one is wrapped in two transposes (IREE's transpose propagation folds the pairs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import relax

from codegen.tosa.runner import SIGNED_VIEW
from passes.value_ranges import Ranges, dtype_range

I32 = dtype_range("int32")
I16 = dtype_range("int16")
ELEMENT = {"int8": "i8", "int16": "i16", "int32": "i32", "int64": "i32", "bool": "i1", "uint8": "i8", "uint16": "i16"}
OFFSET = {u: off for u, (_, off) in SIGNED_VIEW.items()}   # an unsigned tensor's view: stored = value - offset
NUMPY = {"i8": np.int8, "i16": np.int16, "i32": np.int32, "i48": np.int64, "i64": np.int64, "i1": np.bool_}
RANGE = {"i8": "int8", "i16": "int16", "i32": "int32", "i48": "int64", "i64": "int64", "i1": "bool"}
SHIFT_LIMIT = {"i32": 31, "i64": 63}        # TOSA's arithmetic_right_shift takes shifts below the width


class TosaError(ValueError):
    """The model has something TOSA cannot express (yet); the message names the op."""


@dataclass(frozen=True)
class T:
    """A TOSA tensor type."""
    shape: tuple[int, ...]
    elem: str

    def __str__(self) -> str:
        return f"tensor<{''.join(f'{d}x' for d in self.shape)}{self.elem}>"

    def like(self, elem: str | None = None, shape: tuple[int, ...] | None = None) -> T:
        return T(self.shape if shape is None else tuple(shape), elem or self.elem)


@dataclass(frozen=True)
class ShapeT:
    """TOSA 1.0's shape operand type (reshape, slice, pad take their shapes as values)."""
    rank: int

    def __str__(self) -> str:
        return f"!tosa.shape<{self.rank}>"


@dataclass(frozen=True)
class V:
    """An SSA value and its type; ``offset``: the value is stored + offset (an unsigned view)."""
    name: str
    type: T | ShapeT
    offset: int = 0


def _op_name(expr) -> str | None:
    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else None


def _static(expr) -> tuple[int, ...]:
    shape = expr.ty.shape
    try:
        return tuple(int(d) for d in shape.values)
    except (TypeError, AttributeError):
        raise TosaError(f"{_op_name(expr) or 'a value'} has a symbolic shape; fix it with --input-shape") from None


def _dense(a: np.ndarray, elem: str) -> str:
    t = T(a.shape, elem)
    if a.size == 1 or (a.size and np.all(a == a.reshape(-1)[0])):
        v = a.reshape(-1)[0]
        return f"dense<{'true' if (elem == 'i1' and v) else 'false' if elem == 'i1' else int(v)}> : {t}"
    return f'dense<"0x{np.ascontiguousarray(a.astype(NUMPY[elem])).tobytes().hex().upper()}"> : {t}'


class Emitter:
    """Writes one ``func.func @main`` for ``func`` (the integer region: int params, int results)."""

    def __init__(self, func: relax.Function):
        self.func = func
        self.ranges = Ranges(func)
        self.lines: list[str] = []
        self.values: dict = {}
        self.bound: dict = {}           # var -> its binding's value (the rescale pattern looks through)
        self.ops: Counter = Counter()
        self.wide: Counter = Counter()  # ops on i64 tensors
        self.folded: set = set()        # the product and sum inside a requantize that becomes one rescale
        self.count = 0

    # ---- writing ----------------------------------------------------------------------------------

    def _fresh(self) -> str:
        self.count += 1
        return f"%v{self.count}"

    def op(self, name: str, args: list[V], out: T, props: str = "") -> V:
        v = V(self._fresh(), out)
        names = ", ".join(a.name for a in args)
        types = ", ".join(str(a.type) for a in args)
        props = f" <{{{props}}}>" if props else ""
        self.lines.append(f'    {v.name} = "tosa.{name}"({names}){props} : ({types}) -> {out}')
        self.ops[f"tosa.{name}"] += 1
        if isinstance(out, T) and out.elem == "i64":
            self.wide[f"tosa.{name}"] += 1
        return v

    def const(self, a, elem: str) -> V:
        a = np.asarray(a)
        lo, hi = dtype_range(RANGE[elem])
        if a.size and (int(a.min()) < lo or int(a.max()) > hi):
            raise TosaError(f"a constant in [{int(a.min())}, {int(a.max())}] does not fit {elem}")
        v = V(self._fresh(), T(a.shape, elem))
        self.lines.append(f'    {v.name} = "tosa.const"() <{{values = {_dense(a, elem)}}}> : () -> {v.type}')
        return v

    def shape(self, dims) -> V:
        dims = [int(d) for d in dims]
        v = V(self._fresh(), ShapeT(len(dims)))
        text = f"dense<[{', '.join(map(str, dims))}]> : tensor<{len(dims)}xindex>" if dims else "dense<> : tensor<0xindex>"
        self.lines.append(f'    {v.name} = "tosa.const_shape"() <{{values = {text}}}> : () -> {v.type}')
        return v

    # ---- values -----------------------------------------------------------------------------------

    def elem(self, expr) -> str:
        """The TOSA element type of a Relax integer value (int64 only where it fits int32)."""
        dtype = str(expr.ty.dtype)
        if dtype not in ELEMENT:
            raise TosaError(f"{dtype} tensors have no TOSA integer form")
        if dtype == "int64":
            lo, hi = self.ranges.of(expr)
            if lo < I32[0] or hi > I32[1]:
                return "i64"
        return ELEMENT[dtype]

    def get(self, expr, rank: int | None = None) -> V:
        """The TOSA value of a Relax expression: a bound variable's, or a constant written here (at
        ``rank`` dimensions, leading ones added, for broadcasting)."""
        if isinstance(expr, tvm.ir.GenericConst):
            a = expr.value.numpy()
            if a.dtype == np.int64:
                a = a.astype(np.int64)
            if rank is not None and a.ndim < rank:
                a = a.reshape((1,) * (rank - a.ndim) + a.shape)
            if a.dtype == np.bool_:
                return self.const(a, "i1")
            if a.dtype == np.int64 and a.size and (int(a.min()) < I32[0] or int(a.max()) > I32[1]):
                return self.const(a, "i64")
            if str(a.dtype) in OFFSET:
                off = OFFSET[str(a.dtype)]
                return replace(self.const(a.astype(np.int64) - off, ELEMENT[str(a.dtype)]), offset=off)
            return self.const(a, ELEMENT.get(str(a.dtype), "i32"))
        v = self.values.get(expr)
        if v is None or isinstance(v.type, ShapeT):
            raise TosaError(f"a value of unsupported form ({type(expr).__name__})")
        if rank is not None and len(v.type.shape) < rank:     # TOSA broadcasts between equal ranks only
            shape = (1,) * (rank - len(v.type.shape)) + v.type.shape
            v = self.view_of(self.op("reshape", [v, self.shape(shape)], v.type.like(shape=shape)), v)
        return v

    def cast(self, v: V, elem: str) -> V:
        """``v`` as ``elem``: a view widened to i32 or i64 gets its offset back (its value); any other
        cast keeps the stored integers (and the view)."""
        out = v if v.type.elem == elem else replace(self.op("cast", [v], v.type.like(elem)), offset=v.offset)
        if out.offset and elem in ("i32", "i64"):
            shift = self.const(np.full((1,) * len(out.type.shape), out.offset), elem)
            out = self.op("add", [out, shift], out.type)
        return out

    def to_var(self, v: V, var) -> V:
        """An i32 / i64 value (no offset) in ``var``'s representation: its element type, and for an
        unsigned ``var`` its view (the offset taken off before narrowing)."""
        elem, off = self.elem(var), OFFSET.get(str(var.ty.dtype), 0)
        if off:
            v = self.op("sub", [v, self.const(np.full((1,) * len(v.type.shape), off), v.type.elem)], v.type)
            return replace(self.cast(v, elem), offset=off)
        return self.cast(v, elem)

    def view_of(self, v: V, src: V) -> V:
        """``v``, computed from ``src`` by data movement alone, with ``src``'s offset."""
        return replace(v, offset=src.offset)

    def elem_of(self, expr) -> str:
        """The element type ``get(expr)`` has (for a constant, without writing it)."""
        if isinstance(expr, tvm.ir.GenericConst):
            a = expr.value.numpy()
            if a.dtype == np.bool_:
                return "i1"
            wide = a.dtype == np.int64 and a.size and (int(a.min()) < I32[0] or int(a.max()) > I32[1])
            return "i64" if wide else ELEMENT.get(str(a.dtype), "i32")
        return self.get(expr).type.elem

    def work(self, var, *args) -> str:
        """The type an elementwise op computes in: i64 where the result or an operand needs it."""
        return "i64" if "i64" in [self.elem(var), *(self.elem_of(a) for a in args)] else "i32"

    def wide_as(self, expr, work: str, rank: int | None = None) -> V:
        """``expr`` on ``work`` (i32 or i64)."""
        return self.cast(self.get(expr, rank), work)

    def lookup(self, expr):
        """The binding a variable stands for (None for parameters and constants)."""
        return self.bound.get(expr) if isinstance(expr, relax.Var) else None

    # ---- the function -----------------------------------------------------------------------------

    def run(self) -> str:
        params = []
        for i, p in enumerate(self.func.params):
            t = T(_static(p), self.elem(p))
            self.values[p] = V(f"%arg{i}", t, OFFSET.get(str(p.ty.dtype), 0))
            params.append(f"%arg{i}: {t}")
        bindings = [b for block in self.func.body.blocks for b in block.bindings]
        self.bound = {b.var: b.value for b in bindings}
        self.folded = _fold(self)
        for b in bindings:
            self.values[b.var] = self.binding(b.var, b.value)
        body = self.func.body.body
        results = list(body.fields) if isinstance(body, relax.Tuple) else [body]
        outs = [self.get(r) for r in results]
        head = f"  func.func @main({', '.join(params)}) -> ({', '.join(str(o.type) for o in outs)}) {{"
        ret = f"    return {', '.join(o.name for o in outs)} : {', '.join(str(o.type) for o in outs)}"
        return "\n".join(["module {", head, *self.lines, ret, "  }", "}", ""])

    def binding(self, var, value):
        if isinstance(value, relax.Var):
            return self.values[value]
        if isinstance(value, relax.TupleGetItem):      # a field of a split's tuple of values
            return self.values[value.tuple_value][int(value.index)]
        name = _op_name(value)
        handler = HANDLERS.get(name)
        if handler is None:
            raise TosaError(f"{name or type(value).__name__}: no TOSA form yet")
        if var in self.folded:
            return None                 # read through by the rescale that consumes it
        try:
            return handler(self, value, var)
        except TosaError as exc:
            if str(exc).startswith(name):
                raise
            raise TosaError(f"{name}: {exc}") from None


# ---- handlers ---------------------------------------------------------------------------------------

Handler = Callable[[Emitter, relax.Call, relax.Var], V]
HANDLERS: dict[str, Handler] = {}


def handles(*names: str):
    def register(f):
        for n in names:
            HANDLERS[n] = f
        return f
    return register


def _out(em: Emitter, var) -> T:
    return T(_static(var), em.elem(var))


def _narrow(em: Emitter, v: V, var) -> V:
    """``v`` (i32 or i64) in ``var``'s own representation."""
    return em.to_var(v, var)


@handles("relax.astype")
def _astype(em: Emitter, call, var) -> V:
    x = em.get(call.args[0])
    if x.type.elem == em.elem(var) and x.offset == OFFSET.get(str(var.ty.dtype), 0):
        return x
    return em.to_var(em.cast(x, "i64" if x.type.elem == "i64" else "i32"), var)


def _elementwise(tosa: str) -> Handler:
    def handler(em: Emitter, call, var) -> V:
        rank, w = len(_static(var)), em.work(var, *call.args[:2])
        a, b = em.wide_as(call.args[0], w, rank), em.wide_as(call.args[1], w, rank)
        extra = [em.const(np.zeros(1), "i8")] if tosa == "mul" else []
        return _narrow(em, em.op(tosa, [a, b, *extra], _out(em, var).like(w)), var)
    return handler


for _relax, _tosa in (("add", "add"), ("subtract", "sub"), ("multiply", "mul"), ("maximum", "maximum"),
                      ("minimum", "minimum"), ("bitwise_and", "bitwise_and"), ("left_shift", "logical_left_shift")):
    HANDLERS[f"relax.{_relax}"] = _elementwise(_tosa)


@handles("relax.right_shift")
def _right_shift(em: Emitter, call, var) -> V:
    rescaled = _rescale(em, call, var)
    if rescaled is not None:
        return rescaled
    rank, w = len(_static(var)), em.work(var, *call.args[:2])
    lo, hi = em.ranges.of(call.args[1])
    if lo < 0:
        raise TosaError("right_shift by a negative amount")
    shift, limit = call.args[1], SHIFT_LIMIT[w]
    a = em.wide_as(call.args[0], w, rank)
    if isinstance(shift, tvm.ir.GenericConst):
        # a value shifted by its width less one or more is its sign: TOSA takes shifts below the width
        e = shift.value.numpy()
        s = em.const(np.minimum(e, limit).reshape((1,) * (rank - e.ndim) + e.shape), w)
    else:
        s = em.wide_as(shift, w, rank)
        if hi > limit:
            s = em.op("minimum", [s, em.const(np.full((1,) * rank, limit), w)], s.type)
    return _narrow(em, em.op("arithmetic_right_shift", [a, s], _out(em, var).like(w), "round = false"), var)


def _compare(tosa: str, swap: bool = False) -> Handler:
    def handler(em: Emitter, call, var) -> V:
        rank, w = len(_static(var)), em.work(call.args[0], *call.args[:2])
        a, b = em.wide_as(call.args[0], w, rank), em.wide_as(call.args[1], w, rank)
        if swap:
            a, b = b, a
        return em.op(tosa, [a, b], _out(em, var).like("i1"))
    return handler


HANDLERS.update({"relax.equal": _compare("equal"), "relax.greater": _compare("greater"),
                 "relax.greater_equal": _compare("greater_equal"), "relax.less": _compare("greater", True),
                 "relax.less_equal": _compare("greater_equal", True)})


def _nonzero(em: Emitter, b: V, lo: int) -> V:
    """A computed divisor with no zero in it, the same on every element where it is nonzero:
    IREE 3.13 evaluates a division fused behind a reduction (I-ViT's 2^62 / sum(exp)) on the
    tile's padding too, where the divisor reads 0, and x86 traps (SIGFPE; DeiT-tiny's NNCF file).
    max(b, 1) where the ranges prove b >= 1, else 0 replaced by 1 (a zero divisor has no answer
    anyway)."""
    one = em.const(np.ones((1,) * len(b.type.shape)), b.type.elem)
    if lo >= 1:
        return em.op("maximum", [b, one], b.type)
    zero = em.const(np.zeros((1,) * len(b.type.shape)), b.type.elem)
    return em.op("select", [em.op("equal", [b, zero], b.type.like("i1")), one, b], b.type)


@handles("relax.floor_divide")
def _floor_divide(em: Emitter, call, var) -> V:
    """TOSA's INTDIV truncates; floor(a / b) = trunc(a / b) - 1 where the remainder is nonzero and
    the signs differ.  Where a >= 0 and b > 0 (the ranges say so) the two agree."""
    rank, w = len(_static(var)), em.work(var, *call.args[:2])
    a, b = em.wide_as(call.args[0], w, rank), em.wide_as(call.args[1], w, rank)
    out = _out(em, var).like(w)
    (alo, _), (blo, _) = em.ranges.of(call.args[0]), em.ranges.of(call.args[1])
    if not isinstance(call.args[1], tvm.ir.GenericConst):
        b = _nonzero(em, b, blo)
    q = em.op("intdiv", [a, b], out)
    if alo >= 0 and blo > 0:
        return _narrow(em, q, var)
    zero8 = em.const(np.zeros(1), "i8")
    r = em.op("sub", [a, em.op("mul", [q, b, zero8], out)], out)
    zero = em.const(np.zeros((1,) * rank), w)
    inexact = em.op("logical_not", [em.op("equal", [r, zero], out.like("i1"))], out.like("i1"))
    signs = em.op("logical_xor", [em.op("greater", [zero, a], a.type.like("i1")),
                                  em.op("greater", [zero, b], b.type.like("i1"))], out.like("i1"))
    adjust = em.op("cast", [em.op("logical_and", [inexact, signs], out.like("i1"))], out)
    return _narrow(em, em.op("sub", [q, adjust], out), var)


@handles("relax.clip")
def _clip(em: Emitter, call, var) -> V:
    """As maximum then minimum on i32 or i64 (TOSA 1.0's CLAMP takes i8 and i16 only)."""
    rank, w = len(_static(var)), em.work(var, call.args[0])
    lo, hi = (int(v.value) for v in call.args[1:3])
    x = em.wide_as(call.args[0], w)
    full = dtype_range(RANGE[w])
    lo_c = em.const(np.full((1,) * rank, max(lo, full[0])), w)
    hi_c = em.const(np.full((1,) * rank, min(hi, full[1])), w)
    return _narrow(em, em.op("minimum", [em.op("maximum", [x, lo_c], x.type), hi_c], x.type), var)


@handles("relax.where")
def _where(em: Emitter, call, var) -> V:
    rank, w = len(_static(var)), em.work(var, *call.args[1:3])
    c = em.cast(em.get(call.args[0], rank), "i1")
    a, b = em.wide_as(call.args[1], w, rank), em.wide_as(call.args[2], w, rank)
    return _narrow(em, em.op("select", [c, a, b], _out(em, var).like(w)), var)


def _reduce(tosa: str) -> Handler:
    def handler(em: Emitter, call, var) -> V:
        x = em.wide_as(call.args[0], em.work(var, call.args[0]))
        shape = list(x.type.shape)
        axes = range(len(shape)) if call.attrs.axis is None else sorted(int(a) % len(shape) for a in call.attrs.axis)
        for ax in axes:
            shape[ax] = 1
            x = em.op(tosa, [x], x.type.like(shape=tuple(shape)), f"axis = {ax} : i32")
        out = _static(var)
        if tuple(shape) != out:
            x = em.op("reshape", [x, em.shape(out)], x.type.like(shape=out))
        return _narrow(em, x, var)
    return handler


HANDLERS.update({"relax.sum": _reduce("reduce_sum"), "relax.max": _reduce("reduce_max"),
                 "relax.min": _reduce("reduce_min")})


@handles("relax.shape_of")
def _shape_of(em: Emitter, call, var) -> V:
    """A static tensor's shape: the views that read it take their shapes from their own static
    types, so nothing is written; a tensor operand made of it fails in ``get``."""
    _static(call.args[0])
    return V("%shape_of_a_static_tensor", ShapeT(len(_static(call.args[0]))))


@handles("relax.shape_to_tensor")
def _shape_to_tensor(em: Emitter, call, var) -> V:
    """A static shape as the constant tensor of its dimensions."""
    shape = em.lookup(call.args[0])
    if _op_name(shape) != "relax.shape_of":
        raise TosaError("a shape computed at run time")
    return em.const(np.array(_static(shape.args[0])), em.elem(var))


@handles("relax.tensor_to_shape")
def _tensor_to_shape(em: Emitter, call, var) -> V:
    """A shape for a view, which takes its static output type instead (see ``_shape_of``)."""
    return V("%shape_of_a_static_tensor", ShapeT(0))


@handles("relax.reshape", "relax.squeeze", "relax.expand_dims", "relax.flatten")
def _reshape(em: Emitter, call, var) -> V:
    x, out = em.get(call.args[0]), _static(var)
    return x if x.type.shape == out else em.view_of(em.op("reshape", [x, em.shape(out)], x.type.like(shape=out)), x)


@handles("relax.permute_dims")
def _transpose(em: Emitter, call, var) -> V:
    x = em.get(call.args[0])
    axes = call.attrs.axes
    perm = [int(a) for a in axes] if axes is not None else list(reversed(range(len(x.type.shape))))
    return _permute(em, x, perm)


def _permute(em: Emitter, x: V, perm: list[int]) -> V:
    if perm == sorted(perm):
        return x
    shape = tuple(x.type.shape[p] for p in perm)
    return em.view_of(em.op("transpose", [x], x.type.like(shape=shape),
                             f"perms = array<i32: {', '.join(map(str, perm))}>"), x)


def _ints(t) -> list[int]:
    """A tuple of integers (a Relax Tuple of PrimValues or a ShapeExpr)."""
    return [int(v.value) for v in t.fields] if isinstance(t, relax.Tuple) else [int(v) for v in t.values]


@handles("relax.strided_slice")
def _slice(em: Emitter, call, var) -> V:
    x = em.get(call.args[0])
    shape = x.type.shape
    start, size = [0] * len(shape), list(shape)
    axes, begin, end = (call.args[i] for i in (1, 2, 3))
    strides = call.args[4] if len(call.args) > 4 else None
    axes, begin, end = (_ints(a) for a in (axes, begin, end))
    steps = _ints(strides) if strides is not None else [1] * len(axes)
    if any(s != 1 for s in steps):
        raise TosaError("strided_slice with a step other than 1: no TOSA form yet")
    out = _static(var)
    for ax, b in zip(axes, begin, strict=True):
        ax %= len(shape)
        start[ax] = b + shape[ax] if b < 0 else min(b, shape[ax])
        size[ax] = out[ax]
    return em.view_of(em.op("slice", [x, em.shape(start), em.shape(size)], x.type.like(shape=out)), x)


@handles("relax.split")
def _split(em: Emitter, call, var) -> tuple[V, ...]:
    """One slice per part along the axis (ShuffleNetV2's channel split, as ORT's and NNCF's files
    keep it): the parts' static shapes give their sizes."""
    x = em.get(call.args[0])
    axis, start, parts = int(call.attrs.axis) % len(x.type.shape), 0, []
    for field in var.ty.fields:
        size = tuple(int(d) for d in field.shape.values)
        begin = [start if d == axis else 0 for d in range(len(size))]
        parts.append(em.view_of(em.op("slice", [x, em.shape(begin), em.shape(size)], x.type.like(shape=size)), x))
        start += size[axis]
    return tuple(parts)


@handles("relax.concat")
def _concat(em: Emitter, call, var) -> V:
    out = _out(em, var)
    parts = [em.get(f) for f in call.args[0].fields]
    axis = f"axis = {int(call.attrs.axis) % len(out.shape)} : i32"
    if all(p.type.elem == out.elem and p.offset == parts[0].offset for p in parts):
        return em.view_of(em.op("concat", parts, out, axis), parts[0])
    w = em.work(var, *call.args[0].fields)
    return em.to_var(em.op("concat", [em.cast(p, w) for p in parts], out.like(w), axis), var)


@handles("relax.nn.pad")
def _pad(em: Emitter, call, var) -> V:
    x = em.get(call.args[0])
    widths = [int(v) for v in call.attrs.pad_width]
    pad = em.const(np.array([int(call.attrs.pad_value) - x.offset]), x.type.elem)
    return em.view_of(em.op("pad", [x, em.shape(widths), pad], _out(em, var)), x)


def _table(em: Emitter, idx: V, window: np.ndarray, lo: int, out: T) -> V:
    """An 8-bit lookup as ``tosa.table``: TOSA reads ``table[x + 128]`` for an i8 ``x``, so the
    indices ``lo..lo+255`` are moved onto i8 (``x = i - lo - 128``, exact: the range proves the
    span) and the 256 entries are the window of the table they reach (the tail repeats its last
    entry, never read)."""
    table = np.concatenate([window, np.full(256 - window.size, window[-1])])
    moved = em.op("sub", [idx, em.const(np.full((1,) * len(idx.type.shape), lo + 128), idx.type.elem)], idx.type)
    return em.op("table", [em.cast(moved, "i8"), em.const(table, "i8")], out)


def _pick(em: Emitter, call, var) -> V:
    """``take(x, I, axis)`` at constant indices (ONNX Gather of a class token, a head): one slice per
    index along the axis (negative ones from the end, as Gather reads them), joined and reshaped to
    the result."""
    x = em.get(call.args[0])
    shape = x.type.shape
    axis = int(call.attrs.axis) % len(shape) if call.attrs.axis is not None else None
    if axis is None:
        raise TosaError("take without an axis from a computed tensor")
    picks = [int(i) % shape[axis] for i in call.args[1].value.numpy().reshape(-1)]
    size = list(shape)
    size[axis] = 1
    parts = [em.op("slice", [x, em.shape([i if d == axis else 0 for d in range(len(shape))]), em.shape(size)],
                   x.type.like(shape=size)) for i in picks]
    joined = parts[0] if len(parts) == 1 else em.op(
        "concat", parts, x.type.like(shape=[len(picks) if d == axis else n for d, n in enumerate(shape)]),
        f"axis = {axis} : i32")
    return em.view_of(em.op("reshape", [joined, em.shape(_static(var))], x.type.like(shape=_static(var))), x)


@handles("relax.take")
def _take(em: Emitter, call, var) -> V:
    """A lookup: ``tosa.table`` where the result is 8-bit and the indices span at most 256 entries,
    else ``tosa.gather`` of the table's entries (values [1, K, 1]) at the indices [1, W]."""
    table = call.args[0]
    if isinstance(call.args[1], tvm.ir.GenericConst) and not isinstance(table, tvm.ir.GenericConst):
        return _pick(em, call, var)
    idx = em.wide_as(call.args[1], "i32")
    if not isinstance(table, tvm.ir.GenericConst) or table.value.numpy().ndim != 1:
        raise TosaError("take from a non-constant or multi-dimensional tensor at computed indices: no TOSA form yet")
    if call.attrs.axis is not None and int(call.attrs.axis) != 0:
        raise TosaError("take along an axis other than 0")
    lo, hi = em.ranges.of(call.args[1])
    entries = table.value.numpy()
    if lo < 0 or hi >= entries.size:
        raise TosaError(f"take at indices {lo}..{hi} of a {entries.size}-entry table")
    out = _out(em, var)
    off = OFFSET.get(str(var.ty.dtype), 0)
    if out.elem == "i8" and hi - lo < 256:
        return replace(_table(em, idx, entries[lo:hi + 1].astype(np.int64) - off, lo, out), offset=off)
    values = em.const(entries.reshape(1, -1, 1).astype(np.int64) - off, out.elem)
    n = int(np.prod(idx.type.shape))
    idx = em.cast(idx, "i64" if out.elem == "i64" else "i32")      # TOSA gathers i64 values at i64 indices
    flat = em.op("reshape", [idx, em.shape([1, n])], idx.type.like(shape=(1, n)))
    got = em.op("gather", [values, flat], T((1, n, 1), out.elem))
    return replace(em.op("reshape", [got, em.shape(out.shape)], out), offset=off)


def _operand(em: Emitter, expr) -> tuple[V, int]:
    """A contraction operand as an 8- or 16-bit tensor and its zero point: such a tensor as it is;
    ``astype(q, int) - z`` (a centered activation) or ``astype(q, int)`` as q with zero point z (or 0);
    any value whose range fits int8 (else int16), cast."""
    v = em.get(expr)
    if v.type.elem in ("i8", "i16"):
        return v, -v.offset             # a view's offset is part of its zero point
    src, z = em.lookup(expr), 0
    if _op_name(src) == "relax.subtract" and isinstance(src.args[1], tvm.ir.GenericConst) \
            and src.args[1].value.numpy().size == 1:
        src, z = em.lookup(src.args[0]), int(src.args[1].value.numpy().reshape(-1)[0])
    if _op_name(src) == "relax.astype" and str(src.args[0].ty.dtype) in ("int8", "int16", "uint8", "uint16"):
        q = em.get(src.args[0])
        lo, hi = dtype_range(RANGE[q.type.elem])
        if lo <= z - q.offset <= hi:
            return q, z - q.offset
    lo, hi = em.ranges.of(expr)
    for elem in ("i8", "i16"):
        if dtype_range(RANGE[elem])[0] <= lo and hi <= dtype_range(RANGE[elem])[1]:
            return em.cast(v, elem), 0
    raise TosaError(f"a contraction operand in [{lo}, {hi}] is not an 8- or 16-bit tensor")


def _centered(em: Emitter, v: V, z: int, expr, weights: np.ndarray | None = None) -> tuple[V, int, int]:
    """A 16-bit operand with zero point ``z`` as ``(v', 0, d)`` with ``stored - z = v' + d``: TOSA 1.0
    takes a 16-bit matmul's or convolution's zero points as 0 only (ORT's u16 softmax probabilities,
    as views, carry 32768).  ``expr``'s range is that difference's.  Where it fits int16, v' is it
    and d = 0; else (a u16 activation's full span) v' is the stored view itself and d = -z, which
    the caller adds as d * (the sum of each output's constant ``weights``) to the accumulator."""
    if z == 0 or v.type.elem != "i16":
        return v, z, 0
    lo, hi = em.ranges.of(expr)
    if I16[0] <= lo and hi <= I16[1]:
        wide = em.op("cast", [v], v.type.like("i32"))
        d = em.op("sub", [wide, em.const(np.full((1,) * len(v.type.shape), z), "i32")], wide.type)
        return em.op("cast", [d], v.type), 0, 0
    if weights is None:
        raise TosaError(f"a 16-bit contraction operand whose centered values [{lo}, {hi}] do not fit int16, "
                        "times a computed tensor")
    return v, 0, -z


def _split_sum(em: Emitter, acc: V, d: int, sums: np.ndarray, axis: int) -> V:
    """``acc + d * sums`` along ``axis`` (the correction _centered's d asks for); the partial
    accumulator it completes must fit int32 (checked by the caller's bound)."""
    if d == 0:
        return acc
    shape = [1] * len(acc.type.shape)
    shape[axis] = -1
    return em.op("add", [acc, em.const((d * sums.astype(np.int64)).reshape(shape), "i32")], acc.type)


def _partial_bound(weights_abs_sum: np.ndarray) -> None:
    """A 16-bit operand's stored values times int8 weights, before _split_sum's correction: it
    passes through int32 (TOSA has no i48 add), so its bound must fit."""
    if (1 << 15) * int(weights_abs_sum.max(initial=0)) > I32[1]:
        raise TosaError("a 16-bit contraction whose partial sums may pass int32")


def _common(em: Emitter, *vs: V) -> tuple[str, list[V]]:
    """TOSA contracts int8 x int8 into i32 and int16 x int16 (or int16 x int8 weights, for conv)
    into i48: the operands on one width, and the accumulator type."""
    elem = "i16" if any(v.type.elem == "i16" for v in vs) else "i8"
    return ("i48" if elem == "i16" else "i32"), [em.cast(v, elem) for v in vs]


def _to_i32(em: Emitter, acc: V) -> V:
    """An i48 accumulator whose values fit int32 (the lowering's range analysis put it in int32) as
    i32: a rescale by 2^30 / 2^30, exact (TOSA has no cast from i48)."""
    if acc.type.elem == "i32":
        return acc
    return em.op("rescale", [acc, em.const(np.array([1 << 30]), "i32"), em.const(np.array([30]), "i8"),
                             em.const(np.zeros(1), "i48"), em.const(np.zeros(1), "i32")], acc.type.like("i32"),
                 "scale32 = true, rounding_mode = #tosa<rounding_mode<SINGLE_ROUND>>, per_channel = false, "
                 "input_unsigned = false, output_unsigned = false")


@handles("relax.matmul")
def _matmul(em: Emitter, call, var) -> V:
    """``tosa.matmul`` is [N, H, C] x [N, C, W] -> [N, H, W]: leading axes flattened into N (or, for
    constant weights, the rows of x into H with N = 1)."""
    a, za = _operand(em, call.args[0])
    out = _out(em, var)
    w = call.args[1]
    if out.elem == "i64":
        return _wide_matmul(em, call, a, za, out)
    if out.elem != "i32":
        raise TosaError("a matmul that accumulates beyond int32: no TOSA form yet")
    if isinstance(w, tvm.ir.GenericConst):
        wv = w.value.numpy()
        if wv.ndim != 2:
            raise TosaError("a matmul by a constant of more than two dimensions")
        k, n = wv.shape
        rows = int(np.prod(a.type.shape[:-1]))
        acc_type, (a,) = _common(em, a)
        a, za, da = _centered(em, a, za, call.args[0], wv)
        if da:
            _partial_bound(np.abs(wv.astype(np.int64)).sum(0))
        b, zb = em.const(wv.reshape(1, k, n), a.type.elem), 0
        a3 = em.op("reshape", [a, em.shape([1, rows, k])], a.type.like(shape=(1, rows, k)))
        shape3 = (1, rows, n)
    else:
        b, zb = _operand(em, w)
        acc_type, (a, b) = _common(em, a, b)
        (a, za, da), (b, zb, _) = _centered(em, a, za, call.args[0]), _centered(em, b, zb, w)
        if a.type.shape[:-2] != b.type.shape[:-2]:
            raise TosaError("a matmul whose operands' batch axes differ (broadcast): no TOSA form yet")
        batch = int(np.prod(a.type.shape[:-2]))
        (h, k), (_, n) = a.type.shape[-2:], b.type.shape[-2:]
        a3 = em.op("reshape", [a, em.shape([batch, h, k])], a.type.like(shape=(batch, h, k)))
        b = em.op("reshape", [b, em.shape([batch, k, n])], b.type.like(shape=(batch, k, n)))
        shape3 = (batch, h, n)
    zeros = [em.const(np.array([z]), a.type.elem) for z in (za, zb)]
    acc = _to_i32(em, em.op("matmul", [a3, b, *zeros], T(shape3, acc_type)))
    if da:
        acc = _split_sum(em, acc, da, w.value.numpy().astype(np.int64).sum(0), 2)
    return em.op("reshape", [acc, em.shape(out.shape)], out)


def _bytes(em: Emitter, v: V, z: int, expr, weight_abs_sum: int) -> list[tuple[V, int, int]]:
    """A 16-bit operand's values ``stored - z`` (``expr``'s range) as two int8 operands, [(high byte,
    its zero point, 256), (low byte, its zero point, 1)]: value = 256 high + low, so a contraction
    whose sum needs 64 bits is two whose sums fit int32 (each byte at most 255 in size, times the
    weights' absolute sum), joined in int64."""
    lo, hi = em.ranges.of(expr)
    # high - top must fit int8 and so must its zero point -top: high spans at most 256 values of
    # [-128, 255] (a 16-bit value's high byte), so top in [max(hi_byte - 127, -127), min(lo_byte + 128, 128)]
    top = min((lo >> 8) + 128, 128)
    if (hi >> 8) - top > 127 or 255 * weight_abs_sum > I32[1]:
        raise TosaError(f"a contraction of a [{lo}, {hi}] operand whose byte halves' sums pass int32")
    rank = len(v.type.shape)
    i32 = v.type.like("i32")

    def c(value: int) -> V:
        return em.const(np.full((1,) * rank, value), "i32")

    x = em.op("sub", [em.op("cast", [v], i32), c(z)], i32)
    low = em.op("bitwise_and", [x, c(255)], i32)
    high = em.op("arithmetic_right_shift", [x, c(8)], i32, "round = false")
    return [(em.op("cast", [em.op("sub", [high, c(top)], i32)], v.type.like("i8")), -top, 256),
            (em.op("cast", [em.op("sub", [low, c(128)], i32)], v.type.like("i8")), -128, 1)]


def _by_bytes(em: Emitter, v: V, z: int, expr, weight_abs_sum: int, contract) -> V:
    """A contraction of the 16-bit ``v`` whose sums need 64 bits: ``contract(part, zero_point)`` (an
    int8 contraction into i32) on each byte of v (_bytes), joined as 256 acc_high + acc_low in int64."""
    total = None
    for part, zp, scale in _bytes(em, v, z, expr, weight_abs_sum):
        acc = contract(part, zp)
        acc = em.op("cast", [acc], acc.type.like("i64"))
        if scale != 1:
            acc = em.op("mul", [acc, em.const(np.full((1,) * len(acc.type.shape), scale), "i64"),
                                em.const(np.zeros(1), "i8")], acc.type)
        total = acc if total is None else em.op("add", [total, acc], acc.type)
    return total


def _wide_matmul(em: Emitter, call, a: V, za: int, out: T) -> V:
    """x W with constant int8 W whose sums need 64 bits (a 16-bit pooled vector into a classifier):
    one int8 matmul per byte of x (_bytes), 256 acc_high + acc_low in int64."""
    w = call.args[1]
    if not isinstance(w, tvm.ir.GenericConst) or a.type.elem != "i16" or w.value.numpy().ndim != 2:
        raise TosaError("a matmul that accumulates beyond int32 other than a 16-bit tensor times constant weights")
    wv = w.value.numpy().astype(np.int64)
    (k, n), rows = wv.shape, int(np.prod(a.type.shape[:-1]))
    w8 = em.const(wv.reshape(1, k, n), "i8")

    def contract(part: V, zp: int) -> V:
        a3 = em.op("reshape", [part, em.shape([1, rows, k])], part.type.like(shape=(1, rows, k)))
        return em.op("matmul", [a3, w8, em.const(np.array([zp]), "i8"), em.const(np.zeros(1), "i8")],
                     T((1, rows, n), "i32"))
    total = _by_bytes(em, a, za, call.args[0], int(np.abs(wv).sum(0).max()), contract)
    return em.op("reshape", [total, em.shape(out.shape)], out)


NHWC, NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def _crop(em: Emitter, xh: V, extent: list[int]) -> V:
    """An NHWC input cut to the rows and columns its windows read: TOSA wants the last window to end
    at the input's edge, where ONNX and Relax drop what a stride leaves over."""
    n, h, w, c = xh.type.shape
    if [h, w] == extent:
        return xh
    return em.view_of(em.op("slice", [xh, em.shape([0, 0, 0, 0]), em.shape([n, *extent, c])],
                            xh.type.like(shape=(n, *extent, c))), xh)


@handles("relax.nn.conv2d")
def _conv2d(em: Emitter, call, var) -> V:
    """NCHW / OIHW in, as TOSA's NHWC: groups == 1 is ``tosa.conv2d`` (weights OHWI), groups == input
    channels is ``tosa.depthwise_conv2d`` (weights [KH, KW, C, M]), other groups one conv2d per group.
    A convolution whose sums need 64 bits (a 16-bit input, the range analysis' int64 accumulator) is
    one int8 convolution per byte of the input (_bytes), 256 acc_high + acc_low in int64."""
    a = call.attrs
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or any(int(p) for p in a.padding):
        raise TosaError("conv2d other than NCHW/OIHW without padding (the unit pads first)")
    w = call.args[1]
    if not isinstance(w, tvm.ir.GenericConst):
        raise TosaError("conv2d with runtime weights")
    w = w.value.numpy()
    out = _out(em, var)
    if out.elem == "i64":
        x, zx = _operand(em, call.args[0])
        if x.type.elem != "i16":
            raise TosaError("a conv2d that accumulates beyond int32 other than a 16-bit input times int8 weights")
        total = _by_bytes(em, x, zx, call.args[0], int(np.abs(w.astype(np.int64)).reshape(w.shape[0], -1).sum(1).max()),
                          lambda part, zp: _conv_nhwc(em, a, part, zp, w, out))
        return _permute(em, total, NCHW)
    if out.elem != "i32":
        raise TosaError(f"a conv2d into {out.elem}: no TOSA form")
    x, zx, dx = _centered(em, *_operand(em, call.args[0]), call.args[0], w)
    if dx:          # the unit padded with the zero point, so every tap reads (x - z): one sum per output
        _partial_bound(np.abs(w.astype(np.int64)).reshape(w.shape[0], -1).sum(1))
    acc = _to_i32(em, _conv_nhwc(em, a, x, zx, w, out))
    return _permute(em, _split_sum(em, acc, dx, w.astype(np.int64).reshape(w.shape[0], -1).sum(1), 3), NCHW)


def _conv_nhwc(em: Emitter, a, x: V, zx: int, w: np.ndarray, out: T) -> V:
    """The TOSA convolution(s) of the NCHW 8- or 16-bit ``x`` (zero point ``zx``) by the OIHW ``w``
    with attributes ``a``, into an NHWC accumulator: i32, or i48 for a 16-bit ``x``."""
    acc_type = "i48" if x.type.elem == "i16" else "i32"
    groups, (o, i, kh, kw) = int(a.groups), w.shape
    channels = x.type.shape[1]
    geometry = (f"dilation = array<i64: {', '.join(str(int(d)) for d in a.dilation)}>, pad = array<i64: 0, 0, 0, 0>, "
                f"stride = array<i64: {', '.join(str(int(s)) for s in a.strides)}>")
    n, ho, wo = out.shape[0], out.shape[2], out.shape[3]
    extent = [(o_ - 1) * int(st) + (k - 1) * int(d) + 1
              for o_, st, k, d in zip((ho, wo), a.strides, (kh, kw), a.dilation, strict=True)]
    xh = _crop(em, _permute(em, x, NHWC), extent)
    # int16 activations take int8 weights and a 48-bit accumulator and bias (TOSA 1.0, conv2d)
    zeros = [em.const(np.array([zx]), x.type.elem), em.const(np.zeros(1), "i8")]
    bias = "i48" if acc_type == "i48" else "i32"
    geometry = f"acc_type = {acc_type}, {geometry}"
    if groups == 1:
        return em.op("conv2d", [xh, em.const(w.transpose(0, 2, 3, 1), "i8"), em.const(np.zeros(o), bias), *zeros],
                     T((n, ho, wo, o), acc_type), geometry)
    if groups == channels and o % channels == 0 and i == 1:
        m = o // channels
        hwcm = w.reshape(channels, m, kh, kw).transpose(2, 3, 0, 1)
        return em.op("depthwise_conv2d", [xh, em.const(hwcm, "i8"), em.const(np.zeros(o), bias), *zeros],
                     T((n, ho, wo, o), acc_type), geometry)
    per, og = channels // groups, o // groups
    parts = []
    for g in range(groups):
        xg = em.op("slice", [xh, em.shape([0, 0, 0, g * per]), em.shape([*xh.type.shape[:3], per])],
                   xh.type.like(shape=(*xh.type.shape[:3], per)))
        wg = w[g * og:(g + 1) * og].transpose(0, 2, 3, 1)
        parts.append(em.op("conv2d", [xg, em.const(wg, "i8"), em.const(np.zeros(og), bias), *zeros],
                           T((n, ho, wo, og), acc_type), geometry))
    return em.op("concat", parts, T((n, ho, wo, o), acc_type), "axis = 3 : i32")


@handles("relax.nn.max_pool2d")
def _max_pool(em: Emitter, call, var) -> V:
    a = call.attrs
    if str(a.layout) != "NCHW" or any(int(d) != 1 for d in a.dilation):
        raise TosaError("max_pool2d other than NCHW without dilation")
    x = em.get(call.args[0])
    out = _out(em, var)
    top, left, bottom, right = (int(p) for p in a.padding)
    k, s = [int(v) for v in a.pool_size], [int(v) for v in a.strides]
    # the windows end exactly at the padded input's edge: a ceil-mode window past the end gets more
    # padding there (TOSA pads a max pool with the type's minimum), rows no window reads are cut
    xh = _permute(em, x, NHWC)
    pads = []
    for ax, before in enumerate((top, left)):
        need = (out.shape[2 + ax] - 1) * s[ax] + k[ax] - before - x.type.shape[2 + ax]
        pads.append((before, max(need, 0)))
    xh = _crop(em, xh, [min(x.type.shape[2 + ax], (out.shape[2 + ax] - 1) * s[ax] + k[ax] - pads[ax][0])
                        for ax in (0, 1)])
    (top, bottom), (left, right) = pads
    props = (f"kernel = array<i64: {k[0]}, {k[1]}>, pad = array<i64: {top}, {bottom}, {left}, {right}>, "
             f"stride = array<i64: {s[0]}, {s[1]}>")
    pooled = em.view_of(em.op("max_pool2d", [xh], T((out.shape[0], out.shape[2], out.shape[3], out.shape[1]),
                                                    x.type.elem), props), x)
    return _permute(em, pooled, NCHW)


# ---- the requantize: tosa.rescale --------------------------------------------------------------------

@dataclass(frozen=True)
class _Requantize:
    """A matched ``(astype(x, int64) * m + 2^(e-1)) >> e``: its input, its constants, and the
    variables of its product and sum."""
    x: relax.Expr
    m: np.ndarray
    e: np.ndarray
    inner: tuple


def _match_rescale(em: Emitter, call, var) -> _Requantize | None:
    """``call`` (a right_shift, bound to ``var``) as passes/dyadic.rescale builds it, with a
    multiplier and shift tosa.rescale takes (0 <= m < 2^31, 2 <= e <= 62, per tensor or along one
    axis), an input of at most 32 bits and a result that fits 32 bits; else None.  (A result past 32
    bits, a ratio above one on a wide accumulator that a clip then bounds, would wrap in IREE's
    rescale, which truncates apply_scale_32's 64-bit result: that requantize stays 64-bit
    arithmetic.)"""
    e = call.args[1]
    if em.elem(var) == "i64":
        return None
    add = em.lookup(call.args[0])
    if not isinstance(e, tvm.ir.GenericConst) or _op_name(add) != "relax.add" \
            or not isinstance(add.args[1], tvm.ir.GenericConst):
        return None
    mul = em.lookup(add.args[0])
    if _op_name(mul) != "relax.multiply" or not isinstance(mul.args[1], tvm.ir.GenericConst):
        return None
    cast = em.lookup(mul.args[0])
    if _op_name(cast) != "relax.astype" or str(cast.args[0].ty.dtype) not in ("int8", "int16", "int32", "uint8",
                                                                              "uint16"):
        return None
    m, h, e = (c.value.numpy().astype(np.int64) for c in (mul.args[1], add.args[1], e))
    if m.shape != e.shape or not np.array_equal(h, np.where(e > 0, np.left_shift(1, np.maximum(e, 1) - 1), 0)):
        return None
    if e.min() < 2 or e.max() > 62 or m.min() < 0 or m.max() > I32[1] or sum(d > 1 for d in m.shape) > 1:
        return None
    return _Requantize(cast.args[0], m, e, (call.args[0], add.args[0]))


def _rescale(em: Emitter, call, var) -> V | None:
    """The requantize ``call`` closes as one ``tosa.rescale`` (SINGLE_ROUND, scale32: ``(x * m +
    2^(e-1)) >> e`` in 64 bits, TOSA 1.0 apply_scale_32), per channel where m is; None where it is
    not that form."""
    r = _match_rescale(em, call, var)
    if r is None:
        return None
    x = em.get(r.x)
    if x.offset:
        x = em.cast(x, "i32")
    rank = len(x.type.shape)
    channels = [i for i, d in enumerate((1,) * (rank - r.m.ndim) + r.m.shape) if d > 1]
    perm = None
    if channels and channels[0] != rank - 1:        # TOSA rescales per channel along the innermost axis
        perm = [i for i in range(rank) if i != channels[0]] + [channels[0]]
        x = _permute(em, x, perm)
    mv, sv = r.m.reshape(-1), r.e.reshape(-1)
    zin, zout = em.const(np.zeros(1), x.type.elem), em.const(np.zeros(1), "i32")
    v = em.op("rescale", [x, em.const(mv, "i32"), em.const(sv, "i8"), zin, zout], x.type.like("i32"),
              "scale32 = true, rounding_mode = #tosa<rounding_mode<SINGLE_ROUND>>, "
              f"per_channel = {'true' if mv.size > 1 else 'false'}, input_unsigned = false, output_unsigned = false")
    if perm is not None:
        v = _permute(em, v, [perm.index(i) for i in range(rank)])
    return v


def _fold(em: Emitter) -> set:
    """The products and sums of requantizes that become rescales and that nothing else reads."""
    uses: Counter = Counter()
    for value in em.bound.values():
        relax.analysis.post_order_visit(value, lambda e: uses.update([e]) if isinstance(e, relax.Var) else None)
    body = em.func.body.body
    relax.analysis.post_order_visit(body, lambda e: uses.update([e]) if isinstance(e, relax.Var) else None)
    folded = set()
    for var, value in em.bound.items():
        if _op_name(value) == "relax.right_shift" and (r := _match_rescale(em, value, var)) is not None:
            folded.update(v for v in r.inner if uses[v] == 1)
    return folded


def module(func: relax.Function) -> tuple[str, dict[str, int], dict[str, int]]:
    """(the TOSA MLIR text of ``func``, its op histogram, the ops of it on i64 tensors)."""
    em = Emitter(func)
    text = em.run()
    return text, dict(sorted(em.ops.items())), dict(sorted(em.wide.items()))
