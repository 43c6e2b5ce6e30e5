"""The ``lowbit`` command line.  Every subcommand is a thin wrapper over the Python API.

User errors print one line, ``error: ...``, and exit 2.  Heavy imports happen
inside the subcommands, after the environment (thread counts) is set.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text}")
    return values


ENGINES = ("ort", "openvino", "iree")      # compiler/tools/bench.sweep's peers (imported lazily: heavy)


def _engines(text: str) -> tuple[str, ...]:
    """--vs: baseline runtimes (compiler/tools/bench.BASELINES) separated by commas."""
    values = tuple(dict.fromkeys(t.strip() for t in text.split(",")))
    if not values or any(v not in ENGINES for v in values):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(ENGINES)} separated by commas, got {text}")
    if "ort" not in values:
        raise argparse.ArgumentTypeError("ORT FP32 is every table's reference: --vs ort, or ort,openvino")
    return values


def _bits(text: str):
    if text == "mixed":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 8, 4, 2 or mixed, got {text}") from None


def _fidelity(text: str):
    if text == "off":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a cosine such as 0.99, or off; got {text}") from None


SENSITIVITY = ("perturb", "hessian")          # compiler/sensitivity.METHODS, without importing it here


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        values = ()
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected fractions in [0, 1] separated by commas, got {text}")
    return values


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.onnx", help="an ONNX classifier or a zoo model name")
    p.add_argument("--data", required=True, help="labeled dataset: digits")
    p.add_argument("--calib", metavar="DATA.npz", help="calibration inputs (default: 256 training images)")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    """How an FP32 model is quantized (compile with --calib, eval)."""
    p.add_argument("--bits", type=_bits, metavar="{8,4,2,mixed}",
                   help="weight bit-width (default 8), or mixed: per layer by ILP within a budget")
    _add_plan_args(p)
    p.add_argument("--observer", default="auto", choices=["auto", "minmax", "percentile", "mse", "mean-minmax"],
                   help="activation range estimator: auto (default) is minmax (ORT's) for tensors a MatMul, Gemm, "
                        "Softmax, LayerNorm or GELU reads and mse elsewhere, or mean-minmax (the mean of each "
                        "sample's range) for the whole model where that leaves its outputs closer to FP32 on the "
                        "calibration samples")
    p.add_argument("--nonlinear", default="auto", choices=["shift", "poly", "auto"],
                   help="softmax / GELU: I-ViT shift, I-BERT poly, or per layer the lower error (default)")
    p.add_argument("--residual-bits", type=int, default=16, choices=[8, 16],
                   help="bits of a transformer's residual stream, the sums LayerNorm reads (default 16)")
    p.add_argument("--softmax-bits", type=int, default=8, choices=[8, 16],
                   help="bits of softmax outputs, the attention probabilities (default 8)")
    p.add_argument("--act-bits", type=int, default=8, choices=[8, 4],
                   help="bits of each layer's ReLU output, the next layer's input: 8 (default) or 4 (u4)")
    p.add_argument("--fidelity", type=_fidelity, metavar="COSINE|off",
                   help="raise 8-bit activations to 16 bits, the fewest that bring the output cosine to FP32 on "
                        "the calibration samples to COSINE (default 0.99, compiler.quantize.FIDELITY); off: "
                        "every activation stays 8-bit")
    p.add_argument("--rounding", default="optq", choices=["optq", "nearest"],
                   help="weight rounding: optq (default) minds each layer's output on the calibration inputs; "
                        "nearest rounds each weight alone")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size-budget", metavar="F",
                   help="with --bits mixed: weight bytes; F <= 1 is HAWQ's fraction from the cheapest plan to "
                        "all 8-bit, F > 1 (or with a unit: 20000B) is bytes")
    p.add_argument("--bops-budget", metavar="F", help="with --bits mixed: bit operations, the same way")
    p.add_argument("--latency-budget", metavar="F",
                   help="with --bits mixed: the layers' kernel time measured on this machine at each width; "
                        "a fraction as above, or milliseconds with the unit: 0.8ms")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="let the first and last weighted layers go below 8 bits too")
    p.add_argument("--sensitivity", default="perturb", choices=SENSITIVITY,
                   help="with --bits mixed: output KL with one layer quantized (default), or HAWQ's "
                        "Hessian trace x weight perturbation")


def _quant_options(args) -> dict:
    """The CompileOptions fields _add_quant_args sets."""
    return {"weight_bits": args.bits, "observer": args.observer, "nonlinear": args.nonlinear,
            "residual_bits": args.residual_bits, "softmax_bits": args.softmax_bits,
            "activation_bits": args.act_bits, "rounding": args.rounding, **_plan_options(args),
            **({} if args.fidelity is None else {"fidelity": None if args.fidelity == "off" else args.fidelity})}


def _plan_options(args) -> dict:
    """The CompileOptions fields _add_plan_args sets."""
    return {"size_budget": args.size_budget, "bops_budget": args.bops_budget, "latency_budget": args.latency_budget,
            "pin": args.pin, "sensitivity": args.sensitivity}


def _add_shape_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                   help="fix an input's shape (repeatable), e.g. input=1,3,224,224")


def _shapes(args) -> dict[str, tuple[int, ...]]:
    from compiler.options import parse_input_shape

    return dict(parse_input_shape(s) for s in args.input_shape)


def _add_target_args(p: argparse.ArgumentParser, targets: tuple[str, ...] | None = None) -> None:
    """--target and the targets' own options, from codegen/registry.py (data: nothing is imported)."""
    from codegen import registry

    names = targets or tuple(registry.TARGETS)
    if len(names) > 1:
        p.add_argument("--target", default="llvm", help="; ".join(
            f"{n}: {registry.TARGETS[n].help}" for n in names))
    for option, takers in registry.options().values():
        if set(takers) & set(names):
            p.add_argument(option.flag, dest=f"target_{option.name}", metavar=option.metavar,
                           help=f"{', '.join(takers)}: {option.help}")


