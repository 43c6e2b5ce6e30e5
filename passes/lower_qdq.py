"""LowerQDQToInteger: rewrite an imported QDQ graph into integer-only Relax.

TVM imports ONNX QDQ models as fake quantization: ``quantize -> dequantize ->
float op -> quantize``.  This pass rebuilds ``main`` binding by binding,
tracking every value as one of

* an integer tensor with its affine parameters (after a quantize),
* its lazy dequantization (``dequantize`` of a tensor or of a constant),
* a pending integer result awaiting its output quantize,

and emits the integer program (HAWQ-V3, with the dyadic multiplier of
``passes/dyadic.py``):

    conv2d / matmul:  acc = (q_x - z_x) * (q_w - z_w) + q_bias                int32 (int64 if unproven)
                      q_y = clamp(rescale(acc, s_x*s_w[c] / s_y) + z_y)
    residual add:     q_y = clamp(sum_t rescale(q_t - z_t, s_t / s_y) + z_y)
    concat:           q_y = concat_t(clamp(rescale(q_t - z_t, s_t / s_y) + z_y))   (as is if equal)
    mean, avg pool:   q_y = clamp(rescale(sum(q - z), s_x / (n*s_y)) + z_y)
    batch norm:       q_y = clamp(rescale(sign(g) * ((q - z) 2^k + B), s_x*|g| / (2^k s_y)) + z_y)
    max-pool, views:  on the integers, parameters unchanged
    relu / clip:      folded into the clamp: z_y + round(bound / s_y)
    attention:        acc = (q_a - z_a)(q_b - z_b), a positive scalar scale (1/sqrt d) folded into the ratio
    softmax, gelu,    passes/integer_nonlinear.py (I-ViT shift / I-BERT poly families, I-LayerNorm),
    layer norm:       then rescale to the output like any other term

(conv and matmul read the raw input: z_x * sum(w) is folded into the bias offline.)

How a conv2d or matmul is computed on a target (VNNI's operand order, AMX tiles, CUDA's dp4a)
is not decided here: each is described as a ``passes.contraction.Contraction`` and given to the
first of the backend's contraction units that fits (Backend.units, codegen/backend.py), else to the generic
kernels below.  The accumulator bounds are passes/accumulators.py's, sub-byte weights
passes/subbyte.py's.  Each op has one handler, found by name in ``HANDLERS``.

The input ``quantize`` and the output ``dequantize`` stay as the float
boundary.  ``runtime/golden.run_qdq`` defines the same integers in numpy from
the ONNX graph, independently; tests hold the two equal bit for bit.  A
pattern this pass does not know raises ``QDQLoweringError`` naming the op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import tvm
from scipy.special import erf
from tvm import relax

from passes import accumulators, fine_grid, integer_nonlinear, subbyte, wide_grid
from passes.analysis import digest
from passes.contraction import ACTIVATION_MATMUL, CONV2D, MATMUL, Contraction, ContractionUnit, Operand, first_fit
from passes.dyadic import dyadic_from_ratio, fine_offset, rescale, rescale_wide, saturate

op = relax.op
VIEWS = {"relax.reshape", "relax.permute_dims", "relax.flatten", "relax.squeeze", "relax.expand_dims", "relax.take",
         "relax.strided_slice", "relax.broadcast_to"}
NONLINEAR_OPS = {"relax.nn.softmax": "softmax", "relax.nn.gelu": "gelu", "relax.nn.gelu_tanh": "gelu"}


class QDQLoweringError(ValueError):
    pass


@dataclass
class _Int:
    """Integer tensor ``expr`` with real value scale * (q - zero)."""
    expr: relax.Expr
    scale: np.ndarray
    zero: np.ndarray
    dtype: str
    # an NCHW tensor stored NHWC: AMX convolutions read and write channels-last, and so do the
    # epilogues, residual adds and pools between them; any other reader gets an NCHW copy
    channels_last: bool = False
    # this tensor is also an elementwise function of another 8-bit tensor (ReLU's max(q, z) of x),
    # so that a chain reading both (ELU: -a relu(1 - exp(x)) + relu(x)) is still one table of x
    of: _Unary | None = None

    def on_grid(self, scale, zero, dtype: str) -> bool:
        """Whether this tensor is already quantized at (scale, zero, dtype): a quantize to them is the
        identity.  Compared as values, whatever the shapes (ONNX's scalar () and the lowering's (1,))."""
        return self.dtype == dtype and np.array_equal(np.ravel(self.scale), np.ravel(scale)) and \
            np.array_equal(np.ravel(self.zero), np.ravel(zero))


@dataclass
class _Deq:
    value: _Int


@dataclass
class _ConstDeq:
    q: np.ndarray           # int64 values
    scale: np.ndarray
    zero: np.ndarray
    axis: int


@dataclass
class _Unary:
    """A float function of one 8- or 16-bit integer tensor (float ops between a dequantize and a
    quantize, with only constants beside it: GELU's x / sqrt(2) -> Erf as ORT leaves it),
    awaiting the quantize that turns it into a table of the integers (256 or 65,536 entries)."""
    x: _Int
    fn: Callable[[np.ndarray], np.ndarray]     # the integers (int64) -> the float32 values


def _f32(op):
    """An elementwise float op as ONNX computes it on float32 tensors: evaluated in float64 (the
    table is then the same on every host, whatever numpy's SIMD paths), rounded to float32.
    ``.f64`` keeps the float64 function (a function of an accumulator is tabulated in float64)."""
    def f(*a):
        return np.asarray(op(*(np.asarray(v, np.float64) for v in a))).astype(np.float32)
    f.f64 = op
    return f


def _f64(fn):
    return getattr(fn, "f64", fn)


# float ops a table can absorb, as numpy; runtime/golden.py has ONNX's names for the same math.  TVM's
# importer decomposes ONNX's other elementwise functions into these (HardSwish: x * clip(x + 3, 0, 6) / 6,
# Softplus: max(x, 0) + log(1 + exp(-|x|)), Elu, Selu, Mish, Softsign, Reciprocal), so each is a
# composition of table entries below
FLOAT_UNARY = {"relax.erf": _f32(erf), "relax.tanh": _f32(np.tanh), "relax.exp": _f32(np.exp),
               "relax.sigmoid": _f32(lambda v: 1.0 / (1.0 + np.exp(-v))), "relax.sqrt": _f32(np.sqrt),
               "relax.negative": _f32(np.negative), "relax.abs": _f32(np.abs), "relax.log": _f32(np.log),
               "relax.sign": _f32(np.sign), "relax.floor": _f32(np.floor), "relax.ceil": _f32(np.ceil),
               "relax.round": _f32(np.round), "relax.sin": _f32(np.sin), "relax.cos": _f32(np.cos),
               "relax.rsqrt": _f32(lambda v: 1.0 / np.sqrt(v)), "relax.square": _f32(np.square)}
FLOAT_BINARY = {"relax.add": _f32(np.add), "relax.subtract": _f32(np.subtract), "relax.multiply": _f32(np.multiply),
                "relax.divide": _f32(np.divide), "relax.power": _f32(np.power), "relax.maximum": _f32(np.maximum),
                "relax.minimum": _f32(np.minimum)}


def _unary_with_attrs(call) -> Callable[[np.ndarray], np.ndarray] | None:
    """Elementwise ops whose function depends on the call's attributes or constant operands."""
    name = _name(call)
    if name == "relax.clip":
        lo, hi = float(call.args[1].value), float(call.args[2].value)
        return _f32(lambda v: np.clip(v, lo, hi))
    if name == "relax.nn.relu":
        return _f32(lambda v: np.maximum(v, 0.0))
    if name == "relax.nn.leakyrelu":
        alpha = np.float64(np.float32(call.attrs.alpha))
        return _f32(lambda v: np.where(v >= 0, v, v * alpha))
    if name in ("relax.nn.gelu", "relax.nn.gelu_tanh"):
        tanh = name == "relax.nn.gelu_tanh"
        return _f32(lambda v: 0.5 * v * (1.0 + (np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)) if tanh
                                                else erf(v / np.sqrt(2.0)))))
    if name == "relax.astype" and str(call.attrs.dtype) == "float32":
        return lambda v: v
    return FLOAT_UNARY.get(name)


def _composed(f, fn, c: np.ndarray, first: bool):
    """q -> f(fn(q), c), or f(c, fn(q)) when the constant is the first operand."""
    return (lambda q: f(fn(q), c)) if first else (lambda q: f(c, fn(q)))


@dataclass
class _FloatView:
    """Views of a float constant awaiting the quantize that gives them a grid (a class token
    broadcast to the batch, then quantized): the constant is quantized at compile time and the
    views replayed on its integers."""
    value: np.ndarray
    views: list             # relax.Call of a VIEWS op, operand first


MASKED = -1e30      # a mask value this low saturates any grid: (s (q - z) + M) / s_y is below every qmin


@dataclass
class _MaskBias:
    """An attention mask's additive bias where(keep, 0, M), M <= MASKED: the quantize after
    scores + bias is where(keep, q_scores, qmin)."""
    keep: relax.Expr


class _NeverNaN:
    """isnan of a quantized tensor: false everywhere."""


class _BatchNormStats:
    """batch_norm's running-statistics outputs: unused at inference; any use fails lowering."""


@dataclass
class _Split:
    """split of an integer tensor (ShuffleNet's channel split): each part keeps its parameters."""
    parts: relax.Expr       # the tuple of integer tensors
    of: _Int
    dequantized: bool       # QDQ graphs split the dequantized tensor, QOperator graphs the integers


@dataclass
class _Concat:
    """A concatenation of integer tensors awaiting its output quantize: each part is
    requantized to the common output scale first (HAWQ-V3 §3.4, multi-branch)."""
    parts: list             # _Int, or _Pending (each part's mean)
    axis: int


@dataclass
class _Pending:
    terms: list             # (int expr, ratio numerator array (float64), channel axis or None)
    lo: float = -np.inf
    hi: float = np.inf
    bound: int = 0          # a linear layer's proven |accumulator| bound
    channels_last: bool = False     # the terms are NHWC (channel axis 3)
    # the one term is table[index] (an elementwise function of an 8-bit value): the requantize
    # that follows is tabulated with it, one read per element and no 64-bit arithmetic
    table: tuple[np.ndarray, relax.Expr] | None = None
    keep: relax.Expr | None = None      # an attention mask: elsewhere the result is the grid's minimum
    # this result is also a float function of another accumulator (a bias add, a clamp or a positive
    # scale of it), so that a chain reading both (HardSwish: x * clip(x + 3, 0, 6)) is one function of it
    of: _PendingUnary | None = None
    # the 16-bit grid (zero point 0) a reader that needs an integer tensor reads this value on: a mean
    # of 8-bit values, s_x / 128, which holds every mean to 1/256 of s_x (NNCF leaves the squeeze-
    # excitation's pool unquantized before its convolution)
    wide: float | None = None
    # a linear result's proven real bound (passes/wide_grid.py): a reader that needs an integer tensor
    # reads it on the 16-bit grid reach / 32767 (NNCF's squeeze-excitation convolutions, unquantized)
    reach: float | None = None
    # a softmax's output: each row's exact terms sum to at most ``bound`` (passes/integer_nonlinear.py),
    # so P.V is read on P's own integers (NNCF's Swin leaves the probabilities unquantized)
    probabilities: bool = False


@dataclass
class _Viewed:
    """A result awaiting its requantize, seen through views that split or merge its per-channel
    ratio's axis with others (MobileViT's unfold of a normalized feature map into patches): a
    requantize to one scale is elementwise, so it commutes with every view; the terms stay as
    they are, and the views are replayed on the integers after it."""
    p: _Pending
    views: list             # relax.Call of a VIEWS op, operand first


@dataclass
class _PendingUnary:
    """A float function of an accumulator awaiting its requantize (a quantizer that leaves Conv ->
    HardSwish or Gemm -> GELU unquantized in between), awaiting the quantize that tabulates it on a
    16-bit grid (passes/fine_grid.py).  ``call``: the op as imported, for a float island."""
    p: _Pending
    fn: Callable[[np.ndarray], np.ndarray]     # real values (float64) -> float64
    call: relax.Call
    # times a constant per channel (NNCF's SmoothQuant factor after an unquantized GELU): (c, axis);
    # the quantize at scale s is then one at s / |c| per channel, the table's sign flipped where c < 0
    gain: tuple[np.ndarray, int] | None = None


# the ops that read an unquantized operand on its 16-bit grid (``_Lowering.on_wide_grid``)
WIDE_READERS = ("relax.mean", "relax.nn.pad", "relax.nn.layer_norm", "relax.nn.conv2d", "relax.matmul",
                "relax.nn.softmax")


def _wide_step(v) -> float | None:
    """The 16-bit grid step a reader that needs an integer tensor reads pending ``v`` on, or None."""
    if not isinstance(v, _Pending) or v.table is not None or v.keep is not None:
        return None
    if v.wide is not None and len(v.terms) == 1:
        return v.wide
    return None if v.reach is None else wide_grid.reach_step(wide_grid.clamped_reach(v.reach, v.lo, v.hi))


def _host_quantize(values: np.ndarray, s: float, z: int, info: np.iinfo) -> np.ndarray:
    """QuantizeLinear of float32 ``values`` at compile time, as the compiled one computes it:
    float32 division, ties to even, saturated, NaN to the maximum (passes/defined_semantics.py)."""
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.clip(np.round(values / np.float32(s)) + z, info.min, info.max)
    return np.where(np.isnan(q), info.max, q).astype(np.int64)


