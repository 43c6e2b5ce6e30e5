"""OpenVINO baselines: the engine Intel-CPU users compare against first.

* ``ov-fp32``: the FP32 model with ``INFERENCE_PRECISION_HINT=f32``.  On an AMX CPU OpenVINO otherwise
  runs it in bf16, which is another precision, not FP32.
* ``ov-int8``: NNCF post-training quantization of the FP32 model on the same calibration samples as
  every other INT8 runner (``ModelType.TRANSFORMER`` where the model has attention), which is OpenVINO's
  own INT8 path.  Its float remainder (NNCF keeps LayerNorm, Softmax, GELU and most adds in float)
  runs at OpenVINO's default precision for the CPU (bf16 on AMX); the runner records which.
* ``ov-as-given``: an already-quantized QDQ file, which OpenVINO's ONNX frontend turns into
  FakeQuantize and executes in int8.

Every runner is compiled for latency: ``PERFORMANCE_HINT=LATENCY``, one stream, and
``INFERENCE_NUM_THREADS`` equal to the thread count the other runtimes get.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from compiler.quantize import is_quantized
from compiler.tools.ort import is_transformer
from runtime.errors import UserError

AS_GIVEN = "ov-as-given"


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("nncf") is not None


def require() -> None:
    if not available():
        raise UserError("the OpenVINO baselines need the openvino and nncf packages: `make bench` installs them "
                        "(pip install -e '.[bench]')")


@dataclass
class OvRunner:
    """One compiled OpenVINO model; called with a feed dict, returns the outputs by name."""
    name: str
    model: object                   # an openvino.Model, or an ONNX path
    threads: int
    precision: str | None = None    # INFERENCE_PRECISION_HINT, or None for OpenVINO's default
    config: dict = field(init=False)

    def __post_init__(self):
        import openvino as ov

        core = ov.Core()
        self.config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": self.threads}
        if self.precision:
            self.config["INFERENCE_PRECISION_HINT"] = self.precision
        model = core.read_model(self.model) if isinstance(self.model, str) else self.model
        self.compiled = core.compile_model(model, "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        # what OpenVINO chose where it was not told (bf16 on AMX for ov-int8's float remainder)
        self.ran_at = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.request.infer(dict(feeds))
        return {name: np.asarray(result[out]) for name, out in zip(self.output_names, self.compiled.outputs,
                                                                    strict=True)}


def nncf_int8(model_path: str, calib: Mapping[str, np.ndarray]):
    """NNCF PTQ of the FP32 model on every calibration sample, one at a time (the model's batch may be
    fixed at 1)."""
    import logging

    import nncf
    import openvino as ov

    proto = onnx.load(model_path, load_external_data=False)
    n = len(next(iter(calib.values())))
    samples = [{k: v[i : i + 1] for k, v in calib.items()} for i in range(n)]
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):     # its progress bars
        return nncf.quantize(ov.Core().read_model(model_path), nncf.Dataset(samples), subset_size=n,
                             model_type=nncf.ModelType.TRANSFORMER if is_transformer(proto) else None)


def variants(model_path: str, calib: Mapping[str, np.ndarray]) -> list[tuple[str, object, str | None]]:
    """(name, model, precision hint) of the OpenVINO runners that apply: the QDQ file as given for a
    quantized model, else FP32 at f32 and NNCF's INT8."""
    require()
    if is_quantized(onnx.load(model_path, load_external_data=False)):
        return [(AS_GIVEN, model_path, None)]
    return [("ov-fp32", model_path, "f32"), ("ov-int8", nncf_int8(model_path, calib), None)]


def baselines(models: list[tuple[str, object, str | None]], threads: int) -> list[OvRunner]:
    return [OvRunner(name, model, threads, precision) for name, model, precision in models]
