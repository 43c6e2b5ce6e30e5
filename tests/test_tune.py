"""--tune (codegen/tune.py): meta_schedule's search with lowbit's schedule as the one to beat,
and a database that makes the second compile free.  Tuned kernels must be bit-exact: the test
makes every kernel take its tuned schedule, whatever the timings said."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_vnni import _cnn, _mlp

import compiler
from codegen import tune
from compiler import quantize
from compiler.options import CompileOptions
from runtime import golden
from runtime.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("build", [_mlp, _cnn], ids=["matmul", "conv"])
def test_tuned_kernels_bit_exact_and_second_compile_measures_nothing(build, cache, monkeypatch):
    rng = np.random.default_rng(0)
    model = build(lead=(2,)) if build is _mlp else build()
    name, shape = ("x", (2, 64)) if build is _mlp else ("x", (1, 3, 9, 9))
    calib = {name: rng.normal(size=(8, *shape[1:])).astype(np.float32)}
    opts = CompileOptions(calib=calib, tune=3, input_shapes={name: shape})
    monkeypatch.setattr(tune, "MARGIN", float("inf"))      # any measured tuned schedule replaces ours
    art = compiler.compile(model, options=opts)
    report = art.manifest.tuning
    assert report["searched"] == report["kernels"] > 0 and report["measured"] > 0
    assert report["tuned"], "no kernel took a tuned schedule"
    qdq, _ = quantize.quantize(model, calib, opts.quant_config())
    x = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(art.run({name: x})["y"], golden.run_qdq(qdq, {name: x})["y"])

    db = {p.name: p.read_bytes() for p in tune.database_dir(tune._tuning_target(art.manifest.target)).glob("*.json")}
    assert set(db) == {"database_workload.json", "database_tuning_record.json", tune.VERDICTS}

    def no_search(*args, **kwargs):
        raise AssertionError("the second compile searched")

    monkeypatch.setattr("tvm.s_tir.meta_schedule.tune.tune_tasks", no_search)
    monkeypatch.setattr(tune, "_measure", no_search)
    again = compiler.compile(model, options=opts)
    assert again.manifest.tuning["measured"] == again.manifest.tuning["searched"] == 0
    assert again.manifest.tuning["tuned"] == report["tuned"]
    after = {p.name: p.read_bytes() for p in tune.database_dir(tune._tuning_target(art.manifest.target)).glob("*.json")}
    assert after == db
    np.testing.assert_array_equal(again.run({name: x})["y"], art.run({name: x})["y"])
    verdicts = json.loads(db[tune.VERDICTS])
    assert {v["kernel"] for v in verdicts.values()} == set(report["tuned"]) | {
        v["kernel"] for v in verdicts.values() if v["tuned_us"] is None}


def test_tune_needs_static_shapes_and_this_machine(cache):
    with pytest.raises(UserError, match="--tune needs static shapes.*--input-shape x=1,64"):
        compiler.compile(_mlp(), options=CompileOptions(calib={"x": np.zeros((4, 64), np.float32)}, tune=2))
    with pytest.raises(UserError, match="cannot for aarch64-linux"):
        CompileOptions(target="aarch64-linux", tune=2)
