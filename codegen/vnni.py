"""int8 matmul and convolution on x86 VNNI: ``vpdpbusd`` multiplies 4 u8 x s8 pairs per int32
lane and adds them to the lane's accumulator, 16 lanes per 512-bit instruction.

The weights (s8) are packed at compile time so that one instruction's operand is 64 contiguous
bytes, 16 output channels by 4 reduction steps:

    matmul  Wp[j // 16, k // 4, j % 16, k % 4] = W[k, j]                 (K % 4 == 0, N % 16 == 0)
    conv    Wp[o // 16, y, x, c // 4, o % 16, c % 4] = W[o, c, y, x]     (C zero-padded to 4s)

and the matmul computes C[i, j] = sum_k x[i, k] * Wp[j // 16, k // 4, j % 16, k % 4]; its
innermost 16 (j) x 4 (k) step is tensorized: the 4 input bytes x[i, 4q:4q+4] are read as one
int32, broadcast to 16 lanes, and multiplied with the 64 weight bytes.  The convolution is the
same product over (y, x, c) once its input is channels-last, so that 4 channels are 4 bytes.  ``avx512_vnni`` does it in
one ``vpdpbusd`` zmm; ``avx_vnni`` (Alder Lake and later, VEX-encoded, 256-bit) in two ymm halves.
Targets with neither keep the generic schedule (codegen/cpu_schedule.py).

``MatmulUnit``, ``ConvUnit`` and ``ActivationMatmulUnit`` are the contraction units
(passes/contraction.py) that the integer lowering uses on a VNNI target (Backend.units, codegen/backend.py): they
decide which layers fit, pack the weights, and emit the kernels above.

TVM ships ``dot_16x4_vnni`` but passes ``<16 x i32>`` where LLVM 22 declares ``<64 x i8>``
operands, so the implementations here pass byte vectors (shared notes, tvm-0.27 §7).
"""

from __future__ import annotations

import numpy as np

from passes.contraction import ACTIVATION_MATMUL, CONV2D, MATMUL, Accumulator, Contraction

LANES = 16                  # int32 accumulators per instruction group
GROUP = 4                   # u8 x s8 products summed into each lane
BLOCK = "matmul_vnni"       # the kernels' reduction blocks: cpu_schedule tensorizes them
CONV_BLOCK = "conv2d_vnni"
ISAS = ("avx512_vnni", "avx_vnni")
_LLVM_FEATURE = {"avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni"}


def isa(target) -> str | None:
    """The VNNI flavour the LLVM target has, or None (plain AVX2 / AVX-512 without VNNI)."""
    from tvm.target import codegen

    for name in ISAS:
        if codegen.target_has_features(_LLVM_FEATURE[name], target):
            return name
    return None


def fits(k: int, n: int) -> bool:
    """Shapes the packed kernel takes: whole groups of 4 along K (the input row is read 4 bytes
    at a time) and 16 along N."""
    return k % GROUP == 0 and n % LANES == 0


def pack(w: np.ndarray) -> np.ndarray:
    """W[K, N] (int8) -> Wp[N / 16, K / 4, 16, 4]."""
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k // GROUP, GROUP, n // LANES, LANES).transpose(2, 0, 3, 1))


def conv_fits(out_channels: int, groups: int) -> bool:
    return groups == 1 and out_channels % LANES == 0


