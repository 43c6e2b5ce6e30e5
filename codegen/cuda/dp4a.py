"""Int8 GEMM and convolution on CUDA's ``dp4a`` (sm_61 and later).

``dp4a(a, b, c)`` adds the dot product of two 4-byte vectors to a 32-bit
accumulator in one instruction (PTX ``dp4a.u32.s32``: u8 activations times s8
weights, exactly the HAWQ-V3 accumulator ``sum q_x * q_w`` of
passes/lower_qdq.py, whose ``-z_x * sum(w)`` is folded into the bias).  Four
consecutive bytes of the reduction must be contiguous in both operands, so
the lowering lays the operands out for it on this target (``ConvUnit``, ``MatmulUnit``):

* convolution: the input channels-last (NHWC) and padded once (spatially with
  the zero point, its channels to a multiple of 4) by its own kernel, weights
  as [O, KH, KW, C4] with zero bytes past C;
* matmul: weights transposed to [N, K4] (K rounded up to 4, zero bytes past K),
  so row ``n`` of the weights is contiguous like row ``m`` of the input.

Then out[..., n] = sum_k x[..., k] * w[n, k] with ``k`` innermost, and the
schedule (``Dp4a``) splits ``k`` by 4 and tensorizes each step into one
``dp4a`` whose operands are single 32-bit loads (the intrinsic's buffers have
``offset_factor=4``, so tensorize proves the alignment).  Each thread owns a
register tile of rows x columns, accumulates in registers, and runs the fused
requantize epilogue on its tile before the one store.

``ConvUnit`` and ``MatmulUnit`` are the contraction units (passes/contraction.py) through which the
integer lowering lays out and emits these kernels on the cuda target (Backend.units, codegen/backend.py).
"""

from __future__ import annotations

from functools import partial

import numpy as np
from tvm import relax, s_tir, te, tirx, topi
from tvm.s_tir import dlight as dl
from tvm.script import tirx as T

from codegen.cpu_schedule import _const, _divisor_at_most, _feeds, _inline_read_once
from codegen.cuda.rows import CudaRule, own_kernel
from passes.contraction import CONV2D, MATMUL, Accumulator, Contraction

LANES = 4                   # bytes per dp4a operand
BLOCK = "dp4a_"             # the reduction blocks this rule schedules
MAX_THREADS = 256


def rounded(n: int) -> int:
    return -(-n // LANES) * LANES


def _intrinsic(a_dtype: str, b_dtype: str, index: str) -> str:
    """A dp4a step on 4 bytes of each operand in global memory, accumulated in a register.
    ``index``: the kernels' index type (Relax legalizes to int64; tensorize matches it exactly)."""
    name = f"lowbit_dp4a_{a_dtype}_{b_dtype}_{index}"
    a_vec, b_vec = f"{a_dtype}x4", f"{b_dtype}x4"
    lanes, zero, one = tirx.const(LANES, index), tirx.const(0, index), tirx.const(1, index)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes,), a_dtype, offset_factor=LANES, align=LANES)
        B = T.match_buffer(b, (lanes,), b_dtype, offset_factor=LANES, align=LANES)
        C = T.match_buffer(c, (one,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[zero], A[zero:lanes], B[zero:lanes])
            T.writes(C[zero])
            for i in range(lanes):
                with T.sblock("step"):
                    vi = T.axis.remap("R", [i])
                    C[zero] = C[zero] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes,), a_dtype, offset_factor=LANES, align=LANES)
        B = T.match_buffer(b, (lanes,), b_dtype, offset_factor=LANES, align=LANES)
        C = T.match_buffer(c, (one,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[zero], A[zero:lanes], B[zero:lanes])
            T.writes(C[zero])
            C[zero] = T.call_pure_extern("int32", "__dp4a", A.vload([zero], a_vec), B.vload([zero], b_vec), C[zero])

    if s_tir.TensorIntrin.get(name, allow_missing=True) is None:
        s_tir.TensorIntrin.register(name, desc, impl)
    return name


INTRINSICS = {(a, b, i): _intrinsic(a, b, i) for a in ("uint8", "int8") for b in ("int8",) for i in ("int32", "int64")}


# ---- the operand layouts (the contraction units below) ----------------------------------------

def pack_conv_weights(w):
    """OIHW int8 weights -> [O, KH, KW, C4], zero bytes in the padding channels."""
    o, c, kh, kw = w.shape
    out = np.zeros((o, kh, kw, rounded(c)), w.dtype)
    out[..., :c] = w.transpose(0, 2, 3, 1)
    return out


def pack_matmul_weights(w):
    """[K, N] int8 weights -> [N, K4], zero bytes past K."""
    k, n = w.shape
    out = np.zeros((n, rounded(k)), w.dtype)
    out[:, :k] = w.T
    return out


def pad_input(x, padding, channels: int, pad_value: int):
    """NHWC input padded spatially with its zero point and to ``channels`` (a multiple of 4)."""
    top, left, bottom, right = padding
    return topi.nn.pad(x, [0, top, left, 0], [0, bottom, right, channels - int(x.shape[3])],
                       pad_value=pad_value, name="dp4a_pad")


def pad_columns(x, columns: int):
    """A matmul input's reduction axis padded to ``columns`` (the weights there are zero)."""
    rank = len(x.shape)
    return topi.nn.pad(x, [0] * rank, [0] * (rank - 1) + [columns - int(x.shape[-1])], name="dp4a_pad")


def conv2d(xp, w, strides, dilation):
    """out[n, y, x, o] = sum_{kh, kw, c} xp[n, y*sh + kh*dh, x*sw + kw*dw, c] * w[o, kh, kw, c], int32,
    over the already padded NHWC input."""
    _, height, width, _ = (int(d) if isinstance(d, tirx.IntImm) else d for d in xp.shape)
    o, kh, kw, c = (int(d) for d in w.shape)
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    rh, rw, rc = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, c), "rc")
    return te.compute((xp.shape[0], oh, ow, o), lambda n, y, x, f: te.sum(
        xp[n, y * sh + rh * dh, x * sw + rw * dw, rc].astype("int32") * w[f, rh, rw, rc].astype("int32"),
        axis=[rh, rw, rc]), name=f"{BLOCK}conv2d")


