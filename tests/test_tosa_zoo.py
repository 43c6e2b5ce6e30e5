"""Every zoo model through the TOSA target and IREE, bit-exact (tests/test_tosa.py has the rest; this
file is apart so that pytest-xdist runs the two on different workers)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LARGE, assert_golden_per_sample, compile_with_golden, zoo_calibration

from compiler import driver
from compiler.options import CompileOptions
from models import zoo

pytestmark = pytest.mark.usefixtures("iree_wheels")

ZOO = ["digits_cnn", "digits_vit", "ds_cnn", "resnet8", "mobilenet_v1_025", "fc_autoencoder", "resnet18", "deit_tiny"]


@pytest.mark.parametrize("name", ZOO)
def test_iree_runs_every_zoo_model_bit_exact(name):
    """Each zoo model's integer program through TOSA and IREE equals the golden interpreter on it,
    sample by sample; where its nonlinear variants are one family (the CNNs: none), lowbit's CPU
    build of the same QDQ model too."""
    files = zoo.ensure(name)
    art, qdq, variants = compile_with_golden(files.onnx, calib=zoo_calibration(name), target="tosa")
    assert art.manifest.integer_only and art.manifest.build["tosa_ops"]["tosa.rescale"] > 0
    x = zoo.get(name).samples(1 if name in LARGE else 3, seed=5)
    assert_golden_per_sample(art, qdq, variants, x)
    families = {v for vs in (variants.values() if isinstance(variants, dict) else []) for v in vs
                if v in ("poly", "shift")}
    if len(families) <= 1:
        cpu = driver.compile(qdq, options=CompileOptions(nonlinear=families.pop() if families else "auto"))
        np.testing.assert_array_equal(art.run({zoo.INPUT: x})[zoo.OUTPUT], cpu.run({zoo.INPUT: x})[zoo.OUTPUT])


