"""LowerQDQToInteger: rewrite an imported QDQ graph into integer-only Relax.

TVM imports ONNX QDQ models as fake quantization: ``quantize -> dequantize ->
float op -> quantize``.  This pass rebuilds ``main`` binding by binding,
tracking every value as one of

* an integer tensor with its affine parameters (after a quantize),
* its lazy dequantization (``dequantize`` of a tensor or of a constant),
* a pending integer result awaiting its output quantize,

and emits the integer program (HAWQ-V3, with the dyadic multiplier of
``passes/dyadic.py``):

    conv2d / matmul:  acc = (q_x - z_x) * (q_w - z_w) + q_bias                int32
                      q_y = clamp(rescale(acc, s_x*s_w[c] / s_y) + z_y)
    residual add:     q_y = clamp(sum_t rescale(q_t - z_t, s_t / s_y) + z_y)
    mean (pooling):   q_y = clamp(rescale(sum(q - z), s_x / (n*s_y)) + z_y)
    max-pool, views:  on the integers, parameters unchanged
    relu / clip:      folded into the clamp: z_y + round(bound / s_y)

The input ``quantize`` and the output ``dequantize`` stay as the float
boundary.  ``runtime/golden.run_qdq`` defines the same integers in numpy from
the ONNX graph, independently; tests hold the two equal bit for bit.  A
pattern this pass does not know raises ``QDQLoweringError`` naming the op.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from passes.dyadic import dyadic_from_ratio, rescale, saturate

op = relax.op
VIEWS = {"relax.reshape", "relax.permute_dims", "relax.flatten", "relax.squeeze", "relax.expand_dims"}


class QDQLoweringError(ValueError):
    pass


@dataclass
class _Int:
    """Integer tensor ``expr`` with real value scale * (q - zero)."""
    expr: relax.Expr
    scale: np.ndarray
    zero: np.ndarray
    dtype: str


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
class _Pending:
    terms: list             # (int expr, ratio numerator array (float64), channel axis or None)
    lo: float = -np.inf
    hi: float = np.inf


def _np(c) -> np.ndarray:
    return c.value.numpy()


def _name(call) -> str:
    return call.op.name if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) else type(call).__name__


class _Lowering:
    def __init__(self, bb: relax.BlockBuilder):
        self.bb = bb
        self.env: dict = {}

    def val(self, expr):
        if isinstance(expr, relax.Var) and expr in self.env:
            return self.env[expr]
        if isinstance(expr, tvm.ir.GenericConst):
            return expr
        if isinstance(expr, relax.Var):
            return expr                      # a function parameter
        raise QDQLoweringError(f"unexpected operand {type(expr).__name__}")

    def centered(self, v: _Int) -> relax.Expr:
        x = op.astype(v.expr, "int32")
        if np.any(v.zero != 0):
            if v.zero.size != 1:
                raise QDQLoweringError("per-axis zero points on activations are not supported")
            x = op.subtract(x, relax.const(int(v.zero.reshape(-1)[0]), "int32"))
        return self.bb.emit(x)

    def deq(self, v, what: str):
        if isinstance(v, _Deq):
            return v.value
        if isinstance(v, _ConstDeq):
            return v
        raise QDQLoweringError(f"{what}: operand is not a dequantized integer tensor")

    # ---- one binding ------------------------------------------------------------
    def lower(self, call) -> object:
        name = _name(call)
        if name == "relax.quantize":
            return self.quantize(call)
        if name == "relax.dequantize":
            return self.dequantize(call)
        if name in ("relax.nn.conv2d", "relax.matmul"):
            return self.linear(call, name)
        if name == "relax.add":
            return self.add(call)
        if name in ("relax.nn.relu", "relax.clip"):
            p = self.val(call.args[0])
            if not isinstance(p, _Pending):
                raise QDQLoweringError(f"{name} is supported only between a linear op and its quantize")
            lo, hi = (0.0, np.inf) if name == "relax.nn.relu" else (
                float(call.args[1].value), float(call.args[2].value))
            return _Pending(p.terms, max(p.lo, lo), min(p.hi, hi))
        if name == "relax.mean":
            x = self.deq(self.val(call.args[0]), name)
            axes = [int(a) for a in call.attrs.axis]
            total = self.bb.emit(op.sum(self.centered(x), axis=axes, keepdims=bool(call.attrs.keepdims)))
            dims = x.expr.ty.shape.values
            try:
                n = int(np.prod([int(dims[a]) for a in axes]))
            except TypeError:
                raise QDQLoweringError("mean over a dynamic dimension has no fixed divisor") from None
            return _Pending([(total, x.scale.astype(np.float64) / n, None)])
        if name == "relax.nn.max_pool2d" or name in VIEWS:
            # on the integers; QOperator graphs apply these to quantized tensors directly,
            # QDQ graphs to their dequantization: the result keeps the operand's form
            v = self.val(call.args[0])
            if isinstance(v, _ConstDeq) and name in VIEWS:
                return self.const_view(call, v)
            x = v if isinstance(v, _Int) else self.deq(v, name)
            if x.scale.size != 1:
                raise QDQLoweringError(f"{name} of a per-channel tensor is not supported")
            moved = _Int(self.bb.emit(relax.Call(call.op, [x.expr, *call.args[1:]], call.attrs)),
                         x.scale, x.zero, x.dtype)
            return moved if isinstance(v, _Int) else _Deq(moved)
        raise QDQLoweringError(f"{name}: no integer lowering for this op")

    def quantize(self, call):
        src = self.val(call.args[0])
        scale, zero = _np(call.args[1]).astype(np.float32), _np(call.args[2])
        dtype = str(call.ty.dtype)
        info = np.iinfo(dtype)
        if isinstance(src, relax.Var) or isinstance(src, tvm.ir.GenericConst):   # input boundary
            expr = self.bb.emit(relax.Call(call.op, [src, *call.args[1:]], call.attrs))
            return _Int(expr, scale, zero, dtype)
        if isinstance(src, _Deq):
            x = src.value
            if np.array_equal(x.scale, scale) and np.array_equal(x.zero, zero) and x.dtype == dtype:
                return x                                           # Q(DQ(q)) with the same params
            src = _Pending([(self.centered(x), x.scale.astype(np.float64), None)])
        if not isinstance(src, _Pending):
            raise QDQLoweringError("quantize of an unsupported value")
        s_out, z_out = float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0])
        total = None
        for acc, num, axis in src.terms:
            ratio = num.astype(np.float32).astype(np.float64) / np.float64(np.float32(s_out))
            term = rescale(acc, dyadic_from_ratio(ratio), axis if axis is not None else -1)
            total = term if total is None else op.add(total, term)
        lo, hi = int(info.min), int(info.max)
        if np.isfinite(src.lo):
            lo = max(lo, z_out + int(np.round(src.lo / np.float32(s_out))))
        if np.isfinite(src.hi):
            hi = min(hi, z_out + int(np.round(src.hi / np.float32(s_out))))
        return _Int(self.bb.emit(saturate(total, z_out, lo, hi, dtype)), scale, zero, dtype)

    def dequantize(self, call):
        src = self.val(call.args[0])
        scale, zero = _np(call.args[1]).astype(np.float32), _np(call.args[2])
        if isinstance(src, tvm.ir.GenericConst):
            return _ConstDeq(_np(src).astype(np.int64), scale.reshape(-1), zero.reshape(-1).astype(np.int64),
                             int(call.attrs.axis))
        if isinstance(src, _Int):
            if scale.size != 1:
                raise QDQLoweringError("per-axis dequantize of an activation is not supported")
            return _Deq(src)
        raise QDQLoweringError("dequantize of an unsupported value")

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

    def linear(self, call, name):
        x = self.deq(self.val(call.args[0]), name)
        w = self.val(call.args[1])
        if not isinstance(w, _ConstDeq):
            raise QDQLoweringError(f"{name} with a non-constant second operand is not supported yet")
        if w.scale.size > 1 and np.any(w.zero != 0):
            raise QDQLoweringError(f"{name}: per-channel weights need zero points of 0")
        out_axis = 0 if name == "relax.nn.conv2d" else w.q.ndim - 1
        if w.scale.size > 1 and w.axis % w.q.ndim != out_axis:
            raise QDQLoweringError(f"{name}: weights must be quantized per output channel")
        wq = relax.const((w.q - (w.zero.reshape(-1)[0] if w.zero.size == 1 else 0)).astype(np.int32), "int32")
        xi = self.centered(x)
        if name == "relax.nn.conv2d":
            a = call.attrs
            acc = op.nn.conv2d(xi, wq, strides=a.strides, padding=a.padding, dilation=a.dilation, groups=a.groups,
                               data_layout=a.data_layout, kernel_layout=a.kernel_layout, out_dtype="int32")
            axis = 1
        else:
            acc = op.matmul(xi, wq, out_dtype="int32")
            axis = -1
        num = (x.scale.reshape(-1)[0].astype(np.float32) * w.scale.astype(np.float32)).astype(np.float64)
        return _Pending([(self.bb.emit(acc), num, axis)])

    def add(self, call):
        a, b = self.val(call.args[0]), self.val(call.args[1])
        if isinstance(a, _ConstDeq) and isinstance(b, _Pending):
            a, b = b, a
        if isinstance(a, _Pending) and isinstance(b, _ConstDeq) and len(a.terms) == 1:
            acc, num, axis = a.terms[0]
            expect = num.astype(np.float32)
            if b.scale.size not in (1, expect.size) or not np.allclose(b.scale, expect, rtol=1e-6) \
                    or np.any(b.zero != 0):
                raise QDQLoweringError("bias add: the bias must be int32 at scale s_x*s_w (as ORT writes it)")
            bias = relax.const(b.q.astype(np.int32), "int32")
            return _Pending([(self.bb.emit(op.add(acc, bias)), num, axis)], a.lo, a.hi)
        if isinstance(a, (_Deq, _ConstDeq)) and isinstance(b, (_Deq, _ConstDeq)):
            # residual add (or QLinearAdd with a constant operand): each term rescaled to the output
            terms = []
            for v in (a, b):
                if isinstance(v, _ConstDeq):
                    if v.scale.size != 1:
                        raise QDQLoweringError("add of a per-channel constant is not supported")
                    terms.append((relax.const((v.q - int(v.zero[0])).astype(np.int32), "int32"),
                                  v.scale.astype(np.float64), None))
                else:
                    terms.append((self.centered(v.value), v.value.scale.astype(np.float64), None))
            return _Pending(terms)
        raise QDQLoweringError("add: operands are not a supported integer pattern")


def lower_qdq(mod: tvm.IRModule) -> tvm.IRModule:
    """Rebuild ``main`` with integer ops; raises QDQLoweringError on an unknown pattern."""
    func = mod["main"]
    bb = relax.BlockBuilder()
    attrs = {k: func.attrs[k] for k in func.attrs.keys()} if func.attrs is not None else {}
    with bb.function("main", list(func.params), attrs=attrs):
        with bb.dataflow():
            low = _Lowering(bb)
            outputs = set()
            for block in func.body.blocks:
                for b in block.bindings:
                    if b.var.same_as(func.body.body) or not isinstance(b.var, relax.DataflowVar):
                        outputs.add(b.var)
            result = None
            for block in func.body.blocks:
                for b in block.bindings:
                    if b.var in outputs and _name(b.value) == "relax.dequantize":
                        src = low.val(b.value.args[0])
                        if not isinstance(src, _Int):
                            raise QDQLoweringError("the output dequantize must follow a quantize")
                        low.env[b.var] = bb.emit(relax.Call(b.value.op, [src.expr, *b.value.args[1:]],
                                                            b.value.attrs))
                        result = low.env[b.var]
                        continue
                    low.env[b.var] = low.lower(b.value)
            if result is None:
                raise QDQLoweringError("no output dequantize found")
            out = bb.emit_output(result)
        bb.emit_func_output(out)
    new = bb.get()
    return tvm.IRModule({**{gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"},
                         new.get_global_var("main"): new["main"]})


def is_qdq(mod: tvm.IRModule) -> bool:
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(_name(e) == "relax.quantize"))
    return any(found)
