"""The default CPU schedules: every conv/matmul kernel is parallel and vectorized,
and scheduling changes no result (checked against ORT over awkward shapes)."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper
from tvm import s_tir, te, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.s_tir import dlight as dl

import compiler
from codegen import llvm
from codegen.cpu_schedule import CPUDefault
from compiler import frontend


def _conv_model(cin, cout, hw, k, stride, pad, group, batch):
    rng = np.random.default_rng(cin * 100 + k)
    w = numpy_helper.from_array(rng.normal(size=(cout, cin // group, k, k)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=(cout,)).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[stride] * 2, pads=[pad] * 4,
                              group=group, name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, hw, hw])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])], [w, b])


def _matmul_model(m, k, n, batch):
    rng = np.random.default_rng(m + k + n)
    w = numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, m, k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "m", "k"])], [w])


CASES = {
    "conv3x3": _conv_model(16, 32, 14, 3, 1, 1, 1, 1),
    "conv7x7-s2": _conv_model(3, 8, 23, 7, 2, 3, 1, 1),
    "conv3x3-s2-wide": _conv_model(3, 32, 64, 3, 2, 1, 1, 1),   # vectorized over output channels
    "conv1x1-s2": _conv_model(12, 20, 9, 1, 2, 0, 1, 2),
    "depthwise": _conv_model(24, 24, 11, 3, 1, 1, 24, 1),
    "grouped": _conv_model(8, 12, 6, 3, 2, 1, 4, 1),
    "depthwise-s2-wide": _conv_model(32, 32, 40, 3, 2, 1, 32, 1),     # channels in the lanes, input too
    "depthwise-wide": _conv_model(32, 32, 20, 3, 1, 1, 32, 1),        # the same at stride 1
    "depthwise-narrow": _conv_model(32, 32, 10, 3, 1, 1, 32, 1),      # and 10 wide (DS-CNN's)
    "conv-dynamic-batch": _conv_model(4, 8, 10, 3, 1, 1, 1, "N"),
    "matmul-197": _matmul_model(197, 64, 96, 1),      # prime rows: predicated register tile
    "matmul-odd": _matmul_model(5, 7, 13, 3),
    "matmul-dynamic": _matmul_model(6, 16, 32, "N"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_scheduled_kernels_match_ort(name):
    model = CASES[name]
    shape = [d.dim_value or 3 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(7).normal(size=shape).astype(np.float32)
    got = compiler.compile(model).run(x)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-4)


def _scheduled_kernels(model) -> dict[str, str]:
    src = frontend.OnnxModel(model, "m.onnx", "0")
    mod = frontend.to_relax(src, frontend.input_specs(src))
    target = tvm.target.Target(llvm.host_target())
    with target:
        fused = tvm.transform.Sequential(cpu.legalize_passes(target))(mod)
        scheduled = dl.ApplyDefaultSchedule(CPUDefault())(fused)
    return {gv.name_hint: f.script() for gv, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)}


@pytest.mark.parametrize("name, padded, channels_last, parallel", [
    ("conv3x3", False, False, True),
    ("depthwise", False, True, True),           # 26k MACs, above 2^14: split; channels in the lanes
    ("matmul-odd", True, False, False),         # 1.4k MACs: cheaper than waking a worker; 5 rows padded
    ("conv-dynamic-batch", False, False, True),  # unknown work: parallel
    ("matmul-197", True, False, True),          # 197 rows: padded to whole row tiles, no predicated tail
    ("conv3x3-s2-wide", False, True, True),     # stride 2, 32 wide: weights copied channels-last
    ("conv7x7-s2", False, False, True),         # 12 wide: stays vectorized over the width
])
def test_reduction_kernels_are_parallel_and_vectorized(name, padded, channels_last, parallel):
    kernels = _scheduled_kernels(CASES[name])
    main = [s for n, s in kernels.items() if "conv2d" in n or "matmul" in n]
    assert main, kernels.keys()
    for script in main:
        assert ("T.parallel" in script) == parallel and "T.vectorized" in script
        assert '"local"' in script                  # register-tile accumulator
        assert ("_pad" in script) == padded
        assert ("_global" in script) == channels_last          # the transposed weight copy


@pytest.mark.parametrize("name, padded", [("depthwise-s2-wide", 42), ("depthwise-wide", 22), ("depthwise-narrow", 12)])
def test_a_depthwise_convolution_reads_its_input_channels_last(name, padded):
    """Vectorized over channels (at any width and stride), a depthwise convolution reads its
    input at the very channel each lane computes: the padding writes it channels-last, its vector
    along the channels, so the multiply-adds load whole vectors instead of gathering or
    broadcasting; the epilogue (ReLU) stores each NCHW row of the 4-wide tile as one vector."""
    (script,) = [s for n, s in _scheduled_kernels(CASES[name]).items() if "conv2d" in n]
    assert f"pad_temp = T.sblock_alloc_buffer((T.int64(1), T.int64({padded}), T.int64({padded}), T.int64(32))" \
        in script
    head, pad = script.split('T.sblock("pad_temp")')
    pad = pad[:pad.index("T.sblock")]
    # the copy's vector is the channel axis (32 = 2 x 16 lanes), and it stores channels innermost
    assert re.search(r"for ax0_1 in T\.vectorized\(T\.int64\(16\)\):\s*with$", head.rstrip()), head[-300:]
    assert "v0 = T.axis.spatial(T.int64(32), ax0_0 * T.int64(16) + ax0_1)" in pad
    assert "pad_temp[T.int64(0), v1, v2, v0] = " in pad
    relu = script.split('T.sblock("compute")')[0]
    assert re.search(r"for ax1 in T\.vectorized\(T\.int64\(4\)\):\s*with$", relu.rstrip()), relu[-300:]


def test_kernels_no_rule_schedules_are_recorded(monkeypatch):
    """The manifest names kernels left as TVM's naive loop nests (the zoo models have none: see
    test_transformer's digits_vit); with the rule switched off, every kernel is named."""
    model = _conv_model(4, 8, 6, 3, 1, 1, 1, 1)
    assert compiler.compile(model).manifest.unscheduled == []
    monkeypatch.setattr(CPUDefault, "schedule", lambda self, sch, target: None)
    art = compiler.compile(model)
    assert art.manifest.unscheduled and set(art.manifest.unscheduled) == set(art.manifest.kernels)


