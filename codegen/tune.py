"""``--tune TRIALS``: meta_schedule's search over the fused kernels, kept only where it wins.

For each distinct kernel (FuseTIR's PrimFunc; identical kernels are one task):

1. meta_schedule measures ``TRIALS`` candidates from TVM's CPU rules, plus, on a VNNI target,
   ``MultiLevelTilingWithIntrin`` on lowbit's ``vpdpbusd`` intrinsic (codegen/vnni.py);
2. lowbit's own schedule (codegen/cpu_schedule.py) is built and measured by the same builder
   and runner;
3. the kernel's verdict is the faster of the two; a tuned schedule must be ``MARGIN`` faster to
   replace ours, so that timer noise does not swap a hand-written VNNI kernel out.

The records (meta_schedule's JSON database) and the verdicts live under
``$LOWBIT_CACHE/tune/<target>``, keyed by the kernel's structure: a later compile of the same
kernels for the same target reuses them and measures nothing.  Measurements run on this machine,
or on a board through an RPC tracker (``Remote`` with a key), which spreads them over its fleet.

meta_schedule needs static shapes: a symbolic batch makes its tiling rules fail.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from codegen import vnni
from codegen.cpu_schedule import CPUDefault
from runtime.errors import UserError
from runtime.io import cache_root

MARGIN = 0.95                   # tuned time / ours below which the tuned schedule is used
VERDICTS = "verdicts.json"
log = logging.getLogger("lowbit")


@dataclass
class TuneReport:
    trials: int                                         # candidates meta_schedule measures per kernel
    kernels: int = 0                                    # distinct kernels
    searched: int = 0                                   # kernels searched by this compile
    measured: int = 0                                   # builds timed by this compile (0: all reused)
    tuned: list[str] = field(default_factory=list)      # kernels whose tuned schedule beat ours
    database: str = ""

    def summary(self) -> str:
        return (f"{len(self.tuned)} of {self.kernels} kernels from meta_schedule, the rest lowbit's own; "
                f"{self.searched} searched now ({self.measured} measurements), {self.kernels - self.searched} "
                f"from the database")


def skip_tvm_intrinsics() -> None:
    """meta_schedule imports ``tvm.s_tir.tensor_intrin`` in each TuneContext and build worker, which
    parses every target's tensor intrinsics (~1 min on 2 cores) and so hits the builder's
    timeout; lowbit registers the only ones it uses itself (codegen/vnni.py)."""
    import sys
    import types

    sys.modules.setdefault("tvm.s_tir.tensor_intrin", types.ModuleType("tvm.s_tir.tensor_intrin"))


def database_dir(target: tvm.target.Target) -> Path:
    """One database per target and TVM version: records are schedules for that code generator."""
    key = json.dumps([str(target), tvm.__version__], sort_keys=True)
    return cache_root() / "tune" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _tasks(fused: tvm.IRModule) -> dict[str, tuple[tvm.IRModule, list[tvm.ir.GlobalVar]]]:
    """Distinct kernels by structural hash: (the kernel as a one-function module, its GlobalVars)."""
    tasks: dict[str, tuple[tvm.IRModule, list]] = {}
    for gv, func in fused.functions_items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        key = str(tvm_ffi.structural_hash(mod))
        tasks.setdefault(key, (mod, []))[1].append(gv)
    return tasks


def _space(target: tvm.target.Target):
    from tvm.s_tir import meta_schedule as ms

    rules = list(ms.ScheduleRule.create("llvm"))
    postprocs = list(ms.Postproc.create("llvm"))
    if flavour := vnni.isa(target):
        at = next(i for i, r in enumerate(rules) if type(r).__name__ == "MultiLevelTiling")
        rules.insert(at, ms.schedule_rule.MultiLevelTilingWithIntrin(
            vnni.intrinsic(flavour), structure="SSRSRS", max_innermost_factor=64,
            reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global")))
        postprocs.append(ms.postproc.RewriteTensorize(vectorize_init_loop=True))
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs,
                                             mutator_probs=ms.Mutator.create("llvm"))


def _runner(remote):
    """meta_schedule's runner: local, or boards of an RPC tracker."""
    from tvm.s_tir import meta_schedule as ms

    config = ms.runner.EvaluatorConfig(number=5, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)
    if remote is None:
        return ms.runner.LocalRunner(evaluator_config=config)
    if not remote.key:
        raise UserError("tuning measures through an RPC tracker, which spreads the runs over its boards: "
                        "use --tracker HOST:PORT --key KEY instead of --rpc")
    rpc = ms.runner.RPCConfig(tracker_host=remote.host, tracker_port=remote.port, tracker_key=remote.key,
                              session_timeout_sec=int(remote.timeout_s * 20))
    return ms.runner.RPCRunner(rpc_config=rpc, evaluator_config=config)


def _builder():
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(initializer=skip_tvm_intrinsics)


def _ours(mod: tvm.IRModule, target) -> tvm.IRModule | None:
    sch = s_tir.Schedule(mod)
    return sch.mod if CPUDefault().schedule(sch, target) is not None else None


