"""lowbit as an ONNX backend, and its conformance run over ONNX's node tests.

``LowbitBackend`` implements ``onnx.backend.base.Backend``: ``prepare`` checks the model's
ops against the ones lowbit supports, ``run`` compiles it for this CPU (llvm) and runs the
artifact.  lowbit compiles quantization parameters and shapes into the code, so graph inputs
that the ONNX spec uses as parameters (scales, zero points, target shapes, pads, axes: see
``PARAMETERS``) are bound as constants from the first run's values; a later run with other
values compiles again.

``python -m compiler.tools.conformance`` (``make conformance``) runs every node test that onnx 1.23
generates in memory through ``onnx.backend.test.BackendTest``: the cases whose ops lowbit
supports run, the others count as unsupported.  It prints pass / fail / unsupported per op
(fail split into *rejected*: a clean one-line UserError, *crash*: any other exception, and
*wrong*: a wrong result), and *undefined* for cases whose expected output the spec leaves
undefined (``UNDEFINED``: an out-of-range float -> integer Cast), with ONNX Runtime's passes on
the same cases beside them, writes the results as JSON, and exits 1 when a case of the committed
passing set (``tests/conformance/passing.txt``) no longer passes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import re
import sys
import unittest
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.base import Backend, BackendRep

from compiler import driver, frontend
from passes.defined_semantics import integer_range
from runtime.errors import UserError
from runtime.progress import native_stderr_to_debug

ORT_MAX_IR, ORT_MAX_OPSET = 10, 23
PASSING = Path(__file__).resolve().parents[2] / "tests" / "conformance" / "passing.txt"
QUANTIZATION_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                    "ConvInteger", "DynamicQuantizeLinear")

# input positions the op's spec reads as parameters: quantization parameters, and values that fix
# output shapes (which an ahead-of-time compiler needs as constants)
PARAMETERS = {
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "QLinearConv": (1, 2, 4, 5, 6, 7),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7), "MatMulInteger": (2, 3), "ConvInteger": (2, 3),
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 2, 3), "Squeeze": (1,),
    "Unsqueeze": (1,), "Split": (1,), "TopK": (1,), "ConstantOfShape": (0,), "Resize": (1, 2, 3),
    "ReduceMax": (1,), "ReduceMin": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceProd": (1,),
    "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
    "OneHot": (1,), "Range": (0, 1, 2), "CenterCropPad": (1,),
}


def parameter_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = {vi.name for vi in model.graph.input} - inits
    names = []
    for n in model.graph.node:
        for i in PARAMETERS.get(n.op_type, ()):
            if i < len(n.input) and n.input[i] in graph_inputs and n.input[i] not in names:
                names.append(n.input[i])
    return names


def bind(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with the graph inputs in ``values`` turned into initializers (0-d stays 0-d)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    kept = [vi for vi in m.graph.input if vi.name not in values]
    del m.graph.input[:]
    m.graph.input.extend(kept)
    m.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in values.items())
    return m


class LowbitRep(BackendRep):
    def __init__(self, model: onnx.ModelProto, target: str):
        self.model, self.target = model, target
        inits = {t.name for t in model.graph.initializer}
        self.inputs = [vi.name for vi in model.graph.input if vi.name not in inits]
        self.parameters = parameter_inputs(model)
        self._built: dict[str, object] = {}

    def run(self, inputs, **kwargs):
        feeds = dict(zip(self.inputs, inputs if isinstance(inputs, (list, tuple)) else [inputs], strict=True))
        bound = {k: np.asarray(feeds.pop(k)) for k in self.parameters}
        key = hashlib.sha256(b"".join(k.encode() + v.dtype.str.encode() + str(v.shape).encode() + v.tobytes()
                                      for k, v in bound.items())).hexdigest()
        if key not in self._built:
            self._built[key] = driver.compile(bind(self.model, bound), self.target)
        out = self._built[key].run({k: np.asarray(v) for k, v in feeds.items()})
        return tuple(out.values())


class LowbitBackend(Backend):
    target = "llvm"

    @classmethod
    def is_compatible(cls, model, device="CPU", **kwargs) -> bool:
        return device == "CPU" and not frontend.unsupported_ops(model)

    @classmethod
    def prepare(cls, model, device="CPU", **kwargs):
        super().prepare(model, device, **kwargs)
        return LowbitRep(model, cls.target)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


def node_cases() -> list:
    """ONNX's node test cases (generated in memory, no download)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the generators overflow float8 casts on purpose
        return collect_testcases(None)