def _target_options(args) -> dict:
    return {k.removeprefix("target_"): v for k, v in vars(args).items() if k.startswith("target_") and v is not None}


def cmd_compile(args) -> int:
    import compiler
    from runtime.artifact import check_outdir

    check_outdir(args.output)                       # fail before a long compile, not after
    t0 = time.perf_counter()
    from compiler.options import CompileOptions

    opts = CompileOptions(target=args.target, target_options=_target_options(args), input_shapes=_shapes(args),
                          calib=args.calib, tune=args.tune, integer_only=args.integer_only, **_quant_options(args))
    art = compiler.compile(args.model, options=opts, remote=_remote(args))
    art.save(args.output)
    m = art.manifest
    if m.tuning:
        _say(args, f"tuning: {tune_summary(m.tuning)}")
    if (w := (m.quantization or {}).get("widened")) and w["tensors"]:
        e = w["error"]
        _say(args, f"fidelity: {len(w['tensors'])} of {w['candidates']} activations at 16 bits for output cosine "
                   f"{1 - e['chosen']:.4f} on {w['samples']} calibration samples (all 8-bit: {1 - e['8-bit']:.4f}; "
                   f"target {w['target']}; --fidelity off keeps 8)")
    for line in opts.backend.summary_lines(m.build) if m.build else []:
        _say(args, line)
    files = [m.library] if m.library else m.files
    size = sum(os.path.getsize(os.path.join(args.output, f)) for f in files)
    _say(args, f"wrote {args.output}: {len(m.kernels)} kernels, {size / 1024:.0f} KiB {' + '.join(files)}, "
               f"{m.precision} for {args.target} ({time.perf_counter() - t0:.1f} s)")
    return 0


def tune_summary(report: dict) -> str:
    from codegen.tune import TuneReport

    return TuneReport(**report).summary()


