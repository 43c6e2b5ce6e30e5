"""Latency tables (compiler/planning/latency.py): every layer's kernel found, timed at each width, cached,
and budgeted by the ILP.  No timing is asserted beyond being measured: the machine is noisy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import concat_cnn, run_cli

import compiler
from compiler import driver, frontend
from compiler.options import CompileOptions
from compiler.planning import latency, sensitivity
from compiler.planning.bitplan import BITS


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "latency"


def _calib(seed=0):
    return {"x": np.random.default_rng(seed).normal(size=(16, 4, 6, 6)).astype(np.float32)}


def test_manifest_names_the_kernel_of_every_layer():
    art = compiler.compile(concat_cnn(), options=CompileOptions(calib=_calib(), weight_bits=4, pin=False))
    weights = art.manifest.quantization["weights"]
    kernels = [w["kernel"] for w in weights]
    assert len(set(kernels)) == 3 and all(k in art.manifest.kernels for k in kernels)
    assert all("conv2d" in art.manifest.kernel_ops[k] for k in kernels)


def test_table_covers_every_layer_and_width_and_is_cached(cache, monkeypatch):
    src, calib = frontend.load(concat_cnn()), _calib()
    opts = CompileOptions(calib=calib, weight_bits="mixed", latency_budget=0.5)
    layers = sensitivity.measure(src.proto, calib)
    table = driver.latency_table(src, calib, opts, layers)
    assert list(table) == ["conv_a", "conv_b", "conv_c"]
    assert all(sorted(row) == sorted(BITS) and all(0 < ms < 1e3 and math.isfinite(ms) for ms in row.values())
               for row in table.values())
    assert len(list(cache.glob("*.json"))) == 1

    def no_measure(*args, **kwargs):
        raise AssertionError("measured again although the table is cached")

    monkeypatch.setattr(latency, "measure", no_measure)
    assert driver.latency_table(src, calib, opts, layers) == table
    with pytest.raises(AssertionError, match="measured again"):        # other calibration data: other scales
        driver.latency_table(src, _calib(seed=1), opts, layers)


def test_latency_budget_bounds_the_plan(cache):
    src, calib = frontend.load(concat_cnn()), _calib()
    opts = CompileOptions(calib=calib, weight_bits="mixed", latency_budget=0.0, pin=False)
    art = compiler.compile(src.proto, options=opts)
    q = art.manifest.quantization
    table = driver.latency_table(src, calib, opts, sensitivity.measure(src.proto, calib))     # cached: the same
    spent = sum(table[name][bits] for name, bits in q["bit_plan"].items())
    fastest = sum(min(row.values()) for row in table.values())
    assert spent == pytest.approx(fastest) and q["budgets"]["latency"] == pytest.approx(fastest, abs=1e-3)


def test_plan_cli_prints_the_latency_columns(tmp_path, cache):
    import onnx

    path, calib = tmp_path / "cnn.onnx", tmp_path / "calib.npz"
    onnx.save(concat_cnn(), path)
    np.savez(calib, **_calib())
    ok = run_cli("plan", path, "--calib", calib, "--latency-budget", "1000ms", "--size-budget", "0.5")
    assert ok.returncode == 0, ok.stderr
    assert "ms@8" in ok.stdout and "latency" in ok.stdout and "budget 1000" in ok.stdout
    bad = run_cli("plan", path, "--calib", calib, "--latency-budget", "1e-6ms")
    assert bad.returncode == 2 and "smallest feasible latency is" in bad.stderr and "Traceback" not in bad.stderr


def test_no_integer_kernels_no_table(tmp_path, cache):
    """A model whose last op runs in float (a softmax over the batch axis, after the last layer)
    has no kernel per layer: ``plan`` still plans without
    times, a latency budget is a user error."""
    import onnx
    from conftest import make_model
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
                        helper.make_node("MatMul", ["h", "w2"], ["s"], name="fc2"),
                        helper.make_node("Softmax", ["s"], ["y"], name="act", axis=0)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                       [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
                        for n, s in (("w1", (8, 16)), ("w2", (16, 4)))])
    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, path)
    np.savez(calib, x=rng.normal(size=(32, 8)).astype(np.float32))
    ok = run_cli("plan", path, "--calib", calib, "--size-budget", "0.5", "--no-pin")
    assert ok.returncode == 0 and "no latency table" in ok.stderr and "latency" not in ok.stdout.split("\n")[-3]
    bad = run_cli("plan", path, "--calib", calib, "--latency-budget", "0.5")
    assert bad.returncode == 2 and "per-layer times cannot be measured" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_source_hash_reads_the_compiler(tmp_path, monkeypatch):
    """A cached table is keyed by the compiler's sources: the hash must see them (it read nothing
    for a while after the module moved), and any edit to one must change it."""
    assert all((latency.ROOT / pkg / "__init__.py").is_file() for pkg in latency.SOURCES)
    for pkg in latency.SOURCES:
        (tmp_path / pkg / "sub").mkdir(parents=True)
        (tmp_path / pkg / "sub" / "m.py").write_text("x = 1\n")
    monkeypatch.setattr(latency, "ROOT", tmp_path)
    before = latency._source_hash()
    (tmp_path / "passes" / "sub" / "m.py").write_text("x = 2\n")
    assert latency._source_hash() != before
