"""The CUDA backend on a machine without a GPU: every zoo model builds for sm_80 or sm_90, its
PTX assembles with ptxas, every int8 GEMM and convolution runs on dp4a, the integer region's
kernels hold no float instruction, and the dp4a operand layouts compute the golden integers.
Runs on a GPU are in tests/gpu/."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import ROOT, assert_golden_per_sample, compile_with_golden, run_cli, zoo_calibration

import compiler
from codegen.cuda import build as cuda
from codegen.cuda import nvcc
from compiler import driver
from compiler.options import CompileOptions
from models import zoo
from passes import lower_qdq as lowering
from runtime.errors import UserError

ARCHS = ("sm_80", "sm_90")
FLOAT_INSTRUCTION = re.compile(r"^\s*[a-z][\w.]*\.(f16|f16x2|bf16|f32|f64)\b", re.M)


@pytest.fixture(scope="session")
def cuda_toolkit():
    if nvcc.find() is None or nvcc._tool("ptxas") is None:
        pytest.skip("nvcc / ptxas not found (CUDA_PATH, PATH, /usr/local/cuda): these tests compile and assemble "
                    "PTX; install the CUDA toolkit")


def ptx_entries(ptx: str) -> dict[str, str]:
    parts = re.split(r"(?=^\.visible \.entry )", ptx, flags=re.M)
    return {re.match(r"\.visible \.entry (\w+)", p).group(1): p for p in parts if p.startswith(".visible .entry")}


def linear_layers(model: onnx.ModelProto) -> int:
    """Convolutions (not grouped) and matmuls by a constant weight in the FP32 model: each
    becomes one int8 kernel that dp4a can run."""
    consts = {i.name for i in model.graph.initializer}
    n = 0
    for node in model.graph.node:
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and groups == 1 or node.op_type in ("MatMul", "Gemm") and node.input[1] in consts:
            n += 1
    return n


# each model for one of the two architectures, alternating: both archs are covered, at half the build time
@pytest.mark.parametrize("name, arch", [(name, ARCHS[i % len(ARCHS)]) for i, name in enumerate(zoo.ENTRIES)])
def test_zoo_model_builds_assembles_and_runs_int8_on_dp4a(name, arch, cuda_toolkit, tmp_path):
    files = zoo.ensure(name)
    # every activation on 8 bits: a layer whose input the fidelity target widens to 16 bits (FC-AE's 8-wide
    # bottleneck, a small tensor) is an int16 x int8 kernel, which dp4a does not take
    art = compiler.compile(files.onnx, options=CompileOptions(target="cuda", target_options={"arch": arch},
                                                              calib=zoo_calibration(name), fidelity=None))
    outdir = tmp_path / "cuda"
    art.save(outdir)
    gpu = json.loads((outdir / "manifest.json").read_text())["build"]
    assert art.manifest.integer_only and gpu["arch"] == arch
    source, ptx = (outdir / gpu["source"]).read_text(), (outdir / gpu["ptx"]).read_text()
    assert re.search(rf"^\.target {arch}\b", ptx, re.M)
    assert nvcc.assemble(ptx.encode(), arch)[:4] == b"\x7fELF"        # ptxas accepts it: a cubin
    assert (outdir / gpu["fatbin"]).stat().st_size > 0
    entries, kernels = ptx_entries(ptx), cuda.kernel_sources(source)
    # every int8 conv / matmul kernel (dp4a_ operands) computes with dp4a: one launch per linear
    # layer (layers of the same shape share a kernel)
    laid_out = {k for k, body in kernels.items() if re.search(r"\bdp4a_(conv2d|matmul)", body)}
    on_dp4a = {k for k, body in entries.items() if re.search(r"\bdp4a\.u32\.s32\b", body)}
    assert laid_out == on_dp4a == set(gpu["dp4a_kernels"])
    assert gpu["dp4a_launches"] == linear_layers(onnx.load(files.onnx))
    # the integer region: kernels without a float operand have no float instruction
    integer = [k for k, body in kernels.items()
               if not re.search(r"\b(float|half|double|__nv_bfloat16)\s*\*", body.split("{", 1)[0])]
    assert integer and len(integer) < len(kernels)          # the boundary (quantize, dequantize) is float
    for k in integer:
        assert not FLOAT_INSTRUCTION.search(entries[k]), k
    if name in ("digits_vit", "deit_tiny"):     # I-LayerNorm / pooling rows reduce across a warp
        assert gpu["row_reduction_kernels"]
        assert all("shfl.sync" in entries[k] for k in gpu["row_reduction_kernels"])


@pytest.mark.parametrize("name", ["digits_cnn", "digits_vit", "mobilenet_v1_025"])
def test_dp4a_layouts_compute_the_golden_integers(name, monkeypatch):
    """The CUDA graph (channels-last convs padded once, channels to 4, weights transposed for
    dp4a) built for this CPU is bit-exact with the golden reference: only the schedules differ
    between it and the GPU build."""
    from codegen.cuda.backend import cuda_units

    files = zoo.ensure(name)
    calib = files.calibration()
    real = lowering.lower_qdq
    monkeypatch.setattr(driver, "lower_qdq", lambda mod, variants, **_: real(mod, variants, units=cuda_units()))
    # all activations 8-bit: dp4a's layout is for 8-bit inputs (a widened 16-bit one takes the generic path;
    # MobileNetV1-0.25's fidelity trial widens its input since the trials keep the model's opset)
    art, qdq, variants = compile_with_golden(files.onnx, calib=calib, fidelity=None)
    assert art.manifest.integer_only
    # the dp4a layout is the one built: the first convolution's 1 or 3 input channels stored as 4
    first = art.manifest.quantization["weights"][0]
    out_channels, channels, kh, kw = first["shape"]
    assert first["op"] == "conv2d" and channels in (1, 3) and first["bytes"] == out_channels * kh * kw * 4
    assert_golden_per_sample(art, qdq, variants, zoo.get(name).samples(3, seed=5))


def test_without_nvcc_the_library_keeps_the_source_and_warns(mlp_path, tmp_path):
    env_path = tmp_path / "no-cuda"             # CUDA_PATH set: nvcc is looked for there only
    out = tmp_path / "out"
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))
    res = subprocess.run([sys.executable, "-m", "compiler.cli", "compile", str(mlp_path), "--calib", str(calib),
                          "--target", "cuda", "-o", str(out)], capture_output=True, text=True,
                         env={**os.environ, "CUDA_PATH": str(env_path)}, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    warning = [ln for ln in res.stderr.splitlines() if "nvcc not found" in ln]
    assert len(warning) == 1 and "no PTX or cubin" in warning[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["host"] == {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu"}    # any x86-64 host
    gpu = manifest["build"]
    assert gpu["ptx"] is None and gpu["fatbin"] is None and gpu["nvcc"] is None
    assert sorted(p.name for p in out.iterdir()) == ["kernels.cu", "manifest.json", "model.so"]
    # the library embeds the CUDA source, which TVM compiles when a GPU machine loads it
    kernel = next(iter(cuda.kernel_sources((out / "kernels.cu").read_text())))
    assert kernel.encode() in (out / "model.so").read_bytes()
    assert "__dp4a(" in (out / "kernels.cu").read_text()


def test_loading_answers_the_compile_callback_with_the_shipped_fatbin():
    """What TVM's runtime calls to compile a library's CUDA source at load time gets the
    artifact's fatbin for that source, without a compiler (the load itself needs a GPU: tests/gpu)."""
    import tvm

    from codegen.cuda import loader

    source = 'extern "C" __global__ void lowbit_probe_kernel() {}\n'
    loader.provide(source, b"\x50\xed\x55\xba fatbin")
    assert tvm.get_global_func("tvm_callback_cuda_compile")(source) == b"\x50\xed\x55\xba fatbin"


