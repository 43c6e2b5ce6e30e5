"""Range observers and quantization parameters."""

from __future__ import annotations

import numpy as np
import pytest

from compiler import calibration as cal


def test_minmax_is_independent_of_batching():
    x = np.random.default_rng(0).normal(size=(64, 3, 5)).astype(np.float32)
    whole, chunks = cal.MinMaxObserver(), cal.MinMaxObserver()
    whole.update(x)
    for i in range(0, 64, 7):
        chunks.update(x[i : i + 7])
    assert whole.range() == chunks.range() == (float(x.min()), float(x.max()))


def test_mean_minmax_averages_each_samples_range_whatever_the_batching():
    """Each sample's min and max count once, so one loud sample moves the range by 1/n of its excess;
    a batch's rows are its samples, and a tensor whose first axis is not the batch's is one sample."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 4, 5)).astype(np.float32)
    x[3] *= 100
    want = (float(x.reshape(12, -1).min(axis=1).astype(np.float64).mean()),
            float(x.reshape(12, -1).max(axis=1).astype(np.float64).mean()))
    whole, chunks = cal.MeanMinMaxObserver(), cal.MeanMinMaxObserver()
    whole.update(x, samples=12)
    for i in range(0, 12, 5):
        chunks.update(x[i : i + 5], samples=len(x[i : i + 5]))
    np.testing.assert_allclose(whole.range(), want, rtol=1e-12)
    np.testing.assert_allclose(chunks.range(), want, rtol=1e-12)
    assert whole.range()[1] < float(x.max()) / 8                # the loud sample's max is 1/12 of the mean
    heads = cal.MeanMinMaxObserver()                            # [heads, ...] of one sample: one range
    heads.update(x, samples=1)
    assert heads.range() == (float(x.min()), float(x.max()))


def test_reservoir_is_bounded_and_uniform(monkeypatch):
    monkeypatch.setattr(cal, "RESERVOIR", 1000)
    obs = cal.PercentileObserver()
    for i in range(50):                                  # 50 batches of 200 values: 0..9999
        obs.update(np.arange(i * 200, (i + 1) * 200, dtype=np.float32))
    assert len(obs.sample) == 1000 and obs.seen == 10000
    # a uniform sample of 0..9999: its mean is near 5000 (std of the mean ~ 91)
    assert abs(obs.sample.mean() - 5000) < 500


def test_percentile_clips_rare_outliers():
    x = np.random.default_rng(1).normal(size=100_000).astype(np.float32)
    x[7] = 1000.0
    mm, pc = cal.MinMaxObserver(), cal.PercentileObserver(99.9)
    mm.update(x)
    pc.update(x)
    assert mm.range()[1] == 1000.0
    assert 2.5 < pc.range()[1] < 4.5


def test_mse_clipping_beats_minmax_on_heavy_tails():
    x = np.random.default_rng(2).laplace(size=50_000).astype(np.float32)
    mm, mse = cal.MinMaxObserver(), cal.MSEObserver(bits=4, scheme="s8")
    mm.update(x)
    mse.update(x)

    def err(rng):
        p = cal.activation_params(*rng, scheme="s8", bits=4)
        return np.mean((cal.fake_quantize(x, p, 4) - x) ** 2)

    assert mse.range()[1] < mm.range()[1]
    assert err(mse.range()) < 0.5 * err(mm.range())


def test_activation_params_make_zero_exact():
    p = cal.activation_params(-0.7, 2.3, "u8")
    assert p.dtype == "uint8" and 0 <= p.zero_point <= 255
    assert cal.fake_quantize(np.zeros(1, np.float32), p)[0] == 0.0
    relu = cal.activation_params(0.0, 6.0, "u8")           # after ReLU: zero point 0, full grid used
    assert relu.zero_point == 0 and abs(relu.scale - 6 / 255) < 1e-7
    sym = cal.activation_params(-3.0, 1.0, "s8")
    assert sym.zero_point == 0 and abs(sym.scale - 3 / 127) < 1e-7
    assert cal.activation_params(2.0, 5.0, "u8").zero_point == 0     # range widened to include 0
    wide = cal.activation_params(-3.0, 1.0, "s16")                  # the residual stream
    assert (wide.dtype, wide.zero_point) == ("int16", 0) and abs(wide.scale - 3 / 32767) < 1e-9
    probs = cal.activation_params(0.0, 1.0, "u16")                  # 16-bit softmax output
    assert (probs.dtype, probs.zero_point) == ("uint16", 0) and abs(probs.scale - 1 / 65535) < 1e-12
    with pytest.raises(ValueError):
        cal.activation_params(0, 1, "u4")


def test_weight_params_per_channel():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 4, 3, 3)).astype(np.float32) * np.arange(1, 7).reshape(6, 1, 1, 1)
    w[2] = 0.0
    q, s = cal.weight_params(w, axis=0)
    assert q.dtype == np.int8 and s.shape == (6,)
    assert np.abs(q).max() == 127 and not q[2].any() and s[2] == cal.MIN_SCALE
    deq = q.astype(np.float32) * s.reshape(6, 1, 1, 1)
    assert np.all(np.abs(deq - w) <= s.reshape(6, 1, 1, 1) / 2 + 1e-7)
    q4, s4 = cal.weight_params(w, axis=0, bits=4)
    assert np.abs(q4).max() == 7
    qm, sm = cal.weight_params(w.reshape(6, -1).T, axis=1)         # a MatMul weight (K, N): per column
    assert sm.shape == (6,) and np.allclose(sm, s)


def test_auto_observer_keeps_exact_ranges_where_matmuls_read():
    """"auto": the exact range for tensors a MatMul, Gemm, Softmax or LayerNorm reads (through views
    and concat), MSE ranges for the rest (a CNN's features)."""
    from onnx import TensorProto, helper

    from compiler import quantize

    node = helper.make_node
    g = helper.make_graph(
        [node("Relu", ["x"], ["r"]), node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2]),
         node("Conv", ["p", "w"], ["y"]), node("Flatten", ["y"], ["f"]), node("MatMul", ["f", "m"], ["z"]),
         node("Softmax", ["z"], ["s"]), node("MatMul", ["s", "z"], ["o"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    assert quantize._exact_range_tensors(helper.make_model(g)) == {"x", "y", "f", "z", "s", "m"}
