"""MergeKernels: one kernel per row-wise operator and per contraction, after FuseOps.

TVM's ``FuseOps`` stops a kernel at every reduction and never fuses a
producer into a contraction (matmul, conv), so an integer transformer block
falls apart into ~27 launches: I-LayerNorm alone is seven (centre, sum,
square, sum, bit length, max, Newton + normalize), Shiftmax two, and every
head split or merge (reshape, transpose, strided_slice) a launch of its own
that writes a copy.  This pass merges the groups FuseOps made, walking
``main`` from its output back to its input:

* **row-wise chains**: a kernel without a contraction whose output is read by
  one kernel only joins that kernel.  The seven I-LayerNorm pieces and the two
  Shiftmax pieces become one kernel each (every block works on whole rows, so
  ``CPUDefault`` computes them row by row with the row in cache);
* **views**: a kernel of layout ops only (no reduction) joins each of its
  readers, one copy per reader, so a head split is index arithmetic inside
  the Q·Kᵀ and attention·V kernels and no tensor is materialized for it;
* **scores and Shiftmax**: a contraction whose only reader is a row
  normalization (two or more reductions: softmax, LayerNorm) joins it (Q·Kᵀ,
  its requantize and the softmax are one kernel, computed a row of scores at
  a time, as flash attention does).

A row-wise kernel is never merged *into* a contraction's prologue: there its
reductions would run once per output tile.  ``FuseTIR`` then turns every merged
group into one PrimFunc.  Kernels are named after their first few distinct ops
(FuseOps names them after every op, hundreds of characters for a GELU epilogue).
"""

from __future__ import annotations

import re

import tvm
from tvm import relax, s_tir, tirx

COMM_REDUCE = 2                 # tirx.IterVar.CommReduce
MAX_NAME_OPS = 6                # a kernel is named after its first distinct ops (FuseOps: all of them)
INJECTIVE = 2                   # OpPatternKind: reshape, transpose, slice (elementwise math is 0 or 1)
# a hand-written kernel's attribute: the elementwise kernel reading its result is fused into its tiles
# later (codegen/tile_epilogue.py), so that kernel stays whole here, not a contraction's prologue
TILE_EPILOGUE = "lowbit.tile_epilogue"


def _block_kinds(func: tirx.PrimFunc) -> tuple[int, bool, bool]:
    """(reductions, has a contraction, is a layout op): a reduction block reading two or more
    buffers is a contraction (matmul, conv: data and weights); a sum or max reads one."""
    layout = func.attrs is not None and int(func.attrs.get("op_pattern", -1)) == INJECTIVE
    sch = s_tir.Schedule(func)
    reductions, contract = 0, False
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(b)
        if any(int(iv.iter_type) == COMM_REDUCE for iv in stmt.iter_vars):
            reductions += 1
            contract |= len({r.source.name for r in stmt.reads}) >= 2
    return reductions, contract, layout and not reductions


class _Kernel:
    """One kernel call in ``main``: the call_tirs it runs, and the outer values it reads."""

    def __init__(self, var: relax.Var, calls: list[tuple[relax.Var, relax.Call]], inputs: list,
                 bind: dict, kinds: dict):
        self.var, self.calls, self.inputs, self.bind = var, calls, inputs, bind   # bind: param -> input
        flags = [kinds[c.args[0]] for _, c in calls]
        self.reduce = sum(f[0] for f in flags)         # reduction blocks
        self.contract = any(f[1] for f in flags)
        self.layout = all(f[2] for f in flags)


def _is_call_tir(call) -> bool:
    return isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and \
        call.op.name == "relax.call_tir" and len(call.args) == 2


def _static(value) -> bool:
    shape = getattr(value.ty, "shape", None)
    return shape is not None and all(isinstance(d, tvm.tirx.IntImm) for d in shape.values)


def _kernel(mod, binding, kinds) -> _Kernel | None:
    """The kernel a binding of ``main`` launches: a direct call_tir, or a call of a FuseOps group."""
    value = binding.value
    if _is_call_tir(value):
        calls, inputs, bind = [(binding.var, value)], list(value.args[1].fields), {}
    elif isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar):
        func = mod[value.op]
        if not (isinstance(func, relax.Function) and func.attrs is not None and "Primitive" in func.attrs):
            return None
        calls = [(b.var, b.value) for block in func.body.blocks for b in block.bindings]
        if not calls or not all(_is_call_tir(c) for _, c in calls) or not calls[-1][0].same_as(func.body.body):
            return None
        inputs, bind = list(value.args), dict(zip(func.params, value.args, strict=True))
    else:
        return None
    if not all(_static(v) for v in [binding.var, *inputs]):
        return None         # FuseTIR needs each symbolic dimension bound by a parameter: not merged
    if any(mod[c.args[0]].attrs is not None and mod[c.args[0]].attrs.get("tirx.is_scheduled", False)
           for _, c in calls):
        return None         # a hand-written kernel (codegen/amx.py) has no blocks to merge
    for _, c in calls:
        if c.args[0] not in kinds:
            kinds[c.args[0]] = _block_kinds(mod[c.args[0]])
    return _Kernel(binding.var, calls, inputs, bind, kinds)


def _vars_in(expr) -> list:
    found = []
    relax.analysis.post_order_visit(expr, lambda e: found.append(e) if isinstance(e, relax.Var) else None)
    return found


