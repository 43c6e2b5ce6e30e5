"""Depthwise convolutions channels-last: the unit that keeps an AMX network NHWC through them.

AMX convolutions read and write NHWC (codegen/amx.py).  A depthwise convolution between two of
them (MobileNet's inverted residual: 1 x 1 expand on AMX, 3 x 3 depthwise, 1 x 1 project on AMX)
computed NCHW costs two transposes per block: its input is gathered channel by channel into the
padded layout, and its NCHW output is gathered back into the projection's rows.  Here it reads the
NHWC input as it is and writes its accumulator NHWC:

    acc[n, y, x, c] = sum_{ky, kx} xp[n, y s + ky d, x s + kx d, c] * w[ky, kx, c]

with ``xp`` the input padded with its zero point (real 0), and the weights stored [KH, KW, C], so
a vector of channels reads whole vectors of the input and of each tap's weights.
"""

from __future__ import annotations

import numpy as np

from passes.contraction import CONV2D, Accumulator, Contraction

BLOCK = "depthwise_nhwc"


def depthwise_nhwc(x, w, strides, padding, dilation, pad_value: int, out_dtype: str):
    """TE: the NHWC depthwise convolution of ``x`` with [KH, KW, C] weights ``w``."""
    from tvm import te, topi

    top, left, bottom, right = padding
    xp = topi.nn.pad(x, [0, top, left, 0], [0, bottom, right, 0], pad_value=pad_value, name="pad_temp")
    kh, kw, _ = (int(d) for d in w.shape)
    (sy, sx), (dy, dx) = strides, dilation
    n, h, width, c = (int(d) if i else d for i, d in enumerate(x.shape))
    oh = (h + top + bottom - dy * (kh - 1) - 1) // sy + 1
    ow = (width + left + right - dx * (kw - 1) - 1) // sx + 1
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    return te.compute(
        (n, oh, ow, c),
        lambda b, y, z, ch: te.sum(xp[b, y * sy + ry * dy, z * sx + rx * dx, ch].astype(out_dtype)
                                   * w[ry, rx, ch].astype(out_dtype), axis=[ry, rx]),
        name=BLOCK)


class DepthwiseUnit:
    """A depthwise convolution (one channel per group, 8-bit weights) of an NHWC input of static
    image size, any batch, with one zero point: channels-last in and out."""
    name = BLOCK
    channels_last = True

    def fits(self, c: Contraction) -> bool:
        if c.kind != CONV2D or not c.int8_weights or not c.x.channels_last or None in c.x.shape[1:] or c.x.zero is None:
            return False
        out_channels, per_group = c.weights.shape[:2]
        return per_group == 1 and c.groups == c.x.shape[1] == out_channels

    def pack(self, c: Contraction) -> np.ndarray:
        return np.ascontiguousarray(c.weights[:, 0].transpose(1, 2, 0))

    def emit(self, bb, c: Contraction, x, w) -> Accumulator:
        acc = bb.emit_te(depthwise_nhwc, x, w, list(c.strides), list(c.padding), list(c.dilation), c.x.zero,
                         c.acc_dtype, primfunc_name_hint="conv2d_depthwise")
        return Accumulator(acc, 3)