def matmul(x, w):
    """out[..., n] = sum_k x[..., k] * w[n, k], int32."""
    k = te.reduce_axis((0, int(w.shape[1])), "k")
    return te.compute((*x.shape[:-1], w.shape[0]), lambda *i: te.sum(
        x[(*i[:-1], k)].astype("int32") * w[i[-1], k].astype("int32"), axis=k), name=f"{BLOCK}matmul")


# ---- the contraction units (passes/contraction.py) -------------------------------------------

def _operands(c: Contraction) -> bool:
    """8-bit operands (u8 or s8 input, int8 weights) summed in int32: dp4a.u32.s32 / s32.s32."""
    return c.int8_weights and c.x.dtype in ("uint8", "int8") and c.acc_dtype == "int32"


class ConvUnit:
    """An ungrouped convolution of a static image: channels-last in and out, its input padded
    once by a kernel of its own (``pad_input``) unless it needs none."""
    name = f"{BLOCK}conv2d"
    channels_last = True

    def fits(self, c: Contraction) -> bool:
        return c.kind == CONV2D and _operands(c) and c.groups == 1 and all(d is not None for d in c.x.shape[1:])

    def pack(self, c: Contraction) -> np.ndarray:
        return pack_conv_weights(c.weights)

    def emit(self, bb, c: Contraction, x, w) -> Accumulator:
        if not c.x.channels_last:
            x = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
        channels = int(w.ty.shape.values[3])
        padding = list(c.padding)
        xp = x
        if any(padding) or channels != int(x.ty.shape.values[3]):
            xp = bb.emit_te(pad_input, x, padding, channels, c.x.zero, primfunc_name_hint="pad")
        return Accumulator(bb.emit_te(conv2d, xp, w, list(c.strides), list(c.dilation), primfunc_name_hint="conv2d"), 3)


class MatmulUnit:
    """x[..., K] @ W[K, N], W stored [N, K4]; the input's K padded to 4s by a kernel of its own
    where it is not a multiple."""
    name = f"{BLOCK}matmul"
    channels_last = False

    def fits(self, c: Contraction) -> bool:
        return c.kind == MATMUL and _operands(c) and c.weights.ndim == 2

    def pack(self, c: Contraction) -> np.ndarray:
        return pack_matmul_weights(c.weights)

    def emit(self, bb, c: Contraction, x, w) -> Accumulator:
        k_dim = int(c.weights.shape[0])
        xk = x if k_dim % LANES == 0 else bb.emit_te(pad_columns, x, rounded(k_dim), primfunc_name_hint="pad")
        return Accumulator(bb.emit_te(matmul, xk, w, primfunc_name_hint="matmul"), -1)