def test_cuda_flag_errors(mlp_path):
    res = run_cli("compile", str(mlp_path), "--target", "cuda", "--arch", "sm_52", "-o", "/tmp/lowbit-never")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--arch sm_52" in res.stderr
    res = run_cli("compile", str(mlp_path), "--arch", "sm_80", "-o", "/tmp/lowbit-never")
    assert res.returncode == 2 and "--arch is for --target cuda" in res.stderr


def test_a_cuda_artifact_refuses_to_run_without_a_gpu(tmp_path, mlp_path):
    import runtime
    from codegen.cuda.loader import gpu_present

    if gpu_present():
        pytest.skip("this machine has a CUDA GPU; tests/gpu runs the artifacts")
    calib = {"x": np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)}
    compiler.compile(mlp_path, options=CompileOptions(target="cuda", calib=calib)).save(tmp_path / "a")
    art = runtime.load(tmp_path / "a")
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 8), np.float32))
    res = run_cli("run", str(tmp_path / "a"), "--input", str(tmp_path / "x.npz"), "-o", str(tmp_path / "o.npz"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    with pytest.raises(UserError, match="no CUDA GPU"):
        art.run(np.zeros((1, 8), np.float32))


def test_gpu_bench_table_and_refusal_without_a_gpu(tmp_path):
    from codegen.cuda.loader import gpu_present
    from compiler.tools import bench, bench_gpu

    rows = [bench.Row(n, ms, ms * 0.9, ms * 1.1, 1.0, 1.0, 0.0, cos, None)
            for n, ms, cos in (("lowbit-int8", 2.0, 0.995), ("lowbit-fp32", 9.0, 1.0), ("tvm-fp32", 7.0, 1.0),
                               ("tvm-fp16", 3.0, 0.9999))]
    table = bench_gpu.markdown([bench.BenchResult("deit_tiny", 1, 10, {}, 4, rows, {}, "lowbit-fp32", 8, "H100")])
    line = table.splitlines()[-1]
    assert "| deit_tiny | 8 | H100 |" in line and "| 4.50x | 3.50x | 1.50x | 0.9950 |" in line and "| - |" in line
    if not gpu_present():
        res = subprocess.run([sys.executable, "-m", "compiler.tools.bench_gpu", "deit_tiny", "--out", str(tmp_path / "g")],
                             capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 2 and "no CUDA GPU" in res.stderr and not (tmp_path / "g").exists()
