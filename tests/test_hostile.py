"""Hostile and malformed inputs: a corrupt or malicious model, data file or output path ends in
one line, ``error: ...``, and exit 2 (or a documented warning), never in a traceback, a hang, an
allocation of whatever size a file declares, a read outside the model's directory or a write
outside OUTDIR."""

from __future__ import annotations

import builtins
import collections
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, make_model, mlp_model, one_line_error, run_cli
from onnx import TensorProto, helper, numpy_helper

import compiler
import runtime
from compiler import quantize
from compiler.cli import main
from compiler.options import CompileOptions
from runtime.errors import UserError
from runtime.io import read_tensors
from runtime.types import TensorSpec

X = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)     # the mlp's calibration data
LIMIT = "over lowbit's limit of 2 GiB per tensor"


def _refused(model, **options) -> str:
    """The compile's error message, which must be one line."""
    with pytest.raises(UserError) as e:
        compiler.compile(model, options=CompileOptions(**options))
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _value(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _with_initializer(name: str, fill) -> onnx.ModelProto:
    """The mlp with initializer ``name`` changed by ``fill`` (array -> None, in place)."""
    m = mlp_model()
    t = next(t for t in m.graph.initializer if t.name == name)
    a = numpy_helper.to_array(t).copy()
    fill(a)
    t.CopyFrom(numpy_helper.from_array(a, name))
    return m


# ----------------------------------------------------------------------------------------------
# corrupt files
# ----------------------------------------------------------------------------------------------

def test_random_bytes_are_not_a_model(tmp_path):
    rng = np.random.default_rng(0)
    for i, raw in enumerate([b"", rng.bytes(7), rng.bytes(5000), b"\x0a" * 300, b"PK\x03\x04" + rng.bytes(200)]):
        path = tmp_path / f"junk{i}.onnx"
        path.write_bytes(raw)
        with pytest.raises(UserError, match=f"junk{i}.onnx: .*(truncated|corrupt)"):
            compiler.compile(path)


def _corrupt(kind: str) -> bytes:
    m = mlp_model()
    if kind == "element type of w2 (int8: its data longer than its shape)":
        m.graph.initializer[2].data_type = TensorProto.INT8
    elif kind == "element type of w1 (65: none)":
        m.graph.initializer[0].data_type = 65
    elif kind == "element type of input x (65: none)":
        m.graph.input[0].type.tensor_type.elem_type = 65
    raw = m.SerializeToString()
    if kind == "graph name (not UTF-8)":
        assert raw.count(b"test") == 1
        raw = raw.replace(b"test", b"te\xf3t")
    return raw


@pytest.mark.parametrize("kind, match", [
    ("element type of w2 (int8: its data longer than its shape)", "initializer 'w2' .* does not decode"),
    ("element type of w1 (65: none)", "initializer 'w1' has element type 65, which no ONNX version defines"),
    ("element type of input x (65: none)", "graph input 'x' has element type 65"),
    ("graph name (not UTF-8)", r"field 'name' holds b'te\\xf3t', which is not UTF-8 text"),
])
def test_corruptions_the_onnx_checker_misses(tmp_path, kind, match):
    """Corruptions a bit flip makes (fuzzing found them), each of which crashed a compile: the ONNX
    checker accepts all four (of data sizes it checks only that data is not shorter than its shape)."""
    path = tmp_path / "flipped.onnx"
    path.write_bytes(_corrupt(kind))
    assert "flipped.onnx" in _refused(path, calib=X)
    with pytest.raises(UserError, match=match):
        compiler.compile(path)


def test_bit_flips_in_a_valid_model_never_crash(tmp_path):
    """A flip that lands in a weight's value leaves a valid model, which compiles; any other ends
    in a one-line UserError.  Nothing else may come out."""
    raw = mlp_model().SerializeToString()
    outcomes = collections.Counter()
    for seed in range(24):
        rng = np.random.default_rng(seed)
        flipped = bytearray(raw)
        for i in rng.integers(0, len(raw), int(rng.integers(1, 6))):
            flipped[i] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"flip{seed}.onnx"
        path.write_bytes(flipped)
        try:
            compiler.compile(path)
            outcomes["compiled"] += 1
        except UserError as e:
            assert "\n" not in str(e) and f"flip{seed}.onnx" in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 6, outcomes        # the flips reached the structure, not only weights


# ----------------------------------------------------------------------------------------------
# external data
# ----------------------------------------------------------------------------------------------

def _external(tmp_path: Path, location: str) -> Path:
    """The mlp in tmp_path/model/, its w1 stored as external data at ``location``."""
    m = mlp_model()
    w1 = m.graph.initializer[0]
    w1.ClearField("raw_data")
    w1.data_location = TensorProto.EXTERNAL
    w1.external_data.add(key="location", value=location)
    path = tmp_path / "model" / "mlp.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(m.SerializeToString())
    return path


@pytest.mark.parametrize("how", ["../", "absolute path", "link pointing out"])
def test_external_data_outside_the_model_directory_is_refused_unread(tmp_path, monkeypatch, how):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(8 * 16, np.float32).tobytes())     # a valid w1: were it read, the compile would pass
    location = {"../": "../secret.bin", "absolute path": str(secret), "link pointing out": "w1.bin"}[how]
    path = _external(tmp_path, location)
    if how == "link pointing out":
        os.symlink(secret, path.parent / "w1.bin")
    opened = []

    def spy(real):
        def opener(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                opened.append(os.path.realpath(file))
            return real(file, *args, **kwargs)
        return opener

    for module in (os, io, builtins):
        monkeypatch.setattr(module, "open", spy(module.open))
    msg = _refused(path)
    monkeypatch.undo()
    assert f"tensor 'w1' points its external data at {location!r}, outside the model's directory" in msg
    assert str(secret.resolve()) not in opened and str(path.resolve()) in opened


def test_missing_external_data_is_named(tmp_path):
    path = _external(tmp_path, "w1.bin")
    assert f"tensor 'w1' keeps its data in 'w1.bin', which is missing from {path.parent}" in _refused(path)


# ----------------------------------------------------------------------------------------------
# memory bombs: refused before anything allocates what the file declares
# ----------------------------------------------------------------------------------------------

def _huge_input() -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                      [_value("x", [100000, 100000, 1000])], [_value("y", [100000, 100000, 1000])])


