"""The lowbit pipeline, top to bottom.  Each stage is one call.

    ONNX file --load, QOperator->QDQ, check, Q/DQ forms TVM cannot import--> ONNX proto
      --calibrate + quantize (FP32 models given calibration data)--> QDQ ONNX --import--> Relax IRModule
      --lower QDQ to integer (quantized models)--> integer-only Relax
      --analyze--> op histogram, weights, integer-only verdict
      --build (fuse, [--tune: meta_schedule], schedule, lower, LLVM)--> VM executable
      --> Artifact (library + manifest)
    --target cuda: int8 operands laid out for dp4a, the CPU fusion, GPU schedules (codegen/cuda),
      CUDA source in the library, PTX and a fatbin from nvcc beside it
    --target rv32: after lowering, the integer region only (int8 in, int8 out)
      --codegen/rv32 (fuse, scalar schedules, C kernels, call sequence, static memory plan)--> C project
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import onnx

from codegen import cuda, llvm, rv32, tune
from codegen.rv32 import toolchain
from compiler import bitplan, canonicalize, frontend, limits, narrow_qdq, qoperator, quantize, sensitivity
from compiler.errors import UserError
from compiler.options import CompileOptions
from compiler.progress import log, native_stderr_to_debug, stage, steps
from passes import integer_region
from passes.analysis import op_histogram, weight_bytes
from passes.lower_qdq import QDQLoweringError, is_qdq, lower_qdq
from passes.verify_integer import check_integer_only
from runtime import latency
from runtime.artifact import Artifact, Manifest, versions


def compile(model: str | os.PathLike | onnx.ModelProto, target: str = "llvm", *,
            input_shapes: dict[str, tuple[int, ...]] | None = None,
            options: CompileOptions | None = None, remote=None) -> Artifact:
    """Compile an ONNX model.  Raises ``UserError`` for problems with the model or options.
    ``remote`` (runtime/remote.Remote, a tracker): where ``--tune`` measures."""
    opts = options or CompileOptions(target=target, input_shapes=dict(input_shapes or {}))
    config = opts.quant_config() if opts.calib is not None else None      # bad --bits fail before any work
    with native_stderr_to_debug(), steps(6 if opts.weight_bits == "mixed" else 5, "compiling"):
        return _compile(model, opts, config, remote)


def _compile(model, opts: CompileOptions, config, remote=None) -> Artifact:

    mcu, gpu = opts.target == "rv32", opts.target == "cuda"
    if mcu:
        toolchain.require()                 # a missing toolchain fails before any work
        target = {"kind": "rv32", "march": opts.march, "codegen": opts.codegen}
    elif gpu:
        target = cuda.target_dict(opts.arch)
    else:
        target = llvm.target_dict(opts.target, opts.cpu)
        llvm.linker(target)
    with stage("load + check"):
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
        if mcu:                             # a microcontroller runs one sample at a time
            inputs = frontend.static_specs(src, inputs, "a microcontroller runs one sample at a time")
        given_quantized = quantize.is_quantized(src.proto)
        if opts.tune and (hint := frontend.symbolic_hint(inputs)):
            raise UserError(f"{src.path}: --tune needs static shapes (meta_schedule cannot tile symbolic ones){hint}")
    if config is not None:
        if given_quantized:
            raise UserError(f"{src.path}: the model is already quantized; drop --calib (and --bits), "
                            "its own scales are used")
        inputs, shapes = quantization_shapes(src, inputs)
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
            src = frontend.OnnxModel(proto, src.path, src.sha256)
        variants = report.variants()
        quantization = {"source": "calibrated", "observer": config.observer, "activations": config.activations,
                        "weight_bits": config.weight_bits, "calibration_samples": report.samples,
                        "quantized_tensors": report.tensors, "batchnorm_folded": report.bn_folded}
        if bit_plan is not None:
            quantization["weight_bits"] = "mixed"
            quantization["bit_plan"] = bit_plan.bits
            quantization["sensitivity"] = opts.sensitivity
            quantization["budgets"] = {m: round(v, 3) for m, v in bit_plan.limits.items()}
        if report.residual:
            quantization["residual_stream"] = f"{report.residual} tensors in int{config.residual_bits}"
        if report.narrow:
            quantization["activations_u4"] = f"{report.narrow} ReLU outputs on the u4 grid [0, 15]"
        if report.softmax:
            quantization["softmax_output"] = f"{report.softmax} tensors in uint{config.softmax_bits}"
        if report.nonlinear:
            quantization["nonlinear"] = [asdict(c) for c in report.nonlinear]
    else:
        variants = opts.nonlinear
        quantization = {"source": "as given"} if given_quantized else None
    frontend.check_qdq_params(src)
    with stage("import to Relax"):
        mod = frontend.to_relax(src, inputs)
        limits.check_relax(mod, src.path)
        outputs = frontend.relax_output_specs(mod, [o.name for o in src.proto.graph.output], output_dtypes)
    lowering = None
    if is_qdq(mod):
        with stage("lower QDQ to integer"):
            try:
                cpu = not (mcu or gpu)
                mod, lowering = lower_qdq(mod, variants, vnni=cpu and llvm.vnni_isa(target) is not None,
                                          amx=cpu and llvm.amx_available(target), dp4a=gpu)
                quantization["accumulators"] = lowering.summary()
                if lowering.int64:
                    log.warning("%s: %s", src.path, lowering.summary())
            except QDQLoweringError as exc:
                if mcu:
                    raise UserError(f"{src.path}: integer lowering not possible ({exc}); the rv32 target runs "
                                    "integer-only models") from None
                # still a correct program: the float math between the Q/DQ pairs runs as is
                # the message, not the exception: a log record kept (pytest's caplog) would keep its frames,
                # and the lowering's BlockBuilder would warn on stderr whenever it is finally freed
                log.warning("%s: integer lowering not possible (%s); compiled as fake-quant", src.path, str(exc))
    with stage("analyze"):
        histogram, nbytes = op_histogram(mod), weight_bytes(mod)
        verdict = check_integer_only(mod)
    if mcu:
        return _build_rv32(src, opts, mod, inputs, outputs, histogram, nbytes, verdict, quantization, target,
                           declared)
    device = None
    tuning = tune.TuneReport(opts.tune) if opts.tune else None
    # --tune: meta_schedule's kernels, where they beat ours, between fusion and our schedules
    schedule = partial(tune.schedule, trials=opts.tune, remote=remote, report=tuning) if tuning else None
    with stage(f"build cuda {opts.arch}" if gpu else "tune + build llvm" if tuning else "build llvm"):
        try:
            if gpu:
                executable, kernel_ops, fusion, device = cuda.build(mod, target)
            else:
                executable, kernel_ops, fusion = llvm.build(mod, target, schedule=schedule)
        except UserError:
            raise
        except Exception as exc:
            hint = frontend.symbolic_hint(inputs)
            if not hint:        # static shapes: a build failure is a lowbit bug, keep the traceback
                raise
            raise UserError(f"{src.path}: building with symbolic shapes failed: "
                            f"{frontend.first_line(exc)}{hint}") from None
    if lowering is not None:        # each layer's stored weights, and the kernel that reads them
        quantization["weights"] = [{**w, "kernel": fusion.readers.get(d)}
                                   for w, d in zip(lowering.weights, lowering.digests, strict=True)]

    manifest = Manifest(
        model=Path(src.path).name, model_sha256=src.sha256, target=target, precision=_precision(histogram, verdict),
        inputs=inputs, outputs=outputs, kernels=list(kernel_ops), op_histogram=histogram, weight_bytes=nbytes,
        versions=versions(), integer_only=verdict.integer_only, integer_region=verdict.reason,
        quant=quantize.boundary_params(src.proto) or None, quantization=quantization,
        kernel_ops=kernel_ops, kernels_unfused=fusion.before, kernel_launches=fusion.launches,
        launch_sequence=fusion.sequence, tuning=asdict(tuning) if tuning else None, unscheduled=fusion.unscheduled,
        gpu=device.summary() if device else None,
    )
    return Artifact(manifest, executable, files=device.files() if device else None)


def _build_rv32(src, opts: CompileOptions, mod, inputs, outputs, histogram, nbytes, verdict, quantization,
                target, declared) -> Artifact:
    """The integer region as a C project for a RISC-V microcontroller (codegen/rv32).  The C
    interface takes one sample; the manifest keeps the model's declared inputs (a symbolic batch),
    since ``run`` takes a batch and runs it sample by sample."""
    if not verdict.integer_only:
        raise UserError(f"{src.path}: not integer-only ({verdict.reason}); the rv32 target runs integer-only "
                        "models: quantize it (--calib DATA.npz) or give a QDQ model")
    name = Path(src.path).name.split(".")[0]
    with stage(f"build {opts.march} C project"):
        try:
            region, ins, outs = integer_region.extract(mod, [s.name for s in inputs], [s.name for s in outputs])
            build = rv32.build(region, ins, outs, name=name, source=Path(src.path).name,
                               isa=toolchain.isa(opts.march), codegen=opts.codegen, ram_limit=opts.ram_limit)
        except (integer_region.RegionError, rv32.program.ProgramError) as exc:
            raise UserError(f"{src.path}: {exc}; the rv32 target cannot compile this model yet") from None
    manifest = Manifest(
        model=Path(src.path).name, model_sha256=src.sha256, target=target, precision=_precision(histogram, verdict),
        inputs=declared, outputs=outputs, kernels=sorted(build.kernel_ops), op_histogram=histogram, weight_bytes=nbytes,
        versions=versions(), integer_only=verdict.integer_only, integer_region=verdict.reason,
        quant=quantize.boundary_params(src.proto) or None, quantization=quantization,
        kernel_ops=build.kernel_ops, kernels_unfused=build.unfused, kernel_launches=len(build.calls),
        launch_sequence=build.calls,
        mcu=build.summary, library="model.c",
    )
    return Artifact(manifest, None, files=build.files)


def quantization_shapes(src: frontend.OnnxModel, inputs):
    """(input specs, shapes to canonicalize at): a graph that computes shapes at run time is
    folded at fixed shapes (symbolic dimensions become 1, with a warning); others keep theirs."""
    if not canonicalize.needs_static_shapes(src.proto):
        return inputs, None
    inputs = frontend.static_specs(src, inputs)
    return inputs, {s.name: s.shape for s in inputs}


def plan_bits(src: frontend.OnnxModel, calib, opts: CompileOptions, shapes=None, *, latency: bool = False):
    """Per-layer weight bits for ``--bits mixed``: the sensitivity of every weighted layer
    (compiler/sensitivity.py), their kernel times at each width when a latency budget (or
    ``latency``) asks for them (runtime/latency.py), then the ILP within the budgets
    (compiler/bitplan.py).  Returns (BitPlan, the layers with their sensitivities)."""
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
    width (runtime/latency.py), cached per model, target, shapes and quantization options."""
    builds = {}

    def build(bits: int):
        at = replace(opts, weight_bits=bits, size_budget=None, bops_budget=None, latency_budget=None,
                     sensitivity="perturb", pin=False, calib=calib)
        with steps(5, f"latency table: {bits}-bit build"):
            builds[bits] = _compile(src, at, at.quant_config())
        return builds[bits]

    def compute():
        first = build(bitplan.BITS[0])
        feeds = latency.sample_feeds(first.manifest.inputs, calib)
        return latency.measure(lambda b: builds.get(b) or build(b), layers, feeds)

    if llvm.foreign_arch(llvm.target_dict(opts.target, opts.cpu)):
        raise UserError(f"--latency-budget times kernels on this machine, which cannot run {opts.target} code; "
                        "plan with --size-budget or --bops-budget")
    key = {"model": src.sha256, "target": llvm.target_dict(opts.target, opts.cpu), "shapes": opts.input_shapes,
           "calibration": latency.digest_feeds(calib), "layers": [layer.name for layer in layers],
           "quantization": [opts.observer, opts.nonlinear, opts.residual_bits, opts.softmax_bits,
                            opts.activation_bits]}
    return latency.cached(key, compute)


def _precision(histogram: dict[str, int], verdict) -> str:
    """What the artifact computes in: QDQ models that still do float math between
    their quantize/dequantize pairs are "fake-quant", not int8."""
    if "relax.quantize" not in histogram and "relax.dequantize" not in histogram:
        return "fp32"
    return "int8" if verdict.integer_only else "fake-quant"