def cmd_tune(args) -> int:
    """meta_schedule over every kernel, with lowbit's schedule as the one to beat; the database
    then serves ``lowbit compile --tune`` at no cost."""
    import compiler
    from codegen.tune import TuneReport, verdicts
    from compiler.options import CompileOptions

    opts = CompileOptions(target_options=_target_options(args), input_shapes=_shapes(args), calib=args.calib,
                          tune=args.trials,
                          **_quant_options(args))
    art = compiler.compile(args.model, options=opts, remote=_remote(args))
    report = TuneReport(**art.manifest.tuning)
    table = verdicts(art.manifest.target)
    rows = sorted((v for v in table.values() if v["kernel"] in art.manifest.kernels), key=lambda v: v["kernel"])
    width = max((len(v["kernel"]) for v in rows), default=6)
    print(f"{'kernel':<{width}}  {'lowbit us':>10} {'tuned us':>10}  chosen")
    for v in rows:
        ours, tuned = (f"{x:>10.2f}" if x is not None else f"{'-':>10}" for x in (v["ours_us"], v["tuned_us"]))
        print(f"{v['kernel']:<{width}}  {ours} {tuned}  {'tuned' if v['kernel'] in report.tuned else 'lowbit'}")
    print(report.summary())
    print(f"database   {report.database}")
    return 0


def cmd_profile(args) -> int:
    """Per-kernel instruction counts of an rv32 artifact under QEMU (deterministic: -icount shift=0)."""
    import runtime
    from runtime.errors import UserError

    art = runtime.load(args.artifact)
    if not hasattr(art.runner, "profile"):
        raise UserError(f"{args.artifact}: profile counts instructions on a simulator (rv32 artifacts); this one "
                        f"is for {art.manifest.backend} (time it with lowbit bench)")
    block = art.manifest.build
    prof = art.runner.profile(art)
    width = max(len(c.kernel) for c in prof.calls)
    print(f"{'#':>3} {'kernel':<{width}} {'instructions':>13} {'MACs':>10} {'instr/MAC':>9}")
    for c in prof.calls:
        per = f"{c.instructions / c.macs:9.2f}" if c.macs else f"{'-':>9}"
        print(f"{c.index:>3} {c.kernel:<{width}} {c.instructions:>13,} {c.macs:>10,} {per}")
    print(f"{'':>3} {'total':<{width}} {prof.instructions:>13,} {prof.macs:>10,} "
          f"{prof.instructions / max(prof.macs, 1):9.2f}")
    print(f"code (.text) {prof.text_bytes:,} B (kernels + call sequence; the whole harness ELF "
          f"{prof.elf_text_bytes:,} B); flash weights (.rodata) {prof.weight_bytes:,} B; "
          f"RAM {prof.arena_bytes + prof.stack_bytes:,} B = arena {prof.arena_bytes:,} + stack {prof.stack_bytes:,} "
          f"(arena lower bound {block['arena_lower_bound']:,}, no reuse {block['arena_no_reuse']:,})")
    if args.json:
        import json
        from dataclasses import asdict

        _write_text(args.json, json.dumps({**asdict(prof), "instructions": prof.instructions, "macs": prof.macs,
                                           "isa": block["isa"], "codegen": block["codegen"],
                                           "arena_lower_bound": block["arena_lower_bound"],
                                           "arena_no_reuse": block["arena_no_reuse"]}, indent=2))
    return 0


def cmd_run(args) -> int:
    import runtime
    from runtime.io import read_tensors, run_batched, write_npz

    art = runtime.load(args.artifact)
    feeds = read_tensors(args.input, art.manifest.inputs)
    remote = _remote(args)
    if remote and not art.runner.remote:
        from runtime.errors import UserError

        raise UserError(f"{args.artifact}: a {art.manifest.backend} build does not run over TVM RPC; run it here "
                        "(drop --rpc/--tracker)")
    runner = remote.load(art) if remote else art
    outs = run_batched(runner.run, feeds, art.manifest.inputs, art.manifest.outputs, where=args.input)
    write_npz(args.output, outs)
    where = f" (ran on {remote.describe()})" if remote else ""
    _say(args, f"wrote {args.output}: " + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in outs.items()) + where)
    return 0


def _add_remote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpc", metavar="HOST:PORT", help="run on a board's TVM RPC server (python -m tvm.exec.rpc_server)")
    _add_tracker_args(p, "run on a free board of an RPC tracker (with --key)")


