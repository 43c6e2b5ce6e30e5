"""AMX convolutions (codegen/amx.py): the flattened-pixel geometry against a direct convolution in
numpy (any machine), the compiled kernels' ``tdpbusd``, and a network of every kind of step
(narrow stem, phases of stride 2, 1 x 1, dilation, residual add and max pool channels-last)
bit-exact against the golden reference where the host has AMX."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper
from test_vnni import _mlp

import compiler
from codegen import amx
from codegen.llvm import host_target
from compiler import quantize
from compiler.options import CompileOptions
from runtime import golden
from runtime.runner import missing_cpu_features

GEOMETRIES = [      # channels, height, width, out channels, kernel, stride, padding, dilation
    (3, 20, 21, 32, (7, 7), 2, (3, 3, 3, 3), (1, 1)),       # the stem: 3 channels pad to 4, 16 taps a step
    (16, 9, 7, 32, (3, 3), 2, (1, 0, 1, 1), (1, 1)),        # 4 phases, uneven padding
    (64, 8, 8, 64, (3, 3), 1, (1, 1, 1, 1), (1, 1)),
    (64, 9, 9, 32, (1, 1), 2, (0, 0, 0, 0), (1, 1)),        # one phase of four
    (128, 6, 7, 32, (3, 3), 1, (2, 2, 2, 2), (2, 2)),       # dilation: taps two pixels apart
    (64, 5, 5, 32, (3, 1), 2, (1, 0, 1, 0), (1, 1)),        # 3 x 1 kernel, stride 2
    (3, 32, 48, 32, (16, 16), 16, (0, 0, 0, 0), (1, 1)),    # a ViT's patches: 1024-byte pixels
    (96, 7, 9, 24, (1, 1), 1, (0, 0, 0, 0), (1, 1)),        # MobileNetV2's projection: 96 -> 128 bytes, 24 -> 32
    (40, 6, 6, 40, (3, 3), 2, (1, 1, 1, 1), (1, 1)),        # 40 channels in and out: 64 bytes, 64 sums
]


def _direct(x, w, g: amx.ConvGeometry, pad_value):
    """NCHW convolution by its definition, on the padded input."""
    top, left, bottom, right = g.padding
    xp = np.pad(x.astype(np.int64), [(0, 0), (0, 0), (top, bottom), (left, right)], constant_values=pad_value)
    (kh, kw), (dh, dw), s = g.kernel, g.dilation, g.stride
    out = np.zeros((x.shape[0], g.out_channels, g.out_height, g.out_width), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[:, :, ky * dh: ky * dh + s * g.out_height: s, kx * dw: kx * dw + s * g.out_width: s]
            out += np.einsum("bchw,oc->bohw", patch, w[:, :, ky, kx].astype(np.int64))
    return out


def _flatten(x, g: amx.ConvGeometry, pad_value):
    """codegen/amx.py's input rows, built by array slicing instead of per-byte index arithmetic."""
    top, left, bottom, right = g.padding
    s, n, height, pitch = g.stride, x.shape[0], g.plane_height, g.pitch
    # enough border that every phase slice spans the whole plane
    xp = np.pad(x, [(0, 0), (0, 0), (top, s * height), (left, s * pitch)], constant_values=pad_value)
    rows = np.zeros((n, len(g.planes), height, pitch, g.depth), np.uint8)
    for i, (pa, pb) in enumerate(g.planes):
        for j, (ia, ib) in enumerate(g.inner):
            part = xp[:, :, pa + ia::s, pb + ib::s][:, :, :height, :pitch].transpose(0, 2, 3, 1)
            rows[:, i, :, :, j * g.channel_bytes: j * g.channel_bytes + g.channels] = part
    return rows.reshape(n, -1)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda t: f"c{t[0]}k{t[4][0]}x{t[4][1]}s{t[5]}d{t[7][0]}")
