"""Shared fixtures: small hand-built ONNX graphs and a CLI runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


# the x86 ISA paths lowbit's kernels differ by (codegen/llvm.cpu_target): generic, AVX2, AVX-VNNI,
# AVX-512 VNNI, AMX
ISA_PATHS = ("x86-64", "haswell", "alderlake", "icelake-server", "sapphirerapids")


def runnable_cpus() -> list[str]:
    """The ISA paths this machine executes: every CPUID feature of the LLVM CPU is the host's (LLVM's
    tuning flags, which are no CPUID bits, are not compared)."""
    import tvm
    from tvm.target import codegen

    host = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")()
    runnable = []
    for cpu in ISA_PATHS:
        features = codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu}))
        if all(bool(host[f]) for f in features if f in host):
            runnable.append(cpu)
    return runnable


# the zoo's 224x224 models: a test that checks a build's structure or its bit-exactness, not its fidelity,
# calibrates them on the first LARGE_CALIB of their 32 samples (calibration is most of such a test's time)
LARGE = ("resnet18", "deit_tiny")
LARGE_CALIB = 8


def zoo_calibration(name: str) -> dict[str, np.ndarray]:
    from models import zoo

    calib = zoo.ensure(name).calibration()
    return {k: v[:LARGE_CALIB] for k, v in calib.items()} if name in LARGE else calib


def make_model(nodes, inputs, outputs, inits=(), opset=17, name="test") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def mlp_model(batch="N", seed=0) -> onnx.ModelProto:
    """x[N,8] -> MatMul -> Add -> Relu -> MatMul -> y[N,4]."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(size=(16,)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], [w1, b1, w2])


@pytest.fixture
def mlp_path(tmp_path) -> Path:
    p = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), p)
    return p


def compile_with_golden(model, **options):
    """A build and its golden reference: (Artifact, the QDQ model its compile lowered, its softmax /
    GELU variants), from one calibration."""
    from compiler import driver
    from compiler.options import CompileOptions

    art, ref = driver.compile_with_reference(model, CompileOptions(**options))
    return art, ref.model, ref.variants


def assert_golden_per_sample(art, qdq, variants, x) -> None:
    """``art`` (a zoo model's build) bit-exact with the golden interpreter on its reference, sample by sample."""
    from models import zoo
    from runtime import golden

    for i in range(len(x)):
        feeds = {zoo.INPUT: x[i:i + 1]}
        np.testing.assert_array_equal(art.run(feeds)[zoo.OUTPUT], golden.run_qdq(qdq, feeds, variants)[zoo.OUTPUT])


def one_line_error(capsys_or_text) -> str:
    """The CLI's contract for a user error: stderr is exactly one line, ``error: ...``, no traceback."""
    err = capsys_or_text if isinstance(capsys_or_text, str) else capsys_or_text.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="session")
def rv32_toolchain():
    """Skip, saying why, when the bare-metal toolchain is not installed: `make test` installs it, so
    this happens only where apt-get itself could not run."""
    from codegen.rv32 import toolchain

    if (why := toolchain.missing()) is not None:
        pytest.skip(f"{why}: `make test` installs {toolchain.PACKAGES} with apt-get; that was impossible here")


@pytest.fixture(scope="session")
def iree_wheels():
    """Skip, saying why, where IREE's wheels are absent: `make setup` installs them from the pins."""
    import importlib.util

    if importlib.util.find_spec("iree.compiler") is None or importlib.util.find_spec("iree.runtime") is None:
        pytest.skip("iree-base-compiler / iree-base-runtime 3.13 are not installed: `make setup` installs them "
                    "from the pins (pyproject.toml, the tosa extra)")


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess: exit codes and stderr as a user sees them."""
    return subprocess.run([sys.executable, "-m", "compiler.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=600)


def concat_cnn(c=4, seed=0) -> onnx.ModelProto:
    """Two conv branches of x (1x1 and 3x3, the second without ReLU) -> Concat -> 1x1 conv."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32), n) for n, s in
             (("wa", (c, c, 1, 1)), ("wb", (2 * c, c, 3, 3)), ("wc", (c, 3 * c, 1, 1)), ("bc", (c,)))]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a0"], name="conv_a"),
        helper.make_node("Relu", ["a0"], ["a"], name="relu_a"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "wc", "bc"], ["y"], name="conv_c"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 6, 6])], inits)