def _lying_initializer() -> onnx.ModelProto:
    m = mlp_model()
    del m.graph.initializer[0].dims[:]
    m.graph.initializer[0].dims.extend([100000, 100000])          # 512 bytes of data
    return m


def _expand_bomb() -> onnx.ModelProto:
    """Small input, scalar output, and between them an Expand only shape inference sees: 298 GiB."""
    shape = numpy_helper.from_array(np.array([100000, 100000, 8], np.int64), "shape")
    return make_model([helper.make_node("Expand", ["x", "shape"], ["big"], name="bomb"),
                       helper.make_node("ReduceMax", ["big"], ["y"], name="max", keepdims=0)],
                      [_value("x", [1, 8])], [_value("y", [])], [shape])


@pytest.mark.parametrize("model, calib, match", [
    (_huge_input, None, "graph input 'x' has shape (100000, 100000, 1000): 36.4 TiB"),
    (_lying_initializer, None, "initializer 'w1' has shape (100000, 100000): 37.3 GiB"),
    (_expand_bomb, None, "output 'big' of node 'bomb' (Expand) has shape (100000, 100000, 8): 298.0 GiB"),
    (_expand_bomb, np.ones((2, 8), np.float32), "output 'big' of node 'bomb' (Expand)"),   # before ORT calibrates
])
def test_huge_declared_shapes_are_refused_at_compile_time(model, calib, match):
    msg = _refused(model(), calib=None if calib is None else {"x": calib})
    assert match in msg and LIMIT in msg


