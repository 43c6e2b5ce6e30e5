"""Interleaved timing and the ORT baselines (structure and fidelity math; no timed assertions)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from conftest import make_model, mlp_model
from onnx import TensorProto, helper, numpy_helper

from compiler.cli import main
from compiler.tools import bench, ort, ov
from runtime.threads import set_tvm_threads


def test_time_interleaved_rotates_and_samples_every_runner():
    order = []

    def mk(name):
        return lambda feeds: order.append(name) or {"y": feeds["x"]}

    runners = {n: mk(n) for n in ("a", "b", "c")}
    samples, calls = bench.time_interleaved(runners, {"x": np.zeros(1)}, budget_s=0.0, min_rounds=6)
    assert {n: len(s) for n, s in samples.items()} == {"a": 6, "b": 6, "c": 6}
    assert all(c >= 1 for c in calls.values())
    timed = order[9:]                           # after three warm-up calls each
    firsts = [timed[sum(calls[n] + 1 for n in "abc") * r] for r in range(3)]    # + 1: the untimed call
    assert firsts == ["a", "b", "c"]            # each round starts with the next runner


def test_fidelity_math():
    ref = lambda f: {"y": np.array([[1.0, 2.0, 3.0]])}                 # noqa: E731
    off = lambda f: {"y": np.array([[1.0, 3.5, 3.0]])}                 # noqa: E731
    d, cos, top1 = bench.fidelity(off, ref, [{}])
    assert d == 1.5 and top1 == 0.0
    assert abs(cos - (1 + 7 + 9) / (np.sqrt(14) * np.sqrt(1 + 12.25 + 9))) < 1e-12
    d, cos, top1 = bench.fidelity(ref, ref, [{}, {}])
    assert d == 0.0 and abs(cos - 1.0) < 1e-12 and top1 == 1.0


def _attention_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["q"], name="proj"),
        helper.make_node("Transpose", ["q"], ["kt"], perm=[0, 2, 1], name="t"),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Softmax", ["s"], ["y"], axis=-1, name="softmax"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4])], [w])


def test_weight_op_selection_skips_activation_matmuls():
    assert ort.weight_op_nodes(_attention_model()) == ["proj"]
    assert ort.is_transformer(_attention_model()) and not ort.is_transformer(mlp_model())


def test_ort_baseline_variants(tmp_path):
    rng = np.random.default_rng(1)
    for model, x, expect in [
        (mlp_model(), rng.normal(size=(16, 8)), ["ort-fp32", "ort-int8"]),
        (_attention_model(), rng.normal(size=(16, 4, 8)), ["ort-fp32", "ort-int8", "ort-int8-wonly", "ort-int8-dyn"]),
    ]:
        path = tmp_path / "m.onnx"
        onnx.save(model, path)
        calib = {"x": x.astype(np.float32)}
        runners = ort.baselines(str(path), calib, threads=1, workdir=str(tmp_path))
        assert [r.name for r in runners] == expect
        ref = runners[0](calib)
        for r in runners[1:]:
            q = onnx.load(r.path)
            assert any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for n in q.graph.node), r.name
            got = r(calib)
            assert got.keys() == ref.keys()
            # int8 is approximate; a scale or layout bug would be far off
            for k in ref:
                rel = np.abs(got[k] - ref[k]).max() / (np.abs(ref[k]).max() + 1e-9)
                assert rel < 0.15, (r.name, rel)
        static = onnx.load(runners[1].path)
        zp_types = {i.data_type for i in static.graph.initializer if i.name.endswith("_zero_point")}
        assert TensorProto.UINT8 in zp_types           # u8 activations, as asked for explicitly


def test_bench_cli_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model(), path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))
    argv = ["bench", str(path), "--vs", "ort", "--threads", "1", "--calib", str(tmp_path / "calib.npz"),
            "--seconds", "0.5", "--json", str(tmp_path / "b.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("lowbit-int8", "lowbit-fp32", "ort-fp32", "ort-int8"):
        assert name in out
    res, = json.loads((tmp_path / "b.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    # an FP32 model with calibration data: lowbit's integer-only build is the row the ratios refer to
    assert res["rows"][0]["name"] == "lowbit-int8" and rows["lowbit-int8"]["time_vs_lowbit"] == 1.0
    assert rows["ort-fp32"]["speedup_vs_reference"] == 1.0
    assert rows["lowbit-fp32"]["max_abs_diff"] < 1e-4
    assert rows["lowbit-int8"]["cosine"] > 0.99
    assert res["rounds"] >= 10 and res["threads"] == 1 and res["batch"] == 1


@pytest.mark.usefixtures("iree_wheels")
@pytest.mark.parametrize("threads", ["1", "2"])
def test_bench_target_tosa_times_iree_on_the_same_integer_program(tmp_path, capsys, threads):
    """``--target tosa``: lowbit's own rows are its build for this machine, and an iree-int8 row runs
    the same integer program compiled by IREE (local-sync on one thread, local-task on more).  The
    two are bit-exact, so their differences to ORT FP32 are the same numbers."""
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model(batch=1), path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))
    assert main(["bench", str(path), "--target", "tosa", "--vs", "ort", "--threads", threads, "--calib",
                 str(tmp_path / "calib.npz"), "--seconds", "0.3", "--json", str(tmp_path / "b.json")]) == 0
    res, = json.loads((tmp_path / "b.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert {"lowbit-int8", "lowbit-fp32", "iree-int8", "ort-fp32"} <= set(rows)
    assert rows["iree-int8"]["max_abs_diff"] == rows["lowbit-int8"]["max_abs_diff"]
    assert rows["iree-int8"]["cosine"] == rows["lowbit-int8"]["cosine"]
    assert "iree-int8" in bench.markdown([bench.BenchResult(**{**res, "rows": [bench.Row(**r) for r in res["rows"]]})])


def test_bench_of_a_quantized_model_labels_lowbit_int8(tmp_path, capsys):
    fp32 = tmp_path / "m.onnx"
    onnx.save(mlp_model(), fp32)
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    qdq = ort.quantize(str(fp32), {"x": x}, str(tmp_path / "q.onnx"), "static")
    np.savez(tmp_path / "calib.npz", x=x)
    assert main(["bench", qdq, "--threads", "1", "--calib", str(tmp_path / "calib.npz"), "--seconds", "0.3",
                 "--json", str(tmp_path / "b.json")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "b.json").read_text())[0]["rows"]}
    assert rows["lowbit-int8"]["time_vs_lowbit"] == 1.0
    assert rows["ort-as-given"]["speedup_vs_reference"] == 1.0
    assert set(rows) == {"lowbit-int8", "ort-as-given"} | ({"ov-as-given"} if ov.available() else set())
    q = onnx.load(qdq)
    out_dq = next(n for n in q.graph.node if q.graph.output[0].name in n.output)
    lsb = float(next(numpy_helper.to_array(t) for t in q.graph.initializer if t.name == out_dq.input[1]))
    assert rows["lowbit-int8"]["max_abs_diff"] <= lsb * (1 + 1e-5)   # integer-only vs ORT's QDQ: one step


def test_best_int8_is_the_fastest_faithful_variant_else_the_fastest():
    def row(name, ms, cos):
        return bench.Row(name, ms, ms, ms, 1.0, 1.0, 0.0, cos, None)

    def result(*rows):
        return bench.BenchResult("m", 1, 10, {}, 1, [row("lowbit-int8", 5.0, 0.999), *rows], {})

    faithful = result(row("ort-int8", 1.0, 0.95), row("ort-int8-dyn", 3.0, 0.999), row("ort-int8-wonly", 4.0, 0.995))
    assert bench.best_int8(faithful).name == "ort-int8-dyn"
    assert bench.best_int8(result(row("ort-int8", 2.0, 0.9), row("ort-int8-dyn", 1.0, 0.8))).name == "ort-int8-dyn"
    assert bench.best_int8(result()) is None
    table = bench.markdown([faithful])
    assert "| m | 1 | 1 | 5 (5-5) | - | ort-int8-dyn 3 (3-3) |" in table and "| - | 1.67x | - |" in table
    with_ov = result(row("ov-int8", 4.0, 0.998), row("ort-int8", 10.0, 0.999), row("lowbit-fp32", 20.0, 1.0),
                     row("ort-fp32", 16.0, 1.0))
    # lowbit INT8 / OpenVINO INT8, / ORT INT8, lowbit FP32 / ORT FP32, and the two INT8 cosines
    assert "| 1.25x | 0.50x | 1.25x | 0.9990 / 0.9980 |" in bench.markdown([with_ov])


OV = pytest.mark.skipif(not ov.available(), reason="openvino and nncf are not installed (make setup installs them)")


@OV
def test_openvino_baselines(tmp_path):
    """ov-fp32 is FP32 (told f32; OpenVINO would take bf16 on AMX) and matches ORT FP32; ov-int8 is NNCF's
    int8 of the same model on the same calibration samples; a QDQ file runs as given; every runner is
    compiled for latency with one stream and the thread count it is given."""
    rng = np.random.default_rng(2)
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model(), path)
    x = rng.normal(size=(16, 8)).astype(np.float32)
    models = ov.variants(str(path), {"x": x})
    assert [name for name, _, _ in models] == ["ov-fp32", "ov-int8"]
    assert any(op.get_type_name() == "FakeQuantize" for op in models[1][1].get_ops())
    runners = ov.baselines(models, threads=2)
    ref = ort.OrtRunner("ort-fp32", str(path), 1)
    for r in runners:
        assert r.config == {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": 2,
                            **({"INFERENCE_PRECISION_HINT": "f32"} if r.name == "ov-fp32" else {})}
        assert int(r.compiled.get_property("INFERENCE_NUM_THREADS")) == 2
        got, want = r({"x": x})["y"].ravel(), ref({"x": x})["y"].ravel()
        if r.name == "ov-fp32":
            assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
        else:                                               # int8: close, and not the float model
            assert 0.97 < got @ want / (np.linalg.norm(got) * np.linalg.norm(want)) < 1 - 1e-6
    assert runners[0].ran_at == "f32"

    qdq = ort.quantize(str(path), {"x": x}, str(tmp_path / "q.onnx"), "static")
    (name, _, _), = given = ov.variants(qdq, {"x": x})
    assert name == ov.AS_GIVEN
    got, want = ov.baselines(given, 1)[0]({"x": x})["y"], ort.OrtRunner("q", qdq, 1)({"x": x})["y"]
    step = float(numpy_helper.to_array(next(t for t in onnx.load(qdq).graph.initializer
                                            if t.name == next(n for n in onnx.load(qdq).graph.node
                                                              if "y" in n.output).input[1])))
    assert np.abs(got - want).max() <= step * (1 + 1e-5)   # the same QDQ graph in int8: one output step at most


@OV
def test_bench_times_openvino_beside_ort_unless_told_not_to(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model(), path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))
    common = [str(path), "--threads", "1", "--calib", str(tmp_path / "calib.npz"), "--seconds", "0.3", "--json"]
    assert main(["bench", *common, str(tmp_path / "both.json")]) == 0
    res, = json.loads((tmp_path / "both.json").read_text())
    assert {"ov-fp32", "ov-int8"} <= {r["name"] for r in res["rows"]}
    assert res["env"]["ov-fp32 precision"] == "f32" and "openvino" in res["env"]
    assert main(["bench", *common, str(tmp_path / "ort.json"), "--vs", "ort"]) == 0
    res, = json.loads((tmp_path / "ort.json").read_text())
    assert not any(r["name"].startswith("ov-") for r in res["rows"])


def test_resizing_tvms_pool_leaves_the_callers_cores():
    """TVM pins the calling thread to one core for a 1-thread pool and leaves it there; the bench's next
    round (2 threads) then sized OpenVINO's pool by that one core."""
    cores = os.sched_getaffinity(0)
    for t in (1, 2, 1):
        set_tvm_threads(t)
        assert os.sched_getaffinity(0) == cores
