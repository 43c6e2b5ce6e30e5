"""The lowbit pipeline, top to bottom.  Each stage is one call, the same for every target.

    ONNX file --load, QOperator->QDQ, check, Q/DQ forms TVM cannot import--> ONNX proto
      --calibrate + quantize (FP32 models given calibration data)--> QDQ ONNX --import--> Relax IRModule
      --lower QDQ to integer (quantized models), on the target's contraction units--> integer-only Relax
      --analyze--> op histogram, weights, integer-only verdict
      --the backend's build (codegen/registry.py: fuse, schedule, lower, code generation)--> Build
      --> Artifact (the build's files + a manifest made once from the stages' reports)

What differs between targets is asked of the backend (codegen/backend.py); this module names none.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import onnx

from codegen.backend import Backend, Build, BuildContext
from compiler import canonicalize, frontend, limits, narrow_qdq, qoperator, quantize
from compiler.options import CompileOptions
from compiler.planning import bitplan, latency, sensitivity
from passes.analysis import op_histogram, weight_bytes
from passes.lower_qdq import LoweringReport, QDQLoweringError, is_qdq, lower_qdq
from passes.verify_integer import IntegerVerdict, check_integer_only
from runtime.artifact import Artifact, Manifest, versions
from runtime.errors import UserError
from runtime.progress import log, native_stderr_to_debug, stage, steps
from runtime.types import TensorSpec


def compile(model: str | os.PathLike | onnx.ModelProto, target: str = "llvm", *,
            input_shapes: dict[str, tuple[int, ...]] | None = None,
            options: CompileOptions | None = None, remote=None) -> Artifact:
    """Compile an ONNX model.  Raises ``UserError`` for problems with the model or options.
    ``remote`` (runtime/remote.Remote, a tracker): where ``--tune`` measures."""
    opts = options or CompileOptions(target=target, input_shapes=dict(input_shapes or {}))
    return compile_with_reference(model, opts, remote)[0]


@dataclass(frozen=True)
class Reference:
    """The ONNX model a build lowered (the QDQ model calibration made, or a quantized model as it
    was loaded) and its softmax / GELU variants: what runtime/golden.run_qdq reads as the reference
    of that very build."""
    model: onnx.ModelProto
    variants: dict | str


def compile_with_reference(model: str | os.PathLike | onnx.ModelProto, options: CompileOptions,
                           remote=None) -> tuple[Artifact, Reference]:
    """``compile``, also returning the build's golden reference, so that checking a calibrated build
    against golden takes the QDQ model that very compile lowered, from its one calibration."""
    config = options.quant_config() if options.calib is not None else None   # bad --bits fail before any work
    with native_stderr_to_debug(), steps(6 if options.weight_bits == "mixed" else 5, "compiling"):
        return _compile(model, options, config, remote)


@dataclass(frozen=True)
class Loaded:
    """The checked ONNX model and its boundary."""
    src: frontend.OnnxModel
    inputs: list[TensorSpec]            # what the build takes (static where the backend needs it)
    declared: list[TensorSpec]          # the model's own (a symbolic batch kept)
    output_dtypes: dict
    given_quantized: bool


@dataclass(frozen=True)
class Calibrated:
    """What calibration made of an FP32 model."""
    report: quantize.QuantReport
    config: quantize.QuantConfig
    bit_plan: bitplan.BitPlan | None
    sensitivity: str


def _compile(model, opts: CompileOptions, config, remote=None) -> tuple[Artifact, Reference]:
    backend = opts.backend
    backend.require()                       # a missing toolchain fails before any work
    target = backend.target(opts)
    with stage("load + check"):
        loaded = load(model, opts, backend)
    src, inputs, calibrated = loaded.src, loaded.inputs, None
    if config is not None:
        src, inputs, calibrated = calibrate(loaded, opts, config)
    frontend.check_qdq_params(src)
    reference = Reference(src.proto, calibrated.report.variants() if calibrated else "auto")
    with stage("import to Relax"):
        mod = frontend.to_relax(src, inputs)
        limits.check_relax(mod, src.path)
        outputs = frontend.relax_output_specs(mod, [o.name for o in src.proto.graph.output], loaded.output_dtypes)
    mod, lowering = lower(mod, src, calibrated.report.variants() if calibrated else opts.nonlinear, backend, target,
                          opts.integer_only)
    with stage("analyze"):
        histogram, nbytes = op_histogram(mod), weight_bytes(mod)
        verdict = check_integer_only(mod)
    if (backend.integer_only or opts.integer_only) and not verdict.integer_only:
        why = "--integer-only was given" if opts.integer_only else f"the {backend.name} target runs integer-only models"
        raise UserError(f"{src.path}: not integer-only ({verdict.reason}); {why}: quantize it (--calib DATA.npz) "
                        "or give a QDQ model")
    islands = lowering.islands if lowering else ()
    ctx = BuildContext(Path(src.path).name.split(".")[0], Path(src.path).name, inputs, outputs, opts, remote)
    with stage(backend.stage(opts)):
        build = build_for(backend, mod, target, ctx)
    manifest = Manifest(
        model=Path(src.path).name, model_sha256=src.sha256, backend=backend.name, target=target,
        precision=_precision(histogram, verdict, islands), inputs=loaded.declared if backend.one_sample else inputs,
        outputs=outputs, kernels=sorted(build.kernel_ops), op_histogram=histogram, weight_bytes=nbytes,
        versions=versions(), integer_only=verdict.integer_only, integer_region=_region(verdict, islands),
        islands=[asdict(i) for i in islands],
        quant=quantize.boundary_params(src.proto) or None,
        quantization=quantization(loaded.given_quantized, calibrated, lowering, build),
        kernel_ops=build.kernel_ops, kernels_unfused=build.kernels_unfused, kernel_launches=len(build.launch_sequence),
        launch_sequence=build.launch_sequence, tuning=build.tuning, unscheduled=build.unscheduled,
        build=build.summary, files=sorted(build.files), library=build.library)
    return Artifact(manifest, build.executable, files=build.files, fcompile=build.fcompile), reference


def load(model, opts: CompileOptions, backend: Backend) -> Loaded:
    """Load, check, make QOperator QDQ, fix the batch the options ask for, and rewrite the Q/DQ
    forms TVM cannot import (narrow types)."""
    src = frontend.load(model)
    frontend.check_opset(src)               # to_qdq raises a QOperator model's opset to 13
    limits.check_onnx(src.proto, src.path)  # before anything reads tensor data by its declared shape
    src = frontend.OnnxModel(qoperator.to_qdq(src.proto), src.path, src.sha256)
    frontend.check_supported(src)
    frontend.validate(src)
    frontend.check_scales(src)
    src = frontend.rebatch(src, opts.input_shapes)
    inputs = declared = frontend.input_specs(src, opts.input_shapes)
    output_dtypes = frontend.output_dtypes(src)
    src = frontend.OnnxModel(narrow_qdq.rewrite(src.proto, src.path), src.path, src.sha256)
    if not quantize.is_quantized(src.proto) and all(isinstance(d, int) for s in inputs for d in s.shape):
        # an FP32 model at static shapes: its shape arithmetic folded as calibration folds it (a Reshape
        # or Pad whose operand is computed from Shape is one TVM's importer rejects, or types loosely)
        src = frontend.OnnxModel(canonicalize.canonicalize(src.proto, {s.name: s.shape for s in inputs}), src.path,
                                 src.sha256)
    elif quantize.is_quantized(src.proto) and all(isinstance(d, int) for s in inputs for d in s.shape):
        # a model quantized elsewhere keeps its form (its float functions are read as written), but what
        # it computes from constants alone is computed here once (NNCF's Swin builds its window mask at run time)
        src = frontend.OnnxModel(canonicalize.fold_constants(src.proto), src.path, src.sha256)
    elif opts.calib is None and not quantize.is_quantized(src.proto) and canonicalize.needs_static_shapes(src.proto):
        # an FP32 compile at symbolic shapes: the shape arithmetic that does not depend on the symbols folds,
        # and dimensions the model couples become one symbol (TVM's importer cannot follow tensor-valued
        # shapes); calibration fixes such a graph's shapes instead (quantization_shapes)
        src = frontend.OnnxModel(canonicalize.fold_symbolic_shapes(src.proto), src.path, src.sha256)
        inputs = declared = frontend.input_specs(src, opts.input_shapes)
    if backend.one_sample:
        inputs = frontend.static_specs(src, inputs, backend.one_sample)
    if opts.tune and (hint := frontend.symbolic_hint(inputs)):
        raise UserError(f"{src.path}: --tune needs static shapes (meta_schedule cannot tile symbolic ones){hint}")
    return Loaded(src, inputs, declared, output_dtypes, quantize.is_quantized(src.proto))


def calibrate(loaded: Loaded, opts: CompileOptions, config: quantize.QuantConfig):
    """Quantize an FP32 model on the calibration data (after a bit plan for ``--bits mixed``).
    Returns (QDQ model, its input specs, Calibrated)."""
    src = loaded.src
    if loaded.given_quantized:
        raise UserError(f"{src.path}: the model is already quantized; drop --calib (and --bits), "
                        "its own scales are used")
    inputs, shapes = quantization_shapes(src, loaded.inputs)
    is_file = isinstance(opts.calib, (str, os.PathLike))
    calib = quantize.load_calibration(opts.calib, inputs) if is_file else opts.calib
    bit_plan = None
    if opts.weight_bits == "mixed":
        with stage("sensitivity + bit plan"):
            bit_plan, _ = plan_bits(src, calib, opts, shapes)
            config = opts.quant_config(bit_plan.bits)
    with stage("calibrate + quantize"):
        proto, report = quantize.quantize(src.proto, calib, config, where=src.path, shapes=shapes,
                                          calib_where=os.fspath(opts.calib) if is_file else "calibration data")
    return frontend.OnnxModel(proto, src.path, src.sha256), inputs, Calibrated(report, config, bit_plan,
                                                                                 opts.sensitivity)


def lower(mod, src: frontend.OnnxModel, variants, backend: Backend, target: dict, integer_only: bool):
    """QDQ -> integer Relax on the backend's contraction units.  An op with no integer form runs
    in float between a dequantize and a quantize (an island, one warning each), or fails where
    the options or the backend ask for integer-only code; a graph the lowering cannot follow at
    all keeps its float math between the Q/DQ pairs (fake-quant).  Returns (module,
    LoweringReport or None)."""
    if not is_qdq(mod):
        return mod, None
    refuse = "--integer-only was given: replace the op or drop the flag" if integer_only else \
        f"the {backend.name} target runs integer-only models: replace the op" if backend.integer_only else None
    with stage("lower QDQ to integer"):
        try:
            lowered, report = lower_qdq(mod, variants, units=backend.units(target))
        except QDQLoweringError as exc:
            if refuse:
                raise UserError(f"{src.path}: integer lowering not possible ({exc}); {refuse}") from None
            # still a correct program: the float math between the Q/DQ pairs runs as is
            # the message, not the exception: a log record kept (pytest's caplog) would keep its frames,
            # and the lowering's BlockBuilder would warn on stderr whenever it is finally freed
            log.warning("%s: integer lowering not possible (%s); compiled as fake-quant", src.path, str(exc))
            return mod, None
    if report.islands:
        first = report.islands[0]
        if refuse:
            raise UserError(f"{src.path}: {_island_line(first)}{_more(report.islands)}; {refuse}")
        for island in report.islands:
            log.warning("%s: %s", src.path, _island_line(island))
    if report.int64:
        log.warning("%s: %s", src.path, report.summary())
    return lowered, report


def _island_line(island) -> str:
    return f"float island: {island.op} at node {island.node!r} ({island.reason})"


def _more(islands) -> str:
    return f" and {len(islands) - 1} more" if len(islands) > 1 else ""


def build_for(backend: Backend, mod, target: dict, ctx: BuildContext) -> Build:
    """The backend's build.  With symbolic shapes a failure is the user's to fix (one line);
    with static ones it is a lowbit bug, and keeps its traceback."""
    try:
        return backend.build(mod, target, ctx)
    except UserError:
        raise
    except Exception as exc:
        hint = frontend.symbolic_hint(ctx.inputs)
        if not hint:
            raise
        raise UserError(f"{ctx.source}: building with symbolic shapes failed: {frontend.first_line(exc)}{hint}") from None


def quantization(given_quantized: bool, calibrated: Calibrated | None, lowering: LoweringReport | None,
                 build: Build) -> dict | None:
    """The manifest's account of the quantization: where the scales came from (calibration and its
    settings, or "as given"), the bit plan, the accumulators' proof, and each layer's stored
    weights with the kernel that reads them."""
    if calibrated is None:
        out = {"source": "as given"} if given_quantized else None
    else:
        r, c = calibrated.report, calibrated.config
        out = {"source": "calibrated", "observer": c.observer, "activations": c.activations,
               "weight_bits": c.weight_bits, "calibration_samples": r.samples,
               "quantized_tensors": r.tensors, "batchnorm_folded": r.bn_folded}
        if (plan := calibrated.bit_plan) is not None:
            out |= {"weight_bits": "mixed", "bit_plan": plan.bits, "sensitivity": calibrated.sensitivity,
                    "budgets": {m: round(v, 3) for m, v in plan.limits.items()}}
        if r.residual:
            out["residual_stream"] = f"{r.residual} tensors in int{c.residual_bits}"
        if r.narrow:
            out["activations_u4"] = f"{r.narrow} ReLU outputs on the u4 grid [0, 15]"
        if r.softmax:
            out["softmax_output"] = f"{r.softmax} tensors in uint{c.softmax_bits}"
        if r.ranges:
            out["ranges"] = asdict(r.ranges)
        out["rounding"] = c.rounding
        if r.widened:
            out["widened"] = asdict(r.widened)
        if r.nonlinear:
            out["nonlinear"] = [asdict(n) for n in r.nonlinear]
    if lowering is not None:
        out |= {"accumulators": lowering.summary(),
                "weights": [{**w, "kernel": build.readers.get(d)}
                            for w, d in zip(lowering.weights, lowering.digests, strict=True)]}
    return out


def quantization_shapes(src: frontend.OnnxModel, inputs):
    """(input specs, shapes to canonicalize at): a graph that computes shapes at run time is
    folded at fixed shapes (symbolic dimensions become 1, with a warning); others keep theirs."""
    if not canonicalize.needs_static_shapes(src.proto):
        return inputs, None
    inputs = frontend.static_specs(src, inputs)
    return inputs, {s.name: s.shape for s in inputs}


def plan_bits(src: frontend.OnnxModel, calib, opts: CompileOptions, shapes=None, *, latency: bool = False):
    """Per-layer weight bits for ``--bits mixed``: the sensitivity of every weighted layer
    (compiler/planning/sensitivity.py), their kernel times at each width when a latency budget (or
    ``latency``) asks for them (compiler/planning/latency.py), then the ILP within the budgets
    (compiler/planning/bitplan.py).  Returns (BitPlan, the layers with their sensitivities)."""
    layers = sensitivity.measure(src.proto, calib, method=opts.sensitivity, where=src.path, shapes=shapes,
                                 activation_bits=opts.activation_bits)
    if not layers:
        raise UserError(f"{src.path}: no Conv, Gemm or MatMul with constant weights: nothing to plan")
    if latency or opts.latency_budget is not None:
        try:
            with stage("latency table"):
                table = latency_table(src, calib, opts, layers)
            layers = [replace(layer, latency=table[layer.name]) for layer in layers]
        except UserError as exc:
            if opts.latency_budget is not None:
                raise
            log.warning("no latency table: %s", exc)
    pins = {layers[0].name: 8, layers[-1].name: 8} if opts.pin else {}
    return bitplan.solve(layers, opts.budgets(), pins=pins), layers


def latency_table(src: frontend.OnnxModel, calib, opts: CompileOptions, layers) -> dict[str, dict[int, float]]:
    """Each layer's kernel time at 8, 4 and 2 bits on this machine, from one uniform build per
    width (compiler/planning/latency.py), cached per model, target, shapes and quantization options."""
    builds = {}

    def build(bits: int):
        at = replace(opts, weight_bits=bits, size_budget=None, bops_budget=None, latency_budget=None,
                     sensitivity="perturb", pin=False, calib=calib)
        with steps(5, f"latency table: {bits}-bit build"):
            builds[bits] = _compile(src, at, at.quant_config())[0]
        return builds[bits]

    def compute():
        first = build(bitplan.BITS[0])
        feeds = latency.sample_feeds(first.manifest.inputs, calib)
        return latency.measure(lambda b: builds.get(b) or build(b), layers, feeds)

    if not opts.backend.measures_latency:
        raise UserError(f"--latency-budget times kernels on this machine, which cannot run {opts.target} code; "
                        "plan with --size-budget or --bops-budget")
    key = {"model": src.sha256, "target": opts.backend.target(opts), "shapes": opts.input_shapes,
           "calibration": latency.digest_feeds(calib), "layers": [layer.name for layer in layers],
           "quantization": [opts.observer, opts.nonlinear, opts.residual_bits, opts.softmax_bits,
                            opts.activation_bits, opts.fidelity, opts.rounding]}
    return latency.cached(key, compute)


def _region(verdict: IntegerVerdict, islands) -> str:
    """The verifier's verdict, or with float islands, which ops they are."""
    if not islands:
        return verdict.reason
    return f"{len(islands)} float island(s): " + ", ".join(f"{i.op} ({i.node})" for i in islands)


def _precision(histogram: dict[str, int], verdict: IntegerVerdict, islands) -> str:
    """What the artifact computes in: QDQ models that still do float math between their
    quantize/dequantize pairs are "fake-quant"; integer code with float islands is int8 (the
    manifest's ``islands`` and ``integer_only`` say where it is not)."""
    if "relax.quantize" not in histogram and "relax.dequantize" not in histogram:
        return "fp32"
    return "int8" if verdict.integer_only or islands else "fake-quant"