def _npz_declaring(path: Path, shape: tuple[int, ...], payload: bytes) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header.getvalue() + payload)


@pytest.mark.parametrize("shape, match", [
    ((100000, 100000, 1000), "array 'x' declares shape (100000, 100000, 1000) float32, 40000000000000 bytes, " + LIMIT),
    ((4096, 1024), "array 'x' declares shape (4096, 1024) float32 (16777216 bytes) but the file holds 64"),
])
def test_npz_declaring_more_than_it_holds_is_refused_before_allocating(tmp_path, shape, match):
    """numpy allocates an array's declared size before reading it: a 200-byte file must not
    ask for 40 TB, whether it is calibration data or a run's input."""
    path = tmp_path / "data.npz"
    _npz_declaring(path, shape, bytes(64))
    specs = [TensorSpec("x", ("N", 8), "float32")]
    for read in (lambda: quantize.load_calibration(path, specs), lambda: read_tensors(path, specs)):
        with pytest.raises(UserError, match=f"{path}: ") as e:
            read()
        assert match in str(e.value)


# ----------------------------------------------------------------------------------------------
# graph structure, opsets
# ----------------------------------------------------------------------------------------------

def _three_nodes(a_reads="x", b_reads="a", order="ABC") -> onnx.ModelProto:
    c = numpy_helper.from_array(np.ones(4, np.float32), "c")
    nodes = {"A": helper.make_node("Add", [a_reads, "c"], ["a"], name="A"),
             "B": helper.make_node("Relu", [b_reads], ["b"], name="B"),
             "C": helper.make_node("Neg", ["b"], ["y"], name="C")}
    return make_model([nodes[k] for k in order], [_value("x", [4])], [_value("y", [4])], [c])


@pytest.mark.parametrize("model, match", [
    (_three_nodes(a_reads="b"), r"the graph has a cycle: node '(A|B)' \((Add|Relu)\) -> node '(A|B)' .* -> "),
    (_three_nodes(b_reads="b"), r"the graph has a cycle: node 'B' \(Relu\) -> node 'B' \(Relu\)"),
    (_three_nodes(b_reads="nowhere"), r"node 'B' \(Relu\) reads tensor 'nowhere', which no node, graph input"),
    (_three_nodes(order="BAC"), r"node 'B' \(Relu\) reads tensor 'a' before node 'A' \(Add\) produces it"),
])
def test_cycles_dangling_edges_and_order_name_the_nodes(model, match):
    assert re.search("invalid ONNX model: " + match, _refused(model))


@pytest.mark.parametrize("opset", [6, 30])
def test_unsupported_opset_names_the_supported_range(opset):
    m = mlp_model()
    m.opset_import[0].version = opset
    newest = onnx.defs.onnx_opset_version()
    assert f"ONNX opset {opset} is not supported; lowbit reads opsets 7 to {newest}" in _refused(m)


# ----------------------------------------------------------------------------------------------
# NaN, Inf and zero ranges
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, index, value", [("w1", (2, 3), np.nan), ("b1", (5,), np.inf), ("w2", (0, 0), -np.inf)])
def test_non_finite_weights_are_refused_when_quantizing(name, index, value):
    m = _with_initializer(name, lambda a: a.__setitem__(index, value))
    msg = _refused(m, calib=X)
    assert f"initializer {name!r}" in msg and "1 NaN or Inf value(s)" in msg
    if name == "w1":
        assert "(weights of node 'fc1')" in msg