def op_of(cases) -> dict[str, str]:
    """Each case's op: its node's, or for a function-expanded case the op it expands."""
    single = {c.name: c.model.graph.node[-1].op_type for c in cases if "_expanded" not in c.name}
    return {c.name: single.get(re.sub(r"_expanded.*", "", c.name), c.model.graph.node[-1].op_type) for c in cases}


class _Recorder(unittest.TestResult):
    def __init__(self):
        super().__init__()
        self.outcome: dict[str, str] = {}

    @staticmethod
    def _name(test) -> str:
        return re.sub(r"_cpu$", "", test.id().rsplit(".", 1)[-1])

    def addSuccess(self, test):
        self.outcome[self._name(test)] = "pass"

    def addFailure(self, test, err):
        self.outcome[self._name(test)] = "wrong"

    def addError(self, test, err):
        self.outcome[self._name(test)] = "rejected" if isinstance(err[1], UserError) else "crash"

    def addSkip(self, test, reason):
        self.outcome[self._name(test)] = "unsupported"


def run_cases(names: list[str]) -> dict[str, str]:
    """Run the named node cases through onnx's BackendTest: name -> pass | rejected | wrong | unsupported."""
    import onnx.backend.test

    if not names:
        return {}
    suite = onnx.backend.test.BackendTest(LowbitBackend, __name__)
    suite.include("^(" + "|".join(re.escape(n) for n in names) + ")_cpu$")
    result = _Recorder()
    # TVM's importer prints a line per op it cannot convert, and its C++ warnings go to fd 2
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), native_stderr_to_debug():
        warnings.simplefilter("ignore")
        unittest.defaultTestLoader.loadTestsFromTestCase(suite.tests).run(result)
        del suite
        gc.collect()        # failed imports free their BlockBuilders (a C++ warning each) here, not later
    return {n: result.outcome.get(n, "wrong") for n in names}     # BackendTest skips all but the included


RESULTS = ("pass", "rejected", "crash", "wrong", "unsupported", "undefined")


def _float_to_int_out_of_range(n: onnx.NodeProto, values: dict) -> str | None:
    """Cast / CastLike from a float to a fixed-point type: ONNX says "undefined if OOR" (lowbit
    saturates, passes/defined_semantics.py; numpy and ml_dtypes give what the CPU gives)."""
    x = values.get(n.input[0])
    if n.op_type == "Cast":
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        target = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to)).name if to else None
    else:
        like = values.get(n.input[1])
        target = like.dtype.name if like is not None else None
    bounds = integer_range(target) if target and target != "bool" else None
    if x is None or bounds is None or np.asarray(x).dtype.kind != "f":
        return None
    a = np.asarray(x, np.float64)
    bad = ~np.isfinite(a) | (np.trunc(np.nan_to_num(a)) < bounds[0]) | (np.trunc(np.nan_to_num(a)) > bounds[1])
    return f"{n.op_type} of {a[bad].ravel()[0]} to {target}" if bad.any() else None


# cases whose expected output the spec leaves undefined: per op, what makes one so.  Their expected
# values come from numpy / ml_dtypes on the machine that generates them, so they pass or fail with
# the CPU; they count in a column of their own and never enter the passing set
UNDEFINED = {"Cast": _float_to_int_out_of_range, "CastLike": _float_to_int_out_of_range}


def undefined(case) -> str | None:
    """Why ``case``'s expected output is undefined behaviour, or None.  The values each node reads
    come from ONNX's reference evaluator, so intermediate tensors of expanded functions count too."""
    from onnx.backend.test.runner import _normalize_tensor
    from onnx.reference import ReferenceEvaluator

    nodes = [n for n in case.model.graph.node if n.op_type in UNDEFINED]
    if not nodes:
        return None
    inits = {t.name for t in case.model.graph.initializer}
    names = [vi.name for vi in case.model.graph.input if vi.name not in inits]
    for inputs, _ in case.data_sets:
        feeds = dict(zip(names, (np.asarray(_normalize_tensor(x)) for x in inputs), strict=False))
        values = dict(feeds)
        values.update({t.name: numpy_helper.to_array(t) for t in case.model.graph.initializer})
        # the graph inputs alone where the evaluator cannot run it; its own numpy warnings are noise
        with contextlib.suppress(Exception), warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            values.update(ReferenceEvaluator(case.model).run(None, feeds, intermediate=True))
        for n in nodes:
            if reason := UNDEFINED[n.op_type](n, values):
                return reason
    return None