def _plan(kernels: dict[int, _Kernel], bindings, output, row_contractions: bool = True,
          tiled: frozenset = frozenset()) -> dict[int, set[int]]:
    """Groups of binding positions, keyed by the position whose result leaves the group.  A kernel
    reading a value in ``tiled`` (a TILE_EPILOGUE kernel's result) joins no other; the elementwise
    kernels after it (EfficientNet's SiLU table) join no contraction, whose prologue would rerun
    them per tap or tile."""
    producer = {kernels[i].var: i for i in kernels}
    readers: dict[int, set[object]] = {i: set() for i in kernels}
    for pos, b in enumerate(bindings):
        for v in _vars_in(b.value):
            if v in producer:
                readers[producer[v]].add(pos if pos in kernels else "escape")
    for v in _vars_in(output):
        if v in producer:
            readers[producer[v]].add("escape")

    # the results of elementwise kernels fed, directly or through others, by a tile kernel
    downstream = set(tiled)
    for i in sorted(kernels):
        if not kernels[i].reduce and any(a in downstream for a in kernels[i].inputs):
            downstream.add(kernels[i].var)
    groups = {i: {i} for i in kernels}
    owners = {i: {i} for i in kernels}         # the groups a position belongs to (views: several)

    def flag(root, what):
        return any(getattr(kernels[m], what) for m in groups[root])

    def normalization(root):        # softmax (max, sum), LayerNorm (sums): reduce, then reduce again
        return not flag(root, "contract") and sum(kernels[m].reduce for m in groups[root]) >= 2

    def layout(root):
        return all(kernels[m].layout for m in groups[root])

    for p in sorted(kernels, reverse=True):
        if p not in groups or "escape" in readers[p] or any(a in tiled for a in kernels[p].inputs):
            continue
        after_tiles = any(a in downstream for a in kernels[p].inputs)
        users = set().union(*(owners[r] for r in readers[p])) if readers[p] else set()
        if not users or p in users:
            continue
        if len(users) == 1:
            (c,) = users
            if flag(p, "contract"):
                ok = row_contractions and normalization(c)     # scores -> Shiftmax; not conv -> max-pool
            else:
                # no reductions in a GEMM prologue; nor in a layout copy's (AMX's input rows, padded
                # to whole tiles past the rows a LayerNorm computes: no row loop would hold both)
                ok = not ((flag(c, "contract") or layout(c)) and flag(p, "reduce")) and \
                    not (flag(c, "contract") and after_tiles)
        else:
            ok = layout(p)                                                # views: one copy per reader
        if not ok:
            continue
        members = groups.pop(p)
        for c in users:
            groups[c] |= members
        for m in members:
            owners[m] = (owners[m] - {p}) | users
    return groups


def _emit_group(bb: relax.BlockBuilder, name: str, members: list[_Kernel]) -> tuple[relax.GlobalVar, list]:
    """A Primitive function running the members' call_tirs in order; its parameters
    are the values the group reads from outside."""
    inside = [k.var for k in members]
    outer: list[relax.Expr] = []
    for k in members:
        for a in k.inputs:
            if isinstance(a, (relax.Var, tvm.ir.expr.GenericConst)) and \
                    not any(a.same_as(o) for o in outer + inside):
                outer.append(a)
    params = [relax.Var(f"p{i}", a.ty) for i, a in enumerate(outer)]
    with bb.function(name, params, attrs={"Primitive": True}, private=True):
        with bb.dataflow():
            env = dict(zip(outer, params, strict=True))         # outer value -> its value in here
            for k in members:
                local = {**env, **{p: env.get(a, a) for p, a in k.bind.items()}}
                for v, call in k.calls:
                    out = bb.emit(relax.call_tir(call.args[0], [local.get(a, a) for a in call.args[1].fields],
                                                 call.ty_args[0]))
                    local[v] = out
                env[k.var] = out
            result = bb.emit_output(out)
        gv = bb.emit_func_output(result)
    return gv, outer


@tvm.transform.module_pass(opt_level=0, name="lowbit.MergeKernels")
class MergeKernels:
    """``row_contractions=False`` (GPUs): a contraction never joins the row normalization after it;
    there a GEMM runs on tiles of the whole output and a row kernel on a thread block per row."""

    def __init__(self, row_contractions: bool = True):
        self.row_contractions = row_contractions

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main = mod["main"]
        if not isinstance(main.body, relax.SeqExpr) or len(main.body.blocks) != 1 or \
                not isinstance(main.body.blocks[0], relax.DataflowBlock):
            return mod
        bindings = list(main.body.blocks[0].bindings)
        kinds: dict = {}
        kernels = {i: k for i, b in enumerate(bindings) if (k := _kernel(mod, b, kinds)) is not None}
        # every group is emitted afresh, FuseOps' one-group kernels too: all get short names
        tiled = frozenset(b.var for b in bindings if _is_call_tir(b.value) and (attrs := mod[b.value.args[0]].attrs)
                          is not None and attrs.get(TILE_EPILOGUE, False))
        groups = {r: g for r, g in _plan(kernels, bindings, main.body.body, self.row_contractions, tiled).items()
                  if len(g) > 1 or kernels[r].bind}
        if not groups:
            return mod
        bb = relax.BlockBuilder(mod)
        merged = set().union(*groups.values())
        new = []
        for pos, b in enumerate(bindings):
            if pos in groups:
                members = [kernels[m] for m in sorted(groups[pos])]
                ops = dict.fromkeys(re.sub(r"\d+$", "", c.args[0].name_hint) for k in members for _, c in k.calls)
                gv, outer = _emit_group(bb, "fused_" + "_".join(list(ops)[:MAX_NAME_OPS]), members)
                new.append(relax.VarBinding(b.var, relax.Call(gv, outer)))
            elif pos not in merged:
                new.append(b)
        out = bb.get()
        body = relax.SeqExpr([relax.DataflowBlock(new)], main.body.body)
        out["main"] = relax.Function(main.params, body, main.ret_ty, main.is_pure, main.attrs, main.span)
        return relax.transform.DeadCodeElimination(["main"])(out)