def _add_tracker_args(p: argparse.ArgumentParser, what: str = "with --tune: measure on the boards of an RPC "
                                                             "tracker (with --key)") -> None:
    p.add_argument("--tracker", metavar="HOST:PORT", help=what)
    p.add_argument("--key", help="with --tracker: the key the boards registered with")
    p.add_argument("--rpc-timeout", type=_positive(float), default=15.0, metavar="S",
                   help="seconds to reach the server or tracker and get a board (default 15)")


def _remote(args):
    """--rpc (run, bench) or --tracker --key (also compile and tune, for their measurements), or None."""
    from runtime.remote import Remote

    return Remote.from_flags(getattr(args, "rpc", None), args.tracker, args.key, args.rpc_timeout)


def cmd_bench(args) -> int:
    """Each batch size is compiled once; each thread count re-sizes TVM's pool and ORT's sessions
    in this process, so all configurations share one warm machine state."""
    from runtime.threads import configure_threads

    configure_threads(max(args.threads))
    from compiler.tools import bench

    results = bench.sweep(args.model, args.calib, target=args.target, target_options=_target_options(args),
                          batch_sizes=args.batch, threads=args.threads, seconds=args.seconds,
                          samples=args.eval_samples, shapes=_shapes(args), remote=_remote(args), vs=args.vs,
                          report=lambda r: print(r.table(), flush=True))
    if args.json:
        _write_text(args.json, bench.results_json(results))
    return 0


def cmd_eval(args) -> int:
    from runtime.threads import configure_threads

    configure_threads(args.threads)
    from compiler.tools.evaluate import eval_inputs, evaluate

    model_path, calib = eval_inputs(args.model, args.calib, args.data)
    result = evaluate(model_path, calib, args.data, args.threads, also=args.also, **_quant_options(args))
    print(result.table())
    if args.json:
        _write_text(args.json, result.to_json())
    return 0


def cmd_plan(args) -> int:
    from compiler import driver, frontend, quantize
    from compiler.options import CompileOptions
    from compiler.planning import bitplan

    opts = CompileOptions(input_shapes=_shapes(args), calib=args.calib, weight_bits="mixed", **_plan_options(args))
    src = frontend.load(args.model)
    specs, shapes = driver.quantization_shapes(src, frontend.input_specs(src, opts.input_shapes))
    plan, layers = driver.plan_bits(src, quantize.load_calibration(args.calib, specs), opts, shapes, latency=True)
    name_width = max(len(layer.name) for layer in layers)
    print(f"{'layer':<{name_width}}  bits {'params':>9} {'MACs':>11}   {'Omega@8':>9} {'Omega@4':>9} "
          f"{'Omega@2':>9}   {'ms@8':>7} {'ms@4':>7} {'ms@2':>7} {'bytes':>8} {'BOPs':>10} {'ms':>7}")
    for layer in layers:
        b = plan.bits[layer.name]
        omegas = " ".join(f"{layer.sensitivity[k]:>9.2e}" for k in (8, 4, 2))
        times = [f"{layer.latency[k]:>7.4f}" if layer.latency else f"{'-':>7}" for k in (8, 4, 2, b)]
        print(f"{layer.name:<{name_width}}  {b:>4} {layer.params:>9} {layer.macs:>11}   {omegas}   "
              f"{' '.join(times[:3])} {layer.cost('size', b):>8.0f} {layer.cost('bops', b):>10.3g} {times[3]}")
    for metric in plan.totals:
        full = sum(layer.cost(metric, 8) for layer in layers)
        limit = f", budget {plan.limits[metric]:.6g}" if metric in plan.limits else ""
        print(f"{metric:<7} {plan.totals[metric]:.6g} {bitplan.UNITS[metric]} ({100 * plan.totals[metric] / full:.1f}% "
              f"of all 8-bit {full:.6g}{limit})")
    how = {"perturb": "KL of the outputs, one layer quantized at a time",
           "hessian": "Hutchinson trace of the loss Hessian / params x squared weight change"}
    print(f"summed sensitivity {plan.sensitivity:.4g} ({args.sensitivity}: {how[args.sensitivity]})")
    return 0


