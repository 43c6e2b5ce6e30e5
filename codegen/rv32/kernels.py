"""Fused TIR kernels as plain functions for a bare-metal core: raw pointers in, no runtime calls.

TVM 0.27 has no unpacked C interface any more (microTVM's ``--unpacked-api`` went with it).  A
PrimFunc whose parameters are data pointers and whose ``calling_conv`` is 1 is skipped by
``MakePackedAPI`` and comes out as ``void name(int8_t* x, ...)``.  Two more things keep the
kernels free of the TVM runtime:

* schedules for a scalar in-order core (``McuSchedule``): elementwise producers and epilogues
  inlined, the requantize epilogue computed at the accumulation's innermost spatial loop, so the
  accumulator is one register and a conv is the classic ``acc = 0; for k: acc += x*w; store
  requant(acc)``;
* scratch lifted into the arena: a temporary a kernel still needs at its top level (a padded input,
  a row of sums) becomes an extra pointer parameter that the static memory planner places, instead
  of a ``TVMBackendAllocWorkspace`` call.  Small temporaries stay C stack arrays.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import ir, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.tirx import compilation_pipeline

LIFT_BYTES = 64             # temporaries from this size up live in the arena, smaller ones on the stack


@dataclass(frozen=True)
class Scratch:
    name: str
    dtype: str
    bytes: int


@dataclass(frozen=True)
class Kernels:
    """The compiled kernels: C source or an object file, and each kernel's scratch parameters
    (appended after its tensor parameters, in this order)."""
    source: str | None
    obj: bytes | None
    scratch: dict[str, tuple[Scratch, ...]]


class McuSchedule(dl.ScheduleRule):
    """One contraction (conv, matmul, a pool's sum) per kernel, scheduled for a scalar core:

    * elementwise producers and the epilogue inlined; the epilogue computed per register tile,
      unrolled, the accumulators' initialisation split off, so they stay in registers and each
      output is written once, requantized;
    * a convolution's padding is not inlined (a bounds test per multiply-accumulate): the padded
      rows an output row needs are copied once per output row for all output channels (loops
      reordered to oh, oc, ow), per channel for a depthwise conv, as a fill of the pad value and an
      unconditional copy of the interior, into a small buffer the arena holds;
    * register tiles that share each load: 2 output channels x 2 pixels (conv), 4 pixels
      (depthwise), 4 columns or channels (matmul, pointwise conv), a whole row of 5 pixels;
    * the filter window (kh x kw) unrolled, and an untiled 1x1 reduction unrolled by 4, so loads
      use constant offsets and the loop overhead is shared by several multiply-accumulates.

    Kernels with several reductions (I-LayerNorm, Shiftmax rows) keep TVM's loop nests; their
    temporaries become arena scratch."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = dl.analysis.normalize_prim_func(sch)
        if blocks is None or sum(b.is_reduction() for b in blocks) > 1:
            return None
        if any(b.is_reduction() and all(_unit(it.dom) for it in b.iters if it.kind == "R") for b in blocks):
            # a reduction over unit axes only (a 1x1 convolution of one channel): TVM inlines the
            # epilogue into it, init included, so the requantize is applied twice; its plain loop
            # nest is right (found by fuzzing, tests/regressions/integer-rv32-*)
            return None
        pads = [b for b in blocks if b.is_data_pad(sch)]
        rest = dl.try_inline_contiguous_spatial(sch, [b for b in blocks if b not in pads])
        reductions = [b for b in rest if b.is_reduction()]
        if len(reductions) != 1:
            return sch
        red = reductions[0]
        loops = sch.get_loops(red.block_rv)
        spatial = sum(1 for it in red.iters if it.kind == "S")
        if spatial == len(loops):
            return sch
        # normalized loops drop unit axes (batch 1): index the output axes from the end
        nred = len(loops) - spatial
        conv = spatial >= 3 and nred == 3               # ..., oc, oh, ow; rc, kh, kw
        depthwise = spatial >= 3 and nred == 2          # ..., c, oh, ow; kh, kw
        oc, oh, ow = spatial - 3, spatial - 2, spatial - 1
        if conv:                                        # oc, oh, ow -> oh, oc, ow
            sch.reorder(loops[oh], loops[oc])
            loops = sch.get_loops(red.block_rv)
        if pads and (conv or depthwise):                # per output row (conv) or channel (depthwise)
            for p in pads:
                try:
                    sch.compute_at(p.block_rv, loops[oc])
                    # a fill of the pad value, then an unconditional copy of the interior
                    sch.decompose_padding(p.block_rv, sch.get_loops(p.block_rv)[oc + 1])
                except (tvm.TVMError, tvm.error.InternalError):
                    pass
        # a register tile: output channels x pixels (conv), pixels (depthwise), columns (matmul) that
        # share each loaded input and weight
        sizes = [_extent(sch, lp) for lp in loops[:spatial]]

        def divides(axes, want):
            """The first of ``axes`` (innermost first) that ``want`` (or half of it) divides.  A row of
            5 pixels (DS-CNN's 25 x 5 maps) is one tile of five accumulators (measured: better than
            4 channels); a row of 3 only when nothing else divides."""
            if sizes[axes[0]] == 5:
                return {axes[0]: 5}
            found = next(({i: w} for w in (want, want // 2) if w > 1 for i in axes if _tile(sizes[i], w) == w), {})
            return found or ({axes[0]: 3} if sizes[axes[0]] == 3 else {})

        if conv:            # output channels (now at ``oh``) x pixels along a row
            tiles = {oh: _tile(sizes[oh], 2), **divides([ow], 2)}
        elif depthwise:     # pixels along a row, or rows: they share the channel's weights
            tiles = divides([ow, oh], 4)
        else:               # matmul, pointwise conv: the innermost output axis
            tiles = divides(list(reversed(range(spatial))), 4) if nred == 1 else {}
        outer, inner, first = [], [], spatial
        for i, lp in enumerate(loops[:spatial]):
            f = _tile(_extent(sch, lp), tiles.get(i, 1))
            if f > 1:
                o, n = sch.split(lp, [None, f])
                outer.append(o)
                inner.append(n)
                first = min(first, i)
            else:
                outer.append(lp)
        reduction = loops[spatial:]
        sch.reorder(*outer[first:], *reduction, *inner)     # not above the padded rows' loop
        for b in rest[rest.index(red) + 1:]:
            try:
                sch.reverse_compute_at(b.block_rv, outer[-1])
                # the tile's requantize unrolled: the accumulators stay in registers
                for lp in sch.get_loops(b.block_rv)[-len(inner):] if inner else []:
                    sch.unroll(lp)
            except (tvm.TVMError, tvm.error.InternalError):
                break
        # TVM's C codegen evaluates max / min operands once, into temporaries it reuses for the whole
        # scope even after a store: an unrolled max-pool window would compare each element against a
        # stale maximum (found by fuzzing, tests/regressions/integer-rv32-*), so those windows stay loops
        selects = isinstance(sch.get(red.block_rv).body.value, (tirx.Max, tirx.Min))
        sch.decompose_reduction(red.block_rv, reduction[0])
        window = [_extent(sch, lp) for lp in reduction[1:]]
        if not selects and all(n is not None and n <= 7 for n in window):
            for lp in reduction[1:]:
                sch.unroll(lp)
            # a 1x1 window (pointwise conv) or none (matmul): several channels per loop trip
            if not inner and int(np.prod(window)) < 4 and (n := _extent(sch, reduction[0])) and n % 4 == 0 and n > 4:
                _, lp = sch.split(reduction[0], [None, 4])
                sch.unroll(lp)
        for lp in inner:
            sch.unroll(lp)
        return sch


def _unit(dom) -> bool:
    return isinstance(dom, int) and dom == 1 or isinstance(dom, tirx.IntImm) and int(dom) == 1


def _tile(extent: int | None, want: int) -> int:
    """The first of ``want``, ``want // 2``, ... that divides ``extent`` (1 when none does)."""
    while want > 1 and (extent is None or extent % want):
        want //= 2
    return want


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def unpacked(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    """``func`` with data pointers for parameters and the plain C calling convention.  In 0.27 a
    parameter is a buffer-typed variable; each is re-declared over a pointer parameter."""
    params, decls = [], []
    for p in func.params:
        ptr = tirx.Var(p.name + "_ptr", ir.PointerType(ir.PrimType(p.dtype)))
        params.append(ptr)
        decls.append(tirx.DeclBuffer(p, data=ptr))
    return tirx.PrimFunc(params, tirx.SeqStmt([*decls, func.body]), attrs=func.attrs).with_attrs(
        {"global_symbol": name, "calling_conv": 1})


def _statements(stmt) -> list:
    return list(stmt.seq) if isinstance(stmt, tirx.SeqStmt) else [stmt]


def lift_scratch(func: tirx.PrimFunc) -> tuple[tirx.PrimFunc, tuple[Scratch, ...]]:
    """Top-level temporaries of a lowered kernel as extra pointer parameters (the arena holds
    them); small ones are left to the stack."""
    keep, lifted, params = [], [], list(func.params)
    for s in _statements(func.body):
        if isinstance(s, tirx.AllocBuffer):
            buf = s.buffer
            n = 1
            for d in buf.shape:
                n *= int(d)
            size = n * tvm.DataType(buf.dtype).bits // 8
            if size >= LIFT_BYTES:
                ptr = tirx.Var(buf.name + "_ptr", ir.PointerType(ir.PrimType(buf.dtype)))
                params.append(ptr)
                lifted.append(Scratch(buf.name, str(buf.dtype), size))
                keep.append(tirx.DeclBuffer(buf, data=ptr))
                continue
        keep.append(s)
    if not lifted:
        return func, ()
    return tirx.PrimFunc(params, tirx.SeqStmt(keep), attrs=func.attrs), tuple(lifted)


_LOWERED = "lowbit_lowered"


def compile_kernels(funcs: dict[str, tirx.PrimFunc], target: dict) -> Kernels:
    """Schedule (``McuSchedule``), lower, lift scratch and generate C (target kind ``c``) or an
    object file (``llvm`` with a riscv32 triple)."""
    tgt = tvm.target.Target(target)
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with tgt:
        mod = dl.ApplyDefaultSchedule(McuSchedule())(mod)
    mod = tvm.IRModule({gv: unpacked(f, gv.name_hint) for gv, f in mod.functions_items()})
    mod = tirx.transform.BindTarget(tgt)(mod)
    pipeline, _, _ = compilation_pipeline.get_tir_pipeline("s_tir")
    with tvm.transform.PassContext(config={"tirx.disable_vectorize": True}):
        lowered = pipeline(mod)
    scratch, out = {}, {}
    for gv, f in lowered.functions_items():
        out[gv], scratch[gv.name_hint] = lift_scratch(f)
    built = tvm.tirx.build(tvm.IRModule(out), target=tgt, pipeline=_LOWERED)
    if tgt.kind.name == "c":
        return Kernels(built.inspect_source(), None, scratch)
    with tempfile.TemporaryDirectory(prefix="lowbit-rv32-") as tmp:
        path = os.path.join(tmp, "kernels.o")
        built.write_to_file(path)
        with open(path, "rb") as f:
            return Kernels(None, f.read(), scratch)


def _already_lowered():
    identity = tvm.transform.Sequential([], name="lowbit_lowered")
    return identity, compilation_pipeline.finalize_host_passes, compilation_pipeline.finalize_device_passes


compilation_pipeline.register_tir_pipeline(_LOWERED, _already_lowered)


def macs(func: tirx.PrimFunc) -> int:
    """Multiply-accumulates of a kernel: the iteration space of each reduction that adds products."""
    sch = s_tir.Schedule(func)
    blocks = dl.analysis.normalize_prim_func(sch)
    total = 0
    for b in blocks or []:
        if not b.is_reduction():
            continue
        value = sch.get(b.block_rv).body.value
        if isinstance(value, tirx.Add) and any(isinstance(x, tirx.Mul) for x in (value.a, value.b)):
            n = 1
            for it in b.iters:
                n *= int(it.dom)
            total += n
    return total


def in_place_inputs(func: tirx.PrimFunc) -> list[int]:
    """Parameters the output may overwrite: every block is injective and reads such an input only
    at the point it writes (so element i is read before output element i replaces it), and the
    input has the output's shape and element size."""
    sch = s_tir.Schedule(func)
    blocks = dl.analysis.normalize_prim_func(sch)
    if not blocks or not all(b.is_injective() for b in blocks):
        return []
    out = func.params[-1]

    def pointwise(name: str) -> bool:
        for b in blocks:
            stmt = sch.get(b.block_rv)
            written = [str(r.min) for r in stmt.writes[0].region]
            for r in stmt.reads:
                if r.source.name == name and [str(x.min) for x in r.region] != written:
                    return False
        return True

    return [i for i, p in enumerate(func.params[:-1])
            if [int(d) for d in p.shape] == [int(d) for d in out.shape]
            and tvm.DataType(p.dtype).bits == tvm.DataType(out.dtype).bits and pointwise(p.name)]
