"""The RISC-V microcontroller backend: every zoo model bit-exact under QEMU against the golden
reference and the CPU backend, the static memory plan, and its errors."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from conftest import run_cli

import compiler
from codegen import memory_plan
from codegen.memory_plan import Tensor
from codegen.rv32 import toolchain
from compiler import driver, frontend, quantize
from compiler.options import CompileOptions
from models import zoo
from runtime import golden
from runtime.errors import UserError

MODELS = ["digits_cnn", "digits_vit", "ds_cnn", "resnet8", "mobilenet_v1_025", "fc_autoencoder"]


# ----------------------------------------------------------------------------------------------
# the memory planner
# ----------------------------------------------------------------------------------------------

def _check(tensors: list[Tensor], plan: memory_plan.MemoryPlan) -> None:
    for a, b in itertools.combinations(tensors, 2):
        if a.overlaps(b) and plan.inplace.get(a.name) != b.name and plan.inplace.get(b.name) != a.name:
            lo_a, lo_b = plan.offsets[a.name], plan.offsets[b.name]
            assert lo_a + a.size <= lo_b or lo_b + b.size <= lo_a, (a, b, lo_a, lo_b)
    for t in tensors:
        assert plan.offsets[t.name] % memory_plan.ALIGN == 0
        assert plan.offsets[t.name] + t.size <= plan.arena
    assert plan.lower_bound <= plan.arena <= plan.total


def test_planner_never_overlaps_live_tensors():
    rng = np.random.default_rng(0)
    for _ in range(40):
        starts = rng.integers(0, 25, 30)
        tensors = [Tensor(f"t{i}", int(rng.integers(1, 5000)), int(s), int(s + rng.integers(0, 6)))
                   for i, s in enumerate(starts)]
        _check(tensors, memory_plan.plan(tensors))


def test_planner_meets_the_lower_bound_on_a_chain():
    # a chain of layers: each tensor lives from its producer to its consumer, so two are live at a time
    sizes = [3000, 8000, 8000, 4000, 4000, 1000, 200]
    tensors = [Tensor(f"t{i}", s, i, i + 1) for i, s in enumerate(sizes)]
    plan = memory_plan.plan(tensors)
    _check(tensors, plan)
    assert plan.arena == plan.lower_bound == 16000


def test_planner_reuses_an_input_in_place():
    tensors = [Tensor("x", 4096, 0, 1), Tensor("y", 4096, 1, 2), Tensor("z", 64, 2, 2)]
    plan = memory_plan.plan(tensors, inplace={"y": "x"})
    assert plan.offsets["y"] == plan.offsets["x"] and plan.inplace == {"y": "x"}
    assert plan.arena == plan.lower_bound < memory_plan.plan(tensors).total


# ----------------------------------------------------------------------------------------------
# every zoo model under QEMU
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=MODELS)
def built(request, tmp_path_factory, rv32_toolchain):
    name = request.param
    files = zoo.ensure(name)
    model, calib = onnx.load(files.onnx), files.calibration()
    rv32 = compiler.compile(files.onnx, options=CompileOptions(target="rv32", calib=calib))
    outdir = tmp_path_factory.mktemp(name) / "rv32"
    rv32.save(outdir)
    cpu = compiler.compile(files.onnx, options=CompileOptions(calib=calib))
    src = frontend.load(files.onnx)
    _, shapes = driver.quantization_shapes(src, frontend.static_specs(src, frontend.input_specs(src)))
    qdq, report = quantize.quantize(model, calib, shapes=shapes)
    return name, outdir, cpu, qdq, report.variants()


def test_rv32_bit_exact_against_golden_and_cpu(built):
    import runtime

    name, outdir, cpu, qdq, variants = built
    art = runtime.load(outdir)
    assert art.manifest.integer_only and art.manifest.build["isa"] == "rv32imc"
    x = zoo.get(name).samples(3, seed=11)
    batch = art.run({zoo.INPUT: x})[zoo.OUTPUT]            # one QEMU run, sample after sample
    assert batch.shape[0] == len(x)
    for i in range(len(x)):
        feeds = {zoo.INPUT: x[i:i + 1]}
        got = batch[i:i + 1]
        want = golden.run_qdq(qdq, feeds, variants)[zoo.OUTPUT]
        np.testing.assert_array_equal(got, want.reshape(got.shape))
        np.testing.assert_array_equal(got, cpu.run(feeds)[zoo.OUTPUT].reshape(got.shape))


def test_rv32_project_has_no_float_no_malloc_and_a_planned_arena(built):
    _, outdir, *_ = built
    mcu = _manifest(outdir)["build"]
    sources = {f: (outdir / f).read_text() for f in ("kernels.c", "model.c", "model.h")}
    for f, text in sources.items():
        code = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        code = re.sub(r"#define LOWBIT_\w+_(INPUT|OUTPUT)_SCALE .*", "", code)   # the host's dequantize
        assert not re.search(r"\b(float|double|malloc|free)\b", code), f
    header = sources["model.h"]
    up = mcu["function"].removeprefix("lowbit_").removesuffix("_run").upper()      # from the file's name
    assert f"int {mcu['function']}(" in header
    assert re.search(rf"#define LOWBIT_{up}_ARENA_BYTES {mcu['arena_bytes']}\b", header)
    assert re.search(rf"#define LOWBIT_{up}_WEIGHT_BYTES {mcu['weight_bytes']}\b", header)
    # the planner's goal: within 10% of the lower bound every plan must meet
    assert mcu["arena_lower_bound"] <= mcu["arena_bytes"] <= 1.1 * mcu["arena_lower_bound"]


def _manifest(outdir) -> dict:
    import json

    return json.loads((outdir / "manifest.json").read_text())


# ----------------------------------------------------------------------------------------------
# the CLI: profile, the LLVM path, errors
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_cnn(tmp_path_factory):
    files = zoo.ensure("digits_cnn")
    calib = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(calib, **files.calibration())
    return files.onnx, calib


def test_profile_counts_are_deterministic_and_cover_every_call(rv32_toolchain, digits_cnn, tmp_path):
    model, calib = digits_cnn
    out = tmp_path / "cnn"
    r = run_cli("compile", model, "--calib", calib, "--target", "rv32", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    runs = [run_cli("profile", out, "--json", tmp_path / f"p{i}.json") for i in range(2)]
    assert all(p.returncode == 0 for p in runs), runs[0].stderr
    import json

    profiles = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert profiles[0]["calls"] == profiles[1]["calls"]          # -icount shift=0: exact counts
    mcu = _manifest(out)["build"]
    assert [c["kernel"] for c in profiles[0]["calls"]] == _manifest(out)["launch_sequence"]
    assert profiles[0]["macs"] == mcu["macs"] > 0
    assert 0 < profiles[0]["text_bytes"] < profiles[0]["elf_text_bytes"]
    assert "instr/MAC" in runs[0].stdout and "arena" in runs[0].stdout


def test_llvm_and_vector_codegen_link_and_match_the_c_kernels(rv32_toolchain, digits_cnn, tmp_path):
    """--codegen llvm (TVM's LLVM object) for rv32imc and, with RVV (zve32x), vector kernels: both
    bit-exact with GCC's build of the C kernels, and the vector build really vectorized."""
    import runtime

    model, calib = digits_cnn
    builds = {"c": ("rv32imc", "c"), "llvm": ("rv32imc", "llvm"), "rvv": ("rv32imc+zve32x", "llvm")}
    outs = {}
    for name, (march, codegen) in builds.items():
        r = run_cli("compile", model, "--calib", calib, "--target", "rv32", "--march", march, "--codegen", codegen,
                    "-o", tmp_path / name, "-q")
        assert r.returncode == 0, r.stderr
        outs[name] = runtime.load(tmp_path / name)
    assert (tmp_path / "llvm" / "kernels.o").is_file() and not (tmp_path / "llvm" / "kernels.c").exists()
    asm = subprocess.run(["riscv64-unknown-elf-objdump", "-d", str(tmp_path / "rvv" / "kernels.o")],
                         capture_output=True, text=True, check=True).stdout
    assert "vsetvli" in asm and re.search(r"\tv(w?mul|w?macc|add)\.", asm)
    x = zoo.get("digits_cnn").samples(2, seed=5)
    for i in range(len(x)):
        feeds = {zoo.INPUT: x[i:i + 1]}
        want = outs["c"].run(feeds)[zoo.OUTPUT]
        for name in ("llvm", "rvv"):
            np.testing.assert_array_equal(outs[name].run(feeds)[zoo.OUTPUT], want)


def test_ram_limit_names_the_peak_and_the_largest_tensor(rv32_toolchain, tmp_path):
    """ResNet-8's arena is 88 KiB: --ram-limit 64K fails at compile time, in one line."""
    files = zoo.ensure("resnet8")
    calib = tmp_path / "calib.npz"
    np.savez(calib, **files.calibration())
    out = tmp_path / "rn8"
    r = run_cli("compile", files.onnx, "--calib", calib, "--target", "rv32", "--ram-limit", "64K", "-o", out, "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert re.search(r"needs a \d+ B arena .* --ram-limit is 65536 B; the largest tensor is \S+ \(\d+ B", line), line
    assert not out.exists()


def test_missing_toolchain_is_one_line_naming_the_packages(digits_cnn, tmp_path):
    model, calib = digits_cnn
    bare = tmp_path / "bin"
    bare.mkdir()
    os.symlink(shutil.which("python3") or "/usr/bin/python3", bare / "python3")
    env = {**os.environ, "PATH": str(bare)}
    import sys

    r = subprocess.run([sys.executable, "-m", "compiler.cli", "compile", str(model), "--calib", str(calib),
                        "--target", "rv32", "-o", str(tmp_path / "o"), "-q"], capture_output=True, text=True,
                       env=env, cwd=str(os.path.dirname(os.path.dirname(__file__))), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and toolchain.PACKAGES in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_rv32_flags_are_refused_for_other_targets():
    with pytest.raises(UserError, match="--target rv32"):
        CompileOptions(target="llvm", target_options={"march": "rv32imac"})
    with pytest.raises(UserError, match="--march rv64"):
        CompileOptions(target="rv32", target_options={"march": "rv64gc"})
    with pytest.raises(UserError, match="codegen llvm"):
        CompileOptions(target="rv32", target_options={"march": "rv32imc+zve32x"})


def test_in_place_only_for_elementwise_kernels_of_equal_element_size():
    from tvm import te

    from codegen.rv32.kernels import in_place_inputs

    a = te.placeholder((4, 8), "int8", "a")
    b = te.placeholder((1, 8), "int8", "b")
    wide = te.placeholder((4, 8), "int32", "wide")
    add = te.compute((4, 8), lambda i, j: a[i, j] + b[0, j], "add")            # a may be overwritten, b not
    flip = te.compute((8, 4), lambda i, j: a[j, i], "flip")                     # a transpose: no
    narrow = te.compute((4, 8), lambda i, j: wide[i, j].astype("int8"), "narrow")   # 4-byte input: no
    assert in_place_inputs(te.create_prim_func([a, b, add])) == [0]
    assert in_place_inputs(te.create_prim_func([a, flip])) == []
    assert in_place_inputs(te.create_prim_func([wide, narrow])) == []


def test_mixed_precision_weights_stay_packed_in_flash_and_bit_exact(rv32_toolchain, digits_cnn, tmp_path):
    """--bits mixed: 4- and 2-bit weights are packed constants in model.c (less flash), unpacked in
    the kernels, and the rv32 output equals the CPU backend's for the same plan."""
    import runtime

    model, calib = digits_cnn
    plan = ("--bits", "mixed", "--size-budget", "0.5")
    for target in ("rv32", "llvm"):
        r = run_cli("compile", model, "--calib", calib, "--target", target, *plan, "-o", tmp_path / target, "-q")
        assert r.returncode == 0, r.stderr
    mcu, cpu = runtime.load(tmp_path / "rv32"), runtime.load(tmp_path / "llvm")
    assert any(b < 8 for b in mcu.manifest.quantization["bit_plan"].values())
    one_byte_each = sum(int(np.prod(w["shape"])) for w in cpu.manifest.quantization["weights"])
    assert mcu.manifest.build["weight_bytes"] < 0.8 * one_byte_each      # packed (biases, multipliers included)
    x = zoo.get("digits_cnn").samples(3, seed=9)
    np.testing.assert_array_equal(mcu.run({zoo.INPUT: x})[zoo.OUTPUT], cpu.run({zoo.INPUT: x})[zoo.OUTPUT])


def test_bench_points_rv32_at_profile():
    r = run_cli("bench", "digits_cnn", "--target", "rv32", "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "lowbit profile" in r.stderr


def test_a_model_ending_in_a_layout_op_writes_the_callers_output(rv32_toolchain):
    """Concat inside a conv, then Flatten last: the tensor the result is (or is a view of) is the
    caller's output buffer, and the outputs equal the CPU backend's."""
    from conftest import concat_cnn
    from onnx import TensorProto, helper

    model = concat_cnn()
    model.graph.node[-1].output[0] = "y0"
    model.graph.node.append(helper.make_node("Flatten", ["y0"], ["y"], name="flat"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 144]))
    x = np.random.default_rng(0).normal(size=(16, 4, 6, 6)).astype(np.float32)
    mcu, cpu = (compiler.compile(model, options=CompileOptions(target=t, calib={"x": x})) for t in ("rv32", "llvm"))
    got = mcu.run({"x": x[:3]})["y"]
    assert got.shape == (3, 144)
    np.testing.assert_array_equal(got, cpu.run({"x": x[:3]})["y"])
