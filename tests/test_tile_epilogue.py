"""FuseTileEpilogue (codegen/tile_epilogue.py): an AMX convolution's elementwise epilogue computed on
each block of sums as the tiles store it.

The pass rewrites only where it proves that the epilogue reads the sums at the index the layout it
assumes maps back to: the proof must accept the layouts real networks have (NHWC, the next
convolution's bordered rows, tokens, heads) and refuse an index that does not invert (a transpose,
a window).  The fused kernels are bit-exact against the golden interpreter where the host has AMX.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper
from test_amx import _inverted_residual, _net
from tvm.script import tirx as T

import compiler
from codegen import amx
from codegen.llvm import host_target
from codegen.tile_epilogue import _Epilogue
from compiler import quantize
from compiler.options import CompileOptions
from runtime import golden
from runtime.runner import missing_cpu_features

# a 3 x 3 convolution of a 4 x 4 image: pitch 6 (two garbage columns), 32 sums computed per channel
G = amx.ConvGeometry(64, 4, 4, 32, (3, 3), 1, (1, 1, 1, 1), (1, 1))
I64 = T.int64


@T.prim_func(private=True, s_tir=True)
def nhwc(acc: T.Buffer((I64(1), I64(32), I64(32)), "int32"), out: T.Buffer((I64(1), I64(4), I64(4), I64(32)), "int8")):
    for b, y, x, o in T.grid(I64(1), I64(4), I64(4), I64(32)):
        with T.sblock("requantize"):
            vb, vy, vx, vo = T.axis.remap("SSSS", [b, y, x, o])
            out[vb, vy, vx, vo] = T.Cast("int8", T.max(T.min(acc[vb, vy * I64(6) + vx, vo] >> 4, 127), -128))


@T.prim_func(private=True, s_tir=True)
def nchw(acc: T.Buffer((I64(1), I64(32), I64(32)), "int32"), out: T.Buffer((I64(1), I64(32), I64(4), I64(4)), "int8")):
    for b, o, y, x in T.grid(I64(1), I64(32), I64(4), I64(4)):
        with T.sblock("requantize"):
            vb, vo, vy, vx = T.axis.remap("SSSS", [b, o, y, x])
            out[vb, vo, vy, vx] = T.Cast("int8", T.max(T.min(acc[vb, vy * I64(6) + vx, vo] >> 4, 127), -128))


@T.prim_func(private=True, s_tir=True)
def transposed(acc: T.Buffer((I64(1), I64(32), I64(32)), "int32"),
               out: T.Buffer((I64(1), I64(4), I64(4), I64(32)), "int8")):
    for b, y, x, o in T.grid(I64(1), I64(4), I64(4), I64(32)):
        with T.sblock("requantize"):
            vb, vy, vx, vo = T.axis.remap("SSSS", [b, y, x, o])
            out[vb, vy, vx, vo] = T.Cast("int8", T.max(T.min(acc[vb, vx * I64(6) + vy, vo] >> 4, 127), -128))


@T.prim_func(private=True, s_tir=True)
def window(acc: T.Buffer((I64(1), I64(32), I64(32)), "int32"), out: T.Buffer((I64(1), I64(4), I64(4), I64(32)), "int32")):
    for b, y, x, o in T.grid(I64(1), I64(4), I64(4), I64(32)):
        with T.sblock("pair"):
            vb, vy, vx, vo = T.axis.remap("SSSS", [b, y, x, o])
            out[vb, vy, vx, vo] = T.max(acc[vb, vy * I64(6) + vx, vo], acc[vb, vy * I64(6) + vx + I64(1), vo])


@T.prim_func(private=True, s_tir=True)
def bordered(acc: T.Buffer((I64(1), I64(32), I64(32)), "int32"),
             rows: T.Buffer((I64(1), I64(1), I64(7), I64(6), I64(32)), "uint8")):
    # the next 3 x 3 convolution's input: the image at (1, 1) inside a border of zero points (3)
    for b, p, qy, qx, k in T.grid(I64(1), I64(1), I64(7), I64(6), I64(32)):
        with T.sblock("rows"):
            vb, vp, vy, vx, vk = T.axis.remap("SSSSS", [b, p, qy, qx, k])
            rows[vb, vp, vy, vx, vk] = T.if_then_else(
                I64(1) <= vy and vy < I64(5) and I64(1) <= vx and vx < I64(5),
                T.Cast("uint8", T.max(T.min(acc[vb, (vy - I64(1)) * I64(6) + (vx - I64(1)), vk] >> 4, 255), 0)),
                T.uint8(3))


@T.prim_func(private=True, s_tir=True)
def bordered_by_sums(acc: T.Buffer((I64(1), I64(32), I64(32)), "int32"),
                     rows: T.Buffer((I64(1), I64(1), I64(7), I64(6), I64(32)), "uint8")):
    # the border holds a clamped neighbour's value, not a constant: no tile computes it
    for b, p, qy, qx, k in T.grid(I64(1), I64(1), I64(7), I64(6), I64(32)):
        with T.sblock("rows"):
            vb, vp, vy, vx, vk = T.axis.remap("SSSSS", [b, p, qy, qx, k])
            rows[vb, vp, vy, vx, vk] = T.Cast("uint8", T.max(T.min(
                acc[vb, T.max(T.min(vy - I64(1), I64(3)), I64(0)) * I64(6) + T.max(T.min(vx - I64(1), I64(3)), I64(0)),
                    vk] >> 4, 255), 0))


@pytest.mark.parametrize("func, fuses", [(nhwc, True), (nchw, True), (bordered, True), (transposed, False),
                                         (window, False), (bordered_by_sums, False)],
                         ids=["nhwc", "nchw", "bordered", "transposed", "window", "border-of-sums"])
def test_the_layout_is_proved_before_fusing(func, fuses):
    """NHWC, NCHW and the bordered rows invert; a transposed read of a square image (same shape as NHWC),
    two pixels per element, and a border that holds sums do not."""
    epi = _Epilogue(func, 0, G)
    assert epi.ok is fuses
    if fuses and func is bordered:
        # the rows no pixel maps to: top, bottom two, left and right columns of the image rows
        boxes = [box for box, value in epi.fill]
        assert boxes == [((0, 1), (0, 6)), ((5, 7), (0, 6)), ((1, 5), (0, 1)), ((1, 5), (5, 6))]
        assert all(int(value) == 3 for _, value in epi.fill)


def _compile(model, shape, seed=7):
    """The model on the AMX units, and a check of it against golden on random batches."""
    rng = np.random.default_rng(seed)
    calib = {"x": rng.normal(size=(16, *shape[1:])).astype(np.float32)}
    opts = CompileOptions(calib=calib, target_options={"mcpu": "sapphirerapids"})
    art = compiler.compile(model, options=opts)

    def bit_exact(batches=(1, 2)):
        qdq, _ = quantize.quantize(model, calib, opts.quant_config())
        for batch in batches:
            x = rng.normal(size=(batch, *shape[1:])).astype(np.float32)
            np.testing.assert_array_equal(art.run({"x": x})["y"], golden.run_qdq(qdq, {"x": x})["y"])

    return art, bit_exact


def _no_amx() -> bool:
    return bool(missing_cpu_features({**host_target(), "mcpu": "sapphirerapids"}))


def _fused(launches) -> list[str]:
    """Tile kernels that compute an epilogue: a conv2d_amx kernel named after its epilogue too."""
    return [k for k in launches if k.startswith("conv2d_amx") and "_cast" in k]


def test_convolution_chain_epilogues_run_in_the_tiles_bit_exact():
    """_net: the 32 -> 64 convolution's requantize writes the next convolution's bordered rows from
    its tiles, the last one's dequantize the NCHW float output; the stem's sums go to the max pool
    (a window: not fused, the stem writes them NHWC directly); the residual add that writes the
    stride-2 convolution's phases stays its own kernel."""
    art, bit_exact = _compile(_net(), (1, 3, 22, 19))
    launches = art.manifest.launch_sequence
    assert len(_fused(launches)) == 3 and "dequantize" in _fused(launches)[-1], launches
    assert "amx_valid" not in " ".join(k for k in launches if k.startswith("fused_max_pool")), launches
    if _no_amx():
        pytest.skip("this machine has no AMX: the kernels are built, running them is not possible")
    bit_exact(batches=(1, 3))