def _measure(mods: list[tvm.IRModule], target, runner) -> list[float | None]:
    """Seconds per call of each scheduled one-kernel module (None: did not build or run)."""
    from tvm.s_tir import meta_schedule as ms

    built = _builder().build([ms.builder.BuilderInput(m, target) for m in mods])
    inputs, where = [], []
    for i, (b, m) in enumerate(zip(built, mods, strict=True)):
        if b.error_msg is None:
            inputs.append(ms.runner.RunnerInput(b.artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(m["main"])))
            where.append(i)
    out: list[float | None] = [None] * len(mods)
    for i, future in zip(where, runner.run(inputs), strict=True):
        res = future.result()
        if res.error_msg is None:
            out[i] = sum(float(s) for s in res.run_secs) / len(res.run_secs)
    return out


def schedule(fused: tvm.IRModule, target: dict, trials: int, remote=None,
             report: TuneReport | None = None) -> tvm.IRModule:
    """Search the kernels not in the database yet, then give every kernel whose tuned schedule
    won its database schedule (marked scheduled, so our rule leaves it alone)."""
    from tvm.s_tir import meta_schedule as ms

    skip_tvm_intrinsics()
    target = _tuning_target(target)
    report = report if report is not None else TuneReport(trials)
    tasks = _tasks(fused)
    for flavour in vnni.ISAS:           # the records' traces name the intrinsics
        vnni.intrinsic(flavour)
    work = database_dir(target)
    work.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(work))
    verdicts = json.loads((work / VERDICTS).read_text()) if (work / VERDICTS).is_file() else {}
    todo = {k: t for k, t in tasks.items() if verdicts.get(k, {}).get("trials", 0) < trials}
    report.kernels, report.searched, report.database = len(tasks), len(todo), str(work)
    if todo:
        verdicts.update(_search(todo, target, trials, db, work, _runner(remote), report))
        tmp = work / f"{VERDICTS}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(verdicts, indent=1, sort_keys=True))
        os.replace(tmp, work / VERDICTS)
    out = fused
    for k, (mod, gvs) in tasks.items():
        v = verdicts[k]
        if v["tuned_us"] is None or (v["ours_us"] is not None and v["tuned_us"] >= MARGIN * v["ours_us"]):
            continue
        sch = db.query_schedule(mod, target, workload_name="main")
        if sch is None:
            continue
        for gv in gvs:
            out[gv] = sch.mod["main"].with_attrs({"global_symbol": gv.name_hint, "tirx.is_scheduled": True})
        report.tuned.append(gvs[0].name_hint)
    log.info("tuning: %s", report.summary())
    return out


def _search(todo, target, trials: int, db, work: Path, runner, report: TuneReport) -> dict[str, dict]:
    """meta_schedule over ``todo``'s kernels into ``db``, then our schedule of each measured the
    same way: their verdicts."""
    from tvm.s_tir import meta_schedule as ms

    before = len(db.get_all_tuning_records())
    contexts = [ms.TuneContext(mod=mod, target=target, space_generator=_space(target),
                               search_strategy=ms.search_strategy.EvolutionarySearch(
                                   population_size=64, init_min_unmeasured=16, genetic_num_iters=2),
                               task_name=gvs[0].name_hint, num_threads=os.cpu_count() or 1, rand_state=i + 1).clone()
                for i, (mod, gvs) in enumerate(todo.values())]
    ms.tune.tune_tasks(tasks=contexts, task_weights=[len(g) for _, g in todo.values()], work_dir=str(work),
                       max_trials_global=trials * len(todo), max_trials_per_task=trials,
                       num_trials_per_iter=min(trials, 16), builder=_builder(), runner=runner, database=db,
                       cost_model="random")
    report.measured += len(db.get_all_tuning_records()) - before
    ours = {k: _ours(mod, target) for k, (mod, _) in todo.items()}
    scheduled = [k for k, m in ours.items() if m is not None]
    times = dict(zip(scheduled, _measure([ours[k] for k in scheduled], target, runner), strict=True))
    report.measured += len(scheduled)
    verdicts = {}
    for k, (mod, gvs) in todo.items():
        best = db.get_top_k(db.commit_workload(mod), 1)
        tuned_s = sum(float(s) for s in best[0].run_secs) / len(best[0].run_secs) if best else None
        verdicts[k] = {"kernel": gvs[0].name_hint, "trials": trials, "ours_us": _us(times.get(k)),
                       "tuned_us": _us(tuned_s)}
    return verdicts


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 3)


def _tuning_target(target: dict) -> tvm.target.Target:
    # meta_schedule sizes its parallel loops by the core count, which must be in the target
    return tvm.target.Target({**target, "num-cores": target.get("num-cores", os.cpu_count() or 1)})


def verdicts(target: dict) -> dict:
    """The database's per-kernel verdicts (kernel name, trials, our and the tuned time in us)."""
    path = database_dir(_tuning_target(target)) / VERDICTS
    return json.loads(path.read_text()) if path.is_file() else {}