def _on_accumulator_grid(b: _ConstDeq, num: np.ndarray) -> np.ndarray:
    """A bias added to an accumulator at scale s_x*s_w (``num``, per channel or per tensor), as
    integers on that grid.  ORT writes it there already (int32, scale s_x*s_w, zero point 0) and
    it is taken as is; at any other scale or zero point (a bias Add an exporter split off and a
    quantizer gave its own grid) its real value moves to the accumulator's grid:
    round(s_b (q_b - z_b) / (s_x s_w)), one rounding of at most half an accumulator step."""
    expect = num.astype(np.float32)
    if b.scale.size in (1, expect.size) and np.allclose(b.scale, expect, rtol=1e-6) and not np.any(b.zero != 0):
        return b.q
    return _real_on_grid(_real(b), num)


def _real_on_grid(real: np.ndarray, num: np.ndarray) -> np.ndarray:
    """A real bias (float32) on the accumulator's grid s_x*s_w, rounded half to even."""
    real = real.astype(np.float64)
    if num.size > 1 and real.size != num.size:
        raise QDQLoweringError("bias add: a per-tensor bias on a per-channel accumulator has no single grid")
    step = num.astype(np.float32).astype(np.float64).reshape(real.shape if num.size > 1 else ())
    return np.round(real / step).astype(np.int64)


def _keeps_rows(call, before: relax.Expr, after: relax.Expr) -> bool:
    """Whether a view keeps every row along the last axis whole (a softmax's rows still sum as before):
    a transpose that leaves the last axis last, a reshape that keeps its size."""
    a, b = _static_shape(before), _static_shape(after)
    if a is None or b is None or a[-1] != b[-1]:
        return False
    if _name(call) == "relax.permute_dims":
        axes = call.attrs.axes
        return axes is None and len(a) == 1 or axes is not None and int(axes[-1]) % len(a) == len(a) - 1
    return _name(call) in ("relax.reshape", "relax.expand_dims", "relax.squeeze")


def _float_bias(v) -> np.ndarray | None:
    """A float constant operand's value (NNCF and some exporters leave a convolution's bias float),
    its reshapes applied; None for anything else."""
    if isinstance(v, tvm.ir.GenericConst) and _np(v).dtype == np.float32:
        return _np(v)
    if isinstance(v, _FloatView) and v.value.dtype == np.float32 and all(
            _name(c) == "relax.reshape" for c in v.views):
        return v.value.reshape([int(d) for d in v.views[-1].args[1].values]) if v.views else v.value
    return None


def _real(v: _ConstDeq) -> np.ndarray:
    """The float32 values of a dequantized constant."""
    shape = [1] * v.q.ndim
    if v.scale.size > 1:
        shape[v.axis % v.q.ndim] = -1
    return ((v.q - v.zero.reshape(shape)).astype(np.float32) * v.scale.reshape(shape)).astype(np.float32)


def _np(c) -> np.ndarray:
    return c.value.numpy()


def _constant_parameters(call) -> None:
    """A quantize or dequantize whose scale or zero point is computed at run time (ONNX's
    DynamicQuantizeLinear) has no grid to lower to."""
    if not all(isinstance(a, tvm.ir.GenericConst) for a in call.args[1:3]):
        raise QDQLoweringError(f"{_name(call)} with a scale or zero point computed at run time")


def _name(call) -> str:
    return call.op.name if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) else type(call).__name__


# each op's lowering, by the name ``_name`` gives its binding: filled by ``_handles`` below
HANDLERS: dict[str, Callable[[_Lowering, relax.Call], object]] = {}


def _handles(*names: str):
    """Register the decorated ``_Lowering`` method as the handler of the ops ``names``."""
    def register(fn):
        for name in names:
            if name in HANDLERS:
                raise ValueError(f"{name}: two integer lowerings")
            HANDLERS[name] = fn
        return fn
    return register