@pytest.mark.parametrize("name, index, value, nan_out", [("b1", (3,), -np.inf, False), ("w2", (3, 1), np.nan, True)])
def test_fp32_compile_keeps_non_finite_weights_as_ort_does(name, index, value, nan_out):
    """Documented: without quantization a NaN or Inf constant is legitimate (a -inf attention mask)
    and the compiled model computes with it as ONNX Runtime does.  (Not through a ReLU: TVM's
    max(NaN, 0) is 0, ORT's ReLU passes the NaN on.)"""
    m = _with_initializer(name, lambda a: a.__setitem__(index, value))
    got = compiler.compile(m).run({"x": X})["y"]
    want = ort.InferenceSession(m.SerializeToString()).run(None, {"x": X})[0]
    assert np.isnan(got).any() == nan_out
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_non_finite_calibration_data_names_the_array(tmp_path):
    bad = X.copy()
    bad[3, 1] = np.nan
    path = tmp_path / "calib.npz"
    np.savez(path, x=bad)
    assert f"{path}: calibration array 'x' holds 1 NaN or Inf value(s)" in _refused(mlp_model(), calib=str(path))
    bad[3, 1] = np.inf
    assert "calibration data: array 'x' holds NaN or Inf" in _refused(mlp_model(), calib={"x": bad})


def test_a_model_overflowing_on_the_calibration_data_names_the_tensor():
    w = numpy_helper.from_array(np.full((8, 4), 50.0, np.float32), "w")
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                    helper.make_node("Exp", ["h"], ["y"], name="exp")],
                   [_value("x", ["N", 8])], [_value("y", ["N", 4])], [w])
    assert "tensor 'y' is NaN or Inf on the calibration data" in _refused(m, calib={"x": np.abs(X)})


def test_all_zero_calibration_gets_a_usable_scale_and_a_warning(caplog):
    """Calibration data that is all zeros gives the input a zero range: its scale must not be 0
    (division by zero), NaN, or the 1e-8 floor (any real input saturates, and biases quantized
    at s_x * s_w overflow int32, which made even an all-zero input's output wrong)."""
    zeros = np.zeros_like(X)
    art = compiler.compile(mlp_model(), options=CompileOptions(calib={"x": zeros}))
    assert "1 tensor(s) were zero on every calibration sample (x); their range is taken as [-1, 1]" in caplog.text
    scale = art.manifest.quant["x"].scale
    assert np.isfinite(scale) and scale == pytest.approx(2 / 255)
    assert np.isfinite(art.run({"x": X})["y"]).all()
    want = ort.InferenceSession(mlp_model().SerializeToString()).run(None, {"x": zeros[:2]})[0]
    # within 1% of the output's range: the 8-bit hidden layer's and the weights' rounding
    np.testing.assert_allclose(art.run({"x": zeros[:2]})["y"], want, atol=0.01 * np.abs(want).max())


def test_zero_or_non_finite_scale_in_a_given_qdq_model_is_refused():
    qdq, _ = quantize.quantize(mlp_model(), {"x": X})
    for value in (0.0, np.nan, np.inf, -0.5):
        m = onnx.ModelProto()
        m.CopyFrom(qdq)
        scale = next(t for t in m.graph.initializer if t.name == "x_scale")
        scale.CopyFrom(numpy_helper.from_array(np.array(value, np.float32), "x_scale"))
        msg = _refused(m)
        assert f"node 'x_QuantizeLinear' (QuantizeLinear): scale 'x_scale' holds {value}" in msg
        assert "must be positive and finite" in msg
    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    scale = next(t for t in m.graph.initializer if t.name == "w1_scale")      # a pruned channel: allowed
    zeroed = numpy_helper.to_array(scale).copy()
    zeroed[0] = 0
    scale.CopyFrom(numpy_helper.from_array(zeroed, "w1_scale"))
    compiler.compile(m)


