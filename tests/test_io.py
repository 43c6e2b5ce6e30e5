"""Validation of user tensors against the artifact's input specs."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import UserError
from runtime.io import check_inputs, read_tensors, write_npz
from runtime.types import TensorSpec

SPECS = [TensorSpec("a", ("batch", 3), "float32"), TensorSpec("b", ("batch", 2), "int8")]


def _ok():
    return {"a": np.zeros((4, 3), np.float32), "b": np.zeros((4, 2), np.int8)}


def test_valid_inputs_pass():
    out = check_inputs(_ok(), SPECS, "in.npz")
    assert set(out) == {"a", "b"}


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("b"), r"missing \['b'\]"),
    (lambda d: d.update(c=np.zeros(1)), r"unexpected \['c'\]"),
    (lambda d: d.update(a=np.zeros((4, 3), np.float64)), "dtype float64, the model expects float32"),
    (lambda d: d.update(a=np.zeros((4, 4), np.float32)), r"shape \(4, 4\)"),
    (lambda d: d.update(a=np.zeros((4, 3, 1), np.float32)), r"shape \(4, 3, 1\)"),
    (lambda d: d.update(b=np.zeros((5, 2), np.int8)), r"'b' has shape \(5, 2\)"),   # batch bound to 4 by 'a'
])
def test_invalid_inputs_name_the_problem(mutate, match):
    d = _ok()
    mutate(d)
    with pytest.raises(UserError, match=match) as e:
        check_inputs(d, SPECS, "in.npz")
    assert str(e.value).startswith("in.npz: ") and "\n" not in str(e.value)


def test_bare_array_only_for_single_input():
    with pytest.raises(UserError, match="single-input"):
        check_inputs(np.zeros((1, 3), np.float32), SPECS, "x")
    out = check_inputs(np.zeros((1, 3), np.float32), SPECS[:1], "x")
    assert out["a"].shape == (1, 3)


def test_npy_and_npz_reading(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    assert read_tensors(tmp_path / "x.npy", SPECS[:1])["a"].shape == (2, 3)
    with pytest.raises(UserError, match="plain .npy works only for single-input"):
        read_tensors(tmp_path / "x.npy", SPECS)
    p = write_npz(tmp_path / "out" / "y.npz", _ok())
    assert p.name == "y.npz" and sorted(read_tensors(p, SPECS)) == ["a", "b"]
    (tmp_path / "junk.npz").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="not a readable"):
        read_tensors(tmp_path / "junk.npz", SPECS)
