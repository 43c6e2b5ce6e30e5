"""On a CUDA GPU (the device tool's machines, when lent): every zoo model's CUDA build runs
bit-exact against the golden reference, with no compiler on the load path (the artifact's
fatbin).  Skips, saying why, on a machine without a GPU."""

from __future__ import annotations

import pytest
from conftest import assert_golden_per_sample, compile_with_golden

from models import zoo


@pytest.fixture(scope="session")
def gpu_arch():
    from codegen.cuda.loader import gpu_present

    if not gpu_present():
        pytest.skip("no CUDA GPU on this machine (tvm.cuda() does not exist): the GPU runs need one")
    from compiler.tools.bench_gpu import gpu_arch

    return gpu_arch()


@pytest.mark.parametrize("name", list(zoo.ENTRIES))
def test_zoo_model_bit_exact_on_the_gpu(name, gpu_arch, tmp_path, monkeypatch):
    import runtime

    files = zoo.ensure(name)
    calib = files.calibration()
    built, qdq, variants = compile_with_golden(files.onnx, target="cuda", target_options={"arch": gpu_arch}, calib=calib)
    built.save(tmp_path / "a")
    # loading must not compile: the fatbin built here is what runs
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "none-expected")
    art = runtime.load(tmp_path / "a")
    assert_golden_per_sample(art, qdq, variants, zoo.get(name).samples(4, seed=21))