# ----------------------------------------------------------------------------------------------
# calibration arrays that do not fit the model
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arrays, match", [
    ({"a": np.ones((4, 4), np.float32)}, "arrays ['a'] but two_inputs takes inputs ['a', 'b']"),
    ({"a": np.ones((4, 4), np.float32), "b": np.ones((4, 4), np.float32), "c": np.ones((4, 4), np.float32)},
     "arrays ['a', 'b', 'c'] but two_inputs takes inputs ['a', 'b']"),
    ({"a": np.ones((4, 4), np.float32), "b": np.ones((4, 4), np.int64)}, "array 'b' is int64; two_inputs input 'b' takes float32"),
    ({"a": np.ones((4, 4), np.float32), "b": np.ones((4, 5), np.float32)},
     "array 'b' has shape (4, 5) but two_inputs input 'b' is (N, 4)"),
])
def test_calibration_arrays_that_do_not_match_the_inputs(tmp_path, arrays, match):
    m = make_model([helper.make_node("Add", ["a", "b"], ["s"], name="add"),
                    helper.make_node("Relu", ["s"], ["y"], name="relu")],
                   [_value("a", ["N", 4]), _value("b", ["N", 4])], [_value("y", ["N", 4])], name="two_inputs")
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    assert f"{path}: {match}" in _refused(m, calib=str(path))


# ----------------------------------------------------------------------------------------------
# OUTDIR
# ----------------------------------------------------------------------------------------------