def test_a_pool_after_a_row_wise_kernel_does_not_recompute_its_gemm():
    """GEMM -> a row-wise step (a sum along each row, as LayerNorm's) -> a pool over the rows (Swin-T's
    head as ORT quantizes it: the norm's output pooled before its quantize, all one kernel).  The
    pool's loops run over the channels, not the GEMM's rows: computed under them, the GEMM's whole
    row block ran once per channel (Swin-T's ORT file: 100 s per inference).  Each block runs
    exactly as often as it did unscheduled."""
    rows, k, cols = 7, 64, 48
    a, w = te.placeholder((rows, k), "int8", "a"), te.placeholder((k, cols), "int8", "w")
    kk, cc, rr = te.reduce_axis((0, k)), te.reduce_axis((0, cols)), te.reduce_axis((0, rows))
    mm = te.compute((rows, cols), lambda i, j: te.sum(a[i, kk].astype("int32") * w[kk, j].astype("int32"), axis=kk),
                    name="matmul")
    total = te.compute((rows,), lambda i: te.sum(mm[i, cc], axis=cc), name="row_sum")
    centered = te.compute((rows, cols), lambda i, j: mm[i, j] * cols - total[i], name="centered")
    pool = te.compute((cols,), lambda j: te.sum(centered[rr, j], axis=rr), name="pool")
    func = te.create_prim_func([a, w, pool])
    def executions(sch, name):          # how many times the block's body runs
        return int(np.prod([int(sch.get(lp).extent) for lp in sch.get_loops(sch.get_sblock(name))]))

    plain = s_tir.Schedule(func)
    runs = {name: executions(plain, name) for name in ("matmul", "row_sum")}
    sch = CPUDefault().schedule(s_tir.Schedule(func), tvm.target.Target({"kind": "llvm"}))
    assert sch is not None
    for name, n in runs.items():
        assert executions(sch, name) == n, name
    built = tvm.compile(sch.mod, target="llvm")
    rng = np.random.default_rng(0)
    x, y = rng.integers(-128, 128, (rows, k)).astype(np.int8), rng.integers(-128, 128, (k, cols)).astype(np.int8)
    m = x.astype(np.int64) @ y.astype(np.int64)
    want = (m * cols - m.sum(1, keepdims=True)).sum(0).astype(np.int32)
    out = tvm.runtime.tensor(np.zeros(cols, np.int32))
    built(tvm.runtime.tensor(x), tvm.runtime.tensor(y), out)
    np.testing.assert_array_equal(out.numpy(), want)


def _same_as_unscheduled(func, sch, args, out) -> np.ndarray:
    """Run the TE kernel ``func`` unscheduled and as ``sch`` scheduled it; assert the same output
    (a te.Tensor: its shape and dtype), and return it."""
    outs = []
    for mod in (tvm.IRModule({"main": func}), sch.mod):
        o = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], str(out.dtype)))
        tvm.compile(mod, target="llvm")(*args, o)
        outs.append(o.numpy())
    np.testing.assert_array_equal(outs[1], outs[0])
    return outs[0]