def table(outcome: dict[str, str], ops: dict[str, str], ort: dict[str, str]) -> str:
    rows: dict[str, Counter] = {}
    for name, result in outcome.items():
        rows.setdefault(ops[name], Counter())[result] += 1
        rows[ops[name]]["ort"] += ort.get(name) == "pass"
    lines = ["| op | cases | pass | fail: rejected | fail: crash | fail: wrong | unsupported | undefined | ORT passes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def row(name: str, c: Counter) -> str:
        return f"| {name} | {sum(c[r] for r in RESULTS)} | " + " | ".join(str(c[r]) for r in RESULTS) + f" | {c['ort']} |"

    quantization = sorted(op for op in rows if op in QUANTIZATION_OPS)
    others = sorted(op for op in rows if op not in QUANTIZATION_OPS)
    lines += [row(op, rows[op]) for op in quantization]
    lines.append(row("**quantization ops**", sum((rows[op] for op in quantization), Counter())))
    lines += [row(op, rows[op]) for op in others]
    lines.append(row("**all**", sum(rows.values(), Counter())))
    return "\n".join(lines)


def ort_result(case) -> str:
    """The same case on ONNX Runtime (CPU), for comparison: IR version and opset clamped to what
    ORT 1.31 loads (the quantize/dequantize cases are opset 28 / IR 14)."""
    import onnxruntime as ort
    from onnx.backend.test.runner import Runner, _normalize_tensor

    m = onnx.ModelProto()
    m.CopyFrom(case.model)
    m.ir_version = min(m.ir_version, ORT_MAX_IR)
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = min(imp.version, ORT_MAX_OPSET)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3         # its shape-merge warnings are about the case, not the run
        sess = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        for inputs, expected in case.data_sets:
            got = sess.run(None, dict(zip(names, (np.asarray(_normalize_tensor(x)) for x in inputs), strict=True)))
            Runner.assert_similar_outputs([_normalize_tensor(x) for x in expected], got, case.rtol, case.atol)
    except AssertionError:
        return "wrong"
    except Exception:
        return "rejected"
    return "pass"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compiler.tools.conformance", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["quantization", "all"], default="all",
                   help="quantization: the 45 cases of the quantization ops only")
    p.add_argument("--json", type=Path, help="write {case: {op, result}} here")
    p.add_argument("--update", action="store_true", help=f"rewrite {PASSING.name} with this run's passing cases")
    args = p.parse_args(argv)

    import logging
    logging.disable(logging.WARNING)    # fake-quant fallbacks warn once per compile
    cases = node_cases()
    ops = op_of(cases)
    if args.only == "quantization":
        cases = [c for c in cases if ops[c.name] in QUANTIZATION_OPS]
    runnable = [c.name for c in cases if not frontend.unsupported_ops(c.model)]
    outcome = {c.name: "unsupported" for c in cases}
    outcome.update(run_cases(runnable))
    outcome.update({c.name: "undefined" for c in cases if undefined(c)})
    ort = {c.name: ort_result(c) for c in cases}
    print(table(outcome, ops, ort))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({n: {"op": ops[n], "result": r, "ort": ort[n]} for n, r in sorted(outcome.items())},
                                        indent=1) + "\n")
    passing = sorted(n for n, r in outcome.items() if r == "pass")
    if args.update:
        PASSING.parent.mkdir(parents=True, exist_ok=True)
        PASSING.write_text("".join(n + "\n" for n in passing))
        return 0
    expected = [n for n in PASSING.read_text().split() if n in outcome]
    lost = [n for n in expected if outcome[n] != "pass"]
    if lost:
        print(f"{len(lost)} case(s) of {PASSING.name} no longer pass: {', '.join(lost)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