def test_expansion_requantizes_in_its_tiles_before_the_depthwise_bit_exact():
    """MobileNetV2's block: the 1 x 1 expansion's requantize is not the depthwise kernel's prologue
    (which would read the int32 sums) but the expansion's tile epilogue, writing uint8 NHWC; the
    projection's dequantize writes the NCHW float output from its tiles."""
    art, bit_exact = _compile(_inverted_residual(), (1, 24, 11, 10))
    launches = art.manifest.launch_sequence
    fused = _fused(launches)
    assert len(fused) == 2 and launches.index(fused[0]) < next(
        i for i, k in enumerate(launches) if "depthwise" in k), launches
    if _no_amx():
        pytest.skip("this machine has no AMX: the kernels are built, running them is not possible")
    bit_exact()


def _token_mlp(tokens=40, seed=6):
    """x[1, 40, 128] (static: the reshapes fuse) -> MatMul 128x64 -> ReLU -> MatMul 64x64: the first
    epilogue writes the second's rows, padded to 64 tokens (the padding rows are the border)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, s).astype(np.float32), n)
             for n, s in {"w1": (128, 64), "w2": (64, 64)}.items()]
    node = helper.make_node
    nodes = [node("MatMul", ["x", "w1"], ["h"], name="fc1"), node("Relu", ["h"], ["r"], name="relu"),
             node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, 128])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, 64])], inits)


def test_token_matmul_epilogue_writes_the_next_rows_bit_exact():
    art, bit_exact = _compile(_token_mlp(), (1, 40, 128))
    launches = art.manifest.launch_sequence
    assert len(_fused(launches)) >= 1, launches
    if _no_amx():
        pytest.skip("this machine has no AMX: the kernels are built, running them is not possible")
    bit_exact(batches=(1,))