def pack_conv(w: np.ndarray) -> np.ndarray:
    """W[OC, C, KH, KW] (int8) -> Wp[OC / 16, KH, KW, C4 / 4, 16, 4], C zero-padded to C4, a
    multiple of 4 (the zero weights make the padded input channels' values irrelevant)."""
    oc, c, kh, kw = w.shape
    c4 = -(-c // GROUP) * GROUP
    w = np.pad(w, [(0, 0), (0, c4 - c), (0, 0), (0, 0)])
    return np.ascontiguousarray(
        w.reshape(oc // LANES, LANES, c4 // GROUP, GROUP, kh, kw).transpose(0, 4, 5, 2, 1, 3))


def conv2d(x, packed, strides, padding, dilation, pad_value: int, out_dtype: str = "int32"):
    """TE: NCHW convolution of the u8 input with packed weights.  The input is copied once to
    channels-last (NHWC, channels padded to C4, borders padded with the zero point ``pad_value``)
    so that 4 input channels are 4 contiguous bytes; the sum runs channels-last, 16 output
    channels per step, and a final view gives NCHW back to the epilogue."""
    from tvm import te, tirx

    n, (c, h, w) = x.shape[0], (int(d) for d in x.shape[1:])       # the batch may be symbolic
    blocks, kh, kw, c_groups = (int(d) for d in packed.shape[:4])
    top, left, bottom, right = padding
    (sh, sw), (dh, dw) = strides, dilation
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1

    def padded(b, y, x_, ch):
        inside = tirx.all(y >= top, y < h + top, x_ >= left, x_ < w + left)
        value = tirx.if_then_else(inside, x[b, tirx.min(ch, c - 1), y - top, x_ - left],
                                  tirx.const(pad_value, x.dtype))
        return tirx.if_then_else(ch < c, value, tirx.const(0, x.dtype))

    xp = te.compute((n, h + top + bottom, w + left + right, c_groups * GROUP), padded, name="pad_channels_last")
    ry, rx, rc = (te.reduce_axis((0, e), name=nm) for e, nm in ((kh, "ry"), (kw, "rx"), (c_groups * GROUP, "rc")))
    acc = te.compute((n, oh, ow, blocks * LANES), lambda b, y, x_, o: te.sum(
        xp[b, y * sh + ry * dh, x_ * sw + rx * dw, rc].astype(out_dtype)
        * packed[o // LANES, ry, rx, rc // GROUP, o % LANES, rc % GROUP].astype(out_dtype), axis=[ry, rx, rc]),
        name=CONV_BLOCK)
    return te.compute((n, blocks * LANES, oh, ow), lambda b, o, y, x_: acc[b, y, x_, o], name="to_nchw")


def matmul(x, packed, out_dtype: str = "int32"):
    """TE: x[..., K] (u8) @ W[K, N] with W read from its packed layout.  A packed operand with
    leading batch axes (``pack_operand``: attention's K^T or V) pairs with x's last batch axes."""
    from tvm import te, tirx

    batch = len(packed.shape) - 4
    n_blocks, k_groups = (int(d) for d in packed.shape[batch:batch + 2])
    k = te.reduce_axis((0, k_groups * GROUP), name="k")
    width = int(x.shape[-1])
    if width < k_groups * GROUP:        # a runtime operand's K (197 tokens) pads with zeros to 4s
        x = te.compute((*x.shape[:-1], k_groups * GROUP), lambda *i: tirx.if_then_else(
            i[-1] < width, x[(*i[:-1], tirx.min(i[-1], width - 1))], tirx.const(0, x.dtype)), name="pad_reduction")
    return te.compute((*x.shape[:-1], n_blocks * LANES), lambda *i: te.sum(
        x[(*i[:-1], k)].astype(out_dtype)
        * packed[(*i[len(i) - 2 - batch:len(i) - 2], i[-1] // LANES, k // GROUP, i[-1] % LANES, k % GROUP)]
        .astype(out_dtype), axis=k), name=BLOCK)


def operand_columns(n: int) -> int:
    """The packed width of a runtime operand with ``n`` columns: whole 16-lane blocks, and beyond 4
    blocks a multiple of 4 of them.  A row of the product then runs as 4 independent chains of
    vpdpbusd (13 blocks for 197 keys would be one chain, bound by the instruction's latency)."""
    blocks = -(-n // LANES)
    return LANES * (blocks if blocks <= 4 else -(-blocks // 4) * 4)


def pack_operand(b, shift: int):
    """TE: a runtime right operand b[..., K, N] (8-bit, minus ``shift`` to make it s8) in the packed
    layout, per batch: [..., N' / 16, K4 / 4, 16, 4] (N' = operand_columns(N)), zero past K and N
    (so padding adds nothing)."""
    from tvm import te, tirx

    *batch, k, n = (int(d) for d in b.shape)
    k4, n16 = -(-k // GROUP) * GROUP, operand_columns(n)

    def value(*i):
        *lead, jb, kb, jl, kl = i
        row, col = kb * GROUP + kl, jb * LANES + jl
        v = b[(*lead, tirx.min(row, k - 1), tirx.min(col, n - 1))].astype("int16") - tirx.const(shift, "int16")
        return tirx.if_then_else(tirx.all(row < k, col < n), v.astype("int8"), tirx.const(0, "int8"))

    return te.compute((*batch, n16 // LANES, k4 // GROUP, LANES, GROUP), value, name="pack_operand")


def padded_columns(columns: int) -> int:
    """A weight matrix's output columns, padded to whole 16-lane blocks where that adds little
    (a 1000-class head: 8 columns); the padding is sliced off after the sum."""
    return -(-columns // LANES) * LANES if columns >= 4 * LANES else columns


def u8s8(c: Contraction) -> bool:
    """The operands vpdpbusd multiplies: a u8 input, int8 weights, an int32 sum."""
    return c.int8_weights and c.x.dtype == "uint8" and c.acc_dtype == "int32"


def static_u8s8_conv(c: Contraction) -> bool:
    """A convolution of a static image with the operands ``vpdpbusd`` and ``tdpbusd`` multiply."""
    return c.kind == CONV2D and u8s8(c) and all(d is not None for d in c.x.shape[1:])


class MatmulUnit:
    """x[..., K] @ W[K, N] with W packed (``pack``), its columns padded (``padded_columns``)."""
    name = BLOCK
    channels_last = False

    def fits(self, c: Contraction) -> bool:
        return (c.kind == MATMUL and u8s8(c) and c.weights.ndim == 2
                and fits(c.weights.shape[0], padded_columns(c.weights.shape[1])))

    def pack(self, c: Contraction) -> np.ndarray:
        columns = c.weights.shape[1]
        return pack(np.pad(c.weights, [(0, 0), (0, padded_columns(columns) - columns)]))

    def emit(self, bb, c: Contraction, x, w) -> Accumulator:
        from tvm.relax import op

        acc = bb.emit_te(matmul, x, w, primfunc_name_hint="matmul")
        columns = c.weights.shape[1]
        if padded_columns(columns) != columns:
            acc = bb.emit(op.strided_slice(acc, axes=[acc.ty.ndim - 1], begin=[0], end=[columns]))
        return Accumulator(acc, -1)


class ConvUnit:
    """An ungrouped NCHW convolution with whole 16-channel output blocks and a static image (the
    kernel copies it channels-last itself), weights packed by ``pack_conv``."""
    name = CONV_BLOCK
    channels_last = False

    def fits(self, c: Contraction) -> bool:
        return static_u8s8_conv(c) and conv_fits(c.weights.shape[0], c.groups)

    def pack(self, c: Contraction) -> np.ndarray:
        return pack_conv(c.weights)

    def emit(self, bb, c: Contraction, x, w) -> Accumulator:
        acc = bb.emit_te(conv2d, x, w, list(c.strides), list(c.padding), list(c.dilation), c.x.zero,
                         primfunc_name_hint="conv2d")
        return Accumulator(acc, 1)


class ActivationMatmulUnit:
    """Attention's Q.K^T and P.V (both operands at run time): 8-bit per-tensor operands of one
    static batch shape, an int32 sum (``activation_matmul``)."""
    name = BLOCK
    channels_last = False

    def fits(self, c: Contraction) -> bool:
        a, b = c.x, c.y
        return (c.kind == ACTIVATION_MATMUL and c.acc_dtype == "int32"
                and all(v.dtype in ("uint8", "int8") and v.zero is not None and v.static for v in (a, b))
                and a.shape[:-2] == b.shape[:-2])

    def pack(self, c: Contraction) -> np.ndarray:
        raise TypeError("attention's operands are packed at run time (pack_operand)")

    def emit(self, bb, c: Contraction, x, w) -> Accumulator:
        return Accumulator(activation_matmul(bb, x, c.x, w, c.y), -1)


def activation_matmul(bb, a, a_info, b, b_info):
    """(a - z_a)(b - z_b) with both operands at run time, on the kernel above: a as u8 (s8 + 128),
    b packed per call as s8 (u8 - 128, shift t; ``pack_operand``), so with z_b' = z_b - t

        sum (a - z_a)(b' - z_b') = sum a b' - z_b' sum_k a - z_a sum_k b + K z_a z_b

    (sum_k b' = sum_k b - K t).  The row and column sums are small reductions of their own; K pads
    to a multiple of 4 with zeros in both operands (in the kernel), which adds nothing.
    ``a_info``, ``b_info``: the operands' dtypes, static shapes and zero points
    (passes/contraction.Operand)."""
    from tvm import relax
    from tvm.relax import op

    k, n = b_info.shape[-2:]
    za, zb = a_info.zero, b_info.zero
    x = a
    if a_info.dtype == "int8":
        x = bb.emit(op.astype(op.add(op.astype(x, "int16"), relax.const(128, "int16")), "uint8"))
        za += 128
    shift = 128 if b_info.dtype == "uint8" else 0
    packed = bb.emit_te(pack_operand, b, shift, primfunc_name_hint="pack_operand")
    acc = bb.emit_te(matmul, x, packed, primfunc_name_hint="matmul")
    if operand_columns(n) != n:
        acc = bb.emit(op.strided_slice(acc, axes=[acc.ty.ndim - 1], begin=[0], end=[n]))
    if zb - shift:
        rows = op.sum(op.astype(x, "int32"), axis=[-1], keepdims=True)
        acc = bb.emit(op.subtract(acc, op.multiply(rows, relax.const(zb - shift, "int32"))))
    if za:
        cols = op.sum(op.astype(b, "int32"), axis=[-2], keepdims=True)
        acc = bb.emit(op.subtract(acc, op.multiply(cols, relax.const(za, "int32"))))
        acc = bb.emit(op.add(acc, relax.const(k * za * zb, "int32")))
    return acc


_registered: set[str] = set()


def intrinsic(flavour: str) -> str:
    """The registered tensor intrinsic for ``flavour`` (one of ISAS): C[16] += A[4] . B[16, 4]."""
    name = f"lowbit_dot_16x4_{flavour}"
    if name in _registered:
        return name
    # tvm.s_tir.tensor_intrin would do, but importing it parses every target's intrinsics (~1 min)
    from tvm import s_tir
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            for i, k in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    if flavour not in ISAS:
        raise ValueError(f"unknown VNNI flavour {flavour!r}; one of {ISAS}")
    # avx512_vnni: one zmm instruction for the 16 lanes; avx_vnni: two ymm halves of 8
    width = 16 if flavour == "avx512_vnni" else 8
    halves = LANES // width
    op = f"llvm.x86.avx512.vpdpbusd.{32 * width}"
    u8, s8, i32 = f"uint8x{4 * width}", f"int8x{4 * width}", f"int32x{width}"

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            x = T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"), width), dtype=u8)
            for h in T.unroll(halves):
                c[T.ramp(h * width, 1, width)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(op), c.vload([h * width], dtype=i32), x,
                    b.vload([h * width, 0], dtype=s8), dtype=i32)

    s_tir.TensorIntrin.register(name, desc, impl)
    _registered.add(name)
    return name