def cmd_pareto(args) -> int:
    from compiler.tools import pareto
    from compiler.tools.evaluate import eval_inputs

    model_path, calib = eval_inputs(args.model, args.calib, args.data)
    points = pareto.sweep(model_path, calib, args.data, args.budgets, timing_s=args.seconds,
                          sensitivity=args.sensitivity)
    print(pareto.table(points))
    tmp = f"{args.output}.tmp{os.getpid()}.png"
    pareto.plot(points, tmp, f"{os.path.basename(model_path)} on {args.data}")
    os.replace(tmp, args.output)
    if args.json:
        _write_text(args.json, pareto.to_json(points))
    _say(args, f"wrote {args.output}")
    return 0


def cmd_inspect(args) -> int:
    import json

    import runtime
    from codegen import registry

    art = runtime.load(args.artifact)
    m = art.manifest
    files = [m.library] if m.library else m.files
    lib_bytes = sum(os.path.getsize(os.path.join(args.artifact, f)) for f in files)
    if args.json:
        print(json.dumps({"manifest": json.loads(m.to_json()), "library_bytes": lib_bytes}, indent=2))
        return 0
    print(f"model      {m.model} (sha256 {m.model_sha256[:12]})")
    print(f"target     {m.backend} {json.dumps(m.target)}")
    print(f"precision  {m.precision}")
    print(f"integer-only: {'yes' if m.integer_only else 'no'} ({m.integer_region})")
    for island in m.islands:
        print(f"island     {island['op']} at node {island['node']!r}: {island['reason']}")
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for s in specs:
            q = f"  quant {m.quant[s.name]}" if m.quant and s.name in m.quant else ""
            print(f"{kind:<10} {s.name} {s.shape_str()} {s.dtype}{q}")
    print(f"sizes      {' + '.join(files)} {lib_bytes / 1024:.1f} KiB, weights {m.weight_bytes / 1024:.1f} KiB")
    for line in registry.backend(m.backend).summary_lines(m.build) if m.build else []:
        print(line)
    print(f"versions   {', '.join(f'{k} {v}' for k, v in m.versions.items())}")
    if m.quantization:
        q = {k: v for k, v in m.quantization.items() if k not in ("nonlinear", "weights", "bit_plan", "widened")}
        print("quantized  " + ", ".join(f"{k} {v}" for k, v in q.items()))
        if w := m.quantization.get("widened"):
            errors = ", ".join(f"{k} {1 - v:.4f}" for k, v in w["error"].items())
            print(f"  fidelity target {w['target']}: {len(w['tensors'])} of {w['candidates']} activations at 16 bits "
                  f"(output cosine on {w['samples']} calibration samples: {errors})"
                  + (f": {', '.join(w['tensors'])}" if w["tensors"] else ""))
        rows = m.quantization.get("weights", [])
        plan = list((m.quantization.get("bit_plan") or {}).items())
        # the plan names layers in graph order, the lowering counts them in the same order; names are
        # shown when the two agree on every layer (a packed width is at most the planned one)
        named = len(plan) == len(rows) and all(r["bits"] <= b for r, (_, b) in zip(rows, plan, strict=False))
        for i, r in enumerate(rows):
            print(f"  weights #{i:<3} {r['op']} {'x'.join(map(str, r['shape']))}: {r['bits']}-bit, {r['bytes']} bytes"
                  + (f"  ({plan[i][0]}, planned {plan[i][1]}-bit)" if named else "")
                  + (f"  in {r['kernel']}" if r.get("kernel") else ""))
        for row in m.quantization.get("nonlinear", []):
            errs = ", ".join(f"{v} max {row['max_err'][v]:.4f} mean {row['mean_err'][v]:.5f}" for v in row["max_err"])
            print(f"  {row['op']:<10} {row['chosen']:<12} {row['node']}  ({errs})")
    compute = m.compute_kernels()
    print(f"kernels    {len(m.kernels)} distinct: {len(compute)} compute, {len(m.kernels) - len(compute)} boundary "
          f"quantize/dequantize or shape; {m.kernel_launches} launches per inference after fusion, "
          f"{m.kernels_unfused} before")
    if m.unscheduled:
        print(f"unscheduled {len(m.unscheduled)} kernel(s) no schedule rule fit, run as naive loops: "
              f"{', '.join(m.unscheduled)}")
    if m.tuning:
        print(f"tuning     {tune_summary(m.tuning)}")
    _print_launches(m)
    print(f"ops        {sum(m.op_histogram.values())} Relax op calls before lowering")
    for op, n in m.op_histogram.items():
        print(f"  {n:>5}  {op}")
    return 0


