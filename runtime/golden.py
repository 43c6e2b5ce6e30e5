"""The golden reference: integer-only semantics in plain numpy.

Written independently of the Relax builders in ``passes/`` (it shares only the
offline parameters, e.g. a ``Dyadic`` multiplier), so that a compiled kernel
and this reference check each other bit for bit.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

from passes.dyadic import dyadic_from_ratio, fine_offset
from passes.fine_grid import channel_grid, fixed_table, table_grid
from passes.wide_grid import (
    bias_reach,
    clamped_reach,
    const_reach,
    float_weights,
    function_table,
    linear_reach,
    norm_shift,
    probability_reach,
    product_reach,
    reach_step,
    stream_step,
    term_step,
    wide_reach,
)
from runtime import golden_nonlinear as gnl
from runtime import onnx_reference


def saturating_cast(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Float -> integer as lowbit defines it (ONNX leaves it undefined out of range): NaN -> 0,
    values past an end saturate to it, the rest truncate toward zero.  int64 values in [lo, hi]."""
    a = np.asarray(a, np.float64)
    inside = np.trunc(np.clip(np.where(np.isnan(a), 0.0, a), max(lo, -2.0**63), min(hi, 2.0**63 - 1024)))
    out = inside.astype(np.int64)
    return np.where(a >= hi, hi, np.where(a <= lo, lo, out))


