"""The TOSA target: the integer region (int8 in, int8 out) as TOSA 1.0 MLIR (codegen/tosa/emit.py),
compiled by IREE into a ``.vmfb`` for its llvm-cpu backend; runs go through IREE's runtime
(codegen/tosa/runner.py), the host quantizing and dequantizing as for rv32."""

from __future__ import annotations

import tvm
from tvm import relax

from codegen import integer_region
from codegen.backend import Backend, Build, BuildContext
from codegen.tosa import emit, iree
from codegen.tosa.units import UNITS
from runtime.errors import UserError

SOURCE, MODULE = "model.tosa.mlir", "model.vmfb"


class Tosa(Backend):
    name = "tosa"
    # u8 as on x86, so that IREE runs the very integer program lowbit's CPU build runs: TOSA takes
    # no uint8, and a u8 tensor is carried as its signed view (codegen/tosa/emit.py)
    activations = "u8"
    integer_only = True
    one_sample = "the TOSA module is compiled for static shapes, one sample per call"
    bench_peer = "iree"         # IREE is a peer compiler timed on lowbit's very integer program

    def defaults(self):
        return {"iree_target": iree.HOST}

    def validate(self, opts) -> None:
        super().validate(opts)
        iree.flags(opts.target_options["iree_target"])

    def require(self) -> None:
        iree.require()

    def target(self, opts) -> dict:
        return {"kind": "tosa", "iree_target": opts.target_options["iree_target"]}

    def units(self, target: dict) -> tuple:
        return UNITS

    def stage(self, opts) -> str:
        return f"build TOSA + IREE ({opts.target_options['iree_target']})"

    def build(self, mod: tvm.IRModule, target: dict, ctx: BuildContext) -> Build:
        try:
            # the host dequantizes the outputs: a per-channel scale (NNCF's float classifier) is no harder
            region, ins, outs = integer_region.extract(mod, [s.name for s in ctx.inputs], [s.name for s in ctx.outputs],
                                                       per_axis_outputs=True)
            # a static model's shape arithmetic (shape_of -> take -> where, as an exporter spells a
            # Gather's index) folds to constants: TOSA has no shape values
            text, ops, wide = emit.module(relax.transform.FoldConstant()(region)["main"])
        except (integer_region.RegionError, emit.TosaError) as exc:
            raise UserError(f"{ctx.source}: {exc}; the tosa target cannot compile this model yet") from None
        vmfb = iree.compile_tosa(text, target["iree_target"], ctx.source)
        summary = {"iree_target": target["iree_target"], "source": SOURCE, "module": MODULE,
                   "tosa_ops": ops, "i64_ops": wide, "inputs": [vars(t) for t in ins], "outputs": [vars(t) for t in outs]}
        return Build(files={SOURCE: text.encode(), MODULE: vmfb}, kernel_ops={}, kernels_unfused=sum(ops.values()),
                     launch_sequence=[], library=None, summary=summary)

    def summary_lines(self, s: dict) -> list[str]:
        top = ", ".join(f"{k.removeprefix('tosa.')} {v}" for k, v in sorted(s["tosa_ops"].items(), key=lambda kv: -kv[1]))
        return [f"tosa       {s['source']} ({sum(s['tosa_ops'].values())} ops: {top}); {s['module']} for IREE "
                f"{s['iree_target']}"
                + (f"; {sum(s['i64_ops'].values())} ops on i64 (beyond TOSA 1.0's integer profiles)" if s["i64_ops"] else "")]


BACKEND = Tosa()
