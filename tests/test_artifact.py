"""Compile, run, save, load: the artifact contract and its atomicity."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import mlp_model

import compiler
import runtime
from runtime.artifact import MANIFEST, Artifact
from runtime.errors import UserError


@pytest.fixture(scope="module")
def mlp_artifact() -> Artifact:
    return compiler.compile(mlp_model(batch="N"))


def _ort(x):
    return ort.InferenceSession(mlp_model(batch="N").SerializeToString())\
        .run(None, {"x": x})[0]


@pytest.mark.parametrize("batch", [1, 7])
def test_symbolic_batch_runs_any_batch_and_matches_ort(mlp_artifact, batch):
    x = np.random.default_rng(batch).normal(size=(batch, 8)).astype(np.float32)
    y = mlp_artifact.run({"x": x})["y"]
    assert y.shape == (batch, 4)
    np.testing.assert_allclose(y, _ort(x), atol=1e-5, rtol=0)


def test_manifest_describes_the_build(mlp_artifact):
    m = mlp_artifact.manifest
    assert m.precision == "fp32" and m.target["kind"] == "llvm" and m.target["mcpu"]
    assert [(s.name, s.shape, s.dtype) for s in m.inputs] == [("x", ("N", 8), "float32")]
    assert [(s.name, s.shape, s.dtype) for s in m.outputs] == [("y", ("N", 4), "float32")]
    assert m.weight_bytes == (8 * 16 + 16 + 16 * 4) * 4
    assert m.op_histogram["relax.matmul"] == 2
    # the fusing pipeline put bias-add and ReLU into the first matmul's kernel
    assert any("matmul" in k and "relu" in k for k in m.kernels), m.kernels
    assert m.versions["apache-tvm"] == "0.27.0.post1"
    assert m.quant is None
    assert not m.integer_only and "no quantized region" in m.integer_region


def test_save_load_roundtrip(mlp_artifact, tmp_path):
    out = tmp_path / "art"
    mlp_artifact.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.so"]
    loaded = runtime.load(out)
    assert loaded.manifest == mlp_artifact.manifest
    x = np.ones((2, 8), np.float32)
    np.testing.assert_array_equal(loaded.run(x)["y"], mlp_artifact.run(x)["y"])
    # a loaded artifact saves again (copying its library)
    loaded.save(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / MANIFEST).read_text()) == json.loads((out / MANIFEST).read_text())


def test_failed_save_leaves_nothing_behind(mlp_artifact, tmp_path, monkeypatch):
    class Boom(RuntimeError):
        pass

    def fail(*a, **k):
        raise Boom("disk full")

    art = Artifact(mlp_artifact.manifest, type("M", (), {"export_library": fail})())
    with pytest.raises(Boom):
        art.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_artifact(mlp_artifact, tmp_path):
    out = tmp_path / "out"
    mlp_artifact.save(out)
    before = (out / "model.so").read_bytes()

    def fail(*a, **k):
        raise OSError("disk full")

    with pytest.raises(OSError):
        Artifact(mlp_artifact.manifest, type("M", (), {"export_library": fail})()).save(out)
    assert (out / "model.so").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_to_overwrite_a_non_artifact_directory(mlp_artifact, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a lowbit artifact; refusing"):
        mlp_artifact.save(tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"


def test_load_rejects_non_artifacts(tmp_path):
    with pytest.raises(UserError, match="not a lowbit artifact"):
        runtime.load(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="unreadable manifest"):
        runtime.load(tmp_path)


def test_static_override_rejects_other_batches(tmp_path):
    art = compiler.compile(mlp_model(batch="N"), input_shapes={"x": (3, 8)})
    assert art.manifest.inputs[0].shape == (3, 8)
    art.run(np.zeros((3, 8), np.float32))
    with pytest.raises(UserError, match=r"shape \(5, 8\), the model expects \(3, 8\)"):
        art.run(np.zeros((5, 8), np.float32))


def test_build_failure_names_the_dynamic_dimension(monkeypatch):
    from codegen import llvm

    def fail(*a, **k):
        raise RuntimeError("InternalError: Check failed: symbolic extent in a static-only schedule")

    monkeypatch.setattr(llvm, "build", fail)
    with pytest.raises(UserError, match=r"symbolic shapes failed: .*dimension 0 is dynamic \('N'\).*x=1,8"):
        compiler.compile(mlp_model(batch="N"))
    with pytest.raises(RuntimeError, match="static-only"):      # static shapes: a real bug, not hidden
        compiler.compile(mlp_model(batch="N"), input_shapes={"x": (2, 8)})