# ---- the schedule ------------------------------------------------------------------------------

class Dp4a(CudaRule):
    """Schedules a fused kernel whose reduction block is one of ``BLOCK``'s: threads in a
    (rows x columns) grid, each with an RT x CT register tile of accumulators, the reduction in
    dp4a steps, and the epilogue (zero-point correction, bias, requantize, clamp) inlined into the
    tile's store.  Returns None (other rules try) for any other kernel."""

    def schedule(self, sch: s_tir.Schedule) -> s_tir.Schedule | None:
        blocks = dl.analysis.normalize_prim_func(sch)
        if blocks is None:
            return None
        reductions = [b for b in blocks if b.is_reduction()]
        if len(reductions) != 1 or not sch.get(reductions[0].block_rv).name_hint.startswith(BLOCK):
            return None
        red = reductions[0]
        start = blocks.index(red)
        if not all(b.is_injective() for i, b in enumerate(blocks) if i != start):
            return None
        # a prologue (the input's quantize, a head merge, a GELU table) runs first as a kernel of
        # its own: inlined, the operand would be an expression, not 4 bytes in memory
        for b in _inline_read_once(sch, blocks[:start], keep=partial(_feeds, sch, red.block_rv)):
            if not own_kernel(sch, b.block_rv):
                return None
        blocks = blocks[start:]
        stmt = sch.get(red.block_rv)
        own = stmt.writes[0].source.name
        operands = tuple(str(r.source.dtype) for r in stmt.reads if r.source.name != own)
        index = str(sch.get(sch.get_loops(red.block_rv)[-1]).extent.ty)
        intrinsic = INTRINSICS.get((*operands, index))
        if intrinsic is None:
            return None
        for b in blocks[1:-1]:                  # the elementwise chain folds into its last block
            sch.compute_inline(b.block_rv)
        epilogue = blocks[-1].block_rv if len(blocks) > 1 else None

        block = red.block_rv
        kinds = red.dom_kind()
        loops = sch.get_loops(block)
        *lead, col = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
        *outer_red, k = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
        n_cols = _const(sch.get(col).extent)
        if n_cols is None or (_const(sch.get(k).extent) or 1) % LANES:
            return None
        # tiles divide their axes exactly (a predicated step does not match the intrinsic), and
        # only the innermost row axis (output width, tokens) is tiled: the bindings of a split of
        # fused axes cannot be blockized.  The outer axes (batch, output height) are blocks
        if not lead or _const(sch.get(lead[-1]).extent) is None:     # a vector times the matrix: one row
            lead = [*lead, sch.add_unit_loop(block)]
        *outer, row = lead
        n_rows = _const(sch.get(row).extent)
        # output channels across a warp's lanes (consecutive threads read consecutive weight rows),
        # CT of them per thread; rows across the block's other dimension, RT per thread
        ct = _divisor_at_most(n_cols, 4 if n_cols >= 512 else 2 if n_cols >= 64 else 1)
        tx = _divisor_at_most(n_cols // ct, 32)
        rt = _divisor_at_most(n_rows, 4 if n_rows >= 4096 else 2 if n_rows >= 256 else 1)
        ty = _divisor_at_most(n_rows // rt, MAX_THREADS // tx)
        rb, ry, ri = sch.split(row, [None, ty, rt])
        cb, cx, ci = sch.split(col, [None, tx, ct])
        ko, k4 = sch.split(k, [None, LANES])
        sch.reorder(*outer, rb, cb, ry, cx, *outer_red, ko, ri, ci, k4)
        if outer:
            sch.bind(sch.fuse(*outer) if len(outer) > 1 else outer[0], "blockIdx.y")
        sch.bind(sch.fuse(rb, cb), "blockIdx.x")
        sch.bind(ry, "threadIdx.y")
        sch.bind(cx, "threadIdx.x")
        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, cx)
        if epilogue is not None:
            sch.reverse_compute_inline(epilogue)
        sch.decompose_reduction(block, (outer_red or [ko])[0])
        sch.unroll(ri)
        sch.unroll(ci)
        sch.tensorize(k4, intrinsic)
        return sch