def test_a_stems_quantize_runs_once_per_input_element_before_its_space_to_depth_copy():
    """The float input's quantize feeds the AMX stem's space-to-depth copy (16 bytes per pixel:
    2 x 2 phases of 3 channels and a zero padding channel).  Inlined, each copied byte divided and
    rounded on its own, one lane at a time (TVM's vectorizer runs a lane-tested if_then_else
    lane by lane): ResNet-18's stem quantize took 306 us.  Kept, the quantize is one vector loop
    over the input whose vectors stay inside a row (a ramp, not a gather), and the copy's bytes
    are unrolled so each lane's test folds (83 us).  The values are the unscheduled kernel's."""
    from codegen.amx import ConvGeometry, flatten

    g = ConvGeometry(3, 40, 40, 8, (7, 7), 2, (3, 3, 3, 3), (1, 1))
    x = te.placeholder((1, 3, 40, 40), "float32", "x")
    q = te.compute(x.shape, lambda *i: tirx.Cast("uint8", tirx.max(tirx.min(
        tirx.round(x(*i) / tirx.const(0.0187, "float32")) + tirx.const(114.0, "float32"),
        tirx.const(255.0, "float32")), tirx.const(0.0, "float32"))), name="quantized")
    rows = flatten(q, g, 114)
    func = te.create_prim_func([x, rows])
    sch = CPUDefault().schedule(s_tir.Schedule(func), tvm.target.Target({"kind": "llvm"}))
    assert sch is not None
    script = sch.mod["main"].script()
    head, copy = script.split('T.sblock("amx_rows")')
    quantize = head.split('T.sblock("quantized")')[0]
    # the quantize's vectors are 40-wide rows; the copy's 16 bytes unrolled, not vectorized
    assert re.search(r"in T\.vectorized\(40\):\s*with$", quantize.rstrip()), quantize[-200:]
    assert re.search(rf"in T\.unroll\({g.depth}\):\s*with$", head.rstrip()), head[-200:]
    rng = np.random.default_rng(0)
    data = tvm.runtime.tensor(rng.normal(size=(1, 3, 40, 40)).astype(np.float32))
    want = _same_as_unscheduled(func, sch, [data], rows)
    assert len(np.unique(want)) > 50          # real pixels, not only the border's zero point


def test_an_int32_max_pools_padding_is_tested_in_its_window_not_copied():
    """PoolFirst pools ResNet's stem sums as int32 (112 x 112 x 64): a padded copy of them wrote and
    read 3.3 MB (189 us); the padding test joins the window loop instead (63 us).  The values are the
    unscheduled kernel's, borders included."""
    from tvm import topi

    x = te.placeholder((1, 9, 8, 32), "int32", "x")
    pooled = topi.nn.pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), "max", layout="NHWC")
    func = te.create_prim_func([x, pooled])
    sch = CPUDefault().schedule(s_tir.Schedule(func), tvm.target.Target({"kind": "llvm"}))
    assert sch is not None
    script = sch.mod["main"].script()
    assert "pad_temp" not in script and "-2147483648" in script, script
    rng = np.random.default_rng(1)
    data = tvm.runtime.tensor(rng.integers(-2**31, 2**31 - 1, (1, 9, 8, 32), dtype=np.int64).astype(np.int32))
    _same_as_unscheduled(func, sch, [data], pooled)


def test_an_nhwc_depthwise_tests_its_border_per_tap_not_in_a_padded_copy():
    """Vectors of channels (an NHWC depthwise convolution): the border test is one per pixel and
    tap, so the padding joins the window loop; MobileNetV2's layers no longer write and read a
    padded copy of their input (1.25 MB at 112 x 112 x 96).  The values are the unscheduled kernel's."""
    from tvm import topi

    x = te.placeholder((1, 9, 8, 32), "uint8", "x")
    w = te.placeholder((3, 3, 32), "int8", "w")
    padded = topi.nn.pad(x, (0, 1, 1, 0), (0, 1, 1, 0), pad_value=7, name="pad_temp")
    ry, rx = te.reduce_axis((0, 3), "ry"), te.reduce_axis((0, 3), "rx")
    out = te.compute((1, 5, 4, 32), lambda n, y, xx, c: te.sum(
        padded[n, 2 * y + ry, 2 * xx + rx, c].astype("int32") * w[ry, rx, c].astype("int32"), axis=[ry, rx]),
        name="depthwise_nhwc")
    func = te.create_prim_func([x, w, out])
    sch = CPUDefault().schedule(s_tir.Schedule(func), tvm.target.Target({"kind": "llvm"}))
    assert sch is not None
    assert "pad_temp" not in sch.mod["main"].script()
    rng = np.random.default_rng(2)
    args = [tvm.runtime.tensor(rng.integers(0, 255, (1, 9, 8, 32)).astype(np.uint8)),
            tvm.runtime.tensor(rng.integers(-128, 127, (3, 3, 32)).astype(np.int8))]
    _same_as_unscheduled(func, sch, args, out)


def test_a_reduction_to_a_scalar_is_scheduled():
    """A dot product into a 0-d tensor (DynamicQuantizeLinear's and the Hessian trace's sums): the
    channels-last test has no output axis to look at, and must not be asked for one."""
    a = te.placeholder((64,), "int32", "a")
    b = te.placeholder((64,), "int32", "b")
    k = te.reduce_axis((0, 64), "k")
    dot = te.compute((), lambda: te.sum(a[k] * b[k], axis=k), name="dot")
    func = te.create_prim_func([a, b, dot])
    sch = CPUDefault().schedule(s_tir.Schedule(func), tvm.target.Target({"kind": "llvm"}))
    assert sch is not None
    rng = np.random.default_rng(3)
    args = [tvm.runtime.tensor(rng.integers(-1000, 1000, 64).astype(np.int32)) for _ in range(2)]
    _same_as_unscheduled(func, sch, args, dot)
