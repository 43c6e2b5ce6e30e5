"""Every zoo model: exported within ORT's limits, compiled FP32 for llvm, equal to ORT,
and the trained digits models reach their accuracy."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import compiler
from models import data, zoo

ALL = list(zoo.ENTRIES)
FP32_ATOL = 1e-4


@pytest.fixture(scope="module", params=ALL)
def built(request):
    name = request.param
    files = zoo.ensure(name)
    return name, files, compiler.compile(files.onnx)


def test_export_is_valid_onnx_with_symbolic_batch(built):
    name, files, art = built
    m = onnx.load(files.onnx)
    assert m.ir_version <= zoo.MAX_IR_VERSION
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [zoo.OPSET]
    assert art.manifest.inputs[0].shape == ("batch", *zoo.get(name).sample_shape)
    calib = files.calibration()[zoo.INPUT]
    assert calib.shape == (zoo.CALIB_SAMPLES[zoo.get(name).kind], *zoo.get(name).sample_shape)
    assert np.isfinite(calib).all()


def test_fp32_matches_ort(built):
    name, files, art = built
    x = zoo.get(name).samples(2, seed=99)
    got = art.run(x)[zoo.OUTPUT]
    want = ort.InferenceSession(str(files.onnx), providers=["CPUExecutionProvider"]).run(None, {zoo.INPUT: x})[0]
    assert got.shape == want.shape
    assert np.abs(want).max() > 0.1        # not a degenerate (all-zero) model
    err = np.abs(got - want).max()
    assert err <= FP32_ATOL, f"{name}: max |lowbit - ORT| = {err:.3g}"


@pytest.mark.parametrize("name", ["digits_cnn", "digits_vit"])
def test_trained_digits_models_reach_97_percent(name):
    art = compiler.compile(zoo.ensure(name).onnx)
    test = data.digits("test")
    acc = (art.run(test.x)[zoo.OUTPUT].argmax(1) == test.y).mean()
    assert acc >= 0.97, f"{name}: clean test accuracy {acc:.3f}"


def test_cache_is_keyed_by_recipe(monkeypatch, tmp_path):
    e = zoo.get("fc_autoencoder")
    h = e.recipe_hash()
    assert zoo.files("fc_autoencoder").onnx.name == f"fc_autoencoder-{h}.onnx"
    changed = zoo.Entry(**{**e.__dict__, "arch_kwargs": {**e.arch_kwargs, "hidden": 64}})
    assert changed.recipe_hash() != h
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    f = zoo.ensure("fc_autoencoder")
    assert f.onnx.parent == tmp_path / "zoo" and f.onnx.exists() and f.info.exists()
    assert sorted(p.name for p in (tmp_path / "zoo").iterdir()) == sorted([f.onnx.name, f.calib.name, f.info.name])


def test_perturbed_set_is_fixed_and_harder():
    a, b = data.digits("perturbed"), data.digits("perturbed")
    np.testing.assert_array_equal(a.x, b.x)
    clean = data.digits("test")
    assert a.x.shape == clean.x.shape and (a.y == clean.y).all()
    assert np.abs(a.x - clean.x).mean() > 0.1


def test_concurrent_builds_of_one_entry_build_it_once(monkeypatch, tmp_path):
    """Two processes (test workers, a report beside a compile) asking for one entry: the second waits
    on the first's lock and takes its files, instead of training again or failing its rename."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    calls = []

    def slow_build(e, onnx_path, calib_path):
        calls.append(e.name)
        time.sleep(0.5)         # long enough that the other thread arrives while this one builds
        onnx_path.write_bytes(b"model")
        calib_path.write_bytes(b"calib")
        return {"name": e.name}

    monkeypatch.setattr(zoo, "_build", slow_build)
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: zoo.ensure("fc_autoencoder"), range(2)))
    assert calls == ["fc_autoencoder"] and got[0] == got[1] and got[0].onnx.read_bytes() == b"model"
