"""``lowbit corpus``: the real-model corpus (models/corpus.py) through lowbit, against ONNX Runtime.

For every FP32 export it measures:

* FP32: whether lowbit compiles it, and its largest error relative to ORT FP32's largest logit;
* INT8 from the FP32 model and the corpus's calibration crops: the verifier's verdict and the float
  islands, bit-exactness against the golden interpreter (``runtime/golden.py``, the model lowbit's
  quantizer wrote), and logit cosine and top-1 agreement against ORT FP32 on the evaluation crops,
  beside the same figures for ORT's static and dynamic INT8 of the same model and calibration;
* compile time and kernel launches.

For every CNN and vision transformer it also quantizes the dynamo batch-1 export with three other
tools (ORT ``quantize_static`` QDQ and QOperator, NNCF's ONNX PTQ), and reports whether lowbit lowers
each integer-only and bit-exact against golden.

Each model runs in a child process (a crash or a hang in one is that model's failure, not the
report's), and its result is cached by the model's recipe hash and lowbit's source hash, so a report
re-run after a change recomputes everything, and an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from compiler import driver
from compiler.options import CompileOptions
from compiler.tools.ort import OrtRunner
from compiler.tools.ort import quantize as ort_quantize
from models import corpus
from runtime import golden
from runtime.artifact import Artifact
from runtime.errors import UserError
from runtime.io import cache_root

Quantizer = Literal["ort-qdq", "ort-qop", "nncf"]
QUANTIZERS: tuple[Quantizer, ...] = ("ort-qdq", "ort-qop", "nncf")
ROOT = Path(__file__).resolve().parents[2]
GOLDEN_SAMPLES = 2
FIDELITY_FLOOR = 0.99
FP32_SAMPLES = 4
TIMEOUT_S = 3600
HOST = "llvm"
NO_FP32 = "not built: the target is integer-only"


def report_name(target: str) -> str:
    return "corpus" if target == HOST else f"corpus-{target}"


@dataclass
class Outcome:
    """One build of one model: whether it compiled, and what was measured of it."""
    ok: bool = False
    error: str | None = None
    seconds: float | None = None        # all of it: compile, runs, golden
    compile_s: float | None = None
    integer_only: bool | None = None
    islands: list[str] = field(default_factory=list)
    bit_exact: bool | None = None
    max_rel_err: float | None = None
    cosine: float | None = None
    top1: float | None = None
    launches: int | None = None


@dataclass
class ModelResult:
    name: str
    family: str
    kind: str
    exporter: str
    batch: str
    fp32: Outcome
    int8: Outcome
    ort_static: Outcome
    ort_dynamic: Outcome
    quantized: dict[str, Outcome] = field(default_factory=dict)

    def fidelity_bar(self) -> float | None:
        """The issue's bar on INT8's logit cosine against FP32: at least ORT static INT8's on the same
        calibration, and at least 0.99 where ORT's is lower; None where ORT static was not measured."""
        return max(FIDELITY_FLOOR, self.ort_static.cosine) if self.ort_static.cosine is not None else None

    def meets_fidelity_bar(self) -> bool | None:
        bar = self.fidelity_bar()
        return None if bar is None or self.int8.cosine is None else self.int8.cosine >= bar