CONTRACTIONS = ("matmul", "conv2d", "group_conv2d")
REDUCTIONS = ("sum", "max", "min")
LAYOUT = ("reshape", "transpose", "strided_slice", "squeeze", "expand_dims", "concatenate", "take")


def _op_summary(ops: list[str]) -> str:
    """What a kernel computes, in one short phrase: its contractions, row reductions, layout
    ops and elementwise integer steps."""
    parts = [f"{ops.count(o)} {o}" for o in CONTRACTIONS + REDUCTIONS if o in ops]
    layout = [o for o in ops if o in LAYOUT]
    if layout:
        parts.append(f"{len(layout)} layout ({', '.join(dict.fromkeys(layout))})")
    rest = len(ops) - sum(ops.count(o) for o in CONTRACTIONS + REDUCTIONS) - len(layout)
    if rest:
        parts.append(f"{rest} elementwise")
    return f"{len(ops)} ops: " + ", ".join(parts)


def _print_launches(m) -> None:
    """The kernels in call order; a block of launches that repeats (a transformer's encoder
    blocks) is printed once."""
    ops = m.kernel_ops or {}
    seq = m.launch_sequence or m.kernels          # artifacts from before launch_sequence: distinct kernels
    block = m.repeated_block() if m.launch_sequence else None
    i = 0
    while i < len(seq):
        if block and i == block[0]:
            start, length, reps = block
            print(f"  launches {start + 1}-{start + length}, repeated {reps}x "
                  f"(one repeating block: {length} kernels):")
            for k in seq[start:start + length]:
                print(f"    {k}  ({_op_summary(ops.get(k, [k]))})")
            i = start + length * reps
            continue
        print(f"  {seq[i]}  ({_op_summary(ops.get(seq[i], [seq[i]]))})")
        i += 1


def cmd_zoo_list(args) -> int:
    from models import zoo

    for e in zoo.ENTRIES.values():
        shape = "x".join(map(str, e.sample_shape))
        print(f"{e.name:<18}{e.kind:<11}{shape:<12}{e.summary}")
    return 0


def cmd_zoo_export(args) -> int:
    from models import zoo

    f = zoo.export(args.name, args.output, args.calib)
    info = f.info_dict()
    acc = "".join(f", {k} {100 * info[k]:.1f}%" for k in ("torch_test_accuracy", "torch_perturbed_accuracy") if k in info)
    _say(args, f"wrote {args.output}" + (f" and {args.calib}" if args.calib else "") + f" (recipe {info['recipe_hash']}{acc})")
    return 0


def cmd_corpus_list(args) -> int:
    from models import corpus

    for v in corpus.variants():
        r = v.recipe
        print(f"{v.name:<34}{r.family:<13}{r.library:<13}{r.builder}")
    return 0


def cmd_corpus_build(args) -> int:
    from models import corpus

    for v in corpus.find(args.names):
        _say(args, f"{v.name}: {corpus.ensure(v).onnx}")
    return 0


def cmd_corpus_report(args) -> int:
    from compiler.tools import corpus as report

    results = report.report(args.names, Path(args.output), args.timeout, progress=lambda m: _say(args, m),
                            jobs=args.jobs, target=args.target)
    _say(args, report.summary(results))
    stem = report.report_name(args.target)
    _say(args, f"wrote {args.output}/{stem}.md and {stem}.json")
    return 0


