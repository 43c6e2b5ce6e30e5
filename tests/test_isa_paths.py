"""One answer per integer model, whatever the CPU: every x86 ISA path this machine executes
(generic, AVX2, AVX-VNNI, AVX-512 VNNI, AMX: conftest.ISA_PATHS, chosen by --mcpu) gives
bit-identical outputs, equal to the golden interpreter's, on inputs that include values a
thousand times past the calibrated range on both sides (the input quantize saturates)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compile_with_golden, runnable_cpus
from fuzzing import check_integer, examples
from hypothesis import HealthCheck, given, settings

from models import zoo
from runtime import golden

CPUS = runnable_cpus()


def extreme_inputs(calib: np.ndarray, n: int = 1) -> np.ndarray:
    """Calibration samples, then the same scaled by +1000 and -1000."""
    x = calib[:n].copy()
    return np.concatenate([x, x * 1000.0, x * -1000.0]).astype(np.float32)


@pytest.mark.parametrize("name", ["digits_cnn", "digits_vit", "resnet8"])
def test_zoo_models_are_bit_identical_on_every_isa_path(name):
    files = zoo.ensure(name)
    calib = files.calibration()
    x = extreme_inputs(calib[zoo.INPUT])
    print(f"ISA paths run here: {CPUS}")
    want = None
    for cpu in CPUS:
        art, qdq, variants = compile_with_golden(files.onnx, target_options={"mcpu": cpu}, calib=calib)
        assert art.manifest.integer_only, art.manifest.integer_region
        if want is None:        # one reference: every path must give the first one's answer, golden's
            want = np.concatenate([golden.run_qdq(qdq, {zoo.INPUT: x[i:i + 1]}, variants)[zoo.OUTPUT]
                                   for i in range(len(x))])
        np.testing.assert_array_equal(art.run({zoo.INPUT: x})[zoo.OUTPUT], want, err_msg=f"{name} on {cpu}")


@settings(max_examples=2, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(model=examples())
def test_a_random_model_is_bit_identical_on_every_isa_path(model):
    """A fuzz example (its last sample 1000x out of range) on each path in turn, each bit-exact
    with golden: so all of them are equal."""
    for cpu in CPUS:
        check_integer(model, cpu=cpu)
