"""Random small ONNX graphs for differential fuzzing (tests/test_fuzz.py), and the checks they run.

A graph is a chain of layers over an image ``[B, C, H, W]`` (Conv with random kernel, stride,
padding and groups, ReLU, residual or bias Add, Max/AveragePool, then maybe a GlobalAveragePool
-> Flatten -> Gemm head and a Softmax) or over a sequence ``[B, T, D]`` (MatMul + bias, ReLU,
GELU, LayerNormalization, Softmax, residual Add).  Each example also fixes how it is quantized:
activations u8 or s8, weights per channel or per tensor, a random per-layer bit plan (8 / 4 / 2
bits), and the softmax / GELU family (I-ViT shift or I-BERT polynomial).  Everything an example needs to run again is in the model's metadata
(``lowbit_fuzz``), so a failing example saved as one .onnx file is a complete regression test.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from conftest import ISA_PATHS, runnable_cpus
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

REGRESSIONS = Path(__file__).resolve().parent / "regressions"
# beyond the zoo's: channel counts that fill or straddle AMX / VNNI tiles, spatial sizes that are odd or prime
WIDE_CHANNELS = (16, 24, 32, 40, 64)
ODD_SIZES = (13, 17, 20)
META = "lowbit_fuzz"
FP32_TOLERANCE = dict(rtol=1e-4, atol=1e-4)     # lowbit FP32 vs ORT: float reassociation only


class _Net:
    def __init__(self, rng: np.random.Generator):
        self.rng, self.nodes, self.inits, self.layers = rng, [], [], []

    def const(self, name: str, a: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(a.astype(np.float32), name))
        return name

    def add(self, op: str, inputs: list[str], **attrs) -> str:
        name = f"{op.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        if op in ("Conv", "Gemm", "MatMul"):
            self.layers.append(name)
        return name


@st.composite
def image_layers(draw, net: _Net, x: str, c: int, hw: int) -> tuple[str, int, int]:
    seen: dict[tuple[int, int], str] = {(c, hw): x}
    for kind in draw(st.lists(st.sampled_from(["conv", "conv", "relu", "add", "maxpool", "avgpool"]),
                              min_size=1, max_size=4)):
        if kind == "conv":
            k = draw(st.integers(1, min(3, hw)))
            stride, pad = draw(st.integers(1, 2)), draw(st.integers(0, k - 1))
            out = draw(st.sampled_from([*range(1, 9), *WIDE_CHANNELS]))
            group = draw(st.sampled_from([g for g in (1, c) if c % g == 0 and out % g == 0]))
            w = net.rng.normal(0, 1 / np.sqrt(k * k * c / group), (out, c // group, k, k))
            x = net.add("Conv", [x, net.const(f"w{len(net.nodes)}", w), net.const(f"b{len(net.nodes)}",
                                                                                     net.rng.normal(0, 0.1, out))],
                        kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group)
            c, hw = out, (hw + 2 * pad - k) // stride + 1
        elif kind == "relu":
            x = net.add("Relu", [x])
        elif kind == "add":
            other = seen.get((c, hw))
            y = other if other is not None and other != x else net.const(f"c{len(net.nodes)}",
                                                                          net.rng.normal(0, 0.5, (1, c, 1, 1)))
            x = net.add("Add", [x, y])
        elif hw >= 2:
            k = draw(st.integers(2, min(3, hw)))
            stride, pad = draw(st.integers(1, 2)), draw(st.integers(0, k // 2))
            # padded averages count the padding (PyTorch's default): lowbit has no integer lowering yet for
            # a divisor that changes at the border (count_include_pad=0), and falls back to fake-quant
            extra = {"count_include_pad": 1} if kind == "avgpool" and pad else {}
            x = net.add("MaxPool" if kind == "maxpool" else "AveragePool", [x], kernel_shape=[k, k],
                        strides=[stride, stride], pads=[pad] * 4, **extra)
            hw = (hw + 2 * pad - k) // stride + 1
        seen[(c, hw)] = x
    return x, c, hw


@st.composite
def image_net(draw, rng: np.random.Generator, batch: int = 1) -> tuple[onnx.ModelProto, dict]:
    net = _Net(rng)
    c, hw = draw(st.sampled_from([*range(1, 7), 16, 24])), draw(st.sampled_from([*range(3, 11), *ODD_SIZES]))
    x, oc, ohw = draw(image_layers(net, "x", c, hw))
    out_shape = [batch, oc, ohw, ohw]
    if draw(st.booleans()):
        classes = draw(st.integers(2, 10))
        x = net.add("Flatten", [net.add("GlobalAveragePool", [x])])
        x = net.add("Gemm", [x, net.const(f"w{len(net.nodes)}", rng.normal(0, 1 / np.sqrt(oc), (classes, oc))),
                             net.const(f"b{len(net.nodes)}", rng.normal(0, 0.1, classes))], transB=1)
        out_shape = [batch, classes]
        if draw(st.booleans()):
            x = net.add("Softmax", [x], axis=-1)
    return _model(net, x, [batch, c, hw, hw], out_shape), {"family": "image"}


@st.composite
def sequence_net(draw, rng: np.random.Generator, batch: int = 1) -> tuple[onnx.ModelProto, dict]:
    net = _Net(rng)
    t, d = draw(st.integers(1, 6)), draw(st.sampled_from([4, 8, 12, 16]))
    x, width, residual = "x", d, "x"
    for kind in draw(st.lists(st.sampled_from(["matmul", "relu", "gelu", "layernorm", "softmax", "add"]),
                              min_size=1, max_size=5)):
        if kind == "matmul":
            out = draw(st.sampled_from([4, 8, 16]))
            w = net.const(f"w{len(net.nodes)}", rng.normal(0, 1 / np.sqrt(width), (width, out)))
            x = net.add("Add", [net.add("MatMul", [x, w]), net.const(f"b{len(net.nodes)}", rng.normal(0, 0.1, out))])
            width = out
        elif kind == "relu":
            x = net.add("Relu", [x])
        elif kind == "gelu":
            x = net.add("Gelu", [x])
        elif kind == "layernorm":
            x = net.add("LayerNormalization", [x, net.const(f"g{len(net.nodes)}", rng.uniform(0.5, 1.5, width)),
                                               net.const(f"beta{len(net.nodes)}", rng.normal(0, 0.1, width))],
                        axis=-1, epsilon=1e-5)
        elif kind == "softmax":
            x = net.add("Softmax", [x], axis=-1)
        elif width == d and x != residual:
            x = residual = net.add("Add", [x, residual])
    return _model(net, x, [batch, t, d], [batch, t, width]), {"family": "sequence"}


def _model(net: _Net, y: str, in_shape, out_shape) -> onnx.ModelProto:
    if not net.nodes:           # every drawn layer was a no-op at these shapes
        y = net.add("Relu", [y])
    graph = helper.make_graph(net.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, out_shape)], net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


@st.composite
def examples(draw, families=("image", "sequence"), one_sample: bool = False):
    """(model, params): an FP32 graph and how to quantize it, params stored in its metadata: a
    static batch of 1 to 8 samples (``one_sample``: 1, as a microcontroller runs) and the x86 ISA
    path the integer build is compiled for (conftest.ISA_PATHS: run where this machine can, else
    compiled, which must not fail either)."""
    seed = draw(st.integers(0, 2**31 - 1))
    family = draw(st.sampled_from(families))
    batch = 1 if one_sample else draw(st.sampled_from([1, 1, 2, 3, 5, 8]))
    model, params = draw((image_net if family == "image" else sequence_net)(np.random.default_rng(seed), batch))
    layers = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    params.update(seed=seed, activations=draw(st.sampled_from(["u8", "s8"])), cpu=draw(st.sampled_from(ISA_PATHS)),
                  nonlinear=draw(st.sampled_from(["shift", "poly"])),
                  per_tensor=draw(st.booleans()),
                  layer_bits={name: draw(st.sampled_from([8, 8, 4, 2])) for name in layers})
    helper.set_model_props(model, {META: json.dumps(params, sort_keys=True)})
    return model


def params_of(model: onnx.ModelProto) -> dict:
    return json.loads(next(p.value for p in model.metadata_props if p.key == META))


def data(model: onnx.ModelProto) -> tuple[dict, dict]:
    """(one input sample, 8 calibration samples), from the example's seed."""
    rng = np.random.default_rng(params_of(model)["seed"] + 1)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    calib = rng.normal(0, 1, (8, *shape[1:])).astype(np.float32)
    x = rng.normal(0, 1, shape).astype(np.float32)
    x[-1] *= 1000.0             # far outside the calibrated range: every input quantize saturates
    return {"x": x}, {"x": calib}


def quantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """lowbit's QDQ model of the example, with its bit plan, activation scheme and softmax / GELU
    family (one for every node: a QDQ model does not record per-node choices), weights per channel
    or per tensor."""
    from compiler import quantize

    p = params_of(model)
    config = quantize.QuantConfig(activations=p["activations"], layer_bits=p["layer_bits"], pin_ends=False,
                                  nonlinear=p["nonlinear"], per_channel=not p["per_tensor"])
    return quantize.quantize(model, data(model)[1], config)[0]


def check_fp32(model: onnx.ModelProto) -> None:
    """lowbit FP32 (llvm) against ONNX Runtime, within FP32_TOLERANCE."""
    import onnxruntime as ort

    from compiler import driver

    feeds, _ = data(model)
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    (got,) = driver.compile(model).run(feeds).values()
    np.testing.assert_allclose(got, want, **FP32_TOLERANCE)


def check_integer(model: onnx.ModelProto, target: str = "llvm", cpu: str | None = None) -> None:
    """lowbit's integer build (llvm, or rv32 under QEMU) against the golden reference: the build
    is integer-only and its outputs are bit-identical."""
    from compiler import driver
    from compiler.options import CompileOptions
    from runtime import golden

    qdq, family = quantized(model), params_of(model)["nonlinear"]
    cpu = (cpu or params_of(model).get("cpu")) if target == "llvm" else None     # ``cpu``: instead of the drawn one
    feeds, _ = data(model)
    art = driver.compile(qdq, options=CompileOptions(target=target, nonlinear=family, target_options={"mcpu": cpu}))
    assert art.manifest.integer_only, art.manifest.integer_region
    if cpu is not None and cpu not in runnable_cpus():
        return                  # built for an ISA this machine lacks: that it compiles is the check
    (got,) = art.run(feeds).values()
    # the golden interpreter takes the family per node, as the quantizer reports its choices
    per_node: dict[str, list[str]] = {}
    for n in qdq.graph.node:
        if n.op_type in ("Softmax", "Gelu"):
            per_node.setdefault(n.op_type.lower(), []).append(family)
    (want,) = golden.run_qdq(qdq, feeds, per_node).values()
    np.testing.assert_array_equal(got, want)


def save_failure(model: onnx.ModelProto, check: str, previous: dict) -> Path:
    """Keep the latest failing example of a check (hypothesis tries the shrunk one last) as
    tests/regressions/<check>-<hash>.onnx; ``previous`` remembers the file a run wrote before."""
    REGRESSIONS.mkdir(exist_ok=True)
    helper.set_model_props(model, {META: json.dumps({**params_of(model), "check": check}, sort_keys=True)})
    data_ = model.SerializeToString()
    path = REGRESSIONS / f"{check}-{hashlib.sha256(data_).hexdigest()[:10]}.onnx"
    if previous.get(check) and previous[check] != path:
        previous[check].unlink(missing_ok=True)
    path.write_bytes(data_)
    previous[check] = path
    return path
