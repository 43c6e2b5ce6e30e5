"""Differential fuzzing (hypothesis): random small graphs (tests/fuzzing.py), lowbit FP32 against
ONNX Runtime, lowbit's integer builds against the golden reference, bit-exact, on llvm and on rv32
under QEMU.  CI runs a fixed seed and budget; ``make fuzz`` (LOWBIT_FUZZ_EXAMPLES) runs longer.
A failure is shrunk, saved to tests/regressions/, and from then on replayed by
``test_regression`` below."""

from __future__ import annotations

import os

import onnx
import pytest
from fuzzing import REGRESSIONS, check_fp32, check_integer, examples, params_of, save_failure
from hypothesis import HealthCheck, given, settings

CHECKS = {"fp32": check_fp32, "integer-llvm": check_integer, "integer-rv32": lambda m: check_integer(m, "rv32")}
EXAMPLES = int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "0"))      # 0: the CI budgets below
SAVED: dict = {}


def budget(ci: int, share: float = 1.0):
    """CI: ``ci`` examples from a fixed seed; ``make fuzz``: ``share`` of LOWBIT_FUZZ_EXAMPLES, random."""
    return settings(max_examples=max(1, int(EXAMPLES * share)) if EXAMPLES else ci, derandomize=not EXAMPLES,
                    database=None, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


def _saving(check: str, model: onnx.ModelProto) -> None:
    try:
        CHECKS[check](model)
    except Exception:
        save_failure(model, check, SAVED)
        raise


@budget(ci=50)
@given(examples())
def test_fp32_matches_onnxruntime(model):
    _saving("fp32", model)


@budget(ci=50)
@given(examples())
def test_integer_llvm_is_bit_exact_with_the_golden_reference(model):
    _saving("integer-llvm", model)


@budget(ci=10, share=0.1)
@given(model=examples(families=("image",), one_sample=True))
def test_integer_rv32_is_bit_exact_with_the_golden_reference(model, rv32_toolchain):
    _saving("integer-rv32", model)


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.onnx")), ids=lambda p: p.stem)
def test_regression(path, request):
    """Every failure fuzzing found, shrunk: fixed, and staying fixed."""
    model = onnx.load(path)
    check = params_of(model)["check"]
    if check == "integer-rv32":
        request.getfixturevalue("rv32_toolchain")
    CHECKS[check](model)
