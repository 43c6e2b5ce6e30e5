"""FuseTileEpilogue: an AMX convolution's elementwise epilogue runs on each 32 x 32 block of sums
as the tiles store it, not over an int32 tensor in memory afterwards.

codegen/amx.py's kernel computes acc[N, P, OC] (int32; P the flattened pixels ``p = y * Wq + x``,
garbage columns ``x >= OW`` included); FuseOps puts the elementwise steps after it into one kernel E
(MergeKernels keeps E out of the next contraction: passes/merge_kernels.TILE_EPILOGUE) that reads
acc once per output element:

    out[v] = f(acc[b(v), y(v) * Wq + x(v), o(v)], other inputs at v)

Written and read back, the int32 tensor costs 8 bytes of memory traffic per element, cold where
the memory plan reuses a buffer last touched long before (DeiT-tiny's fc1: 688 KB; 17 us hot,
57 us in the network).  After FuseTIR this pass inlines E's blocks into one and, where it proves
the layout E writes, puts E into the kernel's store of each block (``amx.conv_kernel(g, epilogue)``):
for the block's sums ``tile[i, j]`` (valid pixel ``p0 + i``, channel ``o0 + j``)

    out[v(b, y, x, o0, j)] = f(tile[i, j], other inputs at v),   y, x = divmod(p0 + i, Wq)

with ``v`` one of the layouts E's output can have (``_layouts``: NHWC, tokens, heads, a key matrix
transposed per head, the next convolution's input rows inside a border).  The layout is proved,
not assumed: substituted into E's index of acc it must simplify to (b, y * Wq + x, o0 + j) for
every valid pixel and channel, and stay inside E's output; else the kernels stay as they were (a
max pool's window, a transpose, the next convolution's phases of stride 2).  A bordered layout's
positions that no pixel maps to must hold a constant in E (a zero point: ``_border``), stored
before the tiles run.  Each output element is then written once.

Exact: the same integer expression per element, its operand read from a stack buffer.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir.schedule import ScheduleError
from tvm.sym import Analyzer

from codegen import amx
from passes.analysis import digest
from passes.fusion_report import FusionReport


def _is_call_tir(e) -> bool:
    return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir"


class _Unsupported(Exception):
    pass


_BINARY = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Mod, tirx.FloorDiv, tirx.FloorMod, tirx.Min, tirx.Max,
           tirx.EQ, tirx.NE, tirx.LT, tirx.LE, tirx.GT, tirx.GE, tirx.And, tirx.Or, tirx.LShift, tirx.RShift,
           tirx.BitwiseAnd, tirx.BitwiseOr, tirx.BitwiseXor)
_LOAD = tvm.ir.expr.TensorLoad          # what tirx.BufferLoad builds


def _rebuild(e, leaf):
    """``e`` with each node for which ``leaf`` returns an expression replaced by it (TVM 0.27 has no
    Python Substitute); an unknown node kind raises _Unsupported."""
    if (r := leaf(e)) is not None:
        return r
    if isinstance(e, (tirx.IntImm, tirx.FloatImm, tirx.Var, tvm.ir.StringImm)):
        return e
    if isinstance(e, tirx.Cast):
        return tirx.Cast(str(e.ty), _rebuild(e.value, leaf))
    if isinstance(e, _BINARY):
        return type(e)(_rebuild(e.a, leaf), _rebuild(e.b, leaf))
    if isinstance(e, (tirx.Not, tirx.BitwiseNot)):
        return type(e)(_rebuild(e.a, leaf))
    if isinstance(e, tirx.Select):
        return tirx.Select(*(_rebuild(x, leaf) for x in (e.condition, e.true_value, e.false_value)))
    if isinstance(e, tvm.ir.Call):
        return tvm.ir.Call(e.op, [_rebuild(a, leaf) for a in e.args], e.attrs, e.ty_args, ret_ty=e.ty)
    if isinstance(e, _LOAD):
        return tirx.BufferLoad(e.source, [_rebuild(i, leaf) for i in e.indices])
    raise _Unsupported(type(e).__name__)


def _i64(v):
    return tirx.IntImm("int64", v) if isinstance(v, int) else v


def _substitute(e, vmap: dict):
    return _rebuild(e, lambda x: vmap.get(x) if isinstance(x, tirx.Var) else None)


def _loads(e, buffer) -> list:
    found = []
    _rebuild(e, lambda x: found.append(x) if isinstance(x, _LOAD) and x.source.same_as(buffer) else None)
    return found


def _mentions(e, pred) -> bool:
    found = []
    _rebuild(e, lambda x: found.append(x) if pred(x) else None)
    return bool(found)


def _one_block(func: tirx.PrimFunc) -> tuple[tirx.PrimFunc, tirx.SBlock] | None:
    """E with every block inlined into the one writing its output, and that block; None where one
    does not inline (a reduction)."""
    sch = s_tir.Schedule(func)
    try:
        while len(blocks := sch.get_child_blocks(sch.get_sblock("root"))) > 1:
            sch.compute_inline(blocks[0])
    except (ScheduleError, ValueError, RuntimeError):
        return None
    (block,) = sch.get_child_blocks(sch.get_sblock("root"))
    return sch.mod["main"], sch.get(block)


BORDER = 4      # row and column offsets tried for a bordered output (a convolution's padding: 3 for 7 x 7)


def _layouts(g: amx.ConvGeometry, shape: tuple, b, y, x, o0, j) -> list[tuple[tuple, tuple | None]]:
    """E's output index of the sum of pixel (y, x), channel o0 + j (o0 a multiple of 32, j < 32), in
    each layout E's output of ``shape`` may have, with the (row, column) offset of a bordered one.
    The first that proves right is taken.  The channel enters as ``... + j`` only, so that 32 lanes
    of j are one contiguous vector."""
    dims, oh, ow, oc = tuple(int(d) for d in shape[1:]), g.out_height, g.out_width, g.out_channels
    forms = {(oh, ow, oc): [((b, y, x, o0 + j), None)],              # NHWC
             (oc, oh, ow): [((b, o0 + j, y, x), None)],              # NCHW (a layer on the NCHW path next)
             (oh * ow, oc): [((b, y * ow + x, o0 + j), None)]}       # flattened pixels (patch tokens)
    if oh == 1:                                         # a token matmul: its rows, or split into heads
        forms.setdefault((ow, oc), []).append(((b, x, o0 + j), None))
        for d in range(amx.BLOCK, oc, amx.BLOCK):
            if oc % d == 0:
                forms.setdefault((oc // d, ow, d), []).append(
                    ((b, tirx.floordiv(o0, d), x, tirx.floormod(o0, d) + j), None))
                # a key matrix transposed per head (Q K^T's right operand): lanes a row apart
                forms.setdefault((oc // d, d, ow), []).append(
                    ((b, tirx.floordiv(o0, d), tirx.floormod(o0, d) + j, x), None))
    if len(dims) == 4 and dims[0] == 1 and dims[3] == oc:
        # the next convolution's input rows (codegen/amx.flatten: one plane, no padding channels),
        # this image at an offset inside a border
        forms[dims] = [((b, 0, y + dy, x + dx, o0 + j), (dy, dx)) for dy in range(BORDER) for dx in range(BORDER)]
    return forms.get(dims, [])


class _Epilogue:
    """E as one expression of acc's element, with the output index that acc[b, p, o] maps to;
    ``ok`` is False where E does not invert."""

    def __init__(self, func: tirx.PrimFunc, position: int, g: amx.ConvGeometry):
        """``position``: E's parameter that is acc."""
        self.ok, self.position = False, position
        inlined = _one_block(func)
        if inlined is None or not isinstance(inlined[1].body, tirx.BufferStore):
            return
        self.func, block = inlined
        self.acc = self.func.params[position]
        store = block.body
        shape = tuple(store.buffer.shape)       # the batch may be symbolic, the rest is static
        if not all(isinstance(d, tirx.IntImm) for d in shape[1:]):
            return
        ivars = [iv.var for iv in block.iter_vars]
        if any(int(iv.iter_type) != 0 for iv in block.iter_vars) or len(store.indices) != len(ivars) or \
                not all(i.same_as(v) for i, v in zip(store.indices, ivars, strict=True)) or \
                not all(Analyzer().can_prove_equal(iv.dom.extent, d) for iv, d in zip(block.iter_vars, shape,
                                                                                     strict=True)):
            return
        try:
            loads = _loads(store.value, self.acc)
        except _Unsupported:
            return
        if not loads or _loads(store.value, store.buffer):
            return
        n = self.acc.shape[0]
        b, y, x, q, j = (tirx.Var(name, "int64") for name in ("b", "y", "x", "q", "j"))
        ana = Analyzer()
        blocks = -(-g.out_channels // amx.BLOCK)
        for v, extent in ((b, n), (y, g.out_height), (x, g.out_width), (q, blocks), (j, amx.BLOCK)):
            ana.bind(v, tvm.ir.Range.from_min_extent(_i64(0), _i64(extent)))
        o0 = q * amx.BLOCK
        want = (b, y * g.pitch + x, o0 + j)
        with ana.constraint_scope(o0 + j < g.out_channels):
            for form, border in _layouts(g, shape, b, y, x, o0, j):
                vmap = dict(zip(ivars, form, strict=True))
                if all(ana.can_prove(f < extent) for f, extent in zip(form, shape, strict=True)) and \
                        all(ana.can_prove_equal(ana.simplify(_substitute(i, vmap)), w)
                            for ld in loads for i, w in zip(ld.indices, want, strict=True)):
                    self.fill = [] if border is None else _border(store, ivars, shape, border, g, self.acc)
                    if self.fill is not None:
                        break
            else:
                return
            # E at (y, x, 32 q + j): every index simplified while the ranges are known (a per-channel
            # constant at (32 q + j) % 192, not lane by lane), acc's element a variable
            self.sum = tirx.Var("sum", "int32")

            def index(i):       # simplified where it is index arithmetic, not a value (a table's index)
                i = _rebuild(i, at)
                data = _mentions(i, lambda x: isinstance(x, _LOAD) or x.same_as(self.sum))
                return i if data else ana.simplify(i)

            def at(e):
                if isinstance(e, _LOAD):
                    if e.source.same_as(self.acc):
                        return self.sum
                    return tirx.BufferLoad(e.source, [index(i) for i in e.indices])
                return vmap.get(e) if isinstance(e, tirx.Var) else None

            self.value = _rebuild(store.value, at)
            self.index = [ana.simplify(f) for f in form]
        self.out, self.byxqj, self.pitch = store.buffer, (b, y, x, q, j), g.pitch
        self.ok = True

    def border(self) -> None:
        """Emit (IR builder) the stores of the positions no pixel maps to (before the tiles)."""
        _emit_fill(self.out, list(self.out.shape), self.fill)

    def __call__(self, b, p, o0, j, value) -> None:
        """Emit (IR builder) E's store for the sum ``value`` of acc[b, p, o0 + j]."""
        from tvm.script.ir_builder import tirx as IB

        b, p, o0, j = (i if str(i.ty) == "int64" else tirx.Cast("int64", i) for i in (b, p, o0, j))
        kernel = dict(zip(self.byxqj, (b, tirx.floordiv(p, self.pitch), tirx.floormod(p, self.pitch),
                                       tirx.floordiv(o0, amx.BLOCK), j), strict=True))
        kernel[self.sum] = value
        IB.buffer_store(self.out, _substitute(self.value, kernel), [_substitute(i, kernel) for i in self.index])


def _emit_fill(out, shape, fill) -> None:
    """Emit (IR builder) the border's constant stores, channels in 64-lane vectors where they divide."""
    from tvm.script.ir_builder import tirx as IB

    if not fill:
        return
    lanes = 64 if int(shape[4]) % 64 == 0 else 1
    for ((y0, y1), (x0, x1)), value in fill:
        with IB.serial(_i64(0), shape[0]) as b, IB.serial(_i64(y0), _i64(y1)) as qy, \
                IB.serial(_i64(x0), _i64(x1)) as qx, IB.serial(_i64(0), _i64(int(shape[4]) // lanes)) as k0, \
                IB.vectorized(_i64(0), _i64(lanes)) as k1:
            IB.buffer_store(out, value, [b, _i64(0), qy, qx, k0 * lanes + k1])


def _border(store, ivars, shape, offset, g: amx.ConvGeometry, acc) -> list | None:
    """The positions of a bordered output that no valid pixel maps to, as boxes of E's iteration
    space (top and bottom rows, left and right columns) with the constant E stores there (a zero
    point), or None where E's value there is not a constant independent of the sums."""
    (dy, dx), (rows, cols) = offset, (int(shape[2]), int(shape[3]))
    oh, ow = g.out_height, g.out_width
    boxes = [((0, dy), (0, cols)), ((dy + oh, rows), (0, cols)), ((dy, dy + oh), (0, dx)),
             ((dy, dy + oh), (dx + ow, cols))]
    out = []
    for (y0, y1), (x0, x1) in boxes:
        if y0 >= y1 or x0 >= x1:
            continue
        ana = Analyzer()
        for v, (lo, hi) in zip(ivars, ((0, shape[0]), (0, 1), (y0, y1), (x0, x1), (0, shape[4])), strict=True):
            ana.bind(v, tvm.ir.Range.from_min_extent(_i64(lo), _i64(hi) - _i64(lo)))
        value = ana.simplify(store.value)
        if not isinstance(value, tirx.IntImm):
            return None
        out.append((((y0, y1), (x0, x1)), value))
    return out


def fused_kernel(g: amx.ConvGeometry, epi: _Epilogue) -> tirx.PrimFunc:
    """The convolution with E in its store of each block (``conv_kernel(g, epi)``); its parameters
    are the convolution's inputs, then E's other inputs and its output."""
    staged = amx.conv_kernel(g, epi)
    params = [*staged.params[:-1], *(v for i, v in enumerate(epi.func.params) if i != epi.position)]
    func = tirx.PrimFunc(params, staged.body, staged.ret_type, attrs=staged.attrs).without_attr("global_symbol")
    s_tir.analysis.verify_well_formed(func)
    return func


def _name(conv: str, epi: str) -> str:
    return conv + "_" + re.sub(r"^fused_amx_valid\d*_?", "", epi)


@tvm.transform.module_pass(opt_level=0, name="lowbit.FuseTileEpilogue")
class FuseTileEpilogue:
    """After FuseTIR: each AMX convolution whose sums only its epilogue kernel reads, and whose
    epilogue inverts (see the module docstring), becomes one kernel.  ``report`` (lowbit inspect's
    record) follows: the fused kernel's ops, launch sequence and weights."""

    def __init__(self, report: FusionReport | None = None):
        self.report = report

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main = mod["main"]
        if not isinstance(main.body, relax.SeqExpr) or len(main.body.blocks) != 1:
            return mod
        bindings = list(main.body.blocks[0].bindings)
        uses: dict = {}
        for b in bindings:
            relax.analysis.post_order_visit(b.value, lambda e: uses.__setitem__(e, uses.get(e, 0) + 1)
                                            if isinstance(e, relax.Var) else None)
        relax.analysis.post_order_visit(main.body.body, lambda e: uses.__setitem__(e, uses.get(e, 0) + 2)
                                        if isinstance(e, relax.Var) else None)
        convs = {b.var: b.value for b in bindings if _is_call_tir(b.value) and isinstance(
            f := mod[b.value.args[0]], tirx.PrimFunc) and f.attrs is not None and amx.GEOMETRY_ATTR in f.attrs}
        fused, drop = {}, set()
        for b in bindings:
            if not _is_call_tir(b.value) or b.value.args[0] in (c.args[0] for c in convs.values()):
                continue
            args = list(b.value.args[1].fields)
            epi_func = mod[b.value.args[0]]
            for k, a in enumerate(args):
                if a not in convs or uses.get(a, 0) != 1 or a in drop:
                    continue
                conv = convs[a]
                g = amx.ConvGeometry.from_ints(mod[conv.args[0]].attrs[amx.GEOMETRY_ATTR])
                epi = _Epilogue(epi_func, k, g)
                if not epi.ok:
                    continue
                kernel = fused_kernel(g, epi)
                fused[b.var] = (conv, k, kernel, b.value.args[0].name_hint)
                drop.add(a)
                break
        if not fused:
            return mod
        bb, new = relax.BlockBuilder(mod), []
        for b in bindings:
            if b.var in drop:
                continue
            if b.var in fused:
                conv, k, kernel, epi_name = fused[b.var]
                name = _name(conv.args[0].name_hint, epi_name)
                gv = bb.add_func(kernel, name)
                ins = [*conv.args[1].fields, *(a for i, a in enumerate(b.value.args[1].fields) if i != k)]
                b = relax.VarBinding(b.var, relax.call_tir(gv, ins, b.value.ty_args[0]))
                self._record(conv.args[0].name_hint, epi_name, name, ins)
            new.append(b)
        out = bb.get()
        body = relax.SeqExpr([relax.DataflowBlock(new)], main.body.body)
        out["main"] = relax.Function(main.params, body, main.ret_ty, main.is_pure, main.attrs, main.span)
        return relax.transform.DeadCodeElimination(["main"])(out)

    def _record(self, conv: str, epi: str, name: str, ins) -> None:
        r = self.report
        if r is None:
            return
        r.groups[name] = r.groups.get(conv, [re.sub(r"\d+$", "", conv)]) + r.groups.get(epi, [])
        i = r.sequence.index(epi)
        r.sequence[i] = name
        del r.sequence[max(j for j in range(i) if r.sequence[j] == conv)]      # the call just before it
        r.launches = len(r.sequence)
        for a in ins:
            if isinstance(a, tvm.ir.GenericConst):
                r.readers[digest(a.value.numpy())] = name