def source_hash() -> str:
    h = hashlib.sha256()
    for pkg in ("compiler", "passes", "codegen", "runtime", "models"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            h.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def quantized_bases(variants: list[corpus.Variant]) -> set[str]:
    """The exports that get the other tools' quantized versions: the dynamo batch-1 file of every
    CNN and vision transformer."""
    return {v.name for v in variants if v.recipe.kind in ("cnn", "vit") and v.exporter == "dynamo" and not v.dynamic}


# --- quantized versions by other tools -----------------------------------------------------------------------

def _ort_static(src: Path, out: Path, calib: dict, fmt: str, transformer: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = len(next(iter(calib.values())))
            self.it = iter([{k: v[i : i + 1] for k, v in calib.items()} for i in range(n)])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre, inline = Path(tmp) / "pre.onnx", Path(tmp) / "inline.onnx"
        # the weights inline (the dynamo export keeps them in model.onnx.data): ORT's pre-processing
        # loses external data it has to move
        onnx.save(onnx.load(str(src)), str(inline))
        quant_pre_process(str(inline), str(pre), skip_symbolic_shape=transformer)
        quantize_static(str(pre), str(out), Reader(), per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator)


def _nncf(src: Path, out: Path, calib: dict, transformer: bool) -> None:
    import nncf

    n = len(next(iter(calib.values())))
    data = nncf.Dataset([{k: v[i : i + 1] for k, v in calib.items()} for i in range(n)])
    q = nncf.quantize(onnx.load(str(src)), data, subset_size=n,
                      model_type=nncf.ModelType.TRANSFORMER if transformer else None)
    onnx.save(q, str(out))


def quantized_file(f: corpus.CorpusFiles, quantizer: Quantizer) -> Path:
    """``f``'s model quantized by ``quantizer`` with the corpus calibration crops (cached beside it)."""
    from importlib.metadata import version

    tool = "nncf" if quantizer == "nncf" else "onnxruntime"
    path = f.dir / f"{quantizer}-{version(tool)}.onnx"
    if path.exists():
        return path
    transformer = f.variant.recipe.kind == "vit"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if quantizer == "nncf":
        _nncf(f.onnx, tmp, f.calibration(), transformer)
    else:
        _ort_static(f.onnx, tmp, f.calibration(), quantizer.removeprefix("ort-"), transformer)
    os.replace(tmp, path)
    return path


# --- measuring one model -------------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300] if not isinstance(e, UserError) else text[0][:300]


def _measure(fn, out: Outcome) -> Outcome:
    t0 = time.perf_counter()
    try:
        fn(out)
        out.ok = True
    except Exception as e:     # noqa: BLE001  every failure is this model's one-line result
        out.error = _one_line(e)
        if not isinstance(e, UserError):
            out.error += " [traceback: " + traceback.format_exc().strip().splitlines()[-3].strip()[:200] + "]"
    out.seconds = round(time.perf_counter() - t0, 2)
    return out


def _samples(data: dict, n: int) -> list[dict]:
    return [{k: v[i : i + 1] for k, v in data.items()} for i in range(min(n, len(next(iter(data.values())))))]


def _rows(outputs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(o, np.float64).reshape(1, -1) for o in outputs])


def _fidelity(got: np.ndarray, want: np.ndarray, out: Outcome) -> None:
    out.cosine = float(np.mean([g @ w / (np.linalg.norm(g) * np.linalg.norm(w) + 1e-30) for g, w in zip(got, want, strict=True)]))
    out.top1 = float((got.argmax(1) == want.argmax(1)).mean())


def _first(outs: dict) -> np.ndarray:
    return next(iter(outs.values()))


def measure(v: corpus.Variant, quantized: bool = True, target: str = HOST) -> ModelResult:
    """``v``'s row of the report; ``quantized``: also the other tools' quantized versions; ``target``:
    the target every lowbit build is for (an integer-only one, such as tosa, has no FP32 build)."""
    f = corpus.ensure(v)
    integer_only = CompileOptions(target=target).backend.integer_only
    calib, evals = f.calibration(), _samples(f.evaluation(), corpus.EVAL_SAMPLES)
    ref = OrtRunner("ort-fp32", str(f.onnx), 2)
    want = _rows([_first(ref(x)) for x in evals])

    def golden_check(art: Artifact, ref: driver.Reference, out: Outcome) -> None:
        out.bit_exact = all(np.array_equal(_first(art.run(x)), _first(golden.run_qdq(ref.model, x, ref.variants)))
                            for x in evals[:GOLDEN_SAMPLES])

    def build(path: Path, out: Outcome, **options) -> tuple[Artifact, driver.Reference]:
        t0 = time.perf_counter()
        art, reference = driver.compile_with_reference(str(path), CompileOptions(target=target, **options))
        out.compile_s = round(time.perf_counter() - t0, 2)
        m = art.manifest
        out.integer_only, out.launches = m.integer_only, m.kernel_launches
        out.islands = [f"{i['op']} ({i['node']})" for i in m.islands]
        return art, reference

    def fp32(out: Outcome) -> None:
        art, _ = build(f.onnx, out)
        got = _rows([_first(art.run(x)) for x in evals[:FP32_SAMPLES]])
        out.max_rel_err = float(np.abs(got - want[:FP32_SAMPLES]).max() / np.abs(want[:FP32_SAMPLES]).max())

    def int8(out: Outcome) -> None:
        # golden's reference is the QDQ model this very compile lowered (a quantization of the raw FP32
        # file, without the driver's canonicalization, can differ)
        art, reference = build(f.onnx, out, calib=calib)
        _fidelity(_rows([_first(art.run(x)) for x in evals]), want, out)
        golden_check(art, reference, out)

    def ort_int8(variant: str):
        def run(out: Outcome) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                path = ort_quantize(str(f.onnx), calib, str(Path(tmp) / "q.onnx"), variant)
                r = OrtRunner(variant, path, 2)
                _fidelity(_rows([_first(r(x)) for x in evals]), want, out)
        return run

    def given(quantizer: Quantizer):
        def run(out: Outcome) -> None:
            path = quantized_file(f, quantizer)
            # golden reads the model as the compile loaded it (QOperator nodes as QDQ, the batch fixed), not
            # canonicalized: the compile does not canonicalize a quantized model (a fused GELU reads differently)
            art, reference = build(path, out)
            _fidelity(_rows([_first(art.run(x)) for x in evals]), want, out)
            golden_check(art, reference, out)
        return run

    r = v.recipe
    result = ModelResult(v.name, r.family, r.kind, v.exporter, "dynamic" if v.dynamic else "1",
                         Outcome(error=NO_FP32) if integer_only else _measure(fp32, Outcome()),
                         _measure(int8, Outcome()),
                         _measure(ort_int8("static"), Outcome()), _measure(ort_int8("dynamic"), Outcome()))
    if quantized and v.name in quantized_bases([v]):
        result.quantized = {q: _measure(given(q), Outcome()) for q in QUANTIZERS}
    return result


# --- the report ----------------------------------------------------------------------------------------------

def result_path(v: corpus.Variant, src: str, target: str = HOST) -> Path:
    return cache_root() / "corpus-results" / f"{v.name}-{v.hash()}-{src}{'' if target == HOST else '-' + target}.json"


def _from_json(d: dict) -> ModelResult:
    outs = {k: Outcome(**d[k]) for k in ("fp32", "int8", "ort_static", "ort_dynamic")}
    return ModelResult(**{**d, **outs, "quantized": {q: Outcome(**o) for q, o in d["quantized"].items()}})


def run_one(v: corpus.Variant, src: str, timeout: float, target: str = HOST) -> ModelResult:
    """``v``'s result, measured in a child process unless cached for this source."""
    path = result_path(v, src, target)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "compiler.tools.corpus", "--one", v.name, "--json", str(path), "--target", target]
        try:
            # in a scratch directory: ORT's quantizer leaves shape-inference and external-data files in the cwd
            with tempfile.TemporaryDirectory() as scratch:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=scratch)
            failure = None if p.returncode == 0 and path.exists() else \
                f"child exited {p.returncode}: " + (p.stderr.strip().splitlines() or [""])[-1][:200]
        except subprocess.TimeoutExpired:
            failure = f"timed out after {timeout:.0f} s"
        if failure:
            r = v.recipe
            dead = Outcome(error=failure)
            return ModelResult(v.name, r.family, r.kind, v.exporter, "dynamic" if v.dynamic else "1",
                               dead, dead, dead, dead)
    return _from_json(json.loads(path.read_text()))