def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case, match", [
    ("a file", "notes.txt: exists and is not a directory"),
    ("under a file", "notes.txt: is a file, so"),
    ("a web app with a manifest.json", "webapp: exists and is not a lowbit artifact; refusing to overwrite it"),
    ("in a read-only directory", ": directory is not writable"),
])
def test_outdir_that_is_not_ours_is_refused_and_nothing_is_written(tmp_path, mlp_path, capsys, case, match):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "webapp").mkdir()
    (tmp_path / "webapp" / "manifest.json").write_text('{"name": "my app", "start_url": "/"}')
    (tmp_path / "webapp" / "index.html").write_text("<html></html>")
    (tmp_path / "readonly").mkdir(mode=0o500)
    out = {"a file": tmp_path / "notes.txt", "under a file": tmp_path / "notes.txt" / "art",
           "a web app with a manifest.json": tmp_path / "webapp",
           "in a read-only directory": tmp_path / "readonly" / "art"}[case]
    if case == "in a read-only directory" and os.geteuid() == 0:
        # root writes into a 0500 directory; a read-only filesystem stops it too
        out = Path("/sys/lowbit-art")
        try:
            os.rmdir(tempfile.mkdtemp(dir="/sys"))
            pytest.skip("running as root with a writable /sys: no read-only directory to test here")
        except OSError:
            pass
    before = _tree(tmp_path)
    assert main(["-q", "compile", str(mlp_path), "-o", str(out)]) == 2
    assert match in one_line_error(capsys)
    assert _tree(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# processes: a hanging QEMU, a killed compile, the CLI
# ----------------------------------------------------------------------------------------------

def _running(pid: int) -> bool:
    """Whether process ``pid`` is still running (a zombie awaiting its reaper is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("hang", ["QEMU with no program", "a command whose child hangs too"])
def test_a_hanging_qemu_run_times_out_in_one_line_and_leaves_no_process(rv32_toolchain, monkeypatch, tmp_path, hang):
    from codegen.rv32 import qemu, toolchain

    real = toolchain.qemu_command
    child = tmp_path / "child.pid"
    command = {"QEMU with no program": lambda isa, elf="": [a for a in real(isa) if a != "-kernel"],
               "a command whose child hangs too":
                   lambda isa, elf="": ["sh", "-c", f"sleep 120 & echo $! > {child}; sleep 120"]}[hang]
    monkeypatch.setattr(toolchain, "qemu_command", command)
    monkeypatch.setattr(qemu, "TIMEOUT_S", 1)
    monkeypatch.setattr(qemu, "PER_INPUT_S", 0)
    started = []

    class Popen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self.pid)

    monkeypatch.setattr(subprocess, "Popen", Popen)
    with pytest.raises(UserError, match="QEMU did not finish within 1 s") as e:
        qemu._qemu({"isa": "rv32imc"}, tmp_path / "model.elf", 1)
    assert "\n" not in str(e.value) and len(started) == 1
    pids = started + ([int(child.read_text())] if hang.startswith("a command") else [])
    deadline = time.monotonic() + 10            # the kernel's reaping, not lowbit's speed
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_running, pids)), pids


def test_a_killed_compile_leaves_no_partial_artifact(tmp_path, mlp_path):
    """SIGKILL while the artifact is being written (its scratch directory exists): OUTDIR is
    absent, or still the previous artifact, byte for byte; the next compile to it succeeds and
    clears the killed one's leftovers.  Two compiles run at once: one to a new OUTDIR, one over
    an earlier artifact."""
    fresh, previous = tmp_path / "fresh" / "art", tmp_path / "prev" / "art"
    assert main(["-q", "compile", str(mlp_path), "-o", str(previous)]) == 0
    before = _tree(previous)

    def scratch(out: Path) -> list[Path]:
        return [p for p in out.parent.glob(f".{out.name}.*")] if out.parent.exists() else []

    for _ in range(3):                          # a compile that finished before the poll saw it is run again
        if fresh.exists() and not scratch(fresh):
            assert _tree(fresh) == before       # finished, or killed just after its rename: complete
            shutil.rmtree(fresh)
        procs = {out: subprocess.Popen([sys.executable, "-m", "compiler.cli", "-q", "compile", str(mlp_path),
                                        "-o", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
                 for out in (fresh, previous) if not scratch(out)}
        deadline = time.monotonic() + 300       # a hang, not a speed limit
        while procs and time.monotonic() < deadline:
            for out, p in list(procs.items()):
                if scratch(out):
                    p.kill()
                    p.wait()
                    del procs[out]
                elif p.poll() is not None:
                    del procs[out]
            time.sleep(0.002)
        for p in procs.values():
            p.kill()
        if scratch(fresh) and scratch(previous):
            break
    assert scratch(fresh) and scratch(previous), "no compile was caught while writing its artifact"
    assert not fresh.exists()                   # its scratch directory was never renamed into place
    assert _tree(previous) == before            # the old artifact, or (killed after the swap) the same bytes anew
    runtime.load(previous).run({"x": X})
    for out in (fresh, previous):
        assert main(["-q", "compile", str(mlp_path), "-o", str(out)]) == 0
        assert scratch(out) == []
        np.testing.assert_array_equal(runtime.load(out).run({"x": X})["y"], runtime.load(previous).run({"x": X})["y"])


def test_saving_over_an_artifact_swaps_it_in_one_step(tmp_path, mlp_path, monkeypatch):
    """The moment the kill test cannot hit: the old artifact moved away, the new one not yet in.
    One rename that exchanges the two leaves no such moment; here a rename onto OUTDIR fails, as
    a process killed between two renames would stop."""
    from runtime import artifact

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    if not artifact._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is unavailable on this system or filesystem: saves fall back "
                    "to two renames")
    out = tmp_path / "art"
    art = compiler.compile(mlp_path)
    art.save(out)
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out:
            raise OSError("killed before the new artifact was renamed into place")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    art.save(out)
    runtime.load(out).run({"x": X})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "art", "b", "mlp.onnx"]


@pytest.mark.parametrize("hostile", ["random bytes", "external data outside its directory", "huge input shape"])
def test_cli_hostile_model_exit_2_one_line(tmp_path, hostile):
    if hostile == "random bytes":
        path = tmp_path / "junk.onnx"
        path.write_bytes(np.random.default_rng(1).bytes(3000))
    elif hostile == "external data outside its directory":
        path = _external(tmp_path, "../../../../../../../etc/passwd")
    else:
        path = tmp_path / "huge.onnx"
        onnx.save(_huge_input(), path)
    out = tmp_path / "out"
    r = run_cli("compile", path, "-o", out)
    assert r.returncode == 2
    assert one_line_error(r.stderr).startswith(f"error: {path}: ")
    assert not out.exists()