def requantize(x: np.ndarray, m: np.ndarray, e: np.ndarray, qmin: int, qmax: int,
               axis: int = -1, dtype=np.int8) -> np.ndarray:
    """round_half_up(x * m / 2^e), clamped to [qmin, qmax].

    Floor division by 2^e of ``x*m + 2^e/2`` is rounding half toward +inf; done
    with Python integers per distinct (m, e) so no intermediate can overflow.
    """
    x = np.atleast_1d(np.asarray(x, np.int64))      # a scalar term (a constant's) broadcasts as (1,)
    m = np.atleast_1d(np.asarray(m, np.int64))
    e = np.atleast_1d(np.asarray(e, np.int64))
    out = np.empty(x.shape, np.int64)
    if m.size == 1:
        chans = [(slice(None), int(m[0]), int(e[0]))]
    else:
        ax = axis % x.ndim
        chans = [(tuple([slice(None)] * ax + [c]), int(m[c]), int(e[c])) for c in range(m.size)]
    for index, mc, ec in chans:
        num = x[index].astype(object) * mc + ((1 << ec) >> 1)
        out[index] = (num // (1 << ec)).astype(np.int64)
    return np.clip(out, qmin, qmax).astype(dtype)


# --------------------------------------------------------------------------------------
# The integer semantics of a QDQ ONNX graph
# --------------------------------------------------------------------------------------
# Between the input QuantizeLinear and the output DequantizeLinear, every value is an
# integer tensor.  A QDQ graph spells integer layers as DQ -> float op -> Q; here each
# such group is evaluated as the integer program lowbit compiles it to:
#
#   conv / matmul / gemm:  acc = sum((q_x - z_x) * (q_w - z_w)) + q_bias     (int64, exact)
#                          q_y = clamp(requantize(acc, s_x*s_w[c] / s_y) + z_y)
#   residual add:          q_y = clamp(sum_t requantize(q_t - z_t, s_t / s_y) + z_y)
#   concat:                q_y = concat_t(clamp(requantize(q_t - z_t, s_t / s_y) + z_y))
#   (global) average pool: q_y = clamp(requantize(sum(q - z), s_x / (n * s_y)) + z_y)
#   max pool, views:       on the integers, parameters unchanged
#   ReLU / Clip before Q:  folded into the clamp bounds
#
# ``requantize`` is the dyadic multiply-shift with ties rounded up (passes/dyadic.py
# computes m and e; the integer arithmetic here is independent of the Relax builder).

class QDQUnsupported(ValueError):
    pass


class _Q:
    """An integer tensor with its affine parameters (scale/zero point per tensor or per ``axis``)."""

    def __init__(self, q, scale, zero, axis=None, dtype=None):
        self.q = np.asarray(q, np.int64)
        self.scale = np.atleast_1d(np.asarray(scale, np.float32))
        self.zero = np.atleast_1d(np.asarray(zero, np.int64))
        self.axis = axis
        self.dtype = np.dtype(dtype) if dtype is not None else None     # the stored integer type

    def centered(self, channel_axis: int | None = None) -> np.ndarray:
        if self.zero.size == 1:
            return self.q - int(self.zero[0])
        shape = [1] * self.q.ndim
        shape[self.axis % self.q.ndim] = -1
        return self.q - self.zero.reshape(shape)


class _Pending:
    """An integer value awaiting its output QuantizeLinear: one or more (int tensor, scale) terms
    summed after each is requantized, plus real-valued clamp bounds from ReLU/Clip."""

    def __init__(self, terms, lo=-np.inf, hi=np.inf, keep=None, wide=None, reach=None, probabilities=False):
        self.terms = terms            # list of (int64 array, float64 ratio numerator array, channel axis)
        self.lo, self.hi = lo, hi
        self.keep = keep              # an attention mask (bool): elsewhere the quantized result is qmin
        self.of = None                # also a float function of another pending value (_PendingFn)
        # a mean of 8-bit values: the 16-bit grid s_x / 128 (zero point 0) a convolution reads it on
        self.wide = wide
        # a linear result's real bound: read by a convolution on the 16-bit grid reach / 32767
        self.reach = reach
        # a softmax's integers, each row summing to at most 1 / scale (+ 1/2 per term from rounding): a
        # MatMul reads them as they are (NNCF's Swin leaves the probabilities unquantized)
        self.probabilities = probabilities

    def step(self) -> float | None:
        """The 16-bit grid a reader that needs an integer tensor reads this value on, or None."""
        if self.keep is not None:
            return None
        if self.wide is not None and len(self.terms) == 1:
            return self.wide
        return None if self.reach is None else reach_step(clamped_reach(self.reach, self.lo, self.hi))


class _Viewed:
    """A pending value seen through views that split or merge its per-channel ratio's axis with
    others: requantized to one scale as it is, the views then applied to the integers (the two
    orders give the same integers, a requantize to one scale being elementwise)."""

    def __init__(self, p: _Pending, views: list):
        self.p, self.views = p, views       # views: (op, attributes, operands) each


class _PendingFn:
    """A float function ``fn`` (float64 -> float64) of a pending value's real value, elementwise,
    awaiting the QuantizeLinear after it (a quantizer left Conv -> HardSwish or Gemm -> Gelu
    unquantized in between).  That quantize reads it on a 16-bit grid: the pending value is
    requantized to (d, z16) from passes/fine_grid.py, clamped to int16, and fn is computed at
    d (q16 - z16).  ``real()``: the float island's value, for any other reader."""

    def __init__(self, p: _Pending, fn, real, gain=None):
        self.p, self.fn, self.real = p, fn, real
        # times a float constant per channel (NNCF's SmoothQuant factor after an unquantized GELU):
        # (c, axis); quantized at s, each channel is quantized at s / |c|, the table's sign flipped where c < 0
        self.gain = gain


MASKED = -1e30      # an additive mask value this low sends any quantized sum to the grid's minimum


def _mask_keep(b) -> np.ndarray | None:
    """An additive attention mask (a float array of zeros and values <= MASKED, computed from the
    integer mask input): where it keeps; None for anything else."""
    if not _floating_array(b) or b.size < 2 or np.isnan(b).any():
        return None
    return (b == 0) if np.all((b == 0) | (b <= MASKED)) else None


class _Concat:
    """Integer tensors awaiting the output QuantizeLinear of their concatenation: each is
    requantized to the output's parameters, then they are joined."""

    def __init__(self, parts, axis):
        self.parts, self.axis = parts, axis


def _conv_int(x, w, strides, pads, dilations, group):
    """Exact int64 NCHW convolution (im2col), any stride, padding, dilation and group count."""
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (xp.shape[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (xp.shape[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((n, m, oh, ow), np.int64)
    mg = m // group
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        cols = np.empty((n, cg, kh, kw, oh, ow), np.int64)
        for i in range(kh):
            for j in range(kw):
                hi0, wj0 = i * dilations[0], j * dilations[1]
                cols[:, :, i, j] = xs[:, :, hi0:hi0 + strides[0] * oh:strides[0], wj0:wj0 + strides[1] * ow:strides[1]]
        wg = w[g * mg:(g + 1) * mg].reshape(mg, -1)
        out[:, g * mg:(g + 1) * mg] = np.einsum("mk,nkhw->nmhw", wg, cols.reshape(n, cg * kh * kw, oh, ow))
    return out


def _pooled_size(size: int, k: int, s: int, lo: int, hi: int, ceil: bool) -> int:
    """ONNX's output size; in ceil mode a last window that would start in the end padding is dropped."""
    span = size + lo + hi - k
    out = (-(-span // s) if ceil else span // s) + 1
    return out - 1 if ceil and (out - 1) * s >= size + lo else out


def _maxpool_int(q, kernel, strides, pads, fill, ceil_mode: bool = False):
    n, c, h, w = q.shape
    oh = _pooled_size(h, kernel[0], strides[0], pads[0], pads[2], ceil_mode)
    ow = _pooled_size(w, kernel[1], strides[1], pads[1], pads[3], ceil_mode)
    # ceil mode reads past the end padding: more fill there, which max never picks
    extra_h = max(0, (oh - 1) * strides[0] + kernel[0] - (h + pads[0] + pads[2]))
    extra_w = max(0, (ow - 1) * strides[1] + kernel[1] - (w + pads[1] + pads[3]))
    qp = np.pad(q, ((0, 0), (0, 0), (pads[0], pads[2] + extra_h), (pads[1], pads[3] + extra_w)), constant_values=fill)
    out = np.full((n, c, oh, ow), fill, np.int64)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            out = np.maximum(out, qp[:, :, i:i + strides[0] * oh:strides[0], j:j + strides[1] * ow:strides[1]])
    return out


def _bias(b, acc_scale: np.ndarray, node) -> np.ndarray:
    """A bias on the accumulator's grid s_x*s_w: as it is where ORT wrote it there (zero point 0),
    else its real value s_b (q_b - z_b), or a float bias as it is (NNCF's), rounded to that grid,
    half to even."""
    step = acc_scale.astype(np.float32)
    if isinstance(b, _Q) and not np.any(b.zero != 0) and np.allclose(b.scale, step, rtol=1e-6):
        return b.centered()
    real = (_float(("deq", b)) if isinstance(b, _Q) else np.asarray(b, np.float32)).astype(np.float64)
    if step.size > 1 and real.size != step.size:
        raise QDQUnsupported(f"{node.op_type} {node.name}: a per-tensor bias on a per-channel accumulator")
    return np.round(real / (step.astype(np.float64).reshape(real.shape) if step.size > 1 else
                            np.float64(step.reshape(-1)[0]))).astype(np.int64)


def _float(v) -> np.ndarray:
    """A constant operand's real value: an initializer, or the DequantizeLinear of one."""
    if isinstance(v, tuple) and v[0] == "deq":
        q = v[1]
        shape = [1] * q.q.ndim
        if q.scale.size > 1:
            shape[q.axis % q.q.ndim] = -1
        return (q.centered().astype(np.float32) * q.scale.reshape(shape)).astype(np.float32)
    return np.asarray(v, np.float32)


def _real(v, reason: QDQUnsupported) -> np.ndarray | None:
    """An operand's real value for a float island: a dequantized tensor's s (q - z) in float32,
    a result awaiting its requantize as the float32 sum of its terms acc * ratio, clamped; plain
    arrays (floats, indices, shapes) as they are."""
    if v is None:
        return None
    if isinstance(v, tuple) and v[0] == "deq":
        return _float(v)
    if isinstance(v, _PendingFn):
        return v.real()
    if isinstance(v, _Viewed):
        real = _real(v.p, reason)
        for view in v.views:
            real = _view(*view, real)
        return real
    if isinstance(v, _Pending):
        total = None
        for acc, num, axis in v.terms:
            ratio = num.astype(np.float32)
            if ratio.size > 1:
                shape = [1] * acc.ndim
                shape[axis] = -1
                ratio = ratio.reshape(shape)
            term = (acc.astype(np.float32) * ratio).astype(np.float32)
            total = term if total is None else (total + term).astype(np.float32)
        return np.clip(total, np.float32(max(v.lo, -3.4e38)), np.float32(min(v.hi, 3.4e38))).astype(np.float32)
    if isinstance(v, np.ndarray) or np.isscalar(v):
        return np.asarray(v)
    raise reason


def _island(node, ins, reason: QDQUnsupported) -> list:
    """An op with no integer semantics: a float island, as the lowering makes it
    (passes/lower_qdq.py): ONNX's reference implementation on its operands' real values, the
    result quantized by the QuantizeLinear after it as a graph input is.  Raises ``reason`` where
    an operand has no float value (a quantized tensor of a QOperator graph, a concatenation)."""
    from onnx.reference.op_run import OpRun

    class MsGelu(OpRun):
        """com.microsoft Gelu (ORT's contrib op, which compiler/canonicalize.py fuses GELU into):
        erf GELU in float32."""
        op_domain = "com.microsoft"

        def _run(self, x, approximate=None):
            a = {"approximate": approximate} if approximate else {}
            return (ELEMENTWISE64["Gelu"](np.asarray(x, np.float64), a, [x]).astype(np.float32),)

    MsGelu.__name__ = "Gelu"

    values = [_real(v, reason) for v in ins]
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(values)]
    single = _onnx_node(node, names)
    return onnx_reference.evaluator(single, [MsGelu, *IMPORTED_FORMS]).run(
        None, {k: v for k, v in zip(names, values, strict=True) if k})


def _onnx_node(node, inputs: list[str]):
    """``node`` reading ``inputs`` (empty names for absent optional ones), its outputs as they are."""
    from onnx import NodeProto

    out = NodeProto()
    out.CopyFrom(node)
    del out.input[:]
    out.input.extend(inputs)
    return out


def _on_integers(v, deq_of):
    """Max-pool and views act on the integers: QOperator graphs apply them to quantized
    tensors ("q"), QDQ graphs to dequantized ones ("deq"); the result keeps the form."""
    if isinstance(v, tuple) and v[0] == "q":
        return "q", v[1]
    return "deq", deq_of(v)


VIEW_OPS = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Slice", "Expand")


def _view(op: str, a: dict, ins: list, x: np.ndarray) -> np.ndarray:
    """A view op on any array: integers, a pending term's accumulator, or floats."""
    if op == "Flatten":
        ax = a.get("axis", 1)
        return x.reshape(int(np.prod(x.shape[:ax])), -1)
    if op == "Reshape":
        return x.reshape([d if d else x.shape[i] for i, d in enumerate(np.asarray(ins[1]).tolist())])
    if op == "Transpose":
        return x.transpose(a.get("perm"))
    if op == "Gather":
        return np.take(x, np.asarray(ins[1]), axis=a.get("axis", 0))
    if op == "Expand":
        return x * np.ones(np.asarray(ins[1]).tolist(), x.dtype)         # numpy broadcasting, both ways
    if op == "Slice":
        index = [slice(None)] * x.ndim
        axes = np.asarray(ins[3]).tolist() if len(ins) > 3 and ins[3] is not None else range(len(ins[1]))
        steps = np.asarray(ins[4]).tolist() if len(ins) > 4 and ins[4] is not None else [1] * len(ins[1])
        for ax, b, e, st in zip(axes, np.asarray(ins[1]).tolist(), np.asarray(ins[2]).tolist(), steps, strict=True):
            index[ax] = slice(b, e, st)
        return x[tuple(index)]
    if op == "Squeeze":
        return np.squeeze(x, axis=tuple(np.asarray(ins[1]).tolist()) if len(ins) > 1 else None)
    return np.expand_dims(x, tuple(np.asarray(ins[1]).tolist()))


def _moved_axis(op: str, a: dict, old: tuple, new: tuple, axis: int) -> int:
    """Where a per-channel axis goes under a view: permuted by Transpose; kept by a reshape that
    leaves it and everything before it in place, and by a Gather or Slice of other axes; a
    broadcast adds leading axes."""
    axis %= len(old)
    if op == "Transpose":
        return list(a.get("perm")).index(axis)
    if op == "Expand":
        return axis + len(new) - len(old)
    if op == "Gather" and a.get("axis", 0) % len(old) != axis:    # ViT's class token: one axis taken
        return axis if axis < a.get("axis", 0) % len(old) else axis - len(old) + len(new)
    if op == "Slice" and len(old) == len(new) and old[axis] == new[axis]:
        return axis
    for j in range(len(new)):
        if int(np.prod(old[:axis])) == int(np.prod(new[:j])) and new[j] == old[axis]:
            return j
    raise QDQUnsupported(f"{op}: the channels of a per-channel result move apart")


def _f32(f):
    """An elementwise float op as ONNX computes it on float32 tensors: evaluated in float64, the
    result rounded to float32."""
    return lambda *v: np.asarray(f(*(np.asarray(x, np.float64) for x in v))).astype(np.float32)


FLOAT_UNARY = {"Erf": _f32(erf), "Tanh": _f32(np.tanh), "Exp": _f32(np.exp), "Sqrt": _f32(np.sqrt),
               "Sigmoid": _f32(lambda x: 1.0 / (1.0 + np.exp(-x))), "Neg": _f32(np.negative), "Abs": _f32(np.abs)}
FLOAT_BINARY = {"Add": _f32(np.add), "Sub": _f32(np.subtract), "Mul": _f32(np.multiply), "Div": _f32(np.divide),
                "Pow": _f32(np.power)}


def _imported_form(name: str, fn):
    """An ONNX op as the compiled program defines it, for the float islands' reference evaluator;
    ``fn(x, **attributes)`` gets the node's attributes (the schema's defaults filled in)."""
    from onnx.reference.op_run import OpRun

    return type(name, (OpRun,), {"_run": lambda self, x, **a: (fn(np.asarray(x, np.float32), **a),)})


def _f32_ops(*ops):
    return [_f32(op) for op in ops]


_add, _sub, _mul, _div, _max, _log, _exp, _tanh, _neg, _abs = _f32_ops(
    np.add, np.subtract, np.multiply, np.divide, np.maximum, np.log, np.exp, np.tanh, np.negative, np.abs)


def _elu(x, alpha):
    """TVM's Elu: -alpha * relu(1 - exp(x)) + relu(x), alpha a float32 constant."""
    return _add(_mul(np.float32(-alpha), _max(_sub(1.0, _exp(x)), 0.0)), _max(x, 0.0))


# ONNX functions TVM's importer writes as a composition of float32 ops (tvm/relax/frontend/onnx), which is what
# the compiled table tabulates: ONNX's reference formulas round differently at a few of a 16-bit tensor's
# 65,536 values, where a tie to the output grid falls.  Elu's reference, alpha * (exp(x) - 1) in float32,
# also rests on numpy's float32 exp, whose SIMD kernels differ by instruction set (AVX2 against AVX-512):
# one table entry of 65,536 differed between the machines
IMPORTED_FORMS = [
    _imported_form("Elu", lambda x, alpha=1.0: _elu(x, alpha)),
    _imported_form("Selu", lambda x, alpha=1.6732632, gamma=1.050701: _mul(np.float32(gamma), _elu(x, alpha))),
    _imported_form("HardSwish", lambda x: _mul(x, _div(np.clip(_add(x, 3.0), 0, 6).astype(np.float32), 6.0))),
    _imported_form("Softplus", lambda x: _add(_max(x, 0.0), _log(_add(1.0, _exp(_neg(_abs(x))))))),
    _imported_form("Mish", lambda x: _mul(x, _tanh(_log(_add(1.0, _exp(x)))))),
]


def _attr64(a: dict, key: str, default: float) -> np.float64:
    return np.float64(np.float32(a.get(key, default)))      # ONNX float attributes are float32


def _bound(ins: list, i: int, default: float) -> float:
    return float(np.asarray(ins[i]).reshape(-1)[0]) if len(ins) > i and ins[i] is not None else default


def _gelu64(x, a):
    if a.get("approximate", b"none") in (b"tanh", "tanh"):
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


# elementwise ops of one tensor x, in float64, as ONNX defines them: (x, attributes, inputs) -> f(x);
# a function of a pending value is tabulated from these (see _PendingFn)
ELEMENTWISE64 = {
    "Relu": lambda x, a, ins: np.maximum(x, 0.0),
    "Clip": lambda x, a, ins: np.clip(x, _bound(ins, 1, -np.inf), _bound(ins, 2, np.inf)),
    "LeakyRelu": lambda x, a, ins: np.where(x >= 0, x, x * _attr64(a, "alpha", 0.01)),
    "Sigmoid": lambda x, a, ins: 1.0 / (1.0 + np.exp(-x)),
    "HardSigmoid": lambda x, a, ins: np.clip(_attr64(a, "alpha", 0.2) * x + _attr64(a, "beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda x, a, ins: x * (np.clip(x + 3.0, 0.0, 6.0) / 6.0),
    "Gelu": lambda x, a, ins: _gelu64(x, a),
    "Tanh": lambda x, a, ins: np.tanh(x), "Erf": lambda x, a, ins: erf(x), "Exp": lambda x, a, ins: np.exp(x),
    "Neg": lambda x, a, ins: -x, "Abs": lambda x, a, ins: np.abs(x), "Sqrt": lambda x, a, ins: np.sqrt(x),
    "Log": lambda x, a, ins: np.log(x),
}
BINARY64 = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}


def _as_fn(v) -> _PendingFn | None:
    """``v`` as a float function of a pending value, where it is one (its own clamp bounds apply
    when it is requantized to the 16-bit grid)."""
    if isinstance(v, _PendingFn):
        return v if v.gain is None else None
    if isinstance(v, _Pending) and v.keep is None:
        return v.of or _PendingFn(v, lambda x: x, None)
    return None


def _pending_fn(op: str, a: dict, ins: list, real) -> _PendingFn | None:
    """An elementwise op of a pending value (with scalar constants, or of two functions of the
    same one) as one float function of it; ``real`` computes its float island value."""
    if op in BINARY64 and len(ins) == 2:
        f = BINARY64[op]
        for v, k, first in ((ins[0], ins[1], True), (ins[1], ins[0], False)):
            if _plain_scalar(k) and (u := _as_fn(v)) is not None:
                c = np.float64(np.asarray(k, np.float32).reshape(()))
                fn = (lambda x, u=u, c=c: f(u.fn(x), c)) if first else (lambda x, u=u, c=c: f(c, u.fn(x)))
                return _PendingFn(u.p, fn, real)
        ua, ub = _as_fn(ins[0]), _as_fn(ins[1])
        if ua is None or ub is None or ua.p is not ub.p:
            return None
        return _PendingFn(ua.p, lambda x: f(ua.fn(x), ub.fn(x)), real)
    if op not in ELEMENTWISE64 or not ins or (u := _as_fn(ins[0])) is None or \
            any(isinstance(v, (tuple, _Pending, _PendingFn)) for v in ins[1:]):
        return None
    return _PendingFn(u.p, lambda x: ELEMENTWISE64[op](u.fn(x), a, ins), real)


# the ops that read an unquantized operand on its 16-bit grid (``on_wide_grid``)
WIDE_READERS = ("Conv", "MatMul", "Gemm", "ReduceMean", "GlobalAveragePool", "Pad", "LayerNormalization", "Softmax")

NEVER_NAN = object()     # IsNaN of a quantized value


def _floating_array(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype.kind == "f"


def _zeros_like_other(x, zero) -> bool:
    """``zero`` an all-zero float constant that does not broadcast ``x`` (a quantized value) larger."""
    if not _floating_array(zero) or np.any(zero) or _floating_array(x) or x is None:
        return False
    shape = x[1].q.shape if isinstance(x, tuple) else x.terms[0][0].shape if isinstance(x, _Pending) else None
    return shape is not None and np.broadcast_shapes(shape, zero.shape) == tuple(shape)


def _channel_factor(ins, constant: list[bool]) -> tuple | None:
    """(x, c per channel, axis) for a dequantized per-tensor x times a float constant c that varies
    along one axis of x.  ``constant``: which operands are constants (a float function of an
    activation, a squeeze-excitation's sigmoid gate, varies along the channels too, but is not one)."""
    for (x, c), is_constant in zip((ins, ins[::-1]), constant[::-1], strict=True):
        if not is_constant:
            continue
        # a constant quantized per channel, or per tensor (ORT's LayerScale): an initializer has no stored type
        if isinstance(c, tuple) and c[0] == "deq" and (c[1].scale.size > 1 or c[1].dtype is None):
            c = _float(c)
        if isinstance(x, tuple) and x[0] == "deq" and x[1].scale.size == 1 and _floating_array(c) and c.size > 1 \
                and c.ndim <= x[1].q.ndim:
            dims = [1] * (x[1].q.ndim - c.ndim) + list(c.shape)
            varying = [i for i, d in enumerate(dims) if d != 1]
            if len(varying) == 1 and dims[varying[0]] == x[1].q.shape[varying[0]]:
                return x[1], np.asarray(c, np.float32).reshape(-1).astype(np.float64), varying[0]
    return None


def _fn_gain(ins, real) -> _PendingFn | None:
    """f(x) * c[channel] for a float function of a pending value and a float32 constant varying along
    one axis: the function with the gain kept for its quantize."""
    for u, c in (ins, ins[::-1]):
        if isinstance(u, _PendingFn) and u.gain is None and _floating_array(c) and c.dtype == np.float32:
            acc = u.p.terms[0][0]
            axis = _varying_axis(c, np.broadcast_shapes(acc.shape, c.shape))
            if axis is not None:
                return _PendingFn(u.p, u.fn, real, (c.reshape(-1).astype(np.float64), axis))
    return None


def _pending_gain(ins) -> _Pending | None:
    """x * c[channel] for a pending x (one unclamped term) and a float32 constant varying along one
    axis (NNCF's SmoothQuant factor): ratio * |c| along that axis, the integers times sign(c)."""
    for x, c in (ins, ins[::-1]):
        if not isinstance(x, _Pending) or not _floating_array(c) or c.dtype != np.float32 or len(x.terms) != 1 \
                or x.keep is not None or np.isfinite(x.lo) or np.isfinite(x.hi):
            continue
        acc, num, term_axis = x.terms[0]
        axis = _varying_axis(c, np.broadcast_shapes(acc.shape, c.shape))
        if axis is None or (num.size > 1 and term_axis % acc.ndim != axis):
            continue
        c = c.reshape(-1).astype(np.float64)
        shape = [1] * acc.ndim
        shape[axis] = -1
        reach = None if x.reach is None else x.reach * float(np.abs(c).max())
        return _Pending([(acc * np.sign(c).astype(np.int64).reshape(shape), num * np.where(c == 0, 1.0, np.abs(c)),
                          axis)], reach=reach)
    return None


def _span(x: _Q) -> int:
    """max |q - z| over the stored integer type."""
    info = np.iinfo(x.dtype)
    return max(abs(int(info.min) - int(x.zero.reshape(-1)[0])), abs(int(info.max) - int(x.zero.reshape(-1)[0])))


def _varying_axis(c: np.ndarray, shape) -> int | None:
    """The one axis of ``shape`` a constant factor varies along, or None."""
    if c.size <= 1 or c.ndim > len(shape):
        return None
    dims = [1] * (len(shape) - c.ndim) + list(c.shape)
    varying = [i for i, d in enumerate(dims) if d != 1]
    return varying[0] if len(varying) == 1 and dims[varying[0]] == shape[varying[0]] else None


def _floating(v) -> bool:
    """A dequantized activation or a float tensor: what a float op may read."""
    return (isinstance(v, tuple) and v[0] == "deq") or (isinstance(v, np.ndarray) and v.dtype.kind == "f")


def _plain_scalar(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size == 1


def _same_kind(v, kind, q: _Q):
    return ("q", q, v[2]) if kind == "q" else ("deq", q)


def run_qdq(model, feeds: dict, nonlinear="auto") -> dict:
    """Interpret a QDQ ONNX model with lowbit's integer semantics.  Returns float outputs
    (the final DequantizeLinear) keyed by output name.  ``nonlinear``: the softmax / GELU
    family for every node ("auto": poly), or per kind the variant of each node in order."""
    from onnx import helper, numpy_helper

    g = model.graph
    env: dict = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    # initializers and what is computed from them alone (a DequantizeLinear of a weight, Constant nodes)
    constant = {t.name for t in g.initializer}
    for n in g.node:
        if all(i in constant for i in n.input if i):
            constant.update(n.output)
    env.update({k: np.asarray(v) for k, v in feeds.items()})

    def attrs(n):
        return {a.name: helper.get_attribute_value(a) for a in n.attribute}

    def requant(p: _Pending, scale_out, zero_out, qmin: int, qmax: int) -> np.ndarray:
        """``p`` on the output grid; ``scale_out`` one scale, or one per channel (axis 1) of an
        NCHW feature map (NNCF's depthwise inputs), and so ``zero_out``."""
        s_out = np.atleast_1d(np.asarray(scale_out, np.float32))
        zero_out = np.atleast_1d(np.asarray(zero_out, np.int64))
        per = s_out.size > 1
        total = 0
        for acc, num, axis in p.terms:
            if per and axis is not None and axis % acc.ndim != 1:
                raise QDQUnsupported("a per-channel quantize of a result scaled along another axis")
            ratio = num.astype(np.float32).astype(np.float64) / s_out.astype(np.float64)
            d = dyadic_from_ratio(ratio)
            total = total + requantize(acc, d.m, d.e, -(2**62), 2**62,
                                       axis=1 if per else axis if axis is not None else -1, dtype=np.int64)
        # ReLU / Clip bounds are real values; in the output's integer domain they are
        # z + round(bound / s) (round half to even, as QuantizeLinear rounds), per channel
        shape = (1, -1, 1, 1) if per else (1,)
        lo = np.full(s_out.shape, qmin, np.int64)
        hi = np.full(s_out.shape, qmax, np.int64)
        if np.isfinite(p.lo):
            lo = np.maximum(lo, zero_out + np.round(p.lo / s_out).astype(np.int64))
        if np.isfinite(p.hi):
            hi = np.minimum(hi, zero_out + np.round(p.hi / s_out).astype(np.int64))
        out = np.clip(total + zero_out.reshape(shape if zero_out.size > 1 else (1,)), lo.reshape(shape),
                      hi.reshape(shape))
        return out if per else out.reshape(np.shape(total + zero_out))

    def on_wide_grid(v):
        """A value left unquantized, on its 16-bit grid, as a convolution, pool or LayerNorm reads it:
        a pooled or normalized one (``_Pending.wide``), a linear result (its proven bound), a float
        function of one (tabulated on that grid); anything else as it is."""
        if isinstance(v, _PendingFn) and v.gain is None and (step := v.p.step()) is not None:
            table, s_f = function_table(v.fn, step)
            q16 = requant(v.p, step, 0, -(1 << 15), (1 << 15) - 1)
            return ("deq", _Q(table[q16 + (1 << 15)], s_f, 0, None, np.int16))
        if isinstance(v, _Pending) and (step := v.step()) is not None:
            return ("deq", _Q(requant(v, step, 0, -(1 << 15), (1 << 15) - 1), step, 0, None, np.int16))
        if isinstance(v, _Viewed) and (step := v.p.step()) is not None:     # on the grid, then the views
            q16 = requant(v.p, step, 0, -(1 << 15), (1 << 15) - 1)
            for view in v.views:
                q16 = _view(*view, q16)
            return ("deq", _Q(q16, step, 0, None, np.int16))
        return v

    def deq_of(v) -> _Q:
        if not isinstance(v, tuple) or v[0] != "deq":
            raise QDQUnsupported(f"expected a dequantized tensor, got {type(v).__name__}")
        return v[1]

    outputs = {o.name for o in g.output}
    boundary: dict[str, np.ndarray] = {}        # the outputs' dequantizes
    count: dict[str, int] = {}

    def variant(kind: str) -> str:
        if isinstance(nonlinear, str):
            return "poly" if nonlinear == "auto" else nonlinear
        count[kind] = count.get(kind, 0) + 1
        return nonlinear[kind][count[kind] - 1]

    def step(n, a: dict, ins: list, op: str) -> None:
        """One node with lowbit's integer semantics; raises QDQUnsupported where it has none."""
        if op == "QuantizeLinear":
            x, s, z = ins[0], np.float32(np.asarray(ins[1]).reshape(-1)[0]), ins[2] if len(ins) > 2 else np.uint8(0)
            zdt = np.asarray(z).dtype
            info = np.iinfo(zdt)
            if np.asarray(ins[1]).size > 1:     # one scale (and zero point) per channel of a feature map
                s = np.asarray(ins[1], np.float32).reshape(-1)
                zo = np.broadcast_to(np.asarray(z, np.int64).reshape(-1), s.shape)
                if not isinstance(x, (_Pending, _PendingFn)) or a.get("axis", 1) % 4 != 1 or \
                        (isinstance(x, _PendingFn) and x.gain is not None) or \
                        (isinstance(x, _Pending) and x.keep is not None):
                    raise QDQUnsupported(f"QuantizeLinear {n.name}: per-axis, of other than a feature map's result")
                if isinstance(x, _PendingFn):   # f in fixed point on one grid, each channel's ratio t / s_c
                    grid = channel_grid(x.fn, s, zo, int(info.min), int(info.max))
                    table, t = fixed_table(x.fn, grid, s)
                    q16 = requant(x.p, grid.scale, grid.zero, -(1 << 15), (1 << 15) - 1)
                    d = dyadic_from_ratio(np.float64(np.float32(t)) / s.astype(np.float64))
                    zc = zo.reshape(1, -1, 1, 1)
                    val = requantize(table[q16 + (1 << 15)], d.m, d.e, info.min - zc, info.max - zc, axis=1,
                                     dtype=np.int64) + zc
                else:
                    val = requant(x, s, zo, info.min, info.max)
                env[n.output[0]] = ("q", _Q(val, s, zo if len(np.unique(zo)) > 1 else zo[0], 1), zdt)
                return
            if isinstance(x, _PendingFn) and x.gain is not None:   # each channel at s / |c|, the sign flipped
                c, axis = x.gain
                zo = int(np.asarray(z).reshape(-1)[0])
                scales = np.float32(float(s) / np.where(c == 0, 1.0, np.abs(c)))
                grid = channel_grid(x.fn, scales, zo, int(info.min), int(info.max), np.sign(c))
                table, t = fixed_table(x.fn, grid, scales)
                q16 = requant(x.p, grid.scale, grid.zero, -(1 << 15), (1 << 15) - 1)
                shape = [1] * q16.ndim
                shape[axis] = -1
                fixed = table[q16 + (1 << 15)] * np.sign(c).astype(np.int64).reshape(shape)
                d = dyadic_from_ratio(np.float64(np.float32(t)) / scales.astype(np.float64))
                val = requantize(fixed, d.m, d.e, info.min - zo, info.max - zo, axis=axis, dtype=np.int64) + zo
            elif isinstance(x, _PendingFn):
                zo = int(np.asarray(z).reshape(-1)[0])
                grid = table_grid(x.fn, float(s), zo, int(info.min), int(info.max))
                q16 = requant(x.p, grid.scale, grid.zero, -(1 << 15), (1 << 15) - 1)
                with np.errstate(all="ignore"):
                    y = x.fn((q16 - grid.zero).astype(np.float64) * np.float64(grid.scale))
                    val = np.clip(np.round(y / np.float64(s)) + zo, info.min, info.max)
                val = np.where(np.isnan(val), info.max, val)
            elif isinstance(x, _Viewed):
                val = requant(x.p, float(s), int(np.asarray(z).reshape(-1)[0]), info.min, info.max)
                for view in x.views:
                    val = _view(*view, val)
            elif isinstance(x, _Pending):
                val = requant(x, float(s), int(np.asarray(z).reshape(-1)[0]), info.min, info.max)
                if x.keep is not None:
                    val = np.where(x.keep, val, info.min)
            elif isinstance(x, _Concat):
                val = np.concatenate([requant(p if isinstance(p, _Pending) else
                                              _Pending([(p.centered(), p.scale.astype(np.float64), None)]), float(s),
                                              int(np.asarray(z).reshape(-1)[0]), info.min, info.max)
                                      for p in x.parts], axis=x.axis)
            elif isinstance(x, tuple):                          # Q(DQ(q)) with other params: a requantize
                src = deq_of(x)
                val = requant(_Pending([(src.centered(), src.scale.astype(np.float64), src.axis)]),
                              float(s), int(np.asarray(z).reshape(-1)[0]), info.min, info.max)
            else:                                               # the input quantize: float boundary
                val = np.clip(np.round(np.asarray(x, np.float32) / s) + int(np.asarray(z).reshape(-1)[0]),
                              info.min, info.max)
                # NaN: the clamp min(v, max) compares false and selects max (passes/defined_semantics.py)
                val = np.where(np.isnan(val), info.max, val)
            env[n.output[0]] = ("q", _Q(val, s, np.asarray(z).reshape(-1)[0]), zdt)
        elif op == "DequantizeLinear":
            src = ins[0]
            scale, zero = ins[1], (ins[2] if len(ins) > 2 and ins[2] is not None else 0)
            if isinstance(src, tuple) and src[0] == "q":
                qv = _Q(src[1].q, scale, zero, a.get("axis", 1), src[2])
            else:                                               # an initializer (weights, bias)
                qv = _Q(src, scale, zero, a.get("axis", 1))
            if n.output[0] in outputs:      # the float boundary; an op that also reads it reads the integers
                shape = [1] * qv.q.ndim
                if qv.scale.size > 1:
                    shape[qv.axis % qv.q.ndim] = -1
                boundary[n.output[0]] = (qv.centered() * qv.scale.reshape(shape)).astype(np.float32)
            env[n.output[0]] = ("deq", qv)
        elif op == "MatMul" and isinstance(ins[0], _Pending) and ins[0].probabilities:
            # P.V of a softmax no quantize follows: P's own integers times V (on its 16-bit grid)
            p, v = ins[0], deq_of(on_wide_grid(ins[1]))
            if len(p.terms) != 1 or p.keep is not None or v.scale.size != 1:
                raise QDQUnsupported(f"MatMul {n.name}: probabilities times other than one integer tensor")
            (y, sc, _), = p.terms
            num = (np.float32(sc) * v.scale[:1].astype(np.float32)).astype(np.float64)
            k = v.q.shape[-2]
            env[n.output[0]] = _Pending([(y @ v.centered(), num, None)],
                                        reach=probability_reach(k, int(round(1 / float(sc[0]))), _span(v), num))
        elif op in ("Conv", "MatMul", "Gemm"):
            x = deq_of(on_wide_grid(ins[0]))
            out = 0 if op == "Conv" else -1 if op == "MatMul" else 0 if a.get("transB", 0) else 1
            if _floating_array(ins[1]) and ins[1].dtype == np.float32 and ins[1].ndim >= 2:    # left float: int8 per channel
                wq, ws = float_weights(ins[1], out)
                w = _Q(wq, ws, np.zeros(ws.shape, np.int64), out)
            else:
                w = deq_of(ins[1])
            xscale = x.scale[0].astype(np.float32)
            if x.scale.size != 1:               # a depthwise convolution reads each channel at its scale
                if op != "Conv" or a.get("group", 1) != x.scale.size:
                    raise QDQUnsupported(f"{op} {n.name}: per-axis activation parameters (other than a depthwise "
                                         "convolution's input)")
                xscale = np.repeat(x.scale.astype(np.float32), w.q.shape[0] // x.scale.size)
            xi, wi = x.centered(), w.centered()
            if op == "Conv":
                acc = _conv_int(xi, wi, a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0]),
                                a.get("dilations", [1, 1]), a.get("group", 1))
                axis, wscale = 1, w.scale
            elif op == "MatMul":
                acc, axis, wscale = xi @ wi, -1, w.scale
            else:
                xa = xi.T if a.get("transA", 0) else xi
                wb = wi.T if a.get("transB", 0) else wi
                if a.get("alpha", 1.0) != 1.0:
                    raise QDQUnsupported(f"Gemm {n.name}: alpha != 1 is not supported")
                acc, axis, wscale = xa @ wb, -1, w.scale
            num = (xscale * wscale.astype(np.float32)).astype(np.float64)
            bias_in = 2 if op in ("Conv", "Gemm") else None
            if bias_in is not None and len(ins) > bias_in and ins[bias_in] is not None:
                b = _bias(ins[bias_in] if _floating_array(ins[bias_in]) else deq_of(ins[bias_in]), num, n)
                shape = [1] * acc.ndim
                shape[axis] = -1
                acc = acc + b.reshape(shape)
            else:
                b = np.zeros(1, np.int64)
            span = None if x.dtype is None else _span(x)
            if span is None:
                reach = None
            elif w.dtype is not None:           # two activations (attention's Q.K^T, P.V)
                reach = product_reach(xi.shape[-1], span, _span(w), num)
            else:
                reach = bias_reach(linear_reach(wi, out, span, num), b.reshape(-1), num.reshape(-1))
            env[n.output[0]] = _Pending([(acc, num, axis)], reach=reach)
        elif op == "Add" and any(_mask_keep(v) is not None and isinstance(u, (tuple, _Pending)) and
                                 not (isinstance(u, _Pending) and (len(u.terms) != 1 or u.keep is not None))
                                 for u, v in (ins, ins[::-1])) and not any(_zeros_like_other(u, v)
                                                                           for u, v in (ins, ins[::-1])):
            x, b = (ins[0], ins[1]) if _mask_keep(ins[1]) is not None else (ins[1], ins[0])
            if isinstance(x, tuple):
                qv = deq_of(x)
                if qv.scale.size != 1:
                    raise QDQUnsupported(f"Add {n.name}: a mask on a per-channel tensor")
                x = _Pending([(qv.centered(), qv.scale.astype(np.float64), None)])
            env[n.output[0]] = _Pending(x.terms, x.lo, x.hi, keep=_mask_keep(b))
        elif op == "Add" and any(_zeros_like_other(u, v) for u, v in (ins, ins[::-1])):
            env[n.output[0]] = next(u for u, v in (ins, ins[::-1]) if _zeros_like_other(u, v))
        elif op == "IsNaN" and not _floating_array(ins[0]):
            env[n.output[0]] = NEVER_NAN        # s (q - z) is a number whatever q is
        elif op == "Where" and ins[0] is NEVER_NAN:
            env[n.output[0]] = ins[2]
        elif op == "Mul" and (k := _channel_factor(ins, [i in constant for i in n.input])) is not None:
            x, c, axis = k                      # LayerScale: sign(c) (q - z) at ratio s |c| per channel
            shape = [1] * x.q.ndim
            shape[axis] = -1
            sign = np.sign(c).astype(np.int64)
            env[n.output[0]] = _Pending([(x.centered() * sign.reshape(shape),
                                          x.scale.astype(np.float64) * np.where(c == 0, 1.0, np.abs(c)), axis)])
        elif op == "Mul" and (g := _pending_gain(ins)) is not None:
            env[n.output[0]] = g
        elif op == "Add":
            x, y = ins
            if any(isinstance(v, (_PendingFn, _Viewed)) for v in ins) and \
                    all(isinstance(v, (_PendingFn, _Viewed, _Pending, tuple)) for v in ins):
                # a function's table, or the views on their grid, joining a sum
                ins = [on_wide_grid(v) if isinstance(v, (_PendingFn, _Viewed)) else v for v in ins]
                x, y = ins
            if isinstance(x, tuple) and isinstance(y, tuple):
                terms, reach = [], 0.0
                for v in (x, y):
                    qv = deq_of(v)
                    terms.append((qv.centered(), qv.scale.astype(np.float64), qv.axis if qv.scale.size > 1 else None))
                    reach += const_reach(qv.centered() if qv.dtype is None else np.array([_span(qv)]), qv.scale)
                env[n.output[0]] = _Pending(terms, reach=reach)
            elif any(isinstance(v, _Pending) and (np.isfinite(v.lo) or np.isfinite(v.hi)) for v in ins):
                raise QDQUnsupported(f"Add {n.name}: after a clamp that awaits its quantize")
            elif any(isinstance(u, _Pending) and isinstance(v, tuple) and deq_of(v).dtype is None
                     for u, v in (ins, ins[::-1])):                 # matmul + bias (int32 at s_x*s_w)
                p, c = (x, y) if isinstance(x, _Pending) else (y, x)
                acc, num, axis = p.terms[0]
                bq = _bias(deq_of(c), num, n)
                env[n.output[0]] = _Pending([(acc + bq, num, axis)], p.lo, p.hi, reach=None if p.reach is None else
                                            bias_reach(p.reach, bq.reshape(-1), num.reshape(-1)))
            elif any(isinstance(u, _Pending) and len(u.terms) == 1 and u.keep is None and _floating_array(v) and
                     v.size > 1 and v.size != max(v.shape) for u, v in (ins, ins[::-1])):
                # a float tensor (a position embedding NNCF leaves float): on the accumulator's grid
                p, c = (x, y) if isinstance(x, _Pending) else (y, x)
                acc, num, axis = p.terms[0]
                ratio = term_step(num, axis, acc.ndim)
                if tuple(np.broadcast_shapes(c.shape, ratio.shape, acc.shape)) != acc.shape:
                    raise QDQUnsupported(f"Add {n.name}: a tensor constant that does not broadcast against the result")
                q = np.round(np.asarray(c, np.float32).astype(np.float64) / ratio).astype(np.int64)
                if np.abs(q).max() >= 2**30:
                    raise QDQUnsupported(f"Add {n.name}: a tensor constant too large for the accumulator's grid")
                env[n.output[0]] = _Pending([(acc + q, num, axis)],
                                            reach=None if p.reach is None else bias_reach(p.reach, q, ratio))
            elif any(isinstance(u, _Pending) and len(u.terms) == 1 and u.keep is None and _floating_array(v) and
                     (v.size == 1 or v.size == max(v.shape)) for u, v in (ins, ins[::-1])):
                # a float constant added to one accumulator (a bias left float, HardSwish's + 3):
                # its real value on the accumulator's grid
                p, c = (x, y) if isinstance(x, _Pending) else (y, x)
                acc, num, axis = p.terms[0]
                bq = _bias(c, num, n)
                env[n.output[0]] = _Pending([(acc + bq.reshape(c.shape), num, axis)], p.lo, p.hi,
                                            reach=None if p.reach is None else bias_reach(p.reach, bq.reshape(-1),
                                                                                          num.reshape(-1)))
            elif any(isinstance(v, _Pending) for v in ins) and all(isinstance(v, (_Pending, tuple)) for v in ins):
                # a sum no quantize follows (NNCF's residual stream): the terms of both, bounds added
                terms, reach = [], 0.0
                for v in ((x, y) if isinstance(x, _Pending) else (y, x)):
                    if isinstance(v, tuple):
                        qv = deq_of(v)
                        if qv.scale.size != 1 or qv.zero.size != 1:
                            raise QDQUnsupported(f"Add {n.name}: a per-channel activation and a pending result")
                        terms.append((qv.centered(), qv.scale.astype(np.float64), None))
                        reach = None if reach is None else reach + const_reach(np.array([_span(qv)]), qv.scale)
                        continue
                    if v.keep is not None:
                        raise QDQUnsupported(f"Add {n.name}: of a masked pending result")
                    if len(v.terms) > 1 and v.reach is not None:     # the stream so far, kept as int32
                        grid = stream_step(v.reach)
                        terms.append((requant(v, grid, 0, -(1 << 31), (1 << 31) - 1), np.array([grid], np.float64),
                                      None))
                        reach = None if reach is None else reach + v.reach
                        continue
                    terms += v.terms
                    reach = None if reach is None or v.reach is None else reach + v.reach
                env[n.output[0]] = _Pending(terms, reach=reach)
            elif any(_floating(v) for v in ins) and any(_plain_scalar(v) for v in ins):
                env[n.output[0]] = FLOAT_BINARY[op](_float(x), _float(y))
            else:
                raise QDQUnsupported(f"Add {n.name}: operands are not a supported integer pattern")
        elif op in ("Relu", "Clip") and isinstance(ins[0], _Concat) and all(isinstance(q, _Pending)
                                                                          for q in ins[0].parts):
            lo = float(ins[1]) if op == "Clip" and len(ins) > 1 and ins[1] is not None else 0.0 if op == "Relu" \
                else -np.inf
            hi = float(ins[2]) if op == "Clip" and len(ins) > 2 and ins[2] is not None else np.inf
            env[n.output[0]] = _Concat([_Pending(q.terms, max(q.lo, lo), min(q.hi, hi)) for q in ins[0].parts],
                                       ins[0].axis)
        elif op in ("Relu", "Clip") and isinstance(ins[0], _Viewed):
            step(n, a, [ins[0].p, *ins[1:]], op)
            env[n.output[0]] = _Viewed(env[n.output[0]], ins[0].views)
        elif op in ("Relu", "Clip"):
            p = ins[0]
            if isinstance(p, tuple) and deq_of(p).zero.size == 1:   # on a dequantized tensor
                x = deq_of(p)
                if op == "Relu":        # on the grid: max(q, z)
                    env[n.output[0]] = ("deq", _Q(np.maximum(x.q, x.zero[0]), x.scale, x.zero, x.axis, x.dtype))
                    return
                p = _Pending([(x.centered(), x.scale.astype(np.float64), None)])       # Clip: requantized
            if not isinstance(p, _Pending):
                raise QDQUnsupported(f"{op} {n.name}: only supported right before a QuantizeLinear")
            lo, hi = 0.0, np.inf
            if op == "Clip":
                lo = float(ins[1]) if len(ins) > 1 and ins[1] is not None else -np.inf
                hi = float(ins[2]) if len(ins) > 2 and ins[2] is not None else np.inf
            env[n.output[0]] = _Pending(p.terms, max(p.lo, lo), min(p.hi, hi), wide=p.wide, reach=p.reach)
        elif op in ("GlobalAveragePool", "ReduceMean"):
            axes = (2, 3) if op == "GlobalAveragePool" else tuple(a.get("axes", ins[1] if len(ins) > 1 else ()))
            keep = op == "GlobalAveragePool" or a.get("keepdims", 1)

            def mean(x: _Q) -> _Pending:
                total = x.centered().sum(axis=axes, keepdims=bool(keep))
                eight = x.dtype is not None and x.dtype.itemsize == 1 and x.scale.size == 1
                return _Pending([(total, x.scale.astype(np.float64) / int(np.prod([x.q.shape[i] for i in axes])),
                                  None)], wide=float(np.float32(x.scale[0] / np.float32(128))) if eight else None)

            if isinstance(ins[0], _Concat):     # of each part of a concatenation of different grids
                rank = ins[0].parts[0].q.ndim
                cat, reduced = ins[0].axis % rank, [ax % rank for ax in axes]
                if cat in reduced:
                    raise QDQUnsupported(f"{op} {n.name}: across a concatenation of different grids")
                env[n.output[0]] = _Concat([mean(p) for p in ins[0].parts],
                                           cat - (0 if keep else sum(ax < cat for ax in reduced)))
            else:
                env[n.output[0]] = mean(deq_of(on_wide_grid(ins[0])))
        elif op == "BatchNormalization":
            # y = g*x + b, g = gamma/sqrt(var+eps), b = beta - mean*g; the shift b is put on the input's
            # grid refined 2^k times: y = sign(g) * ((q - z) * 2^k + round(2^k * b / (s_x*g))) * s_x*|g| / 2^k
            gamma, beta, mean, var = (np.asarray(_float(v), np.float64).reshape(-1) for v in ins[1:5])
            gain = gamma / np.sqrt(var + np.float64(np.float32(a.get("epsilon", 1e-5))))

            def affine(x: _Q, gain, shift) -> _Pending:
                s_x = np.float64(x.scale[0])
                shape = [1] * x.q.ndim
                shape[1] = -1
                info = np.iinfo(x.dtype)
                k, offset = fine_offset(shift / (s_x * gain), int(info.max) - int(info.min))
                shifted = x.centered() * (1 << k) + offset.reshape(shape)
                # the 16-bit grid a pool reads it on: it holds |g| s_x |q - z| + |b| for every 8-bit q
                span = max(abs(int(info.min) - int(x.zero[0])), abs(int(info.max) - int(x.zero[0])))
                wide = float(np.float32(np.max(np.abs(gain) * s_x * span + np.abs(shift)) / 32767)) \
                    if info.bits == 8 else None
                return _Pending([(shifted * np.sign(gain).astype(np.int64).reshape(shape), s_x * np.abs(gain) / 2.0**k,
                                  1)], wide=wide)

            if isinstance(ins[0], _Concat) and ins[0].axis % 4 == 1:     # each part's channels, on its grid
                bounds = np.cumsum([0] + [p.q.shape[1] for p in ins[0].parts])
                env[n.output[0]] = _Concat([affine(p, gain[lo:hi], (beta - mean * gain)[lo:hi])
                                            for p, lo, hi in zip(ins[0].parts, bounds[:-1], bounds[1:], strict=True)],
                                           ins[0].axis)
            else:
                env[n.output[0]] = affine(deq_of(ins[0]), gain, beta - mean * gain)
        elif op == "AveragePool":
            # sum / count per window, count the window's cells inside the input (count_include_pad=0)
            # or inside the padded input (ceil mode's last window is cut at its end): exactly
            # sum * (L / count) at one ratio s_x / L, L the counts' least common multiple
            x = deq_of(ins[0])
            k = a["kernel_shape"]
            pads = list(a.get("pads", [0, 0, 0, 0]))
            if any(d != 1 for d in a.get("dilations", [1, 1])) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET",
                                                                                                      "NOTSET"):
                raise QDQUnsupported(f"AveragePool {n.name}: dilations or auto_pad")
            strides, ceil, include = a.get("strides", [1, 1]), bool(a.get("ceil_mode", 0)), \
                bool(a.get("count_include_pad", 0))
            counts = []
            for ax in (0, 1):
                size = x.q.shape[2 + ax]
                out = _pooled_size(size, k[ax], strides[ax], pads[ax], pads[ax + 2], ceil)
                start = np.arange(out) * strides[ax] - pads[ax]
                lo, hi = (-pads[ax], size + pads[ax + 2]) if include else (0, size)
                counts.append(np.minimum(start + k[ax], hi) - np.maximum(start, lo))
                pads[ax + 2] += max(0, (out - 1) * strides[ax] + k[ax] - (size + pads[ax] + pads[ax + 2]))
            count = np.outer(*counts)
            lcm = int(np.lcm.reduce(count.reshape(-1)))
            span = max(abs(int(np.iinfo(x.dtype).min) - int(x.zero[0])), abs(int(np.iinfo(x.dtype).max) - int(x.zero[0])))
            if k[0] * k[1] * span * lcm >= 2**31:       # sum * (L / count) must fit the int32 the lowering uses
                raise QDQUnsupported(f"AveragePool {n.name}: the counts' common multiple {lcm} overflows int32")
            channels = x.q.shape[1]
            total = _conv_int(x.centered(), np.ones((channels, 1, *k), np.int64), strides, pads, [1, 1], channels)
            env[n.output[0]] = _Pending([(total * (lcm // count), x.scale.astype(np.float64) / lcm, None)])
        elif op in ("Mul", "Div") and isinstance(ins[0], _Viewed) and np.asarray(ins[1]).size == 1 and \
                float(np.asarray(ins[1]).reshape(-1)[0]) > 0:
            step(n, a, [ins[0].p, *ins[1:]], op)
            env[n.output[0]] = _Viewed(env[n.output[0]], ins[0].views)
        elif op in ("Mul", "Div") and isinstance(ins[0], _Pending) and np.asarray(ins[1]).size == 1:
            c = float(np.asarray(ins[1]).reshape(-1)[0])      # attention's 1/sqrt(d), folded into the ratio
            acc, num, axis = ins[0].terms[0]
            factor, reach = c if op == "Mul" else 1.0 / c, ins[0].reach
            env[n.output[0]] = _Pending([(acc, num * factor, axis)], ins[0].lo, ins[0].hi,
                                        reach=None if reach is None else reach * factor)
        elif op in ("Softmax", "Gelu"):
            x = deq_of(on_wide_grid(ins[0]) if op == "Softmax" else ins[0])
            if op == "Softmax" and a.get("axis", -1) % x.q.ndim != x.q.ndim - 1:
                raise QDQUnsupported(f"Softmax {n.name}: over an axis other than the last")
            kind = "softmax" if op == "Softmax" else "gelu"
            y, sc = (gnl.softmax if kind == "softmax" else gnl.gelu)(variant(kind), x.centered(), float(x.scale[0]))
            env[n.output[0]] = _Pending([(y, np.array([sc]), None)], probabilities=kind == "softmax")
        elif op == "LayerNormalization":
            x = deq_of(on_wide_grid(ins[0]))
            gamma, beta = (np.asarray(_float(v), np.float64).reshape(-1) for v in ins[1:3])
            if x.dtype is not None and x.dtype.itemsize == 2 and (k := norm_shift(gamma.size)):
                # 16 bits over many channels: the grid k bits coarser (the integer variance in int64)
                x = _Q((x.centered() + (1 << (k - 1))) >> k, np.float32(x.scale * 2.0**k), 0, None, np.int32)
            y, sc = gnl.layer_norm(x.centered(), float(x.scale[0]), gamma, beta, float(np.float32(a.get("epsilon", 1e-5))))
            # a reader that needs an integer tensor reads it on the 16-bit grid |gamma| sqrt(C) + |beta| bounds
            wide = float(np.float32((np.abs(gamma).max() * np.sqrt(gamma.size) + np.abs(beta).max()) / 32767))
            env[n.output[0]] = _Pending([(y, sc, -1)], wide=wide, reach=wide_reach(wide))
        elif op == "Concat" and len(ins) > 1 and all(isinstance(v, _Pending) for v in ins):
            # results awaiting one requantize on the same ratios (Swin's roll of a block's output): per term
            first, axis = ins[0], a["axis"]
            for v in ins:
                if v.keep is not None or (v.lo, v.hi) != (first.lo, first.hi) or len(v.terms) != len(first.terms) or \
                        any(not np.array_equal(n1, n2) or a1 != a2 or (a1 is not None and a1 % t1.ndim == axis % t1.ndim)
                            for (t1, n1, a1), (_, n2, a2) in zip(v.terms, first.terms, strict=True)):
                    raise QDQUnsupported(f"Concat {n.name}: of results awaiting their requantize on different ratios")
            terms = [(np.concatenate([v.terms[i][0] for v in ins], axis=axis), num, term_axis)
                     for i, (_, num, term_axis) in enumerate(first.terms)]
            reach = None if any(v.reach is None for v in ins) else max(v.reach for v in ins)
            env[n.output[0]] = _Pending(terms, first.lo, first.hi, reach=reach)
        elif op == "Concat" and any(isinstance(v, _Pending) for v in ins):
            # a result awaiting its requantize with float constants (ViT's class token, NNCF): each
            # constant on the accumulator's grid, concatenated with it
            (p,) = [v for v in ins if isinstance(v, _Pending)] if sum(isinstance(v, _Pending) for v in ins) == 1 \
                else (None,)
            if p is None or len(p.terms) != 1 or p.keep is not None or np.isfinite(p.lo) or np.isfinite(p.hi):
                raise QDQUnsupported(f"Concat {n.name}: of a result awaiting its requantize with other than constants")
            acc, num, term_axis = p.terms[0]
            axis = a["axis"] % acc.ndim
            if term_axis is not None and term_axis % acc.ndim == axis:
                raise QDQUnsupported(f"Concat {n.name}: along the channels of a per-channel result")
            ratio = term_step(num, term_axis, acc.ndim)
            parts, reach = [], p.reach
            for v in ins:
                if isinstance(v, _Pending):
                    parts.append(acc)
                    continue
                if not _floating_array(v) or v.dtype != np.float32 or v.ndim != acc.ndim:
                    raise QDQUnsupported(f"Concat {n.name}: of a result awaiting its requantize with other than "
                                         "float constants")
                q = np.round(v.astype(np.float64) / ratio).astype(np.int64)
                if np.abs(q).max() >= 2**30:
                    raise QDQUnsupported(f"Concat {n.name}: a constant too large for the accumulator's grid")
                parts.append(q)
                reach = None if reach is None else max(reach, const_reach(q, ratio))
            env[n.output[0]] = _Pending([(np.concatenate(parts, axis=axis), num, term_axis)], reach=reach)
        elif op == "Concat":
            parts = [deq_of(v) for v in ins]
            p0 = parts[0]
            if all(p.scale.size == 1 and p.dtype == p0.dtype and np.array_equal(p.scale, p0.scale)
                   and np.array_equal(p.zero, p0.zero) for p in parts):    # one grid: concatenate the integers
                env[n.output[0]] = ("deq", _Q(np.concatenate([p.q for p in parts], axis=a["axis"]), p0.scale, p0.zero,
                                              None, p0.dtype))
            else:
                env[n.output[0]] = _Concat(parts, a["axis"])
        elif op == "MaxPool":
            kind, x = _on_integers(ins[0], deq_of)
            k = a["kernel_shape"]
            if any(d != 1 for d in a.get("dilations", [1, 1])) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise QDQUnsupported(f"MaxPool {n.name}: dilations or auto_pad")
            fill = np.iinfo(np.int64).min
            pooled = _maxpool_int(x.q, k, a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0]), fill,
                                  bool(a.get("ceil_mode", 0)))
            env[n.output[0]] = _same_kind(ins[0], kind, _Q(pooled, x.scale, x.zero, x.axis, x.dtype))
        elif op in VIEW_OPS:
            v = ins[0]
            if isinstance(v, _Pending):         # a view of a result awaiting its requantize: of each term
                terms = []
                try:
                    for acc, num, axis in v.terms:
                        moved = _view(op, a, ins, acc)
                        terms.append((moved, num, None if axis is None or num.size == 1 else
                                      _moved_axis(op, a, acc.shape, moved.shape, axis)))
                    # rows stay whole where the last axis stays last at its size
                    rows = v.terms[0][0].shape[-1] == terms[0][0].shape[-1] and \
                        (op != "Transpose" or list(a.get("perm", [0]))[-1] == terms[0][0].ndim - 1)
                    env[n.output[0]] = _Pending(terms, v.lo, v.hi, wide=v.wide, reach=v.reach,
                                                probabilities=v.probabilities and rows)
                except QDQUnsupported:          # the channels move apart: the views wait for the quantize
                    env[n.output[0]] = _Viewed(v, [(op, a, ins)])
            elif isinstance(v, _Viewed):
                env[n.output[0]] = _Viewed(v.p, [*v.views, (op, a, ins)])
            elif not isinstance(v, tuple):      # a float tensor (a constant, or float ops' result)
                env[n.output[0]] = _view(op, a, ins, np.asarray(v))
            else:
                kind, x = _on_integers(v, deq_of)
                env[n.output[0]] = _same_kind(v, kind, _Q(_view(op, a, ins, x.q), x.scale, x.zero, x.axis, x.dtype))
        elif op == "Pad" and isinstance(on_wide_grid(ins[0]), tuple) and a.get("mode", b"constant") in (b"constant",
                                                                                                       "constant"):
            kind, x = _on_integers(on_wide_grid(ins[0]), deq_of)
            pads = np.asarray(ins[1]).tolist()
            rank = x.q.ndim
            axes = [ax % rank for ax in np.asarray(ins[3]).tolist()] if len(ins) > 3 and ins[3] is not None \
                else list(range(rank))
            width = [(0, 0)] * rank
            for i, ax in enumerate(axes):
                width[ax] = (pads[i], pads[i + len(axes)])
            value = float(np.asarray(ins[2]).reshape(-1)[0]) if len(ins) > 2 and ins[2] is not None else 0.0
            # a QOperator Pad reads the integers (its value is one); a QDQ one the real values
            levels = value if kind == "q" else value / float(np.float32(x.scale.reshape(-1)[0]))
            if x.scale.size != 1 or min(pads) < 0 or abs(levels - round(levels)) > 1e-6:
                raise QDQUnsupported(f"Pad {n.name}: not a padding on the tensor's grid")
            padded = np.pad(x.q, width, constant_values=(0 if kind == "q" else int(x.zero.reshape(-1)[0])) + round(levels))
            env[n.output[0]] = _same_kind(on_wide_grid(ins[0]), kind, _Q(padded, x.scale, x.zero, x.axis, x.dtype))
        elif op == "Split" and isinstance(ins[0], tuple):      # parts of an integer tensor, on its grid
            kind, x = _on_integers(ins[0], deq_of)
            axis = a.get("axis", 0) % x.q.ndim
            if len(ins) > 1 and ins[1] is not None:
                sizes = np.asarray(ins[1]).tolist()
            elif "split" in a:
                sizes = list(a["split"])
            else:                                       # num_outputs (or the output count): equal, the last smaller
                k = len(n.output)
                width_k = -(-x.q.shape[axis] // k)
                sizes = [min(width_k, x.q.shape[axis] - i * width_k) for i in range(k)]
            parts = np.split(x.q, np.cumsum(sizes)[:-1], axis=axis)
            for name, part in zip(n.output, parts, strict=True):
                env[name] = _same_kind(ins[0], kind, _Q(part, x.scale, x.zero, x.axis, x.dtype))
        elif op == "Constant":
            env[n.output[0]] = numpy_helper.to_array(a["value"])
        elif op in FLOAT_UNARY and _floating(ins[0]):
            env[n.output[0]] = FLOAT_UNARY[op](_float(ins[0]))
        elif op == "Mul" and all(isinstance(v, tuple) for v in ins) and \
                all(deq_of(v).scale.size == 1 for v in ins):
            x, y = (deq_of(v) for v in ins)
            if y.q.size == 1 and x.q.size > 1 or x.q.size == 1 and y.q.size > 1:     # by a quantized scalar
                x, c = (x, y) if y.q.size == 1 else (y, x)
                real = np.float64(_float(("deq", c)).reshape(-1)[0])
                if real <= 0:
                    raise QDQUnsupported(f"Mul {n.name}: a scalar factor must be positive")
                env[n.output[0]] = _Pending([(x.centered(), x.scale.astype(np.float64) * real, None)])
            else:                                                                     # two activations
                env[n.output[0]] = _Pending([(x.centered() * y.centered(),
                                              x.scale.astype(np.float64) * y.scale.astype(np.float64), None)])
        elif op in FLOAT_BINARY and any(_floating(v) for v in ins) and any(_plain_scalar(v) for v in ins):
            x, y = ins
            env[n.output[0]] = FLOAT_BINARY[op](_float(x), _float(y))
        else:
            raise QDQUnsupported(f"{op} {n.name}: no integer semantics for this op yet")

    for n in g.node:
        ins = [env.get(i) if i else None for i in n.input]
        if n.op_type == "Identity":
            # the same value, whatever its kind, as TVM's importer reads it: a quantize after
            # DQ -> Identity requantizes the integers (run as floats, it rounded ties to even where
            # the compiled requantize rounds half up)
            env[n.output[0]] = ins[0]
            continue
        a = attrs(n)
        pf = _pending_fn(n.op_type, a, ins, lambda n=n, ins=ins: _island(n, ins, QDQUnsupported(n.name))[0])
        if n.op_type == "Mul" and pf is None and (gained := _fn_gain(ins, lambda n=n, ins=ins: _island(
                n, ins, QDQUnsupported(n.name))[0])) is not None:
            env[n.output[0]] = gained
            continue
        if pf is not None and any(isinstance(v, _PendingFn) for v in ins):
            env[n.output[0]] = pf
            continue
        joins_sum = n.op_type == "Add" and all(isinstance(v, (_PendingFn, _Viewed, _Pending, tuple)) for v in ins)
        if any(isinstance(v, _PendingFn) for v in ins) and n.op_type not in ("QuantizeLinear", *WIDE_READERS) \
                and not joins_sum:
            env.update(zip(n.output, _island(n, ins, QDQUnsupported(n.name)), strict=False))
            continue
        try:
            step(n, a, ins, n.op_type)
            if pf is not None and isinstance(env[n.output[0]], _Pending):    # an exact form, remembering fn
                env[n.output[0]].of = pf
        except QDQUnsupported as exc:      # a float island, as the lowering makes one
            if pf is not None:
                env[n.output[0]] = pf
            else:
                env.update(zip(n.output, _island(n, ins, exc), strict=False))
    # an output left at its accumulator (no output quantize: NNCF's classifier) is dequantized at s_x*s_w
    return {o.name: boundary[o.name] if o.name in boundary else _real(env[o.name], QDQUnsupported(o.name))
            if isinstance(env[o.name], _Pending) else env[o.name] for o in g.output}