def _f(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _verdict(o: Outcome) -> str:
    if o.error == NO_FP32:
        return "–"
    if not o.ok:
        return "fails: " + (o.error or "?").replace("|", "/")
    if o.integer_only:
        return "integer-only"
    return f"{len(o.islands)} island(s): " + ", ".join(o.islands[:3]).replace("|", "/") if o.islands else "float"


def _exact(o: Outcome) -> str:
    return "–" if o.bit_exact is None else ("yes" if o.bit_exact else "**no**")


def _bar(r: ModelResult) -> str:
    met = r.meets_fidelity_bar()
    return "–" if met is None else f"{'met' if met else '**missed**'} ({r.fidelity_bar():.4f})"


def markdown(results: list[ModelResult]) -> str:
    lines = ["| model | exporter | batch | FP32 rel. err | INT8 (--calib) | bit-exact | cos / top-1 | "
             "ORT static cos / top-1 | ORT dynamic cos / top-1 | fidelity bar | compile s | launches |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fp = _f(r.fp32.max_rel_err, 1) if r.fp32.max_rel_err is None else f"{r.fp32.max_rel_err:.1e}"
        lines.append(" | ".join([
            f"| {r.name.split('.')[0]}", r.exporter, r.batch, fp if r.fp32.ok else _verdict(r.fp32),
            _verdict(r.int8), _exact(r.int8), f"{_f(r.int8.cosine)} / {_f(r.int8.top1, 2)}",
            f"{_f(r.ort_static.cosine)} / {_f(r.ort_static.top1, 2)}",
            f"{_f(r.ort_dynamic.cosine)} / {_f(r.ort_dynamic.top1, 2)}", _bar(r), _f(r.int8.compile_s, 1),
            str(r.int8.launches or "–")]) + " |")
    q = [r for r in results if r.quantized]
    if q:
        lines += ["", "Quantized by other tools (the dynamo batch-1 export; no `--calib`):", "",
                  "| model | " + " | ".join(f"{t}: lowering / bit-exact / cos" for t in QUANTIZERS) + " |",
                  "|---|" + "---|" * len(QUANTIZERS)]
        for r in q:
            cells = [f"{_verdict(o)} / {_exact(o)} / {_f(o.cosine)}" for o in (r.quantized[t] for t in QUANTIZERS)]
            lines.append(f"| {r.name.split('.')[0]} | " + " | ".join(cells) + " |")
    lines += ["", summary(results)]
    return "\n".join(lines) + "\n"


def summary(results: list[ModelResult]) -> str:
    n = len(results)
    if all(r.fp32.error == NO_FP32 for r in results) and n:
        integer = sum(bool(r.int8.ok and r.int8.integer_only) for r in results)
        given = [o for r in results for o in r.quantized.values()]
        return (f"{n} models, built for an integer-only target: {integer}/{n} integer-only from --calib, "
                f"{sum(bool(r.int8.bit_exact) for r in results)}/{n} bit-exact with golden; quantized inputs: "
                f"{sum(bool(o.integer_only) for o in given)}/{len(given)} integer-only, "
                f"{sum(bool(o.bit_exact) for o in given)}/{len(given)} bit-exact.")
    fp32 = sum(r.fp32.ok and (r.fp32.max_rel_err or 0) <= 1e-4 for r in results)
    integer = sum(bool(r.int8.ok and r.int8.integer_only) for r in results)
    exact = sum(bool(r.int8.bit_exact) for r in results if r.int8.ok)
    given = [o for r in results for o in r.quantized.values()]
    bars = [r.meets_fidelity_bar() for r in results]
    at_ort = sum(bool(r.int8.cosine is not None and r.ort_static.cosine is not None
                      and r.int8.cosine >= r.ort_static.cosine) for r in results)
    return (f"{n} FP32 models: {fp32}/{n} compile FP32 within 1e-4 of ORT; {integer}/{n} integer-only from --calib "
            f"({100 * integer / max(n, 1):.0f}%); {exact}/{sum(r.int8.ok for r in results)} INT8 builds bit-exact "
            f"with golden; quantized inputs: {sum(bool(o.integer_only) for o in given)}/{len(given)} integer-only, "
            f"{sum(bool(o.bit_exact) for o in given)}/{len(given)} bit-exact; INT8 cosine at or above ORT static "
            f"INT8's {at_ort}/{n}, fidelity bar (that, and at least {FIDELITY_FLOOR}) met "
            f"{sum(b is True for b in bars)}/{sum(b is not None for b in bars)}.")


def report(names: list[str] | None, out_dir: Path, timeout: float = TIMEOUT_S, progress=print,
           jobs: int = 1, target: str = HOST) -> list[ModelResult]:
    """Measure the named corpus models (all by default) and write ``corpus.md`` and ``corpus.json``
    (``corpus-TARGET.*`` for another target than the host's).  ``jobs`` children at a time (each
    compile is mostly one thread; compile times then include the neighbour's load)."""
    variants, src = corpus.find(names), source_hash()
    done = 0

    def one(v: corpus.Variant) -> ModelResult:
        nonlocal done
        t0 = time.perf_counter()
        r = run_one(v, src, timeout, target)
        done += 1
        progress(f"[{done}/{len(variants)}] {v.name}: fp32 {'ok' if r.fp32.ok else 'fails'}, int8 {_verdict(r.int8)}"
                 f", bit-exact {_exact(r.int8)} ({time.perf_counter() - t0:.0f} s)")
        return r

    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(one, variants))
    out_dir.mkdir(parents=True, exist_ok=True)
    body = {"lowbit_source": src, "models": [asdict(r) for r in results], "summary": summary(results)}
    stem = report_name(target)
    for name, text in ((f"{stem}.json", json.dumps(body, indent=1)), (f"{stem}.md", markdown(results))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compiler.tools.corpus")
    p.add_argument("--one", help="measure one corpus model in this process (the report's child)")
    p.add_argument("--json")
    p.add_argument("--target", default=HOST)
    a = p.parse_args(argv)
    result = measure(corpus.find([a.one])[0], target=a.target)
    tmp = Path(a.json).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result), indent=1))
    os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
