"""int8 convolution on Intel AMX (Sapphire Rapids and later).

``tdpbusd`` multiplies a 16 x 64 u8 tile A by a 64 x 16 s8 tile B into a 16 x 16 int32 tile: 16384
MACs per instruction, eight times what AVX-512 VNNI issues per cycle.  B is in VNNI order: each
of its 16 rows of 64 bytes holds 16 output channels x 4 consecutive reduction bytes.

A is read row by row at a fixed stride, so the convolution is written over flattened pixels,
with no im2col copy.  The input is copied once to channels-last (channels padded to C4: 4, 8, 16,
32 or a multiple of 64), bordered with the zero point, split into stride x stride phases (phase
(a, b) holds pixels (s*y + a, s*x + b); a stride-1 conv has one phase) and flattened: pixel after
pixel, ``Wq`` pixels per image row, C4 bytes each.  For output pixel ``p = oy * Wq + ox``, the
pixels a kernel row (ky) reads in one phase are consecutive, from

    base(phase) + p + (ky // s) * Wq

so the bytes they hold are one contiguous run, an affine function of ``p`` with slope C4.  A
*step* is 64 bytes of such a run: one tap's 64 channels when C4 >= 64, or 64 / C4 neighbouring
taps of a narrow input (the 3-channel stem: 16 taps per step, not 49 steps of 4 bytes).  16
consecutive output pixels at one step are one tile load with row stride C4, and the step's
weights, packed at compile time (``pack``), are its B tiles (zero where a byte is past the
kernel's edge or a padding channel).

The ``Wq - OW`` columns per output row past the image's right edge read wrapped-around pixels;
they are computed and never read (2 of 9 for a 7-wide output).  The sum runs over the steps for
2 x 2 tiles (32 pixels x 32 output channels) held in four tile registers next to their two A and
two B operands, then stored as int32 [N, P, OC]; a separate elementwise kernel picks the valid
pixels and applies the epilogue, or, where codegen/tile_epilogue.py proves the layout, the
epilogue runs on each block as the tiles store it.

Linux grants AMX's 8 KiB of tile state per process, on request (``arch_prctl``); each kernel
call asks, which costs one syscall, so that the library needs no set-up call from its host.

``ConvUnit`` and ``TokenMatmulUnit`` are the contraction units (passes/contraction.py) that the
integer lowering prefers to VNNI's on an AMX target (Backend.units, codegen/backend.py).  The first keeps its
input and output channels-last, so that the requantize, residual adds and max pools between two
tile convolutions read and write NHWC; a token matmul [B, T, K] @ [K, N] runs as a 1 x 1
convolution of B one-row images of T pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from codegen import vnni
from passes.contraction import Accumulator, Contraction
from passes.merge_kernels import TILE_EPILOGUE

ROWS = 16                   # pixels per tile, and output channels per B tile (16 x 4 bytes)
DEPTH = 64                  # bytes per tile row
BLOCK = 2 * ROWS            # pixels and output channels per 2 x 2 tile block
PARTS = 16                  # runs of blocks per image that the threads share
NARROW = (4, 8, 16, 32)     # channel paddings of narrow inputs, whose steps span several taps
LLVM_FEATURES = ("amx-tile", "amx-int8")
_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


def available(target) -> bool:
    from tvm.target import codegen

    return all(codegen.target_has_features(f, target) for f in LLVM_FEATURES)


def padded_channels(channels: int) -> int:
    """Bytes per pixel of the flattened input: a narrow input's channels padded to divide a tile
    row, a wider one's to whole tile rows (MobileNetV2's 96 and 144 to 128 and 192: a third more
    multiply-adds, on units with 8x VNNI's)."""
    if channels <= NARROW[-1]:
        return next(c for c in NARROW if c >= channels)
    return -(-channels // DEPTH) * DEPTH


def conv_fits(channels: int, out_channels: int, groups: int, strides, dilation) -> bool:
    """Whole 32-channel output blocks, or more than one tile row of output channels (padded to whole
    blocks: ``ConvGeometry.out_block``); one stride for both axes; dilation only with whole-row taps
    (a narrow step's taps are neighbours).  A 16-channel conv stays on VNNI, whose kernel needs no
    flattening copy and no separate epilogue.  VNNI takes 144 channels too, but NCHW: between
    channels-last tiles and depthwise layers (MobileNetV2's 24 -> 144 expansions) its transposes in
    and out cost more than the tiles' 11% padding (MobileNetV2 int8 4.9 -> 4.1 ms on one thread)."""
    c4 = padded_channels(channels)
    blocks = out_channels % BLOCK == 0 or out_channels > ROWS
    return (groups == 1 and blocks and strides[0] == strides[1]
            and (c4 % DEPTH == 0 or tuple(dilation) == (1, 1)))


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution in flattened-pixel form (see the module docstring)."""
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: int
    padding: tuple[int, int, int, int]      # top, left, bottom, right
    dilation: tuple[int, int]

    def ints(self) -> list[int]:
        """The fields as a flat list of ints (a PrimFunc attribute); ``from_ints`` inverts it."""
        return [self.channels, self.height, self.width, self.out_channels, *self.kernel, self.stride,
                *self.padding, *self.dilation]

    @classmethod
    def from_ints(cls, v) -> ConvGeometry:
        v = [int(i) for i in v]
        return cls(v[0], v[1], v[2], v[3], (v[4], v[5]), v[6], tuple(v[7:11]), (v[11], v[12]))

    @property
    def channel_bytes(self) -> int:
        return padded_channels(self.channels)

    @property
    def interleaved(self) -> bool:
        """A narrow strided input keeps its phases in each pixel's bytes (space to depth): the
        stem's 7 x 7 / 2 over 3 channels becomes 4 x 4 taps of 16 bytes, one 64-byte step per row."""
        return self.channel_bytes < DEPTH and self.stride > 1

    @cached_property
    def planes(self) -> list[tuple[int, int]]:
        """The phases stored one after another (a 1 x 1 stride-2 conv reads one of four)."""
        if self.interleaved:
            return [(0, 0)]
        s, (dh, dw) = self.stride, self.dilation
        return sorted({(ky * dh % s, kx * dw % s) for ky in range(self.kernel[0]) for kx in range(self.kernel[1])})

    @property
    def inner(self) -> list[tuple[int, int]]:
        """The phases inside each pixel."""
        s = self.stride
        return [(a, b) for a in range(s) for b in range(s)] if self.interleaved else [(0, 0)]

    @property
    def depth(self) -> int:
        """Bytes per flattened pixel."""
        return len(self.inner) * self.channel_bytes

    def _out(self, axis: int) -> int:
        size = (self.height, self.width)[axis] + self.padding[axis] + self.padding[axis + 2]
        return (size - self.dilation[axis] * (self.kernel[axis] - 1) - 1) // self.stride + 1

    @property
    def out_height(self) -> int:
        return self._out(0)

    @property
    def out_width(self) -> int:
        return self._out(1)

    @property
    def pitch(self) -> int:
        """Pixels per row of a plane, and per row of the computed output (Wq).  A single output
        row from one kernel row (a token matmul) is widened to whole blocks: its last block then
        reads that row's padding, not a second plane row that every producer would have to fill."""
        wq = -(-(self.width + self.padding[1] + self.padding[3]) // self.stride)
        if self.kernel[0] == 1 and self._out(0) == 1:
            return -(-wq // BLOCK) * BLOCK
        return wq

    @property
    def out_block(self) -> int:
        """Output channels computed: whole 32-channel blocks, the padding channels' weights zero and
        their sums never read (``unflatten`` keeps ``out_channels``).  MobileNetV2's 24- and
        144-channel 1 x 1 convolutions run on the tiles at 33% and 11% more multiply-adds, where
        VNNI's and the plain schedules' 16-lane blocks do not take 24 channels at all."""
        return -(-self.out_channels // BLOCK) * BLOCK

    @property
    def pixels(self) -> int:
        """Output pixels computed, garbage columns included, rounded up to whole tile blocks."""
        return -(-self.out_height * self.pitch // BLOCK) * BLOCK

    def _shifts(self, axis: int, phase: int) -> list[int]:
        """Pixel shifts along ``axis`` of the taps a plane of ``phase`` holds."""
        s, d, k = self.stride, self.dilation[axis], self.kernel[axis]
        if self.interleaved:
            return list(range(-(-k * d // s)))
        return sorted({t * d // s for t in range(k) if t * d % s == phase})

    @cached_property
    def steps(self) -> list[tuple[int, int, int]]:
        """(plane, row shift, first byte of the run) of each 64-byte step."""
        out = []
        for i, (a, b) in enumerate(self.planes):
            cols = self._shifts(1, b)
            for sy in self._shifts(0, a):
                if self.depth % DEPTH == 0:
                    out += [(i, sy, cx * self.depth + cb) for cx in cols for cb in range(0, self.depth, DEPTH)]
                else:
                    out += [(i, sy, start) for start in range(0, (max(cols) + 1) * self.depth, DEPTH)]
        return out

    def tap(self, plane: int, sy: int, byte: int) -> tuple[int, int, int] | None:
        """The (ky, kx, channel) whose weight multiplies byte ``byte`` of a step's run, or None."""
        cx, rest = divmod(byte, self.depth)
        j, c = divmod(rest, self.channel_bytes)
        y = self.stride * sy + self.planes[plane][0] + self.inner[j][0]       # = ky * dh
        x = self.stride * cx + self.planes[plane][1] + self.inner[j][1]       # = kx * dw
        (dh, dw), (kh, kw) = self.dilation, self.kernel
        if c >= self.channels or y % dh or x % dw or y // dh >= kh or x // dw >= kw:
            return None
        return y // dh, x // dw, c

    @cached_property
    def plane_height(self) -> int:
        """Rows per plane: its image, and whatever the last block's steps reach past it."""
        image = -(-(self.height + self.padding[0] + self.padding[2]) // self.stride)
        # output pixel p's step reads pixels up to p + sy * Wq + (start + 63) // depth
        reach = max(sy * self.pitch + (start + DEPTH - 1) // self.depth for _, sy, start in self.steps)
        return max(image, -(-(self.pixels + reach) // self.pitch))

    @property
    def row_bytes(self) -> int:
        """Bytes of the flattened input, per image."""
        return len(self.planes) * self.plane_height * self.pitch * self.depth

    def offsets(self) -> np.ndarray:
        """Each step's first byte for output pixel 0, in the flattened input (the kernel's table)."""
        plane = self.plane_height * self.pitch
        return np.array([(i * plane + sy * self.pitch) * self.depth + start for i, sy, start in self.steps],
                        dtype=np.int32)

    def pack(self, w: np.ndarray) -> np.ndarray:
        """OIHW int8 weights -> B tiles [OC / 16, steps, 16, 16, 4]: tile row g, column n, byte k
        multiplies byte ``start + 4 g + k`` of the step's run with output channel n (0 where the
        byte is past the kernel's edge or a padding channel)."""
        oc = self.out_block
        w = np.pad(w, [(0, oc - self.out_channels), (0, 0), (0, 0), (0, 0)])
        tiles = np.zeros((oc // ROWS, len(self.steps), ROWS, ROWS, 4), np.int8)
        for st, (i, sy, start) in enumerate(self.steps):
            for byte in range(DEPTH):
                if (t := self.tap(i, sy, start + byte)) is not None:
                    ky, kx, c = t
                    tiles[:, st, byte // 4, :, byte % 4] = w[:, c, ky, kx].reshape(oc // ROWS, ROWS)
        return tiles


def flatten(x, g: ConvGeometry, pad_value: int, channels_last: bool = False):
    """TE: the u8 input (NCHW, or NHWC with ``channels_last``) -> [N, planes, rows, Wq, bytes per
    pixel], bordered with the zero point; padding channels read 0."""
    from tvm import te, tirx

    top, left = g.padding[:2]

    def pick(index, values):
        out = tirx.const(values[-1])
        for i, v in enumerate(values[:-1]):
            out = tirx.Select(index == i, tirx.const(v), out)
        return out

    def value(b, plane, qy, qx, k):
        a, col0 = pick(plane, [p[0] for p in g.planes]), pick(plane, [p[1] for p in g.planes])
        c = k
        if g.interleaved:       # byte k of a pixel: inner phase (k // C4 // s, k // C4 % s), channel k % C4
            j, c = k // g.channel_bytes, k % g.channel_bytes
            a, col0 = a + j // g.stride, col0 + j % g.stride
        y, col = g.stride * qy + a - top, g.stride * qx + col0 - left
        inside = tirx.all(y >= 0, y < g.height, col >= 0, col < g.width)
        yc, xc = tirx.max(tirx.min(y, g.height - 1), 0), tirx.max(tirx.min(col, g.width - 1), 0)
        cc = tirx.min(c, g.channels - 1)
        read = x[b, yc, xc, cc] if channels_last else x[b, cc, yc, xc]
        value = tirx.if_then_else(inside, read, tirx.const(pad_value, x.dtype))
        if g.channel_bytes == g.channels:
            return value
        return tirx.if_then_else(c < g.channels, value, tirx.const(0, x.dtype))

    shape = (x.shape[0], len(g.planes), g.plane_height, g.pitch, g.depth)
    return te.compute(shape, value, name="amx_rows")


def unflatten(acc, g: ConvGeometry):
    """TE: the kernel's [N, P, OC] int32 -> NHWC, the valid pixels only."""
    from tvm import te

    return te.compute((acc.shape[0], g.out_height, g.out_width, g.out_channels),
                      lambda b, y, x, o: acc[b, y * g.pitch + x, o], name="amx_valid")


GEOMETRY_ATTR = "lowbit.amx_geometry"      # a kernel's ConvGeometry, as the ints of ``ConvGeometry.ints``


def conv_kernel(g: ConvGeometry, epilogue=None):
    """The TIR kernel: acc[N, P, OC] = sum over steps of rows[N, offset + depth * p : +64] . B[step].

    ``epilogue(b, p, o0, j, value)``: each 32 x 32 block is stored to a stack buffer instead, and for
    each valid pixel p and channel o0 + j (o0 the block's first, a multiple of 32) ``epilogue`` emits
    the store of its result, after ``epilogue.border()`` emitted whatever no pixel maps to (codegen/tile_epilogue.py:
    the requantize reads the sums from L1); ``acc`` is then left unwritten, and the caller makes the
    epilogue's buffers the kernel's parameters in its place."""
    from tvm.script import tirx as T

    oc, depth, pixels, n_steps, row_bytes = g.out_block, g.depth, g.pixels, len(g.steps), g.row_bytes
    out_h, out_w, out_c = g.out_height, g.out_width, g.out_channels
    staged = epilogue is not None
    planes, plane_height, pitch = len(g.planes), g.plane_height, g.pitch
    p_blocks, o_blocks = pixels // BLOCK, oc // BLOCK
    blocks, c_stride = p_blocks * o_blocks, oc * 4
    # consecutive blocks share the larger operand while it is in cache: a late layer's weights
    # (2.4 MB at 512 channels) are read once, not once per pixel block
    weights_first = oc * n_steps * DEPTH > row_bytes
    parts = min(blocks, PARTS)

    def amx(name, *args):
        return T.call_llvm_intrin("void", f"llvm.x86.{name}", *args)

    @T.prim_func(check_well_formed=not staged)      # staged: the epilogue's buffers are not parameters yet
    def kernel(x_h: T.handle, w: T.Buffer((oc // ROWS, n_steps, ROWS, ROWS, 4), "int8"),
               offsets: T.Buffer((n_steps,), "int32"), acc_h: T.handle):
        # opaque (op_pattern 8): fusion leaves it whole, and the epilogue joins the unflatten step
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8, GEOMETRY_ATTR: g.ints(),
                     TILE_EPILOGUE: True})
        n = T.int64()
        x = T.match_buffer(x_h, (n, planes, plane_height, pitch, depth), "uint8")
        acc = T.match_buffer(acc_h, (n, pixels, oc), "int32")
        rows = T.decl_buffer((n * row_bytes,), "uint8", data=x.data)       # the same bytes, flat
        T.evaluate(T.call_extern("int64", "syscall", T.int64(_ARCH_PRCTL), T.int64(_ARCH_REQ_XCOMP_PERM),
                                 T.int64(_XFEATURE_XTILEDATA)))
        if staged:
            epilogue.border()
        for part in T.parallel(n * parts):
            # tile configuration (per thread: it is register state): palette 1, eight 16 x 64-byte
            # tiles; set once per run of blocks, as setting it costs as much as a small block
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            for i in range(64):
                cfg[i] = T.uint8(0)
            cfg[0] = T.uint8(1)
            for t in range(8):
                cfg[16 + 2 * t] = T.uint8(64)
                cfg[48 + t] = T.uint8(ROWS)
            T.evaluate(amx("ldtilecfg", T.address_of(cfg[0])))
            tile = T.alloc_buffer((BLOCK, BLOCK), "int32", scope="local")
            b = part // parts
            for block in range(part % parts * blocks // parts, (part % parts + 1) * blocks // parts):
                if weights_first:
                    p0 = block % p_blocks * BLOCK
                    o0 = block // p_blocks * BLOCK
                else:
                    p0 = block // o_blocks * BLOCK
                    o0 = block % o_blocks * BLOCK
                # tile ids are immediates: no loops over them
                T.evaluate(amx("tilezero", T.int8(0)))
                T.evaluate(amx("tilezero", T.int8(1)))
                T.evaluate(amx("tilezero", T.int8(2)))
                T.evaluate(amx("tilezero", T.int8(3)))
                for st in range(n_steps):
                    a0 = b * row_bytes + p0 * depth + T.Cast("int64", offsets[st])
                    T.evaluate(amx("tileloadd64", T.int8(4), T.address_of(rows[a0]), T.int64(depth)))
                    T.evaluate(amx("tileloadd64", T.int8(5), T.address_of(rows[a0 + ROWS * depth]), T.int64(depth)))
                    T.evaluate(amx("tileloadd64", T.int8(6), T.address_of(w[o0 // ROWS, st, 0, 0, 0]), T.int64(64)))
                    T.evaluate(amx("tileloadd64", T.int8(7), T.address_of(w[o0 // ROWS + 1, st, 0, 0, 0]),
                                   T.int64(64)))
                    T.evaluate(amx("tdpbusd", T.int8(0), T.int8(4), T.int8(6)))
                    T.evaluate(amx("tdpbusd", T.int8(1), T.int8(4), T.int8(7)))
                    T.evaluate(amx("tdpbusd", T.int8(2), T.int8(5), T.int8(6)))
                    T.evaluate(amx("tdpbusd", T.int8(3), T.int8(5), T.int8(7)))
                if staged:
                    T.evaluate(amx("tilestored64", T.int8(0), T.address_of(tile[0, 0]), T.int64(BLOCK * 4)))
                    T.evaluate(amx("tilestored64", T.int8(1), T.address_of(tile[0, ROWS]), T.int64(BLOCK * 4)))
                    T.evaluate(amx("tilestored64", T.int8(2), T.address_of(tile[ROWS, 0]), T.int64(BLOCK * 4)))
                    T.evaluate(amx("tilestored64", T.int8(3), T.address_of(tile[ROWS, ROWS]), T.int64(BLOCK * 4)))
                    for i in range(BLOCK):
                        if (p0 + i) % pitch < out_w and (p0 + i) // pitch < out_h:
                            if out_c % BLOCK == 0:
                                for j in T.vectorized(BLOCK):
                                    epilogue(b, p0 + i, o0, j, tile[i, j])
                            else:       # the last block's padding channels: whole 16-lane halves or lane by lane
                                for h in range(BLOCK // ROWS):
                                    if o0 + h * ROWS + ROWS <= out_c:
                                        for j in T.vectorized(ROWS):
                                            epilogue(b, p0 + i, o0, h * ROWS + j, tile[i, h * ROWS + j])
                                    else:
                                        for j in range(ROWS):
                                            if o0 + h * ROWS + j < out_c:
                                                epilogue(b, p0 + i, o0, h * ROWS + j, tile[i, h * ROWS + j])
                else:
                    T.evaluate(amx("tilestored64", T.int8(0), T.address_of(acc[b, p0, o0]), T.int64(c_stride)))
                    T.evaluate(amx("tilestored64", T.int8(1), T.address_of(acc[b, p0, o0 + ROWS]),
                                   T.int64(c_stride)))
                    T.evaluate(amx("tilestored64", T.int8(2), T.address_of(acc[b, p0 + ROWS, o0]),
                                   T.int64(c_stride)))
                    T.evaluate(amx("tilestored64", T.int8(3), T.address_of(acc[b, p0 + ROWS, o0 + ROWS]),
                                   T.int64(c_stride)))
            T.evaluate(amx("tilerelease"))

    return kernel


def conv2d(bb, x, packed, g: ConvGeometry, pad_value: int, channels_last: bool):
    """Emit the convolution: the input (NCHW, or NHWC with ``channels_last``) flattened to rows,
    the tile kernel, and the valid pixels, channels-last (the epilogue fuses into that last step)."""
    from tvm import relax

    rows = bb.emit_te(lambda t: flatten(t, g, pad_value, channels_last), x, primfunc_name_hint="amx_rows")
    kernel = bb.add_func(conv_kernel(g).without_attr("global_symbol"), "conv2d_amx")
    out = relax.TensorType((x.ty.shape.values[0], g.pixels, g.out_block), "int32")
    offsets = relax.const(g.offsets(), "int32")
    acc = bb.emit(relax.call_tir(kernel, [rows, packed, offsets], out))
    return bb.emit_te(lambda t: unflatten(t, g), acc, primfunc_name_hint="amx_valid")


class ConvUnit:
    """A convolution VNNI could run (u8 x s8, static image) whose shape fits the tiles
    (``conv_fits``): channels-last in and out, weights packed per step (``ConvGeometry.pack``)."""
    name = "conv2d_amx"
    channels_last = True

    @staticmethod
    def geometry(c: Contraction) -> ConvGeometry | None:
        if not vnni.static_u8s8_conv(c):
            return None
        out_channels, channels, kh, kw = c.weights.shape
        if not conv_fits(channels, out_channels, c.groups, c.strides, c.dilation):
            return None
        _, _, height, width = c.x.shape
        return ConvGeometry(channels, height, width, out_channels, (kh, kw), c.strides[0], c.padding, c.dilation)

    def fits(self, c: Contraction) -> bool:
        return self.geometry(c) is not None

    def pack(self, c: Contraction) -> np.ndarray:
        return self.geometry(c).pack(c.weights)

    def emit(self, bb, c: Contraction, x, w) -> Accumulator:
        return Accumulator(conv2d(bb, x, w, self.geometry(c), c.x.zero, c.x.channels_last), 3)


class TokenMatmulUnit:
    """A matmul VNNI could run over a static number of tokens, at least one tile block, as a
    1 x 1 convolution of each sample's token row."""
    name = "conv2d_amx"
    channels_last = False

    @staticmethod
    def geometry(c: Contraction) -> ConvGeometry | None:
        dims = c.x.shape
        if not (vnni.MatmulUnit().fits(c) and len(dims) == 3 and dims[1] is not None and dims[1] >= BLOCK):
            return None
        k, n = c.weights.shape
        if not conv_fits(k, n, 1, (1, 1), (1, 1)):
            return None
        return ConvGeometry(k, 1, dims[1], n, (1, 1), 1, (0, 0, 0, 0), (1, 1))

    def fits(self, c: Contraction) -> bool:
        return self.geometry(c) is not None

    def pack(self, c: Contraction) -> np.ndarray:
        return self.geometry(c).pack(c.weights.T[:, :, None, None])

    def emit(self, bb, c: Contraction, x, w) -> Accumulator:
        from tvm.relax import op

        dims = x.ty.shape.values
        rows = bb.emit(op.reshape(x, (dims[0], 1, dims[1], dims[2])))
        acc = conv2d(bb, rows, w, self.geometry(c), c.x.zero, True)
        return Accumulator(bb.emit(op.reshape(acc, (dims[0], dims[1], c.weights.shape[1]))), -1)
