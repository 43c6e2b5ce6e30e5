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

TVM ships ``dot_16x4_vnni`` but passes ``<16 x i32>`` where LLVM 22 declares ``<64 x i8>``
operands, so the implementations here pass byte vectors (shared notes, tvm-0.27 §7).
"""

from __future__ import annotations

import numpy as np

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
