"""Accuracy report: ORT FP32, ORT INT8 (QDQ) and lowbit integer-only on a labeled dataset.

    lowbit eval MODEL --data digits [--calib DATA.npz]

All three are calibrated on the same data (by default the zoo's calibration
set, drawn from the training split) and evaluated on the clean and perturbed
test splits.  Columns: top-1 accuracy, top-1 agreement with ORT FP32, and mean
|logit - FP32 logit|.  The perturbed split is where decisions sit near class
boundaries, so it separates quantizers that the clean split cannot.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx

import compiler
from compiler.frontend import input_specs, load
from compiler.options import CompileOptions
from compiler.tools import ort
from models import data, zoo
from runtime.errors import UserError
from runtime.io import read_tensors

DATASETS = ("digits",)
REFERENCE = "ORT FP32"


@dataclass(frozen=True)
class EvalRow:
    runner: str
    top1: dict[str, float]              # split -> accuracy
    agreement: dict[str, float]         # split -> top-1 agreement with ORT FP32
    mean_abs_dlogit: dict[str, float]   # split -> mean |logit - ORT FP32 logit|


@dataclass(frozen=True)
class EvalResult:
    model: str
    dataset: str
    samples: dict[str, int]
    calibration_samples: int
    rows: list[EvalRow]
    notes: dict[str, str]

    def table(self) -> str:
        splits = list(self.samples)
        head = f"{'runner':<18}" + "".join(f"{'top-1 ' + s:>17}" for s in splits) + \
            "".join(f"{'agree ' + s:>17}" for s in splits) + "".join(f"{'|dlogit| ' + s:>20}" for s in splits)
        lines = [f"{self.model} on {self.dataset} ({', '.join(f'{n} {s}' for s, n in self.samples.items())}; "
                 f"calibrated on {self.calibration_samples} samples)", head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.runner:<18}" + "".join(f"{100 * r.top1[s]:>16.1f}%" for s in splits)
                         + "".join(f"{100 * r.agreement[s]:>16.1f}%" for s in splits)
                         + "".join(f"{r.mean_abs_dlogit[s]:>20.4f}" for s in splits))
        lines += ["agree: top-1 agreement with ORT FP32; |dlogit|: mean |logit - ORT FP32 logit|"]
        lines += [f"{k}: {v}" for k, v in self.notes.items()]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def labeled_splits(dataset: str):
    if dataset != "digits":
        raise UserError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    return {s: data.digits(s) for s in ("test", "perturbed")}


def eval_inputs(model: str, calib_path: str | None, dataset: str):
    """(model path, calibration arrays) for eval and pareto: a zoo name or a file; ``calib_path``,
    else the zoo's calibration set, else 256 images of the dataset's training split (never its
    test splits)."""
    labeled_splits(dataset)                         # unknown dataset: fail before any work
    model_path, calib = model, None
    if not os.path.exists(model) and model in zoo.ENTRIES:
        files = zoo.ensure(model)
        model_path = str(files.onnx)
        calib = files.calibration() if not calib_path else None
    specs = input_specs(load(model_path))
    if calib_path:
        calib = read_tensors(calib_path, specs)
    elif calib is None:
        train = data.digits("train").x
        pick = np.random.default_rng(0).choice(len(train), size=min(256, len(train)), replace=False)
        calib = {specs[0].name: train[pick]}
    return model_path, calib


def compile_for_splits(model_path: str, calib: Mapping[str, np.ndarray], splits, **quantization):
    """lowbit integer-only for whole splits at once: a graph with run-time shape arithmetic is
    compiled at the split's size (static shapes).  Returns (artifact, CompileOptions)."""
    name = onnx.load(model_path, load_external_data=False).graph.input[0].name
    sizes = {len(d.x) for d in splits.values()}
    shapes = {name: next(iter(splits.values())).x.shape} if len(sizes) == 1 else {}
    opts = CompileOptions(calib=dict(calib), input_shapes=shapes, **quantization)
    return compiler.compile(model_path, options=opts), opts


def evaluate(model_path: str, calib: Mapping[str, np.ndarray], dataset: str = "digits",
             threads: int = 1, also: tuple[str, ...] = (), **quantization) -> EvalResult:
    """``quantization``: lowbit's CompileOptions fields (observer, nonlinear, weight_bits, budgets...).
    ``also``: more targets whose builds of the same model run here (rv32: under QEMU, codegen/rv32/qemu.py)."""
    splits = labeled_splits(dataset)
    name = onnx.load(model_path, load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        qdq = ort.quantize(model_path, calib, os.path.join(tmp, "ort_int8.onnx"), "static")
        art, opts = compile_for_splits(model_path, calib, splits, **quantization)
        runners = {REFERENCE: ort.OrtRunner(REFERENCE, model_path, threads),
                   "ORT INT8 (QDQ)": ort.OrtRunner("ORT INT8 (QDQ)", qdq, threads),
                   f"lowbit {art.manifest.precision}": art.run}
        for target in also:
            other = compiler.compile(model_path, options=CompileOptions(target=target, calib=dict(calib),
                                                                        **quantization))
            runners[f"lowbit {other.manifest.precision} {target}"] = other.run
        logits = {r: {s: next(iter(run({name: d.x}).values())) for s, d in splits.items()}
                  for r, run in runners.items()}
    ref = logits[REFERENCE]
    rows = [EvalRow(r, {s: float((out[s].argmax(1) == d.y).mean()) for s, d in splits.items()},
                    {s: float((out[s].argmax(1) == ref[s].argmax(1)).mean()) for s in splits},
                    {s: float(np.abs(out[s] - ref[s]).mean()) for s in splits})
            for r, out in logits.items()]
    notes = {"ORT INT8": ("quant_pre_process + quantize_static, QDQ, u8 activations / s8 per-channel weights"
                         + ("" if ort.host_has_vnni() else " (7-bit: no VNNI here)") + ", MinMax"),
             "lowbit": f"{art.manifest.precision}, integer-only: {'yes' if art.manifest.integer_only else 'no'}, "
                       f"observer {opts.observer}, weights {_bits(art.manifest.quantization['weight_bits'])}, "
                       f"activations {'u4 after ReLU, else ' if opts.activation_bits == 4 else ''}u8, "
                       f"{art.manifest.weight_bytes} bytes of constants, "
                       f"{art.manifest.quantization.get('accumulators', '')}"}
    if art.manifest.quantization.get("nonlinear"):
        notes["lowbit non-linears"] = nonlinear_summary(art.manifest.quantization["nonlinear"])
    return EvalResult(os.path.basename(model_path), dataset, {s: len(d.y) for s, d in splits.items()},
                      len(next(iter(calib.values()))), rows, notes)


def _bits(weight_bits) -> str:
    return f"{weight_bits}-bit" if isinstance(weight_bits, int) else str(weight_bits)


def nonlinear_summary(rows: list[dict]) -> str:
    """One line per op kind: how many nodes chose each variant, and the mean / max error."""
    out = []
    for kind in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == kind]
        chosen = {v: sum(r["chosen"] == v for r in mine) for v in dict.fromkeys(r["chosen"] for r in mine)}
        errs = ", ".join(f"{v} mean {np.mean([r['mean_err'][v] for r in mine]):.2e} max "
                         f"{max(r['max_err'][v] for r in mine):.2e}" for v in mine[0]["mean_err"])
        out.append(f"{kind} x{len(mine)} ({', '.join(f'{k} {n}' for k, n in chosen.items())}; {errs})")
    return "; ".join(out)