def test_steps_and_packing_compute_the_convolution(geometry):
    """Every output pixel, as the kernel computes it: the 64 bytes at p*C4 + offset[step] of the
    rows, times the step's packed B tile, summed over the steps."""
    g = amx.ConvGeometry(*geometry)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, g.channels, g.height, g.width)).astype(np.uint8)
    w = rng.integers(-128, 128, (g.out_channels, g.channels, *g.kernel)).astype(np.int8)
    rows, tiles, offsets = _flatten(x, g, 7), g.pack(w), g.offsets()
    b_tiles = tiles.transpose(1, 2, 4, 0, 3).reshape(len(g.steps), amx.DEPTH, g.out_block).astype(np.int64)
    start = np.arange(g.pixels)[:, None] * g.depth + np.arange(amx.DEPTH)[None]
    acc = sum(rows[:, start + off].astype(np.int64) @ b for off, b in zip(offsets, b_tiles, strict=True))
    valid = acc[:, : g.out_height * g.pitch].reshape(2, g.out_height, g.pitch, -1)[:, :, : g.out_width]
    np.testing.assert_array_equal(valid[..., : g.out_channels].transpose(0, 3, 1, 2), _direct(x, w, g, 7))
    assert not valid[..., g.out_channels:].any()        # the padding channels' weights are zero
    assert rows.shape[1] >= g.pixels * g.depth + offsets.max() + amx.DEPTH     # no read past the rows


def _net(seed=0):
    """x[N, 3, 22, 19]: stem 7x7/2 -> max pool 3x3/2 -> conv 32->64 -> conv 64->64 + residual, ReLU ->
    1x1/2 conv 64->64 -> dilated conv 64->32 -> NCHW output."""
    rng = np.random.default_rng(seed)
    shapes = {"w1": (32, 3, 7, 7), "b1": (32,), "w2": (64, 32, 3, 3), "b2": (64,), "w3": (64, 64, 3, 3),
              "w4": (64, 64, 1, 1), "w5": (32, 64, 3, 3)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, s).astype(np.float32), n) for n, s in shapes.items()]
    conv = helper.make_node
    nodes = [conv("Conv", ["x", "w1", "b1"], ["c1"], name="stem", strides=[2, 2], pads=[3, 3, 3, 3]),
             conv("Relu", ["c1"], ["r1"], name="relu1"),
             conv("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             conv("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             conv("Relu", ["c2"], ["r2"], name="relu2"),
             conv("Conv", ["r2", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
             conv("Add", ["c3", "r2"], ["s3"], name="residual"),
             conv("Relu", ["s3"], ["r3"], name="relu3"),
             conv("Conv", ["r3", "w4"], ["c4"], name="down", strides=[2, 2]),
             conv("Conv", ["c4", "w5"], ["y"], name="dilated", pads=[2, 2, 2, 2], dilations=[2, 2])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 22, 19])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 3, 3])], inits)


def test_network_on_amx_is_bit_exact():
    model = _net()
    rng = np.random.default_rng(1)
    calib = {"x": rng.normal(size=(16, 3, 22, 19)).astype(np.float32)}
    opts = CompileOptions(calib=calib, target_options={"mcpu": "sapphirerapids"})
    art = compiler.compile(model, options=opts)
    assert art.manifest.integer_only
    assert sum("conv2d_amx" in k for k in art.manifest.kernels) == 5     # one tile kernel per conv
    asm = art.kernel_library().inspect_source("asm")
    assert asm.count("tdpbusd") >= 5 and "ldtilecfg" in asm
    target = host_target()
    if missing_cpu_features({**target, "mcpu": "sapphirerapids"}):
        pytest.skip("this machine has no AMX: the kernels' assembly is checked, running them is not possible")
    assert amx.available(tvm.target.Target(target))
    qdq, _ = quantize.quantize(model, calib, opts.quant_config())
    for batch in (1, 3):
        x = rng.normal(size=(batch, 3, 22, 19)).astype(np.float32)
        np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(qdq, {"x": x})["y"])


def test_channels_no_tile_block_divides_run_on_amx_bit_exact():
    """96 input channels (flattened to 128 bytes a pixel) into 24 and 40 outputs (computed as 32 and
    64, the padding sums never read): neither VNNI's 16-lane blocks nor whole tile blocks fit, and
    before, such a conv ran on the plain int32 schedule (MobileNetV2's projections)."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, s).astype(np.float32), n)
             for n, s in {"w1": (24, 96, 1, 1), "w2": (40, 24, 3, 3)}.items()]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="project"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 96, 9, 9])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 40, 5, 5])], inits)
    calib = {"x": rng.normal(size=(16, 96, 9, 9)).astype(np.float32)}
    opts = CompileOptions(calib=calib, target_options={"mcpu": "sapphirerapids"})
    art = compiler.compile(model, options=opts)
    assert sum("conv2d_amx" in k for k in art.manifest.kernels) == 2, art.manifest.kernels
    if missing_cpu_features({**host_target(), "mcpu": "sapphirerapids"}):
        pytest.skip("this machine has no AMX: the kernels are built, running them is not possible")
    qdq, _ = quantize.quantize(model, calib, opts.quant_config())
    x = rng.normal(size=(2, 96, 9, 9)).astype(np.float32)
    np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(qdq, {"x": x})["y"])


def test_without_amx_the_vnni_kernels_remain():
    """An AVX-512 VNNI CPU (Ice Lake) gets no tile code: the same network's convs are VNNI ones."""
    model = _net()
    calib = {"x": np.random.default_rng(1).normal(size=(4, 3, 22, 19)).astype(np.float32)}
    art = compiler.compile(model, options=CompileOptions(calib=calib, target_options={"mcpu": "icelake-server"}))
    asm = art.kernel_library().inspect_source("asm")
    assert "tdpbusd" not in asm and "vpdpbusd" in asm