def _say(args, msg: str) -> None:
    if not args.quiet:
        print(msg)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a flag given before or after the subcommand must not be reset by the other parser's default
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="-v: pipeline stages with timings; -vv: also TVM's own log")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or status lines")

    p = argparse.ArgumentParser(prog="lowbit", parents=[common],
                                description="Compile ONNX models to integer-only low-precision code.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", parents=[common], help="compile an ONNX model into an artifact directory")
    c.add_argument("model", metavar="MODEL.onnx")
    _add_target_args(c)
    _add_shape_arg(c)
    c.add_argument("--calib", metavar="DATA.npz",
                   help="quantize an FP32 model to integer-only, calibrating on these inputs (any sample count)")
    _add_quant_args(c)
    c.add_argument("--integer-only", action="store_true",
                   help="fail (exit 2, no artifact) unless every op between the input quantize and the output "
                        "dequantize is integer: no float islands, no fake-quant")
    c.add_argument("--tune", type=_positive(int), default=0, metavar="TRIALS",
                   help="meta_schedule search, TRIALS candidates per kernel, kept where it beats lowbit's schedule; "
                        "results are cached, so a second compile measures nothing (needs static shapes)")
    _add_tracker_args(c)
    c.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    c.set_defaults(func=cmd_compile)

    t = sub.add_parser("tune", parents=[common], help="tune a model's kernels into the database compile --tune reads")
    t.add_argument("model", metavar="MODEL.onnx")
    t.add_argument("--trials", type=_positive(int), default=64, help="candidates measured per kernel (default 64)")
    _add_target_args(t, ("llvm",))
    _add_shape_arg(t)
    t.add_argument("--calib", metavar="DATA.npz", help="quantize an FP32 model first, as compile --calib does")
    _add_quant_args(t)
    _add_tracker_args(t)
    t.set_defaults(func=cmd_tune)

    r = sub.add_parser("run", parents=[common], help="run an artifact on inputs from .npz/.npy")
    r.add_argument("artifact", metavar="OUTDIR")
    r.add_argument("--input", required=True, metavar="IN.npz")
    r.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    _add_remote_args(r)
    r.set_defaults(func=cmd_run)

    pr = sub.add_parser("profile", parents=[common],
                        help="rv32: per-kernel instructions under QEMU, instructions per MAC, code, flash and RAM")
    pr.add_argument("artifact", metavar="OUTDIR")
    pr.add_argument("--json", metavar="FILE.json", help="also write the figures as JSON")
    pr.set_defaults(func=cmd_profile)

    b = sub.add_parser("bench", parents=[common], help="time lowbit against ONNX Runtime, interleaved")
    b.add_argument("model", metavar="MODEL.onnx", help="an ONNX file, a zoo model name, or a corpus file (resnet18.dynamo)")
    b.add_argument("--vs", type=_engines, default=("ort", "openvino"), metavar="ort,openvino",
                   help="baseline runtimes timed interleaved with lowbit: ort (its FP32 is the reference), "
                        "openvino (with ort, the default; it needs the openvino and nncf packages, which make "
                        "bench installs) and iree (IREE running lowbit's own integer program as TOSA: "
                        "--target tosa adds it)")
    b.add_argument("--threads", type=_counts, default=(os.cpu_count() or 1,), metavar="T1,T2,...",
                   help="threads for every runtime; several are measured one after another (default: all cores)")
    b.add_argument("--batch", type=_counts, default=(1,), metavar="B1,B2,...",
                   help="batch sizes, each compiled and measured (default 1)")
    _add_target_args(b)
    b.add_argument("--calib", metavar="DATA.npz", help="calibration data for the INT8 baselines")
    b.add_argument("--seconds", type=_positive(float), default=20.0,
                   help="time budget for the timed rounds of each batch and thread count")
    b.add_argument("--eval-samples", type=_positive(int), default=8,
                   help="batches used for the fidelity columns")
    _add_remote_args(b)
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    _add_shape_arg(b)
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", parents=[common], help="accuracy of ORT FP32, ORT INT8 and lowbit integer-only")
    _add_dataset_args(e)
    _add_quant_args(e)
    e.add_argument("--threads", type=_positive(int), default=os.cpu_count() or 1, help="threads for every runtime")
    e.add_argument("--also", action="append", default=[], metavar="TARGET",
                   help="also lowbit's build for TARGET, run here (rv32: under QEMU); repeatable")
    e.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    e.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plan", parents=[common], help="per-layer weight bits by ILP, without compiling")
    pl.add_argument("model", metavar="MODEL.onnx")
    pl.add_argument("--calib", required=True, metavar="DATA.npz", help="inputs the sensitivity is measured on")
    _add_plan_args(pl)
    _add_shape_arg(pl)
    pl.set_defaults(func=cmd_plan)

    pa = sub.add_parser("pareto", parents=[common], help="accuracy against size and speed: uniform vs mixed bits")
    _add_dataset_args(pa)
    pa.add_argument("--budgets", type=_fractions, default=(0.25, 0.5, 0.75), metavar="T1,T2,...",
                    help="size budgets of the mixed plans, HAWQ fractions (default 0.25,0.5,0.75)")
    pa.add_argument("--sensitivity", default="perturb", choices=SENSITIVITY, help="how layers are ranked")
    pa.add_argument("--seconds", type=_positive(float), default=10.0,
                    help="time budget for the interleaved timing of all configurations")
    pa.add_argument("-o", "--output", required=True, metavar="PLOT.png")
    pa.add_argument("--json", metavar="FILE", help="also write the points as JSON")
    pa.set_defaults(func=cmd_pareto)

    i = sub.add_parser("inspect", parents=[common], help="show an artifact's kernels, op histogram and sizes")
    i.add_argument("artifact", metavar="OUTDIR")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_inspect)

    z = sub.add_parser("zoo", parents=[common], help="the bundled model zoo")
    zsub = z.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    zl = zsub.add_parser("list", parents=[common], help="list zoo models")
    zl.set_defaults(func=cmd_zoo_list)
    ze = zsub.add_parser("export", parents=[common], help="build (cached) and write a zoo model")
    ze.add_argument("name", metavar="NAME")
    ze.add_argument("-o", "--output", required=True, metavar="FILE.onnx")
    ze.add_argument("--calib", metavar="FILE.npz", help="also write its calibration set")
    ze.set_defaults(func=cmd_zoo_export)

    c = sub.add_parser("corpus", parents=[common], help="the real-model corpus (torchvision, HF transformers exports)")
    csub = c.add_subparsers(dest="corpus_command", required=True, metavar="CORPUS_COMMAND")
    csub.add_parser("list", parents=[common], help="list the corpus's ONNX files").set_defaults(func=cmd_corpus_list)
    cb = csub.add_parser("build", parents=[common], help="export (cached) the named corpus models, or all")
    cb.add_argument("names", nargs="*", metavar="NAME", help="a model (resnet18) or one file (resnet18.dynamo)")
    cb.set_defaults(func=cmd_corpus_build)
    cr = csub.add_parser("report", parents=[common],
                         help="compile every corpus model FP32 and INT8, against ORT and golden; write the table")
    cr.add_argument("names", nargs="*", metavar="NAME", help="a model (resnet18) or one file (resnet18.dynamo)")
    cr.add_argument("-o", "--output", default="bench/results", metavar="DIR", help="where corpus.{md,json} go")
    cr.add_argument("--timeout", type=_positive(float), default=3600.0, metavar="S", help="per model")
    cr.add_argument("--jobs", type=_positive(int), default=1, metavar="N",
                    help="models measured at a time (their compile times then share the machine)")
    cr.add_argument("--target", default="llvm",
                    help="the builds' target, one that runs here: llvm (this machine's CPU; FP32 and INT8) or an "
                         "integer-only one such as tosa (IREE; INT8 only) -> corpus-TARGET.{md,json}")
    cr.set_defaults(func=cmd_corpus_report)
    return p


def _configure_logging(verbose: int) -> None:
    log = logging.getLogger("lowbit")
    for h in [h for h in log.handlers if getattr(h, "lowbit_cli", False)]:
        log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lowbit: %(message)s"))
    handler.lowbit_cli = True
    log.addHandler(handler)
    log.setLevel(logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    import signal

    if hasattr(signal, "SIGPIPE"):      # `lowbit inspect X | head` ends quietly, like any Unix tool
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    # flags may sit before or after the subcommand; absent ones are not set at all (SUPPRESS)
    args.verbose, args.quiet = getattr(args, "verbose", 0), getattr(args, "quiet", False)
    _configure_logging(args.verbose)
    from runtime.errors import UserError
    from runtime.progress import set_quiet

    set_quiet(args.quiet)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        from runtime.remote import stuck

        if stuck():                     # a TVM socket call that timed out still blocks its thread
            sys.stderr.flush()
            os._exit(exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