class _Lowering:
    def __init__(self, bb: relax.BlockBuilder, variants, units: Sequence[ContractionUnit] = ()):
        self.bb = bb
        self.units = tuple(units)           # the target's contraction units, preferred first
        self.env: dict = {}
        self.variants = variants            # "shift" | "poly" | {kind: [variant per node, in order]}
        self.seen: dict[str, int] = {}
        self.widened: list[str] = []        # accumulators the range analysis could not keep in int32
        self.weights: list[dict] = []       # each linear layer's stored weights
        self.digests: list[str] = []        # ... and their identity, to find the kernel that reads them
        self.nchw: dict = {}                # channels-last values' NCHW copies, by variable
        self.islands: list[Island] = []     # ops run in float, in program order

    def val(self, expr, channels_last: bool = False):
        """The lowered value of ``expr``; a channels-last tensor comes back NCHW (one copy per
        tensor) unless the reader takes ``channels_last`` ones."""
        if isinstance(expr, relax.Var) and expr in self.env:
            v = self.env[expr]
            inner = v.value if isinstance(v, _Deq) else v
            if channels_last or not isinstance(inner, _Int) or not inner.channels_last:
                return v
            if expr not in self.nchw:
                self.nchw[expr] = self.to_nchw(inner)
            return _Deq(self.nchw[expr]) if isinstance(v, _Deq) else self.nchw[expr]
        if isinstance(expr, tvm.ir.GenericConst):
            return expr
        if isinstance(expr, relax.Var):
            return expr                      # a function parameter
        raise QDQLoweringError(f"unexpected operand {type(expr).__name__}")

    def peek(self, expr):
        """``expr``'s lowered value as recorded, with no NCHW copy made (``val`` makes one)."""
        return self.env.get(expr, expr) if isinstance(expr, relax.Var) else expr

    def to_nchw(self, v: _Int) -> _Int:
        return replace(v, expr=self.bb.emit(op.permute_dims(v.expr, [0, 3, 1, 2])), channels_last=False)

    def to_nhwc(self, v: _Int) -> _Int:
        if v.channels_last:
            return v
        return replace(v, expr=self.bb.emit(op.permute_dims(v.expr, [0, 2, 3, 1])), channels_last=True)

    def centered(self, v: _Int, dtype: str = "int32") -> relax.Expr:
        """q - z: one zero point, or one per channel of a feature map (NNCF's depthwise inputs)."""
        x = op.astype(v.expr, dtype)
        if np.any(v.zero != 0):
            z = v.zero.reshape(-1)
            if z.size != 1 and v.expr.ty.ndim != 4:
                raise QDQLoweringError("per-axis zero points on activations other than a feature map's channels")
            shape = [1] * 4
            shape[3 if v.channels_last else 1] = -1
            x = op.subtract(x, relax.const(int(z[0]), dtype) if z.size == 1 else
                            relax.const(z.reshape(shape).astype(dtype), dtype))
        return self.bb.emit(x)

    def one_zero(self, v: _Int) -> _Int:
        """A feature map with a zero point per channel as q - z_c in int16 (zero point 0): what a
        depthwise convolution reads, its padding then plain zeros.  |q - z_c| <= 255."""
        if v.zero.size == 1:
            return v
        return replace(v, expr=self.centered(v, "int16"), zero=np.zeros(1, np.int64), dtype="int16")

    def on_wide_grid(self, v):
        """A value left unquantized as the int16 tensor a convolution, pool or LayerNorm reads: a pooled
        or normalized one on its grid (``_Pending.wide``), a linear result on the grid its bound
        fixes, a float function of one tabulated from that grid (passes/wide_grid.py); anything
        else as it is."""
        if isinstance(v, _PendingUnary) and v.gain is None and (step := _wide_step(v.p)) is not None:
            table, s_f = wide_grid.function_table(v.fn, step)
            q16 = self.requantize(v.p, step, 0, "int16")
            index = op.subtract(op.astype(q16.expr, "int32"), relax.const(fine_grid.QMIN, "int32"))
            y = self.bb.emit(op.take(relax.const(table.astype(np.int16), "int16"), index, axis=0))
            return _Deq(_Int(y, np.float32([s_f]), np.array([0]), "int16", q16.channels_last))
        if (step := _wide_step(v)) is not None:
            return _Deq(self.requantize(v, step, 0, "int16"))
        if isinstance(v, _Viewed) and (step := _wide_step(v.p)) is not None:   # on the grid, then the views
            y = self.requantize(v.p, step, 0, "int16")
            expr = y.expr
            for view in v.views:
                expr = self.bb.emit(relax.Call(view.op, [expr, *self.rest(view)], view.attrs))
            return _Deq(replace(y, expr=expr))
        return v

    def deq(self, v, what: str, per_channel: bool = False):
        """The integer tensor of a dequantized value; one quantized per channel only where the
        reader takes one (``per_channel``: a depthwise convolution)."""
        if isinstance(v, _Deq):
            if v.value.scale.size > 1 and not per_channel:
                raise QDQLoweringError(f"{what} of a per-channel activation (only a depthwise convolution reads one)")
            return v.value
        if isinstance(v, _ConstDeq):
            return v
        raise QDQLoweringError(f"{what}: operand is not a dequantized integer tensor")

    # ---- float islands ------------------------------------------------------------
    def island(self, binding, reason: QDQLoweringError) -> relax.Var:
        """``binding``'s op, which has no integer form, in float: each integer operand
        dequantized, x = s (q - z), or an accumulator awaiting its requantize read at its real
        value, x = clamp(sum_i acc_i * r_i, lo, hi); the result stays float until the quantize
        that follows it, which quantizes it as it would a graph input.  Raises ``reason`` where an
        operand has no float form here."""
        value = binding.value
        if isinstance(value, relax.TupleGetItem):
            expr = relax.TupleGetItem(self.as_float(value.tuple_value, reason), value.index)
        elif isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            expr = relax.Call(value.op, [self.as_float(a, reason) for a in value.args], value.attrs, value.ty_args)
        elif isinstance(value, relax.Tuple):
            expr = self.as_float(value, reason)
        else:
            raise reason
        out = self.bb.emit(expr)
        node = value.span.source_name.name if value.span is not None else None
        self.islands.append(Island(_name(value), node or binding.var.name, str(reason)))
        return out

    def as_float(self, arg, reason: QDQLoweringError) -> relax.Expr:
        """An operand's real value as a float32 expression (see ``island``)."""
        if isinstance(arg, relax.Tuple):
            return relax.Tuple([self.as_float(f, reason) for f in arg.fields])
        if not isinstance(arg, relax.Var):
            return arg                      # constants, shapes, prim values
        return self.float_value(self.val(arg), reason)

    def float_value(self, v, reason: QDQLoweringError) -> relax.Expr:
        """A lowered value's real value as a float32 expression (see ``island``)."""
        if isinstance(v, _Viewed):
            expr = self.float_value(v.p, reason)
            for view in v.views:
                expr = self.bb.emit(relax.Call(view.op, [expr, *self.rest(view)], view.attrs))
            return expr
        if isinstance(v, relax.Expr):       # a parameter, a shape, or an island's float result
            return v
        if isinstance(v, _ConstDeq):
            return relax.const(_real(v), "float32")
        if isinstance(v, _FloatView):       # a float constant's views (BERT's embedding rows, gathered)
            expr = relax.const(v.value)
            for view in v.views:
                expr = self.bb.emit(relax.Call(view.op, [expr, *self.rest(view)], view.attrs))
            return expr
        if isinstance(v, _PendingUnary) and v.call is not None:     # the float ops as imported
            call = v.call
            return self.bb.emit(relax.Call(call.op, [self.as_float(a, reason) for a in call.args], call.attrs,
                                           call.ty_args))
        if isinstance(v, _Unary):           # the function's 256 values, looked up
            src = np.iinfo(v.x.dtype)
            table = v.fn(np.arange(src.min, src.max + 1, dtype=np.int64)).astype(np.float32)
            x = self.to_nchw(v.x) if v.x.channels_last else v.x
            index = op.subtract(op.astype(x.expr, "int32"), relax.const(int(src.min), "int32"))
            return self.bb.emit(op.take(relax.const(table, "float32"), index, axis=0))
        if isinstance(v, (_Deq, _Pending)) and (v.value if isinstance(v, _Deq) else v).channels_last:
            v = _Deq(self.to_nchw(v.value)) if isinstance(v, _Deq) else self.pending_view_nchw(v)
        if isinstance(v, _Deq):
            x = v.value         # NCHW here; a per-channel scale lies along axis 1
            scale = x.scale.reshape((1, -1, 1, 1) if x.scale.size > 1 else ()).astype(np.float32)
            centered = op.astype(self.centered(x), "float32")
            return self.bb.emit(op.multiply(centered, relax.const(scale, "float32")))
        if isinstance(v, _Pending) and v.table is None and v.keep is None and not v.channels_last:
            total = None
            for acc, num, axis in v.terms:
                ratio = num.astype(np.float32)
                if ratio.size > 1:
                    shape = [1] * acc.ty.ndim
                    shape[axis] = -1
                    ratio = ratio.reshape(shape)
                term = op.multiply(op.astype(acc, "float32"), relax.const(ratio, "float32"))
                total = term if total is None else op.add(total, term)
            if np.isfinite(v.lo) or np.isfinite(v.hi):
                total = op.clip(total, max(v.lo, -3.4e38), min(v.hi, 3.4e38))
            return self.bb.emit(total)
        raise reason

    def float_output(self, v) -> relax.Expr:
        """A graph whose last layer's result leaves unquantized (NNCF keeps the classifier's output
        float): the accumulator is the integer result, and its dequantize at s_x*s_w (per channel
        where the weights are) the float boundary, as an output dequantize would be."""
        if not isinstance(v, _Pending) or len(v.terms) != 1 or v.table is not None or \
                np.isfinite(v.lo) or np.isfinite(v.hi):
            raise QDQLoweringError("no output dequantize found")
        if v.channels_last:
            v = self.pending_view_nchw(v)
        acc, num, axis = v.terms[0]
        scale = num.astype(np.float32).reshape(-1)
        zero = np.zeros(scale.shape, np.int32 if str(acc.ty.dtype) == "int32" else np.int64)
        ndim = acc.ty.ndim
        return self.bb.emit(op.dequantize(acc, relax.const(scale, "float32"), relax.const(zero, str(zero.dtype)),
                                          axis=(axis if axis is not None else -1) % ndim, out_dtype="float32"))

    # ---- one binding ------------------------------------------------------------
    def lower(self, call) -> object:
        name = _name(call)
        if name == "relax.shape_of":        # the integer tensor has the float one's shape
            return self.bb.emit(op.shape_of(self.same_shape(self.val(call.args[0]))))
        if (plain := self.plain_call(call)) is not None:
            return plain
        if (u := self.closure(call)) is not None:
            return u
        handler = HANDLERS.get(name)
        args = [self.peek(a) for a in call.args] if isinstance(call, relax.Call) else []
        if (pu := self.pending_closure(call)) is not None:
            # an exact integer form where one exists (a bias, a clamp, a positive scale), which also
            # remembers the function; a table on the 16-bit grid where none does
            if handler is None or any(isinstance(a, _PendingUnary) for a in args):
                return pu
            try:
                r = handler(self, call)
            except (QDQLoweringError, ValueError):
                return pu
            return replace(r, of=pu) if isinstance(r, _Pending) else r
        if name == "relax.multiply" and (gained := self.channel_gain(call)) is not None:
            return gained
        joins_sum = name == "relax.add" and all(isinstance(a, (_PendingUnary, _Viewed, _Pending, _Deq)) for a in args)
        if any(isinstance(a, _PendingUnary) for a in args) and name not in ("relax.quantize", *WIDE_READERS) \
                and not joins_sum:
            raise QDQLoweringError(f"{name}: a float function of an accumulator must be quantized next")
        if handler is None:
            raise QDQLoweringError(f"{name}: no integer lowering for this op")
        return handler(self, call)

    def pending_closure(self, call) -> _PendingUnary | None:
        """An elementwise float op of an accumulator awaiting its requantize, with scalar
        constants beside it, or of two functions of the same accumulator: one float function of it
        (see ``_PendingUnary``).  None for anything else."""
        if not isinstance(call, relax.Call) or not call.args:
            return None
        name = _name(call)
        vals = [self.peek(a) for a in call.args]
        if any(isinstance(v, _PendingUnary) and v.gain is not None for v in vals):
            return None
        if name in FLOAT_BINARY and len(call.args) == 2:
            f = _f64(FLOAT_BINARY[name])
            for v, k, first in ((vals[0], vals[1], True), (vals[1], vals[0], False)):
                if isinstance(k, tvm.ir.GenericConst) and _np(k).size == 1 and (u := self.as_pending_unary(v)) is not None:
                    c = np.float64(_np(k).astype(np.float32).reshape(()))
                    return _PendingUnary(u.p, _composed(f, u.fn, c, first), call)
            ua, ub = (self.as_pending_unary(v) for v in vals)
            if ua is None or ub is None or ua.p is not ub.p:
                return None
            return _PendingUnary(ua.p, lambda x, f=f, fa=ua.fn, fb=ub.fn: f(fa(x), fb(x)), call)
        if (u := self.as_pending_unary(vals[0])) is None or (fn := _unary_with_attrs(call)) is None:
            return None
        f = _f64(fn)
        return _PendingUnary(u.p, lambda x, f=f, inner=u.fn: f(inner(x)), call)

    @staticmethod
    def as_pending_unary(v) -> _PendingUnary | None:
        """``v`` as a float function of an accumulator, where it is one (its own clamp bounds are
        applied when it is requantized to the 16-bit grid)."""
        if isinstance(v, _PendingUnary):
            return v
        if isinstance(v, _Pending) and v.keep is None:
            return v.of or _PendingUnary(v, lambda x: x, None)
        return None

    def closure(self, call) -> _Unary | None:
        """Elementwise float functions of one 8-bit tensor stay one: f(g(x)), and f(g(x), h(x)) of
        the same tensor x (SiLU's x * sigmoid(x), HardSwish's x * clip(x + 3, 0, 6) / 6, Mish,
        Softplus, every GELU form as exporters spell it out).  The quantize after the chain
        tabulates it: 256 entries computed at compile time, one lookup per element (TFLite's
        integer kernels do the same).  None where ``call`` is not such an op of such values."""
        if not isinstance(call, relax.Call):
            return None
        name = _name(call)
        if name in FLOAT_BINARY and len(call.args) == 2:
            a, b = (self.val(arg) if isinstance(arg, (relax.Var, tvm.ir.GenericConst)) else None for arg in call.args)
            for v, k, first in ((a, b, True), (b, a, False)):     # with a scalar constant (max(x, 0) in Softplus)
                if isinstance(k, tvm.ir.GenericConst) and _np(k).size == 1 and (u := self.as_unary(v)) is not None \
                        and (isinstance(v, _Unary) or name not in HANDLERS):
                    return _Unary(u.x, _composed(FLOAT_BINARY[name], u.fn, _np(k).reshape(()), first))
            ua, ub = self.as_unary(a), self.as_unary(b)
            if ua is None or ub is None or not ua.x.expr.same_as(ub.x.expr) or \
                    not (isinstance(a, _Unary) or isinstance(b, _Unary) or a is b):
                return None
            f = FLOAT_BINARY[name]
            return _Unary(ua.x, lambda q, f=f, fa=ua.fn, fb=ub.fn: f(fa(q), fb(q)))
        if not call.args or not isinstance(call.args[0], relax.Var):
            return None
        v = self.val(call.args[0])
        if not isinstance(v, _Unary) or (fn := _unary_with_attrs(call)) is None:
            return None
        return _Unary(v.x, lambda q, fn=fn, inner=v.fn: fn(inner(q)))

    # ---- the handlers -----------------------------------------------------------
    @_handles("relax.nn.relu", "relax.clip")
    def clamp(self, call):
        name = _name(call)
        p = self.val(call.args[0])
        if isinstance(p, _Concat) and all(isinstance(q, _Pending) for q in p.parts):     # of each part
            lo, hi = (0.0, np.inf) if name == "relax.nn.relu" else (
                float(call.args[1].value), float(call.args[2].value))
            return _Concat([replace(q, lo=max(q.lo, lo), hi=min(q.hi, hi)) for q in p.parts], p.axis)
        if isinstance(p, _Deq) and p.value.zero.size == 1:
            x = p.value
            if name == "relax.nn.relu":     # s (q - z) >= 0  <=>  q >= z: the same grid, exactly
                z = relax.const(int(x.zero.reshape(-1)[0]), x.dtype)
                u = self.as_unary(p)
                of = None if u is None else _Unary(u.x, lambda q, fn=u.fn: np.maximum(fn(q), np.float32(0)))
                return _Deq(replace(x, expr=self.bb.emit(op.maximum(x.expr, z)), of=of))
            # Clip's bounds need not lie on the grid: a requantize of its own (as Q(DQ(q)) with
            # other parameters) clamps them in the output's integer domain
            p = _Pending([(self.centered(x), x.scale.astype(np.float64), None)], channels_last=x.channels_last)
        if isinstance(p, _Viewed):
            return _Viewed(self.clamp_of(call, p.p), p.views)
        return self.clamp_of(call, p)

    @staticmethod
    def clamp_of(call, p) -> _Pending:
        name = _name(call)
        if not isinstance(p, _Pending):
            raise QDQLoweringError(f"{name} is supported only between a linear op and its quantize")
        lo, hi = (0.0, np.inf) if name == "relax.nn.relu" else (
            float(call.args[1].value), float(call.args[2].value))
        return replace(p, lo=max(p.lo, lo), hi=min(p.hi, hi))

    @_handles("relax.mean")
    def mean(self, call):
        """sum(q - z) at ratio s / n; of a concatenation of different grids (NNCF's GoogLeNet pools
        the last inception block's concat), of each part, and concatenated after their requantize."""
        v = self.val(call.args[0])
        keep = bool(call.attrs.keepdims)
        if isinstance(v, _Concat):
            rank = len(v.parts[0].expr.ty.shape.values)
            axes = sorted(int(a) % rank for a in call.attrs.axis)
            if v.axis % rank in axes:
                raise QDQLoweringError("relax.mean across the parts of a concatenation of different grids")
            axis = v.axis % rank - (0 if keep else sum(a < v.axis % rank for a in axes))
            return _Concat([self.mean_of(p, axes, keep) for p in v.parts], axis)
        return self.mean_of(self.deq(self.on_wide_grid(v), "relax.mean"), [int(a) for a in call.attrs.axis], keep)

    def mean_of(self, x: _Int, axes: list[int], keep: bool) -> _Pending:
        total = self.bb.emit(op.sum(self.centered(x), axis=axes, keepdims=keep))
        dims = x.expr.ty.shape.values
        try:
            n = int(np.prod([int(dims[a]) for a in axes]))
        except TypeError:
            raise QDQLoweringError("mean over a dynamic dimension has no fixed divisor") from None
        wide = float(np.float32(np.float32(x.scale.reshape(-1)[0]) / np.float32(128))) \
            if x.dtype in ("int8", "uint8") and x.scale.size == 1 else None
        return _Pending([(total, x.scale.astype(np.float64) / n, None)], wide=wide)

    @_handles(*FLOAT_UNARY, "relax.nn.leakyrelu")
    def float_unary(self, call):
        name = _name(call)
        u = self.as_unary(self.val(call.args[0]))
        if u is None:
            raise QDQLoweringError(f"{name}: a float op of a value that is not one 8-bit tensor")
        f = _unary_with_attrs(call)
        return _Unary(u.x, lambda q, fn=u.fn: f(fn(q)))

    @_handles("TupleGetItem")               # _name of a relax.TupleGetItem
    def tuple_get_item(self, call: relax.TupleGetItem):
        v = self.val(call.tuple_value)
        if isinstance(v, _Split):
            part = replace(v.of, expr=self.bb.emit(relax.TupleGetItem(v.parts, call.index)), of=None)
            return _Deq(part) if v.dequantized else part
        if isinstance(v, (_Pending, _Concat)):  # batch_norm: 0 is the output; 1, 2 (running stats) go unused
            return v if call.index == 0 else _BatchNormStats()
        raise QDQLoweringError("tuple access of an unsupported value")

    @_handles("relax.split")
    def split(self, call):
        """Parts of an integer tensor, on its grid (the quantizer's Q after each part, with the
        same parameters, is then the identity)."""
        v = self.val(call.args[0])
        x = v if isinstance(v, _Int) else self.deq(v, "relax.split")
        if x.scale.size != 1:
            raise QDQLoweringError("relax.split of a per-channel tensor is not supported")
        return _Split(self.bb.emit(relax.Call(call.op, [x.expr], call.attrs)), x, not isinstance(v, _Int))

    @_handles("relax.concat")
    def concat(self, call):
        fields = call.args[0].fields if isinstance(call.args[0], relax.Tuple) else None
        if fields is None:
            raise QDQLoweringError("concat of a tuple variable is not supported")
        if any(isinstance(self.peek(f), _Pending) for f in fields):
            return self.concat_pending(call, [self.val(f) for f in fields])
        parts = [self.const_int(v) if isinstance(v := self.val(f), _ConstDeq) else self.deq(v, "relax.concat")
                 for f in fields]
        first = parts[0]
        if all(p.scale.size == 1 and p.on_grid(first.scale, first.zero, first.dtype) for p in parts):
            # one grid (NNCF unifies a concat's input scales and quantizes after its readers): the
            # integers concatenated are the dequantized concat's integers, exactly
            joined = self.bb.emit(op.concat([p.expr for p in parts], axis=int(call.attrs.axis)))
            return _Deq(_Int(joined, first.scale, first.zero, first.dtype))
        return _Concat(parts, int(call.attrs.axis))

    def concat_pending(self, call, values: list) -> _Pending:
        """A result awaiting its requantize joined with float constants (ViT's class token before the
        position embedding, both left float by NNCF): each constant on the result's accumulator grid,
        round(c / (s_x s_w)) per channel, concatenated with the accumulator."""
        pending = [v for v in values if isinstance(v, _Pending)]
        if len(pending) == len(values) > 1:
            return self.concat_alike(call, pending)
        p = pending[0]
        if len(pending) != 1 or len(p.terms) != 1 or p.table is not None or p.keep is not None \
                or np.isfinite(p.lo) or np.isfinite(p.hi):
            raise QDQLoweringError("relax.concat of a result awaiting its requantize with other than float constants")
        p = self.pending_view_nchw(p) if p.channels_last else p
        acc, num, term_axis = p.terms[0]
        ndim = acc.ty.ndim
        axis = int(call.attrs.axis) % ndim
        if term_axis is not None and term_axis % ndim == axis:
            raise QDQLoweringError("relax.concat along the channels of a per-channel result")
        step = wide_grid.term_step(num, term_axis, ndim)
        dtype = str(acc.ty.dtype)
        parts, reach, bound = [], p.reach, p.bound
        for v in values:
            if isinstance(v, _Pending):
                parts.append(acc)
                continue
            real = _float_bias(v)
            if real is None or real.ndim != ndim:
                raise QDQLoweringError("relax.concat of a result awaiting its requantize with other than float constants")
            q = np.round(real.astype(np.float64) / step).astype(np.int64)
            if np.abs(q).max() >= accumulators.INT32_LIMIT // 2:
                raise QDQLoweringError("relax.concat: a constant too large for the accumulator's grid")
            parts.append(relax.const(q.astype(dtype), dtype))
            reach = None if reach is None else max(reach, wide_grid.const_reach(q, step))
            bound = max(bound, int(np.abs(q).max()))
        return _Pending([(self.bb.emit(op.concat(parts, axis=axis)), num, term_axis)], bound=bound, reach=reach)

    def concat_alike(self, call, parts: list[_Pending]) -> _Pending:
        """Results awaiting one requantize with the same terms' ratios (Swin's roll: slices of one
        result joined the other way round): each term's accumulators concatenated."""
        parts = [self.pending_view_nchw(p) if p.channels_last else p for p in parts]
        first = parts[0]
        ndim = first.terms[0][0].ty.ndim
        axis = int(call.attrs.axis) % ndim
        for p in parts:
            if p.table is not None or p.keep is not None or (p.lo, p.hi) != (first.lo, first.hi) \
                    or len(p.terms) != len(first.terms) or any(
                        not np.array_equal(n1, n2) or a1 != a2 or (a1 is not None and a1 % ndim == axis)
                        for (_, n1, a1), (_, n2, a2) in zip(p.terms, first.terms, strict=True)):
                raise QDQLoweringError("relax.concat of results awaiting their requantize on different ratios")
        terms = []
        for i, (_, num, term_axis) in enumerate(first.terms):
            accs = [p.terms[i][0] for p in parts]
            dtype = "int64" if any(str(acc.ty.dtype) == "int64" for acc in accs) else str(accs[0].ty.dtype)
            accs = [acc if str(acc.ty.dtype) == dtype else self.bb.emit(op.astype(acc, dtype)) for acc in accs]
            terms.append((self.bb.emit(op.concat(accs, axis=axis)), num, term_axis))
        reach = None if any(p.reach is None for p in parts) else max(p.reach for p in parts)
        return _Pending(terms, first.lo, first.hi, bound=max(p.bound for p in parts), reach=reach)

    @_handles("relax.nn.max_pool2d")
    def max_pool(self, call):
        if str(call.attrs.layout) == "NCHW":
            v = self.val(call.args[0], channels_last=True)
            x = v if isinstance(v, _Int) else self.deq(v, "relax.nn.max_pool2d")
            if x.channels_last:     # channels are the contiguous vector; the stride only moves rows
                a = call.attrs
                pooled = op.nn.max_pool2d(x.expr, a.pool_size, a.strides, a.padding, a.dilation, a.ceil_mode,
                                          a.count_include_pad, layout="NHWC")
                moved = replace(x, expr=self.bb.emit(pooled), of=None)
                return moved if isinstance(v, _Int) else _Deq(moved)
        return self.on_integers(call)

    @_handles("relax.nn.pad")
    def pad(self, call):
        """Constant padding of a quantized tensor: the pad value's grid point, z + v / s, which must
        be an integer (zero padding is z, exactly).  A QOperator graph pads the integers themselves
        (ORT pads with the zero point): there the value is the integer."""
        v = self.on_wide_grid(self.val(call.args[0]))
        x = v if isinstance(v, _Int) else self.deq(v, "relax.nn.pad")
        if x.scale.size != 1 or str(call.attrs.pad_mode) != "constant":
            raise QDQLoweringError("relax.nn.pad: only constant padding of a per-tensor quantized tensor")
        value = float(call.attrs.pad_value)
        step = value if isinstance(v, _Int) else value / float(np.float32(x.scale.reshape(-1)[0]))
        info = np.iinfo(x.dtype)
        q = (0 if isinstance(v, _Int) else int(x.zero.reshape(-1)[0])) + int(np.round(step))
        if abs(step - np.round(step)) > 1e-6 or not info.min <= q <= info.max:
            raise QDQLoweringError("relax.nn.pad: the pad value is not on the tensor's grid")
        padded = op.nn.pad(x.expr, [int(w) for w in call.attrs.pad_width], "constant", float(q))
        moved = _Int(self.bb.emit(padded), x.scale, x.zero, x.dtype)
        return moved if isinstance(v, _Int) else _Deq(moved)

    @_handles(*VIEWS)
    def view(self, call):
        """A view of a dequantized constant or a float one (replayed on the integers at its
        quantize), of a result awaiting its requantize, or of an integer tensor."""
        v = self.val(call.args[0])
        if isinstance(v, _ConstDeq):
            return self.const_view(call, v)
        if isinstance(v, (tvm.ir.GenericConst, _FloatView)):
            base = v if isinstance(v, _FloatView) else _FloatView(_np(v), [])
            return _FloatView(base.value, [*base.views, call])
        if isinstance(v, _Pending):
            return self.pending_view(call, v)
        if isinstance(v, _Viewed):
            return _Viewed(v.p, [*v.views, call])
        return self.on_integers(call)

    def on_integers(self, call):
        """Max-pool and views on the integers; QOperator graphs apply these to quantized tensors
        directly, QDQ graphs to their dequantization: the result keeps the operand's form."""
        name = _name(call)
        v = self.val(call.args[0])
        x = v if isinstance(v, _Int) else self.deq(v, name)
        if x.scale.size != 1:
            raise QDQLoweringError(f"{name} of a per-channel tensor is not supported")
        moved = _Int(self.bb.emit(relax.Call(call.op, [x.expr, *self.rest(call)], call.attrs)),
                     x.scale, x.zero, x.dtype)
        return moved if isinstance(v, _Int) else _Deq(moved)

    def rest(self, call) -> list:
        """A call's operands after the data: target shapes, indices (a symbolic batch's are
        computed in the graph, so they come from the lowered program)."""
        out = []
        for a in call.args[1:]:
            v = self.val(a) if isinstance(a, relax.Var) else a
            if not isinstance(v, relax.Expr):
                raise QDQLoweringError(f"{_name(call)}: an operand after the data is a quantized value")
            out.append(v)
        return out

    def same_shape(self, v) -> relax.Expr:
        """An expression with the shape of lowered value ``v`` (NCHW)."""
        inner = v.value if isinstance(v, _Deq) else v
        if isinstance(inner, _Int):
            return self.to_nchw(inner).expr if inner.channels_last else inner.expr
        if isinstance(inner, _Pending) and not inner.channels_last:
            return inner.terms[0][0]
        if isinstance(inner, _Viewed):      # the views replayed on a term: the viewed shape
            expr = self.same_shape(inner.p)
            for view in inner.views:
                expr = self.bb.emit(relax.Call(view.op, [expr, *self.rest(view)], view.attrs))
            return expr
        if isinstance(inner, _FloatView):
            return self.float_value(inner, QDQLoweringError("shape of a float constant's views"))
        if isinstance(inner, relax.Expr):
            return inner
        raise QDQLoweringError(f"shape of an unsupported value ({type(inner).__name__})")

    def plain_call(self, call) -> relax.Expr | None:
        """A call on shapes and integer tensors the quantizer never touched (a symbolic batch's
        shape arithmetic), emitted as it is; None when an operand is quantized or float."""
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op) or \
                _name(call) in ("relax.quantize", "relax.dequantize"):
            return None

        def plain(a):
            if isinstance(a, relax.Tuple):
                fields = [plain(f) for f in a.fields]
                return None if any(f is None for f in fields) else relax.Tuple(fields)
            if not isinstance(a, (relax.Var, tvm.ir.GenericConst)):
                return a                    # shapes, prim values, strings: no tensor data
            v = self.val(a)
            ty = getattr(v, "ty", None)
            if not isinstance(v, relax.Expr) or (isinstance(ty, relax.TensorType) and str(ty.dtype).startswith(
                    ("float", "bfloat"))):
                return None
            return v

        args = [plain(a) for a in call.args]
        if any(a is None for a in args):
            return None
        return self.bb.emit(relax.Call(call.op, args, call.attrs, call.ty_args))

    @_handles("relax.quantize")
    def quantize(self, call):
        _constant_parameters(call)
        src = self.val(call.args[0], channels_last=True)
        scale, zero = _np(call.args[1]).astype(np.float32), _np(call.args[2])
        dtype = str(call.ty.dtype)
        info = np.iinfo(dtype)
        if scale.size > 1 and (call.ty.ndim != 4 or int(call.attrs.axis) % 4 != 1):
            raise QDQLoweringError("per-axis quantize other than one scale per channel of an NCHW feature map")
        # one zero point, or one per channel (NNCF's asymmetric depthwise inputs)
        z_out = int(zero.reshape(-1)[0]) if np.all(zero == zero.reshape(-1)[0]) else zero.reshape(-1).astype(np.int64)
        if isinstance(src, (tvm.ir.GenericConst, _FloatView)) and scale.size == 1:     # on the host
            base = src if isinstance(src, _FloatView) else _FloatView(_np(src), [])
            q = _host_quantize(base.value.astype(np.float32), float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]),
                               info)
            expr = relax.const(q.astype(dtype), dtype)
            for view in base.views:
                expr = self.bb.emit(relax.Call(view.op, [expr, *self.rest(view)], view.attrs))
            return _Int(expr, scale, zero, dtype)
        if isinstance(src, _Viewed) and scale.size == 1:
            y = self.requantize(src.p, float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]), dtype).expr
            for view in src.views:
                y = self.bb.emit(relax.Call(view.op, [y, *self.rest(view)], view.attrs))
            return _Int(y, scale, zero, dtype)
        if isinstance(src, _Unary) and scale.size == 1:
            return self.tabulate(src, float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]), dtype)
        if isinstance(src, _PendingUnary) and src.gain is not None:
            if scale.size != 1:
                raise QDQLoweringError("per-axis quantize of a float function times a per-channel factor")
            c, axis = src.gain
            s = float(scale.reshape(-1)[0])
            return replace(self.tabulate_pending_channels(src, np.float32(s / np.where(c == 0, 1.0, np.abs(c))),
                                                          int(zero.reshape(-1)[0]), dtype, axis, np.sign(c)),
                           scale=scale.reshape(-1)[:1])
        if isinstance(src, _PendingUnary) and scale.size == 1:
            return self.tabulate_pending(src, float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]), dtype)
        if isinstance(src, _PendingUnary):
            return self.tabulate_pending_channels(src, scale.reshape(-1), z_out, dtype)
        if isinstance(src, relax.Var) or isinstance(src, tvm.ir.GenericConst):   # input boundary
            expr = self.bb.emit(relax.Call(call.op, [src, *self.rest(call)], call.attrs))
            return _Int(expr, scale, zero, dtype)
        if isinstance(src, _Deq):
            x = src.value
            if x.on_grid(scale, zero, dtype):
                return x                                           # Q(DQ(q)) with the same params
            src = _Pending([(self.centered(x), x.scale.astype(np.float64), None)], channels_last=x.channels_last)
        if isinstance(src, _Concat) and scale.size == 1:
            s, z = float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0])
            parts = [self.requantize(p, s, z, dtype).expr if isinstance(p, _Pending) else
                     self.quantize_like(p, scale, zero, dtype) for p in src.parts]
            return _Int(self.bb.emit(op.concat(parts, axis=src.axis)), scale, zero, dtype)
        if not isinstance(src, _Pending) or (scale.size > 1 and src.keep is not None):
            raise QDQLoweringError("quantize of an unsupported value")
        return self.requantize(src, scale.reshape(-1) if scale.size > 1 else float(scale.reshape(-1)[0]), z_out, dtype)

    def requantize(self, src: _Pending, s_out: float | np.ndarray, z_out: int | np.ndarray, dtype: str) -> _Int:
        """A pending result's terms, each rescaled to s_out, summed, clamped (with its ReLU / Clip
        bounds) to ``dtype`` at zero point z_out.  ``s_out`` may hold one scale per channel of a
        feature map (NNCF quantizes a depthwise convolution's input so): the ratios, and the clamp of
        a ReLU6, are then per channel, and so may the zero point ``z_out`` be."""
        info = np.iinfo(dtype)
        scale, zero = np.atleast_1d(np.float32(s_out)), np.atleast_1d(np.asarray(z_out, np.int64))
        per = scale.size > 1
        channel = 3 if src.channels_last else 1
        lo, hi = np.full(scale.shape, int(info.min), np.int64), np.full(scale.shape, int(info.max), np.int64)
        if np.isfinite(src.lo):
            lo = np.maximum(lo, zero + np.round(src.lo / scale).astype(np.int64))
        if np.isfinite(src.hi):
            hi = np.minimum(hi, zero + np.round(src.hi / scale).astype(np.int64))
        total = None
        for acc, num, axis in src.terms:
            if per and axis is not None and axis % acc.ty.ndim != channel:
                raise QDQLoweringError("a per-channel quantize of a result scaled along another axis")
            axis = channel if per else axis
            ratio = num.astype(np.float32).astype(np.float64) / scale.astype(np.float64)
            d = dyadic_from_ratio(ratio)
            wide = not accumulators.requantize_fits(src.bound, int(d.m.max()))     # x * m + 2^(e-1) past int64
            overflow = f"requantize: accumulator bound {src.bound} times multiplier {int(d.m.max())} may overflow int64"
            if wide and not accumulators.wide_requantize_fits(src.bound):
                raise QDQLoweringError(overflow)
            if src.table is not None and len(src.terms) == 1 and axis is None:
                values, index = src.table
                out = integer_nonlinear.tabulate(lambda t, d=d: saturate(rescale(t, d), z_out, int(lo[0]), int(hi[0]),
                                                                         "int32"), values)
                y = op.astype(op.take(relax.const(out.astype(np.int32), "int32"), index, axis=0), dtype)
                return _Int(self.bb.emit(y), scale, zero, dtype, src.channels_last)
            term = (rescale_wide if wide else rescale)(acc, d, axis if axis is not None else -1)
            if term is None:                # a shift of 20 or less: the split product does not apply
                raise QDQLoweringError(overflow)
            total = term if total is None else op.add(total, term)
        y = saturate(self.plus_zero(total, zero, channel, 4), 0, int(lo.min()), int(hi.max()), dtype)
        if per and (np.any(lo != lo.min()) or np.any(hi != hi.max())):     # ReLU6's top differs per channel
            shape = [1] * 4
            shape[channel] = -1
            y = op.minimum(op.maximum(y, relax.const(lo.reshape(shape).astype(dtype), dtype)),
                           relax.const(hi.reshape(shape).astype(dtype), dtype))
        if src.keep is not None:
            y = op.where(src.keep, y, relax.const(int(info.min), dtype))
        return _Int(self.bb.emit(y), scale, zero, dtype, src.channels_last)

    def const_value(self, expr) -> np.ndarray:
        """A constant operand as float32: a plain constant, or DequantizeLinear of one."""
        v = self.val(expr)
        if isinstance(v, tvm.ir.GenericConst):
            return _np(v).astype(np.float32)
        if isinstance(v, _ConstDeq):
            return _real(v)
        raise QDQLoweringError("batch_norm: parameters must be constants")

    @_handles("relax.nn.batch_norm")
    def batch_norm(self, call):
        """Inference BatchNormalization of a dequantized tensor, y = g*x + b per channel with
        g = gamma/sqrt(var+eps), b = beta - mean*g.  With the shift written on the input's grid,
        refined 2^k times (``dyadic.fine_offset``):

            y = sign(g) * ((q - z) * 2^k + B) * (s_x * |g| / 2^k),   B = round(2^k * b / (s_x * g))

        one requantize term with per-channel ratio s_x*|g| / (2^k s_y): HAWQ-V3's bias at the
        accumulator scale, with the "weight" g.  Rounding B is the only approximation."""
        v = self.val(call.args[0])
        gamma, beta, mean, var = (self.const_value(a).astype(np.float64).reshape(-1) for a in call.args[1:5])
        g = gamma / np.sqrt(var + float(call.attrs.epsilon))
        if np.any(g == 0):
            raise QDQLoweringError("batch_norm with a zero scale (gamma = 0) has no integer form")
        axis = int(call.attrs.axis)
        if isinstance(v, _Concat) and v.axis % 4 == axis % 4 and all(isinstance(p, _Int) for p in v.parts):
            # DenseNet's norm after a concat of different grids (NNCF): each part's channels, on its grid
            parts, start = [], 0
            for p in v.parts:
                end = start + int(p.expr.ty.shape.values[axis])
                parts.append(self.affine(p, g[start:end], (beta - mean * g)[start:end], axis))
                start = end
            return _Concat(parts, v.axis)
        return self.affine(self.deq(v, "relax.nn.batch_norm"), g, beta - mean * g, axis)

    def affine(self, x: _Int, g: np.ndarray, b: np.ndarray, axis: int) -> _Pending:
        """g * x + b per channel along ``axis`` as one requantize term (see ``batch_norm``)."""
        s_x = np.float64(np.float32(x.scale.reshape(-1)[0]))
        info = np.iinfo(x.dtype)
        k, bias = fine_offset(b / (s_x * g), int(info.max) - int(info.min))
        shape = [1] * x.expr.ty.ndim
        shape[axis] = -1
        term = op.add(op.left_shift(self.centered(x), relax.const(k, "int32")),
                      relax.const(bias.astype(np.int32).reshape(shape), "int32"))
        if np.any(g < 0):
            term = op.multiply(term, relax.const(np.sign(g).astype(np.int32).reshape(shape), "int32"))
        # a reader that needs an integer tensor (a pool: DenseNet's head in ORT's QOperator file) reads
        # it on the 16-bit grid that holds |g| s_x |q - z| + |b| for every 8-bit q
        z = int(x.zero.reshape(-1)[0])
        span = max(abs(int(info.min) - z), abs(int(info.max) - z))
        wide = float(np.float32(np.max(np.abs(g) * s_x * span + np.abs(b)) / 32767)) if info.bits == 8 else None
        return _Pending([(self.bb.emit(term), s_x * np.abs(g) / 2.0**k, axis)], wide=wide)

    def const_int(self, c: _ConstDeq) -> _Int:
        """A per-tensor quantized constant as an integer tensor (e.g. a class token in a Concat)."""
        if c.scale.size != 1:
            raise QDQLoweringError("per-channel constant operand is not supported")
        dtype = "int8" if c.q.min() >= -128 and c.q.max() <= 127 else "int32"
        return _Int(relax.const(c.q.astype(dtype), dtype), c.scale, c.zero, dtype)

    def activation_matmul(self, a: _Int, b: _Int):
        """Attention's Q.K^T and P.V: both operands are quantized activations, (a - z_a)(b - z_b),
        on the first unit that fits, else one int32 (or int64) matmul of the centered operands."""
        bound = accumulators.activation_matmul(int(a.expr.ty.shape.values[-1]), a.dtype, int(a.zero.reshape(-1)[0]),
                                               b.dtype, int(b.zero.reshape(-1)[0]))
        dtype = accumulators.accumulator_dtype(bound)
        c = Contraction(ACTIVATION_MATMUL, Operand.of(a.expr, a.dtype, a.zero), dtype,
                        y=Operand.of(b.expr, b.dtype, b.zero))
        unit = first_fit(self.units, c)
        if unit is not None:
            acc = unit.emit(self.bb, c, a.expr, b.expr).expr
        else:
            acc = self.bb.emit(op.matmul(self.centered(a), self.centered(b), out_dtype=dtype))
        num = (a.scale.reshape(-1)[:1].astype(np.float32) * b.scale.reshape(-1)[:1].astype(np.float32))
        reach = wide_grid.product_reach(int(a.expr.ty.shape.values[-1]), accumulators.span(a.dtype, int(a.zero.reshape(-1)[0])),
                                        accumulators.span(b.dtype, int(b.zero.reshape(-1)[0])), num)
        return _Pending([(acc, num.astype(np.float64), None)], bound=bound, reach=reach)

    def probability_matmul(self, p: _Pending, v: _Int) -> _Pending:
        """P.V with P a softmax's output that no quantize follows (NNCF's Swin and MobileViT): P's own
        integers (p 2^15, exact), times V centered; P's rows sum to at most 2^15 + K/2, so the sum fits
        int32 with V on its 16-bit grid (passes/accumulators.probability_matmul)."""
        acc, num, _ = p.terms[0]
        if len(p.terms) != 1 or p.keep is not None or p.table is not None or v.scale.size != 1:
            raise QDQLoweringError("relax.matmul: probabilities times a value that is not one integer tensor")
        k, zv = int(v.expr.ty.shape.values[-2]), int(v.zero.reshape(-1)[0])
        bound = accumulators.probability_matmul(k, p.bound, v.dtype, zv)
        dtype = accumulators.accumulator_dtype(bound)
        out = self.bb.emit(op.matmul(self.bb.emit(op.astype(acc, dtype)), self.centered(v, dtype), out_dtype=dtype))
        num = (num.astype(np.float32) * v.scale.reshape(-1)[:1].astype(np.float32)).astype(np.float64)
        return _Pending([(out, num, None)], bound=bound,
                        reach=wide_grid.probability_reach(k, p.bound, accumulators.span(v.dtype, zv), num))

    @_handles("relax.isnan")
    def isnan(self, call):
        """A quantized value's real value is s (q - z): never NaN, whatever q is (SDPA as torch's
        dynamo exporter writes it replaces a softmax's NaN rows with where(isnan(p), 0, p))."""
        v = self.val(call.args[0])
        if isinstance(v, relax.Expr):
            raise QDQLoweringError("relax.isnan of a float tensor")
        return _NeverNaN()

    @_handles("relax.where")
    def where(self, call):
        cond = self.val(call.args[0])
        if not isinstance(cond, _NeverNaN):
            return self.mask_bias(call, cond)
        if _static_shape(call) is None or _static_shape(call) != _static_shape(call.args[2]):
            raise QDQLoweringError("relax.where: the kept operand is broadcast")
        return self.val(call.args[2])

    def mask_bias(self, call, cond) -> _MaskBias:
        """where(keep, 0, M) with M far below any grid (-inf, or float32's lowest as transformers
        write it) and ``keep`` computed from integer inputs (a padded attention mask): added to
        scores, it leaves them or sends them below every representable value."""
        values = [self.val(a) for a in call.args[1:]]
        consts = [_np(v) if isinstance(v, tvm.ir.GenericConst) and _np(v).size == 1 else None for v in values]
        if not isinstance(cond, relax.Expr) or str(cond.ty.dtype) != "bool" or None in consts:
            raise QDQLoweringError("relax.where: only where(isnan(q), c, q) of a quantized q, or an attention "
                                   "mask where(keep, 0, -inf) of integer inputs, has an integer form")
        zero, low = (float(c.reshape(-1)[0]) for c in consts)
        if zero == 0.0 and low <= MASKED:
            return _MaskBias(cond)
        if low == 0.0 and zero <= MASKED:
            return _MaskBias(self.bb.emit(op.logical_not(cond)))
        raise QDQLoweringError(f"relax.where: a mask of {zero} and {low} does not saturate the grid")

    @_handles("relax.multiply", "relax.divide")
    def scale(self, call):
        """Products and quotients:
        - a pending result times a positive scalar constant (attention's 1/sqrt(d)): folded into
          the requantize ratio, no runtime multiply;
        - an activation times a positive quantized scalar (ORT's sqrt(1/sqrt(d)) on q and k): a
          requantize term s_x * c;
        - two activations: their centered product, ratio s_a * s_b (GELU's x * Phi(x) as ORT
          quantizes it);
        - an 8-bit activation with a float scalar constant: a float function, tabulated at its quantize."""
        name = _name(call)
        p, c = self.val(call.args[0]), self.val(call.args[1])
        viewed = p.views if isinstance(p, _Viewed) else None
        p = p.p if isinstance(p, _Viewed) else p
        if isinstance(p, _Pending) and isinstance(c, tvm.ir.GenericConst) and _np(c).size == 1 \
                and float(_np(c).reshape(-1)[0]) > 0 and len(p.terms) == 1:
            v = float(_np(c).reshape(-1)[0])
            acc, num, axis = p.terms[0]
            factor = v if name == "relax.multiply" else 1.0 / v
            scaled = _Pending([(acc, num * factor, axis)], p.lo, p.hi, p.bound,
                              reach=None if p.reach is None else p.reach * factor)
            return scaled if viewed is None else _Viewed(scaled, viewed)
        if viewed is not None:
            raise QDQLoweringError(f"{name} of a viewed result other than a positive scalar scale")
        if name == "relax.multiply":
            if isinstance(p, _ConstDeq):
                p, c = c, p
            if isinstance(p, _Deq) and isinstance(c, _ConstDeq) and c.q.size == 1 and p.value.scale.size == 1:
                real = float(_real(c).reshape(-1)[0])
                if real > 0:
                    return _Pending([(self.centered(p.value), p.value.scale.astype(np.float64) * np.float64(real),
                                      None)])
            if isinstance(p, (tvm.ir.GenericConst, _ConstDeq)):
                p, c = c, p
            # a constant varying along one axis (LayerScale, float or quantized as ORT writes it): a gain per channel
            real = _np(c) if isinstance(c, tvm.ir.GenericConst) else _real(c) if isinstance(c, _ConstDeq) else None
            if isinstance(p, _Deq) and real is not None and p.value.scale.size == 1 \
                    and (axis := _channel_axis(real, _static_shape(call))) is not None:
                return self.channel_scale(p.value, real, axis)
            if isinstance(c, _ConstDeq) and c.scale.size == 1 and c.q.size > 1:     # a quantized tensor constant
                c = _Deq(self.const_int(c))
            if isinstance(p, _Deq) and isinstance(c, _Deq) and p.value.scale.size == c.value.scale.size == 1:
                a, b = p.value, c.value
                ca, cb = self.centered(a), self.centered(b)
                bound = accumulators.product(a.dtype, b.dtype)
                if accumulators.accumulator_dtype(bound) == "int64":    # a 16-bit operand: the product in int64
                    ca, cb = op.astype(ca, "int64"), op.astype(cb, "int64")
                return _Pending([(self.bb.emit(op.multiply(ca, cb)), a.scale.astype(np.float64) * b.scale.astype(np.float64),
                                  None)], bound=bound)
        return self.float_binary(call)

    def channel_gain(self, call) -> _PendingUnary | _Pending | None:
        """x * c[channel] where x awaits its quantize (NNCF's SmoothQuant factor after a LayerNorm, an
        attention output or a GELU): a result's ratio times |c| per channel (its integers times
        sign(c)), or a float function of one with the gain kept for its quantize; None otherwise."""
        a, b = (self.peek(x) for x in call.args)
        x, c = (a, b) if isinstance(b, tvm.ir.GenericConst) else (b, a)
        if not isinstance(c, tvm.ir.GenericConst) or _np(c).dtype != np.float32 or _np(c).size < 2:
            return None
        axis = _channel_axis(_np(c), _static_shape(call))
        if axis is None:
            return None
        c = _np(c).reshape(-1).astype(np.float64)
        if isinstance(x, _PendingUnary) and x.gain is None and not x.p.channels_last:
            return replace(x, call=call, gain=(c, axis))
        if not isinstance(x, _Pending) or len(x.terms) != 1 or x.table is not None or x.keep is not None \
                or x.channels_last or np.isfinite(x.lo) or np.isfinite(x.hi):
            return None
        acc, num, term_axis = x.terms[0]
        if num.size > 1 and term_axis % acc.ty.ndim != axis:
            return None
        sign = np.sign(c)
        if np.any(sign != 1):
            shape = [1] * acc.ty.ndim
            shape[axis] = -1
            acc = self.bb.emit(op.multiply(acc, relax.const(sign.astype(np.int32).reshape(shape), str(acc.ty.dtype))))
        ratio = num * np.where(c == 0, 1.0, np.abs(c))
        reach = None if x.reach is None else x.reach * float(np.abs(c).max())
        return _Pending([(acc, ratio, axis)], bound=x.bound, reach=reach)

    def channel_scale(self, x: _Int, c: np.ndarray, axis: int) -> _Pending:
        """x * c[channel] (LayerScale, a per-channel gain): y = sign(c) (q - z) * s_x |c|, a
        per-channel requantize ratio; the sign multiplies the integers (a ratio is positive)."""
        c = np.asarray(c, np.float32).reshape(-1).astype(np.float64)
        sign = np.sign(c)
        ratio = x.scale.astype(np.float64) * np.where(c == 0, 1.0, np.abs(c))
        centered = self.centered(x)
        if np.any(sign != 1):
            shape = [1] * x.expr.ty.ndim
            shape[axis] = -1
            centered = self.bb.emit(op.multiply(centered, relax.const(sign.astype(np.int32).reshape(shape), "int32")))
        return _Pending([(centered, ratio, axis)])

    @_handles("relax.subtract", "relax.power", "relax.maximum", "relax.minimum")
    def float_binary(self, call):
        """A float op of an 8-bit activation (or a float function of one) and a scalar float
        constant: still a function of the one tensor's integers (any of FLOAT_BINARY: add,
        multiply and divide come here when they are nothing else)."""
        name = _name(call)
        a, b = self.val(call.args[0]), self.val(call.args[1])
        for u, k, first in ((self.as_unary(a), b, True), (self.as_unary(b), a, False)):
            if u is not None and isinstance(k, tvm.ir.GenericConst) and _np(k).size == 1:
                return _Unary(u.x, _composed(FLOAT_BINARY[name], u.fn, _np(k).reshape(()), first))
        raise QDQLoweringError(f"{name}: only a positive scalar scale of a linear result, a product of "
                               "activations, or a float op of one 8- or 16-bit tensor and a scalar is supported")

    def as_unary(self, v) -> _Unary | None:
        """``v`` as a float function of one 8- or 16-bit tensor's integers, where it is one."""
        if isinstance(v, _Unary):
            return v
        if isinstance(v, _Deq) and v.value.of is not None:
            return v.value.of
        if isinstance(v, _Deq) and v.value.scale.size == 1 and np.iinfo(v.value.dtype).bits in (8, 16):
            x = v.value
            s, z = np.float32(x.scale.reshape(-1)[0]), int(x.zero.reshape(-1)[0])
            return _Unary(x, lambda q: ((q - z).astype(np.float32) * s).astype(np.float32))
        return None

    def variant(self, kind: str) -> str:
        if isinstance(self.variants, str):
            return "poly" if self.variants == "auto" else self.variants
        i = self.seen.get(kind, 0)
        self.seen[kind] = i + 1
        return self.variants[kind][i]

    @_handles(*NONLINEAR_OPS)
    def nonlinear(self, call):
        kind = NONLINEAR_OPS[_name(call)]
        v = self.val(call.args[0])
        # scores no quantize follows (NNCF's Q.K^T): on their 16-bit grid; a GELU of a linear result is
        # a float function of it instead, tabulated at its quantize (``pending_closure``)
        x = self.deq(self.on_wide_grid(v) if kind == "softmax" else v, kind)
        ndim = x.expr.ty.ndim
        if kind == "softmax" and int(call.attrs.axis) % ndim != ndim - 1:
            raise QDQLoweringError("softmax over an axis other than the last is not supported")
        s = float(np.float32(x.scale.reshape(-1)[0]))
        variant = self.variant(kind)
        build = integer_nonlinear.softmax if kind == "softmax" else integer_nonlinear.gelu
        info = np.iinfo(x.dtype)
        if kind == "gelu" and info.bits == 8:
            # elementwise on 256 possible inputs: a table of the builder's own results
            table, scale, bound = integer_nonlinear.gelu_table(variant, s, int(x.zero.reshape(-1)[0]), x.dtype)
            index = op.subtract(op.astype(x.expr, "int32"), relax.const(int(info.min), "int32"))
            return _Pending([(op.take(relax.const(table, "int64"), index, axis=0), np.array([scale], np.float64), None)],
                            bound=bound, table=(table, index))
        elif kind == "softmax" and info.bits == 8:
            y, scale, bound = build(variant, self.centered(x), s, span=int(info.max) - int(info.min))
        else:
            y, scale, bound = build(variant, self.centered(x), s)
        return _Pending([(self.bb.emit(y), np.array([scale], np.float64), None)], bound=bound,
                        probabilities=kind == "softmax")

    @_handles("relax.nn.layer_norm")
    def layer_norm(self, call):
        x = self.deq(self.on_wide_grid(self.val(call.args[0])), "relax.nn.layer_norm")
        ndim = x.expr.ty.ndim
        if [int(a) % ndim for a in call.attrs.axes] != [ndim - 1]:
            raise QDQLoweringError("layer_norm over axes other than the last is not supported")
        gamma = self.const_value(call.args[1]).astype(np.float64).reshape(-1)
        beta = self.const_value(call.args[2]).astype(np.float64).reshape(-1)
        if np.any(gamma == 0):
            raise QDQLoweringError("layer_norm with a zero gamma has no integer form")
        info, channels = np.iinfo(str(x.expr.ty.dtype)), int(gamma.size)
        if info.bits == 16 and (k := wide_grid.norm_shift(channels)):
            # 16 bits over many channels (Swin's 1536-channel patch merging read unquantized from NNCF's
            # file, a wide 16-bit residual stream): the grid k bits coarser, q - z rounded half up, so
            # that the integer variance fits int64
            shifted = op.right_shift(op.add(self.centered(x), relax.const(1 << (k - 1), "int32")),
                                     relax.const(k, "int32"))
            x = _Int(self.bb.emit(shifted), np.float32(x.scale * 2.0**k), np.zeros(1, np.int64), "int32")
        elif not accumulators.layer_norm_fits(channels, str(x.expr.ty.dtype)):
            raise QDQLoweringError(f"layer_norm over {channels} channels of {info.dtype} input: the integer "
                                   "variance could overflow int64; keep the residual stream in 8 bits")
        s = float(np.float32(x.scale.reshape(-1)[0]))
        y, scale, bound = integer_nonlinear.layer_norm(self.centered(x), s, gamma, beta, float(call.attrs.epsilon))
        # read unquantized (Swin's patch norm, then the first block's norm, in ORT's QOperator file): on the
        # 16-bit grid of |gamma| sqrt(C) + |beta|, which bounds it (|x - mean| <= sqrt(C) sigma)
        wide = float(np.float32((np.abs(gamma).max() * np.sqrt(channels) + np.abs(beta).max()) / 32767))
        return _Pending([(self.bb.emit(y), scale, -1)], bound=bound, wide=wide, reach=wide_grid.wide_reach(wide))

    @_handles("relax.nn.avg_pool2d")
    def avg_pool(self, call):
        """A window sum as a depthwise convolution with a ones kernel, then divided by the window's
        count: the cells inside the input (count_include_pad=0), or inside the padded input (a
        ceil-mode window is cut at its end).  Where the count varies, sum / count is exactly
        sum * (L / count) / L with L the counts' least common multiple: one integer multiply by a
        constant per position, then one requantize at ratio s_x / L."""
        x = self.deq(self.val(call.args[0]), "relax.nn.avg_pool2d")
        a = call.attrs
        if str(a.layout) != "NCHW" or any(int(v) != 1 for v in a.dilation):
            raise QDQLoweringError("avg_pool2d: only NCHW without dilation")
        k = [int(v) for v in a.pool_size]
        strides, padding = [int(v) for v in a.strides], [int(v) for v in a.padding]
        try:        # the spatial sizes (the batch may be symbolic)
            sizes = [[int(e.ty.shape.values[d]) for d in (2, 3)] for e in (call.args[0], call)]
        except TypeError:
            raise QDQLoweringError("avg_pool2d: the window counts need static spatial sizes") from None
        counts = []
        for ax in (0, 1):
            size, out = sizes[0][ax], sizes[1][ax]
            start = np.arange(out) * strides[ax] - padding[ax]
            lo, hi = (-padding[ax], size + padding[ax + 2]) if bool(a.count_include_pad) else (0, size)
            counts.append(np.minimum(start + k[ax], hi) - np.maximum(start, lo))
            # a ceil-mode window past the end padding reads more zeros (centered: nothing)
            padding[ax + 2] += max(0, (out - 1) * strides[ax] + k[ax] - (size + padding[ax] + padding[ax + 2]))
        count = np.outer(*counts)
        lcm = int(np.lcm.reduce(count.reshape(-1)))
        if k[0] * k[1] * accumulators.span(x.dtype, int(x.zero.reshape(-1)[0])) * lcm >= accumulators.INT32_LIMIT:
            raise QDQLoweringError(f"avg_pool2d: the window counts' common multiple {lcm} overflows int32")
        channels = int(x.expr.ty.shape.values[1])
        zx = int(x.zero.reshape(-1)[0])
        ones = np.ones((channels, 1, *k), np.int8)
        # a window sum is a depthwise convolution: a target's unit may run it (TOSA's is tosa.depthwise_conv2d)
        c = Contraction(CONV2D, Operand.of(x.expr, x.dtype, x.zero), "int32", ones, groups=channels,
                        strides=tuple(strides), padding=tuple(padding))
        unit = first_fit(self.units, c)
        if unit is not None and not unit.channels_last:
            total = unit.emit(self.bb, c, x.expr, relax.const(unit.pack(c))).expr
        else:
            total = self.bb.emit_te(_conv_zero_padded, x.expr, relax.const(ones, "int8"), strides, padding, [1, 1],
                                    channels, zx, "int32", primfunc_name_hint="sum_pool")
        if zx:
            total = self.bb.emit(op.subtract(total, relax.const(zx * k[0] * k[1], "int32")))
        if np.any(count != lcm):
            total = self.bb.emit(op.multiply(total, relax.const((lcm // count).astype(np.int32), "int32")))
        return _Pending([(total, x.scale.astype(np.float64) / lcm, None)])

    def quantize_like(self, x: _Int, scale, zero, dtype) -> relax.Expr:
        """``x`` requantized to (scale, zero, dtype); as is when it already has them."""
        if x.on_grid(scale, zero, dtype):
            return x.expr
        d = dyadic_from_ratio(x.scale.astype(np.float64) / np.float64(np.float32(scale.reshape(-1)[0])))
        info = np.iinfo(dtype)
        return self.bb.emit(saturate(rescale(self.centered(x), d), int(zero.reshape(-1)[0]), int(info.min),
                                     int(info.max), dtype))

    @_handles("relax.dequantize")
    def dequantize(self, call):
        _constant_parameters(call)
        src = self.val(call.args[0], channels_last=True)
        scale, zero = _np(call.args[1]).astype(np.float32), _np(call.args[2])
        if isinstance(src, _Int) and isinstance(src.expr, tvm.ir.GenericConst):     # a constant quantized here
            src = src.expr
        if isinstance(src, tvm.ir.GenericConst):
            return _ConstDeq(_np(src).astype(np.int64), scale.reshape(-1), zero.reshape(-1).astype(np.int64),
                             int(call.attrs.axis))
        if isinstance(src, _Int):
            if scale.size != 1 and not (np.array_equal(scale.reshape(-1), src.scale.reshape(-1))
                                        and np.all(zero.reshape(-1) == src.zero.reshape(-1))):
                raise QDQLoweringError("per-axis dequantize of an activation quantized otherwise")
            return _Deq(src)
        raise QDQLoweringError("dequantize of an unsupported value")

    def tabulate_pending(self, u: _PendingUnary, s: float, z: int, dtype: str) -> _Int:
        """q_y = T[q16]: the accumulator requantized to a 16-bit grid, then a 65,536-entry table of
        the float function, quantized (passes/fine_grid.py)."""
        info = np.iinfo(dtype)
        grid = fine_grid.table_grid(u.fn, s, z, int(info.min), int(info.max))
        with np.errstate(all="ignore"):
            table = fine_grid.quantize64(u.fn(fine_grid.grid_values(grid)), s, z, int(info.min), int(info.max))
        q16 = self.requantize(u.p, grid.scale, grid.zero, "int16")
        index = op.subtract(op.astype(q16.expr, "int32"), relax.const(fine_grid.QMIN, "int32"))
        y = op.take(relax.const(table.astype(dtype), dtype), index, axis=0)
        return _Int(self.bb.emit(y), np.float32([s]), np.array([z]), dtype, q16.channels_last)

    def tabulate_pending_channels(self, u: _PendingUnary, scales: np.ndarray, z: int | np.ndarray, dtype: str,
                                  axis: int | None = None, sign: np.ndarray | None = None) -> _Int:
        """One scale per output channel (NNCF: Conv -> SiLU -> Q per channel -> depthwise; or f times a
        factor per channel quantized at one scale, each channel at s / |c|, along ``axis``): the
        16-bit grid covers every channel, the table holds f in fixed point, ``sign`` flips it per
        channel, and each channel requantizes it by its own dyadic ratio (passes/fine_grid.py)."""
        info = np.iinfo(dtype)
        grid = fine_grid.channel_grid(u.fn, scales, z, int(info.min), int(info.max), sign)
        table, t = fine_grid.fixed_table(u.fn, grid, scales)
        q16 = self.requantize(u.p, grid.scale, grid.zero, "int16")
        index = op.subtract(op.astype(q16.expr, "int32"), relax.const(fine_grid.QMIN, "int32"))
        fixed = self.bb.emit(op.take(relax.const(table.astype(np.int32), "int32"), index, axis=0))
        axis = axis if axis is not None else 3 if q16.channels_last else 1
        if sign is not None and np.any(sign != 1):
            shape = [1] * q16.expr.ty.ndim
            shape[axis] = -1
            fixed = self.bb.emit(op.multiply(fixed, relax.const(sign.astype(np.int32).reshape(shape), "int32")))
        d = dyadic_from_ratio(np.float64(np.float32(t)) / np.float32(scales).astype(np.float64))
        zero = np.atleast_1d(np.asarray(z, np.int64))
        y = saturate(self.plus_zero(rescale(fixed, d, axis), zero, axis, q16.expr.ty.ndim), 0, int(info.min),
                     int(info.max), dtype)
        return _Int(self.bb.emit(y), np.float32(scales), zero, dtype, q16.channels_last)

    @staticmethod
    def plus_zero(total: relax.Expr, zero: np.ndarray, axis: int, ndim: int) -> relax.Expr:
        """total (int64) + z: one zero point, or one per channel along ``axis``."""
        if not np.any(zero != 0):
            return total
        shape = [1] * ndim
        shape[axis] = -1
        return op.add(total, relax.const(int(zero[0]), "int64") if zero.size == 1 else
                      relax.const(zero.reshape(shape).astype(np.int64), "int64"))

    def tabulate(self, u: _Unary, s: float, z: int, dtype: str) -> _Int:
        """q_y = T[q_x]: the float function at each of the 256 (or, of a 16-bit tensor, 65,536)
        integers, quantized as QuantizeLinear does (float32 division, ties to even, saturated; NaN to
        the maximum), stored in the output's type."""
        info, src = np.iinfo(dtype), np.iinfo(u.x.dtype)
        table = _host_quantize(u.fn(np.arange(src.min, src.max + 1, dtype=np.int64)), s, z, info).astype(dtype)
        index = op.subtract(op.astype(u.x.expr, "int32"), relax.const(int(src.min), "int32"))
        y = op.take(relax.const(table, dtype), index, axis=0)
        return _Int(self.bb.emit(y), np.float32([s]), np.array([z]), dtype, u.x.channels_last)

    def pending_view(self, call, p: _Pending) -> _Pending:
        """A view of a result awaiting its requantize (ORT leaves Flatten / Reshape after a mean
        unquantized): applied to each integer term, a per-channel term's axis moved with it."""
        if p.table is not None or p.keep is not None:
            raise QDQLoweringError(f"{_name(call)} of a tabulated or masked value is not supported")
        if p.channels_last:
            p = self.pending_view_nchw(p)
        terms = []
        for acc, num, axis in p.terms:
            view = self.bb.emit(relax.Call(call.op, [acc, *self.rest(call)], call.attrs))
            axis = None if num.size == 1 else axis      # one ratio: no channel axis to follow
            if axis is not None:
                try:
                    axis = _moved_axis(call, acc, view, axis)
                except QDQLoweringError:
                    return _Viewed(p, [call])
            terms.append((view, num, axis))
        return replace(p, terms=terms, probabilities=p.probabilities and _keeps_rows(call, p.terms[0][0], terms[0][0]))

    def pending_view_nchw(self, p: _Pending) -> _Pending:
        """A channels-last pending result with its terms moved back to NCHW."""
        terms = [(self.bb.emit(op.permute_dims(acc, [0, 3, 1, 2])), num, None if axis is None else 1)
                 for acc, num, axis in p.terms]
        return replace(p, terms=terms, channels_last=False)

    def const_view(self, call, c: _ConstDeq):
        name = _name(call)
        if name == "relax.permute_dims":
            perm = [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else \
                list(reversed(range(c.q.ndim)))
            return _ConstDeq(c.q.transpose(perm), c.scale, c.zero, perm.index(c.axis % c.q.ndim))
        if name == "relax.reshape" and c.scale.size == 1:
            shape = [int(d) for d in call.args[1].values]
            return _ConstDeq(c.q.reshape(shape), c.scale, c.zero, c.axis)
        if name == "relax.reshape" and c.q.ndim == 1:              # a per-channel bias vector
            shape = [int(d) for d in call.args[1].values]
            return _ConstDeq(c.q.reshape(shape), c.scale, c.zero, shape.index(c.q.size))
        raise QDQLoweringError(f"{name} of a per-channel constant is not supported")

    @_handles("relax.nn.conv2d", "relax.matmul")
    def linear(self, call):
        """acc = sum(q_x * w) + (bias - z_x * sum(w)): the input's zero point is folded into the bias
        offline, so the kernel reads the raw 8-bit input (padding it with z_x, which is real 0)
        and the int8 weights: the u8 x s8 -> int32 product VNNI and dp4a execute.  The first of the
        target's units that fits stores the weights in its layout and emits the kernel; with none,
        the generic kernels below do (sub-byte weights stay packed, passes/subbyte.py)."""
        name = _name(call)
        is_conv = name == "relax.nn.conv2d"
        # only a channels-last unit's convolution reads a channels-last input as it is
        v = self.on_wide_grid(self.val(call.args[0], channels_last=is_conv and any(u.channels_last for u in self.units)))
        if not is_conv and isinstance(v, _Pending) and v.probabilities:
            return self.probability_matmul(v, self.deq(self.on_wide_grid(self.val(call.args[1])), name))
        x = self.one_zero(self.deq(v, name, per_channel=is_conv))
        w = self.val(call.args[1])
        if name == "relax.matmul" and isinstance(w, _Deq):
            return self.activation_matmul(x, w.value)
        out_axis = 0 if is_conv else -1
        if isinstance(w, tvm.ir.GenericConst) and _np(w).dtype == np.float32 and _np(w).ndim >= 2:
            # a quantizer left this layer's weights float (NNCF's squeeze-excitation): int8 per channel
            wq, ws = wide_grid.float_weights(_np(w), out_axis)
            w = _ConstDeq(wq, ws, np.zeros(ws.shape, np.int64), out_axis % wq.ndim)
        if not isinstance(w, _ConstDeq):
            raise QDQLoweringError(f"{name} with a non-constant second operand is not supported yet")
        if w.scale.size > 1 and np.any(w.zero != 0):
            raise QDQLoweringError(f"{name}: per-channel weights need zero points of 0")
        out_axis %= w.q.ndim
        if w.scale.size > 1 and w.axis % w.q.ndim != out_axis:
            raise QDQLoweringError(f"{name}: weights must be quantized per output channel")
        a = call.attrs
        if is_conv and (str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW"):
            raise QDQLoweringError(f"{name}: only NCHW/OIHW layouts are supported")
        wq = w.q - (w.zero.reshape(-1)[0] if w.zero.size == 1 else 0)
        zx = int(x.zero.reshape(-1)[0])
        acc_range = accumulators.linear(wq, out_axis, x.dtype, zx)
        bound, acc_dtype = acc_range.bound, acc_range.dtype
        if acc_dtype == "int64":
            self.widened.append(f"{name.split('.')[-1]} #{len(self.weights)} (bound 2^{np.log2(bound):.1f})")
        # 4- and 2-bit weights stay packed in the artifact; the kernel unpacks them (passes/subbyte.py)
        bits = subbyte.width(wq)
        weights = wq.astype(next(t for t in ("int8", "int16", "int32")
                                 if np.iinfo(t).min <= wq.min() and wq.max() <= np.iinfo(t).max))
        geometry = {}
        if is_conv:
            geometry = dict(groups=int(a.groups), strides=tuple(int(v) for v in a.strides),
                            padding=tuple(int(v) for v in a.padding), dilation=tuple(int(v) for v in a.dilation))
        c = Contraction(CONV2D if is_conv else MATMUL, Operand.of(x.expr, x.dtype, x.zero, x.channels_last), acc_dtype,
                        weights, bits, **geometry)
        unit = first_fit(self.units, c)
        if (unit is None or not unit.channels_last) and x.channels_last:
            x = self.one_zero(self.deq(self.val(call.args[0]), name, per_channel=is_conv))
            c = replace(c, x=Operand.of(x.expr, x.dtype, x.zero))
        stored = unit.pack(c) if unit is not None else subbyte.pack(wq, bits) if bits else weights
        wc = relax.const(stored, str(stored.dtype))
        self.digests.append(digest(stored))
        self.weights.append({"op": name.split(".")[-1], "shape": list(wq.shape),
                             "bits": bits or 8 * stored.itemsize, "bytes": int(stored.nbytes)})
        if unit is not None:
            result = unit.emit(self.bb, c, x.expr, wc)
            acc, axis, shape = result.expr, result.axis, result.channel_shape
        elif is_conv:
            acc = self.bb.emit_te(_conv_zero_padded, x.expr, wc, list(c.strides), list(c.padding), list(c.dilation),
                                  c.groups, zx, acc_dtype, (tuple(wq.shape), bits), primfunc_name_hint="conv2d")
            axis, shape = 1, (1, -1, 1, 1)
        elif bits:
            acc = self.bb.emit_te(subbyte.matmul, x.expr, wc, (tuple(wq.shape), bits), acc_dtype,
                                  primfunc_name_hint="matmul")
            axis, shape = -1, (-1,)
        else:
            acc = self.bb.emit(op.matmul(x.expr, wc, out_dtype=acc_dtype))
            axis, shape = -1, (-1,)
        if zx:
            correction = acc_range.correction
            acc = self.bb.emit(op.add(acc, relax.const(correction.reshape(shape).astype(acc_dtype), acc_dtype)))
        xs = x.scale.reshape(-1)[0].astype(np.float32)
        if x.scale.size > 1:        # a depthwise convolution: output channel o reads input channel o // multiplier
            if not is_conv or c.groups != x.scale.size:
                raise QDQLoweringError(f"{name}: per-channel activations feed only depthwise convolutions")
            xs = np.repeat(x.scale.astype(np.float32), wq.shape[0] // c.groups)
        num = (xs * w.scale.astype(np.float32)).astype(np.float64)
        reach = wide_grid.linear_reach(wq, out_axis, accumulators.span(x.dtype, zx), num)
        return _Pending([(acc, num, axis)], bound=bound, channels_last=unit is not None and unit.channels_last,
                        reach=reach)

    def tensor_add(self, a: _Pending, real: np.ndarray) -> _Pending:
        """A float tensor added to one accumulator (ViT's position embedding, which NNCF leaves
        float): its real value on the accumulator's grid, round(e / (s_x s_w)) per channel, half to even."""
        acc, num, axis = a.terms[0]
        shape = _static_shape(acc)
        step = wide_grid.term_step(num, axis, acc.ty.ndim)
        try:
            fits = shape is not None and list(np.broadcast_shapes(real.shape, step.shape, tuple(shape))) == shape
        except ValueError:
            fits = False
        if not fits:
            raise QDQLoweringError("relax.add: a tensor constant that does not broadcast against the result")
        q = np.round(real.astype(np.float64) / step).astype(np.int64)
        if np.abs(q).max() >= accumulators.INT32_LIMIT // 2:
            raise QDQLoweringError("relax.add: a tensor constant too large for the accumulator's grid")
        bound = accumulators.bias_add(a.bound, q)
        dtype = str(acc.ty.dtype) if accumulators.accumulator_dtype(bound) == "int32" else "int64"
        acc = acc if dtype == str(acc.ty.dtype) else self.bb.emit(op.astype(acc, dtype))
        total = self.bb.emit(op.add(acc, relax.const(q.astype(dtype), dtype)))
        reach = None if a.reach is None else wide_grid.bias_reach(a.reach, q, step)
        return _Pending([(total, num, axis)], bound=bound, reach=reach)

    def residual_sum(self, a: _Pending, b) -> _Pending:
        """A sum that no quantize follows (NNCF leaves a transformer's residual stream float): the
        terms of both, each requantized by its own ratio where the sum is read; its bound the sum
        of theirs (passes/wide_grid.py)."""
        values = [a, b]
        if any(v.channels_last if isinstance(v, _Pending) else v.value.channels_last for v in values):
            values = [self.pending_view_nchw(v) if isinstance(v, _Pending) else _Deq(self.to_nchw(v.value))
                      for v in values]
        terms, reach, bound = [], 0.0, 0
        for v in values:
            if isinstance(v, _Deq):
                x = v.value
                if x.scale.size != 1 or x.zero.size != 1:
                    raise QDQLoweringError("relax.add of a per-channel activation and a pending result")
                span = accumulators.span(x.dtype, int(x.zero.reshape(-1)[0]))
                terms.append((self.centered(x), x.scale.astype(np.float64), None))
                reach = None if reach is None else reach + wide_grid.const_reach(np.array([span]), x.scale)
                bound = max(bound, span)
                continue
            if v.table is not None or v.keep is not None or np.isfinite(v.lo) or np.isfinite(v.hi):
                raise QDQLoweringError("relax.add of a tabulated, masked or clamped pending result")
            if len(v.terms) > 1 and v.reach is not None:    # the stream so far: one int32 tensor
                step = wide_grid.stream_step(v.reach)
                terms.append((self.requantize(v, step, 0, "int32").expr, np.array([step], np.float64), None))
                reach = None if reach is None else reach + v.reach
                bound = max(bound, 1 << (wide_grid.STREAM_BITS + 1))
                continue
            terms += v.terms
            reach = None if reach is None or v.reach is None else reach + v.reach
            bound = max(bound, v.bound)
        return _Pending(terms, bound=bound, reach=reach)

    @_handles("relax.add")
    def add(self, call):
        a, b = self.val(call.args[0], channels_last=True), self.val(call.args[1], channels_last=True)
        if isinstance(a, _MaskBias) or isinstance(b, _MaskBias):
            mask, x = (a, self.val(call.args[1])) if isinstance(a, _MaskBias) else (b, self.val(call.args[0]))
            if isinstance(x, _Deq) and x.value.scale.size == 1:             # the scores, NCHW as the mask is
                x = _Pending([(self.centered(x.value), x.value.scale.astype(np.float64), None)])
            if not isinstance(x, _Pending) or x.keep is not None or x.table is not None or x.channels_last:
                raise QDQLoweringError("relax.add: an attention mask on a value that is not one requantize")
            return replace(x, keep=mask.keep)
        for x, zero in ((a, b), (b, a)):        # + an all-zero constant (an attention mask with nothing masked)
            if isinstance(zero, tvm.ir.GenericConst) and not np.any(_np(zero)) and not isinstance(x, relax.Expr) \
                    and _static_shape(call) is not None \
                    and _static_shape(call) == _static_shape(call.args[0 if x is a else 1]):
                return x
        if any(isinstance(v, (_PendingUnary, _Viewed)) for v in (a, b)) and \
                all(isinstance(v, (_PendingUnary, _Viewed, _Pending, _Deq)) for v in (a, b)):
            # a float function of an accumulator, or a per-channel result seen through views, joins a sum no
            # quantize follows (NNCF's MobileViT: a block's SiLU input plus its output; the unfolded patches
            # plus the attention's projection): on the 16-bit grid its bound fixes
            a, b = (self.on_wide_grid(v) if isinstance(v, (_PendingUnary, _Viewed)) else v for v in (a, b))
        if isinstance(b, _Pending) and not isinstance(a, _Pending):
            a, b = b, a
        if isinstance(a, _Pending) and (np.isfinite(a.lo) or np.isfinite(a.hi)):
            raise QDQLoweringError("relax.add after a clamp that awaits its quantize")
        real = _float_bias(b) if isinstance(a, _Pending) and len(a.terms) == 1 else None
        if real is not None and real.size > 1 and real.size != max(real.shape) and not a.channels_last:
            return self.tensor_add(a, real)         # a position embedding: a tensor on the accumulator's grid
        if real is not None and (real.size == 1 or real.size == max(real.shape)):     # a vector along one axis
            b = _ConstDeq(np.zeros(real.shape, np.int64), np.ones(1, np.float32), np.zeros(1, np.int64), 0)
        if isinstance(a, _Pending) and isinstance(b, _ConstDeq) and len(a.terms) == 1:
            acc, num, axis = a.terms[0]
            bq = _on_accumulator_grid(b, num) if real is None else _real_on_grid(real, num).reshape(real.shape)
            bound = accumulators.bias_add(a.bound, bq)
            dtype = str(acc.ty.dtype)
            if dtype == "int32" and accumulators.accumulator_dtype(bound) == "int64":    # may not fit: add in int64
                acc, dtype = self.bb.emit(op.astype(acc, "int64")), "int64"
                self.widened.append(f"bias add #{len(self.weights) - 1} (bound 2^{np.log2(bound):.1f})")
            q = bq.reshape(-1) if a.channels_last and bq.size > 1 else bq        # per channel: the last axis
            bias = relax.const(q.astype(dtype), dtype)
            reach = None if a.reach is None else wide_grid.bias_reach(a.reach, bq.reshape(-1), num.reshape(-1))
            return _Pending([(self.bb.emit(op.add(acc, bias)), num, axis)], a.lo, a.hi, bound, a.channels_last,
                            reach=reach)
        if isinstance(a, _Pending) and isinstance(b, (_Pending, _Deq)):
            return self.residual_sum(a, b)
        if isinstance(a, (_Deq, _ConstDeq)) and isinstance(b, (_Deq, _ConstDeq)):
            # residual add (or QLinearAdd with a constant operand): each term rescaled to the output
            nhwc = any(isinstance(v, _Deq) and v.value.channels_last for v in (a, b))
            if nhwc and any(isinstance(v, _ConstDeq) for v in (a, b)):
                a, b = (self.val(x) for x in call.args)
                nhwc = False
            terms, reach = [], 0.0
            for v in (a, b):
                if isinstance(v, _ConstDeq):
                    if v.scale.size != 1:
                        raise QDQLoweringError("add of a per-channel constant is not supported")
                    centered = v.q - int(v.zero[0])
                    terms.append((relax.const(centered.astype(np.int32), "int32"), v.scale.astype(np.float64), None))
                    reach += wide_grid.const_reach(centered, v.scale)
                else:
                    value = self.to_nhwc(v.value) if nhwc else v.value
                    terms.append((self.centered(value), value.scale.astype(np.float64), None))
                    span = accumulators.span(value.dtype, int(value.zero.reshape(-1)[0]))
                    reach += wide_grid.const_reach(np.array([span]), value.scale)
            # its bound: a reader with no quantize between (ConvNeXt's downsampling LayerNorm, NNCF) reads
            # the sum on the 16-bit grid it fixes
            return _Pending(terms, channels_last=nhwc, reach=reach)
        return self.float_binary(call)


def _channel_axis(c: np.ndarray, out_shape: list[int] | None) -> int | None:
    """The one axis a constant factor varies along (broadcast against the output), or None for a
    scalar or a constant that varies along several axes."""
    if out_shape is None or c.size <= 1 or c.ndim > len(out_shape):
        return None
    dims = [1] * (len(out_shape) - c.ndim) + list(c.shape)
    varying = [i for i, d in enumerate(dims) if d != 1]
    return varying[0] if len(varying) == 1 and dims[varying[0]] == out_shape[varying[0]] else None


def _static_shape(expr) -> list[int] | None:
    try:
        return [int(d) for d in expr.ty.shape.values]
    except (TypeError, AttributeError):
        return None


def _moved_axis(call, before, after, axis: int) -> int:
    """Where a per-channel axis of ``before`` lies in ``after = view(before)``: permuted by a
    transpose, kept by a reshape that leaves the axis and the elements before it in place (a
    flatten of [N, C, 1, 1]), by a take or slice along other axes (ViT's class token); anything
    else has no single channel axis."""
    old, new = _static_shape(before), _static_shape(after)
    axis %= len(old) if old else 1
    if _name(call) == "relax.permute_dims":
        perm = [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else list(reversed(range(len(old))))
        return perm.index(axis)
    if _name(call) == "relax.broadcast_to" and old and new:
        return axis + len(new) - len(old)
    if _name(call) == "relax.take" and old and new:
        taken = int(call.attrs.axis) % len(old) if call.attrs.axis is not None else None
        if taken is not None and taken != axis:         # the class token x[:, 0]: other axes close up
            return axis if axis < taken else axis + len(new) - len(old)
    if _name(call) == "relax.strided_slice" and old and new and len(old) == len(new) and \
            old[axis] == new[axis]:                     # a slice of other axes (or all of this one)
        return axis
    if old and new and _name(call) in ("relax.reshape", "relax.flatten", "relax.squeeze", "relax.expand_dims"):
        lead = int(np.prod(old[:axis]))
        for j in range(len(new)):
            if int(np.prod(new[:j])) == lead and new[j] == old[axis]:
                return j
    raise QDQLoweringError(f"{_name(call)} of a per-channel result moves its channels apart")


def _conv_zero_padded(x, w, strides, padding, dilation, groups, pad_value, out_dtype, packing=(None, None)):
    """NCHW convolution of the raw quantized input, padded with its zero point (real 0).
    ``packing``: (weight shape, bits) when ``w`` holds packed sub-byte weights."""
    from tvm import topi

    shape, bits = packing
    if bits:
        w = subbyte.unpacked(w, shape, bits)
    top, left, bottom, right = padding
    xp = topi.nn.pad(x, [0, 0, top, left], [0, 0, bottom, right], pad_value=pad_value, name="pad_temp")
    if groups == 1:
        return topi.nn.conv2d_nchw(xp, w, strides, 0, dilation, out_dtype=out_dtype)
    return topi.nn.group_conv2d_nchw(xp, w, strides, 0, dilation, groups, out_dtype=out_dtype)


@dataclass(frozen=True)
class Island:
    """An op with no integer form, run in float: its integer operands dequantized, its result
    quantized by the quantize that follows it (the next op with an integer form)."""
    op: str                 # the Relax op, e.g. relax.sin
    node: str               # its ONNX node's name (compiler/frontend.py keeps it as the op's span), else its value's
    reason: str             # why no integer form


@dataclass(frozen=True)
class LoweringReport:
    """The static range analysis' result (passes/accumulators.py): every linear layer's accumulator bound is
    max_c(sum_k |w[c,k]| * max|q_x| + |z_x * sum_k w[c,k]|) (+ |bias|); layers whose bound
    reaches 2^31 accumulate in int64 and are listed here.  ``weights``: per linear layer, in
    order, its op, weight shape, and bits and bytes as stored (sub-byte widths packed);
    ``digests``: the stored constants' identities (passes.analysis.digest), in the same order."""
    int64: tuple[str, ...]
    weights: tuple[dict, ...] = ()
    digests: tuple[str, ...] = ()
    islands: tuple[Island, ...] = ()

    @property
    def layers(self) -> int:
        return len(self.weights)

    def summary(self) -> str:
        if not self.int64:
            return f"all {self.layers} accumulators proven to fit int32"
        return f"{len(self.int64)} of {self.layers} accumulators widened to int64: {', '.join(self.int64)}"


def lower_qdq(mod: tvm.IRModule, variants="auto",
              units: Sequence[ContractionUnit] = ()) -> tuple[tvm.IRModule, LoweringReport]:
    """Rebuild ``main`` with integer ops; raises QDQLoweringError on an unknown pattern.
    ``variants``: the softmax / GELU family, "shift" or "poly" for every node ("auto" without
    calibration data means poly), or per kind the list chosen per node (compiler/quantize.py).
    ``units``: the target's contraction units, preferred first (Backend.units, codegen/backend.py): each conv2d and
    matmul runs on the first that fits, in its weight layout; with none (the default), on the
    generic kernels."""
    func = mod["main"]
    bb = relax.BlockBuilder()
    attrs = {k: func.attrs[k] for k in func.attrs.keys()} if func.attrs is not None else {}
    with bb.function("main", list(func.params), attrs=attrs):
        with bb.dataflow():
            low = _Lowering(bb, variants, units)
            # the graph's outputs: the result, or each field of a result tuple (a model with several outputs,
            # one of which other ops may also read)
            outputs, fields = set(), None
            for block in func.body.blocks:
                for b in block.bindings:
                    if b.var.same_as(func.body.body) or not isinstance(b.var, relax.DataflowVar):
                        outputs.add(b.var)
                        if isinstance(b.value, relax.Tuple) and all(isinstance(f, relax.Var) for f in b.value.fields):
                            fields = b
                            outputs.update(b.value.fields)
            result, boundary = None, {}
            for block in func.body.blocks:
                for b in block.bindings:
                    if b.var in outputs and _name(b.value) == "relax.dequantize":
                        src = low.val(b.value.args[0])
                        if not isinstance(src, _Int):
                            raise QDQLoweringError("the output dequantize must follow a quantize")
                        boundary[b.var] = result = bb.emit(relax.Call(b.value.op, [src.expr, *b.value.args[1:]],
                                                                      b.value.attrs))
                        # ops that also read the output read its integers
                        low.env[b.var] = low.lower(b.value) if fields is not None else result
                        continue
                    if fields is not None and b.var.same_as(fields.var):
                        result = low.env[b.var] = bb.emit(relax.Tuple(
                            [boundary[f] if f in boundary else low.float_output(low.env.get(f))
                             for f in b.value.fields]))
                        continue
                    try:
                        low.env[b.var] = low.lower(b.value)
                    except QDQLoweringError as exc:
                        low.env[b.var] = low.island(b, exc)
                    except ValueError as exc:   # a ratio or offset passes/dyadic.py cannot represent
                        low.env[b.var] = low.island(b, QDQLoweringError(f"{_name(b.value)}: {exc}"))
            if result is None:
                result = low.float_output(low.env.get(func.body.body))
            out = bb.emit_output(result)
        bb.emit_func_output(out)
    new = bb.get()
    lowered = tvm.IRModule({**{gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"},
                            **{gv: f for gv, f in new.functions_items()}})
    return lowered, LoweringReport(tuple(low.widened), tuple(low.weights), tuple(low.digests), tuple(low.islands))


def is_qdq(mod: tvm.IRModule) -> bool:
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(_name(e) == "relax.quantize"))
    return any(found)
