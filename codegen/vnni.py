"""int8 matmul on x86 VNNI: ``vpdpbusd`` multiplies 4 u8 x s8 pairs per int32 lane and adds them
to the lane's accumulator, 16 lanes per 512-bit instruction.

The weights (K x N, s8) are packed at compile time so that one instruction's operand is 64
contiguous bytes:

    Wp[j // 16, k // 4, j % 16, k % 4] = W[k, j]          (zero-padded to whole 16 x 4 groups)

and the kernel computes C[i, j] = sum_k x[i, k] * Wp[j // 16, k // 4, j % 16, k % 4]; its
innermost 16 (j) x 4 (k) step is tensorized: the 4 input bytes x[i, 4q:4q+4] are read as one
int32, broadcast to 16 lanes, and multiplied with the 64 weight bytes.  ``avx512_vnni`` does it in
one ``vpdpbusd`` zmm; ``avx_vnni`` (Alder Lake and later, VEX-encoded, 256-bit) in two ymm halves.
Targets with neither keep the generic schedule (codegen/cpu_schedule.py).

TVM ships ``dot_16x4_vnni`` but passes ``<16 x i32>`` where LLVM 22 declares ``<64 x i8>``
operands, so the implementations here pass byte vectors (shared notes, tvm-0.27 §7).
"""

from __future__ import annotations

import numpy as np

LANES = 16                  # int32 accumulators per instruction group
GROUP = 4                   # u8 x s8 products summed into each lane
BLOCK = "matmul_vnni"       # the kernel's reduction block: cpu_schedule tensorizes it
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


def matmul(x, packed, out_dtype: str = "int32"):
    """TE: x[..., K] (u8) @ W[K, N] with W read from its packed layout."""
    from tvm import te

    n_blocks, k_groups = (int(d) for d in packed.shape[:2])
    k = te.reduce_axis((0, k_groups * GROUP), name="k")
    return te.compute((*x.shape[:-1], n_blocks * LANES), lambda *i: te.sum(
        x[(*i[:-1], k)].astype(out_dtype)
        * packed[i[-1] // LANES, k // GROUP, i[-1] % LANES, k % GROUP].astype(out_dtype), axis=k), name=BLOCK)


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

    if flavour == "avx512_vnni":
        @T.prim_func(s_tir=True)
        def impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
                 c: T.Buffer((16,), "int32", offset_factor=1)):
            with T.sblock("root"):
                T.reads(c[0:16], a[0:4], b[0:16, 0:4])
                T.writes(c[0:16])
                x = T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"), 16),
                                  dtype="uint8x64")
                c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                    c.vload([0], dtype="int32x16"), x, b.vload([0, 0], dtype="int8x64"), dtype="int32x16")
    elif flavour == "avx_vnni":
        @T.prim_func(s_tir=True)
        def impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
                 c: T.Buffer((16,), "int32", offset_factor=1)):
            with T.sblock("root"):
                T.reads(c[0:16], a[0:4], b[0:16, 0:4])
                T.writes(c[0:16])
                x = T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"), 8),
                                  dtype="uint8x32")
                for h in T.unroll(2):
                    c[T.ramp(h * 8, 1, 8)] = T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"),
                        c.vload([h * 8], dtype="int32x8"), x, b.vload([h * 8, 0], dtype="int8x32"),
                        dtype="int32x8")
    else:
        raise ValueError(f"unknown VNNI flavour {flavour!r}; one of {ISAS}")
    s_tir.TensorIntrin.register(name, desc, impl)
    _registered.add(name)
    return name