def test_token_matmuls_on_amx_are_bit_exact():
    """x[N, 40, 128] -> MatMul 128x64 (+bias) -> ReLU -> MatMul 64x32: token matmuls, each a 1 x 1
    convolution over the 40 tokens (two 32-row blocks, the second mostly padding)."""
    model = _mlp(lead=("N", 40), dims=(128, 64, 32), scale=0.2)
    rng = np.random.default_rng(2)
    calib = {"x": rng.normal(size=(8, 40, 128)).astype(np.float32)}
    opts = CompileOptions(calib=calib, target_options={"mcpu": "sapphirerapids"})
    art = compiler.compile(model, options=opts)
    assert sum("conv2d_amx" in k for k in art.manifest.kernels) == 2
    if missing_cpu_features({**host_target(), "mcpu": "sapphirerapids"}):
        pytest.skip("this machine has no AMX: the kernels are built, running them is not possible")
    qdq, _ = quantize.quantize(model, calib, opts.quant_config())
    for batch in (1, 2):
        x = rng.normal(size=(batch, 40, 128)).astype(np.float32)
        np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(qdq, {"x": x})["y"])


def _inverted_residual(seed=4):
    """MobileNetV2's block twice: 1x1 24 -> 144 (ReLU6), depthwise 3x3 at stride 1, then at stride 2
    with padding on one side only, 1x1 144 -> 24; x[N, 24, 11, 10]."""
    rng = np.random.default_rng(seed)
    shapes = {"we": (144, 24, 1, 1), "be": (144,), "wd": (144, 1, 3, 3), "bd": (144,), "wd2": (144, 1, 3, 3),
              "wp": (24, 144, 1, 1)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n) for n, s in shapes.items()]
    inits += [numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi")]
    node = helper.make_node
    nodes = [node("Conv", ["x", "we", "be"], ["e"], name="expand"),
             node("Clip", ["e", "lo", "hi"], ["e6"], name="relu6"),
             node("Conv", ["e6", "wd", "bd"], ["d"], name="depthwise", group=144, pads=[1, 1, 1, 1]),
             node("Relu", ["d"], ["dr"], name="relu"),
             node("Conv", ["dr", "wd2"], ["d2"], name="depthwise_s2", group=144, strides=[2, 2], pads=[0, 0, 1, 1]),
             node("Conv", ["d2", "wp"], ["y"], name="project")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 24, 11, 10])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24, 6, 5])], inits)


def test_depthwise_layers_between_tiles_stay_channels_last_bit_exact():
    """Between AMX convolutions (NHWC in and out) the depthwise layers read and write NHWC too
    (codegen/depthwise.py): no transpose before or after them, and the 144-channel expansion runs
    on the tiles (VNNI's NCHW kernel would need both transposes).  Bit-exact against golden."""
    model = _inverted_residual()
    rng = np.random.default_rng(5)
    calib = {"x": rng.normal(size=(16, 24, 11, 10)).astype(np.float32)}
    opts = CompileOptions(calib=calib, target_options={"mcpu": "sapphirerapids"})
    art = compiler.compile(model, options=opts)
    launches = art.manifest.launch_sequence
    assert sum(k.startswith("conv2d_amx") for k in launches) == 2, launches
    assert sum("depthwise" in k for k in launches) == 2, launches
    assert not any("transpose" in k for k in launches[:-1]), launches      # the NCHW output's only
    if missing_cpu_features({**host_target(), "mcpu": "sapphirerapids"}):
        pytest.skip("this machine has no AMX: the kernels are built, running them is not possible")
    qdq, _ = quantize.quantize(model, calib, opts.quant_config())
    x = rng.normal(size=(2, 24, 11, 10)).astype(np.float32)
    np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(qdq, {"x": x})["y"])
