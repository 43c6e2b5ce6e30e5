"""ONNX Runtime baselines: FP32, and the INT8 variants users actually deploy.

* ``ort-int8``: ``quant_pre_process`` then ``quantize_static`` in QDQ format,
  u8 activations and s8 per-channel weights.  QUInt8 is passed explicitly:
  ORT 1.31 defaults to s8s8, which takes MLAS's slow path on x86 (2.6x slower
  on ResNet-18, ~40x for a plain MatMulInteger).  On a CPU without VNNI the weights
  are 7-bit (``reduce_range``), as ORT advises against vpmaddubsw's saturation.
* For transformers, all-op static quantization wrecks the outputs (softmax
  quantized to u8), so two more variants users pick for fidelity:
  ``ort-int8-wonly`` quantizes only Conv/Gemm and MatMuls with a weight
  initializer, and ``ort-int8-dyn`` is dynamic s8 quantization.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from compiler.quantize import is_quantized

TRANSFORMER_OPS = {"Softmax", "LayerNormalization"}
AS_GIVEN = "ort-as-given"


@dataclass
class OrtRunner:
    name: str
    path: str
    threads: int

    def __post_init__(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        # ORT's pool spin-waits after a run for longer than lowbit's next run takes: interleaved,
        # that doubled lowbit's ResNet-18 time, while ORT without spinning is as fast (20.98 vs
        # 20.62 ms fp32, 2 threads); TVM's pool is set the same way (runtime/threads.py)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, dict(feeds)), strict=True))


class _Reader:
    """ORT CalibrationDataReader over a dict of stacked samples, in fixed-size batches."""

    def __init__(self, calib: Mapping[str, np.ndarray], batch: int):
        n = len(next(iter(calib.values())))
        self._it = iter([{k: v[i : i + batch] for k, v in calib.items()} for i in range(0, n, batch)])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # ORT >= 1.17 may call this; calibration is single-pass here
        pass


def _static_batch(model: onnx.ModelProto) -> int:
    dim = model.graph.input[0].type.tensor_type.shape.dim
    return dim[0].dim_value if dim and dim[0].HasField("dim_value") and dim[0].dim_value > 0 else 8


def weight_op_nodes(model: onnx.ModelProto) -> list[str]:
    """Conv/Gemm nodes, and MatMul nodes with a constant operand (not attention's activation x activation)."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in ("Conv", "Gemm") or (n.op_type == "MatMul" and any(i in consts for i in n.input))]


def is_transformer(model: onnx.ModelProto) -> bool:
    return any(n.op_type in TRANSFORMER_OPS for n in model.graph.node)


def quantize(model_path: str, calib: Mapping[str, np.ndarray], out_path: str, variant: str) -> str:
    """Write an ORT-quantized copy of ``model_path``.  ``variant``: static | wonly | dynamic."""
    root = logging.getLogger()
    level = root.level
    # the quantizer logs a warning per LayerNorm weight it cannot quantize per channel
    root.setLevel(logging.ERROR)
    try:
        return _quantize(model_path, calib, out_path, variant)
    finally:
        root.setLevel(level)


def _quantize(model_path: str, calib: Mapping[str, np.ndarray], out_path: str, variant: str) -> str:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = str(Path(tmp) / "pre.onnx")
        quant_pre_process(model_path, pre, skip_symbolic_shape=False)
        model = onnx.load(pre)
        # pre-processing may leave nodes unnamed; nodes_to_quantize needs names
        for i, n in enumerate(model.graph.node):
            n.name = n.name or f"{n.op_type}_{i}"
        onnx.save(model, pre)
        if variant == "dynamic":
            quantize_dynamic(pre, out_path, weight_type=QuantType.QInt8, per_channel=False)
            return out_path
        quantize_static(
            pre, out_path, _Reader(calib, _static_batch(model)), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
            reduce_range=not host_has_vnni(),
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_quantize=weight_op_nodes(model) if variant == "wonly" else None,
        )
    return out_path


def host_has_vnni() -> bool:
    """Without VNNI, MLAS multiplies u8 x s8 with vpmaddubsw, whose int16 pair sums saturate: ORT
    then asks for 7-bit weights (reduce_range), its documented remedy, or its int8 is not faithful."""
    import tvm

    host = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")()
    return any(bool(host.get(f, False)) for f in ("avx512vnni", "avxvnni"))


def variants(model_path: str, calib: Mapping[str, np.ndarray], workdir: str) -> list[tuple[str, str]]:
    """(name, model path) of FP32 and of the INT8 variants that apply to this model, quantized
    into ``workdir``.  The first is the reference: ``ort-fp32``, or ``ort-as-given`` for a
    quantized model."""
    model = onnx.load(model_path, load_external_data=False)
    if is_quantized(model):         # already quantized: ORT runs it as given (re-quantizing breaks it)
        return [(AS_GIVEN, model_path)]
    kinds = [("ort-int8", "static")]
    if is_transformer(model):
        kinds += [("ort-int8-wonly", "wonly"), ("ort-int8-dyn", "dynamic")]
    return [("ort-fp32", model_path)] + [
        (name, quantize(model_path, calib, os.path.join(workdir, f"{name}.onnx"), variant)) for name, variant in kinds]


def baselines(model_path: str, calib: Mapping[str, np.ndarray], threads: int, workdir: str,
              quantized: list[tuple[str, str]] | None = None) -> list[OrtRunner]:
    """Sessions with ``threads`` intra-op threads over ``variants`` (made here unless given)."""
    return [OrtRunner(name, path, threads) for name, path in quantized or variants(model_path, calib, workdir)]
