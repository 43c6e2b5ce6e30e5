"""Default CPU schedules for fused kernels (what TVM 0.27 leaves unscheduled).

Relax's CPU pipeline legalizes and fuses, but dlight's CPU rules cover only
GEMV and plain reductions, so conv and matmul kernels reach LLVM as naive
loop nests: reduction innermost, scalar, one thread.  This rule gives every
kernel a schedule that needs no tuning:

* the main reduction block (conv2d, matmul, pooling) becomes
  ``parallel(outer spatial) -> tile -> reduction -> T x V register tile``:
  the innermost spatial axis is vectorized with V lanes, and the widest other
  spatial axis (output channels, matmul rows) is unrolled T times, so each
  vector load of the input feeds T accumulators kept in a local buffer;
* epilogues (bias, ReLU, residual add, requantization) are inlined into one
  block and computed at the tile they consume, while it is still in cache;
* producers (padding) run once as their own parallel, vectorized nest, so the
  padding test stays out of the innermost loop;
* a sum or max of one integer tensor (a zero-point correction's row or column
  sums) keeps its contiguous axis innermost, with its casts inlined;
* injective kernels are flattened, vectorized and parallelized; those that move
  data or test their indices (padding) keep their innermost axis as the vector.

Kernels with several reductions (softmax, LayerNorm) are computed a row at a time,
casts before the first reduction inlined and per-row values (a row's reciprocal)
kept per row, not recomputed per element; attention scores on VNNI are computed
a GEMM row at a time, the softmax after it.  Tuned or tensorized kernels (VNNI)
replace this where they exist; this is the floor.
"""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.schedule import ScheduleError
from tvm.sym import detect_linear_equation
from tvm.tirx.analysis import undefined_vars

from codegen import vnni
from passes import subbyte

VECTOR_BYTES = 64          # AVX-512; LLVM splits wider vectors on narrower ISAs
ROW_TILES = (8, 4)         # rows unrolled per register tile, largest first
# a fork/join costs a thread wake-up (tens of microseconds with the pool asleep, a few with its
# workers spinning between kernels: runtime/threads.py); kernels with less work than this run on
# the calling thread.  2^14, not 2^17: ResNet-18's late epilogues (7 x 7 x 512) split too, int8 at
# 2 threads ResNet-18 2.34 -> 2.19 ms, MobileNetV2 3.35 -> 3.14, DeiT-tiny 7.97 -> 7.16
MIN_PARALLEL_WORK = 1 << 14


def _const(extent) -> int | None:
    """A loop extent as an int, or None when it is symbolic (a dynamic batch)."""
    if isinstance(extent, int):
        return extent
    return int(extent.value) if hasattr(extent, "value") else None


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in undefined_vars(expr, []))


def _read_once(sch: s_tir.Schedule, block, in_total: bool = False) -> bool:
    """Whether every consumer (``in_total``: all consumers together) reads the block's output
    at most once per point.  Inlining a block read k times copies its expression k times;
    along a chain (integer Newton reads its previous value twice per step, from two blocks)
    that grows as k^depth.  TVM 0.27 has no Python TIR visitor, so the loads are counted in
    the consumers' scripts."""
    body = sch.get(block).body
    if not isinstance(body, tirx.BufferStore):
        return False
    load = re.compile(rf"\b{re.escape(body.buffer.name)}\[")
    reads = [len(load.findall(sch.get(c).body.script())) for c in sch.get_consumers(block)]
    return (sum(reads) if in_total else max(reads, default=0)) <= 1


def _feeds(sch: s_tir.Schedule, reader, info) -> bool:
    """Whether the block of ``info`` is read by the block ``reader``."""
    return sch.get(reader).name_hint in {sch.get(c).name_hint for c in sch.get_consumers(info.block_rv)}


def _padding(stmt) -> bool:
    """A padded copy: the block stores if_then_else(inside, its input, a constant)."""
    value = stmt.body.value if isinstance(stmt.body, tirx.BufferStore) else None
    return isinstance(value, tvm.ir.Call) and getattr(value.op, "name", "") == "prim.if_then_else"


def _channels_innermost(sch: s_tir.Schedule, red) -> bool:
    """Whether the reduction's input is read at its output's last (channel) axis as its own last
    index: channels-last, a vector of channels one contiguous load."""
    stmt = sch.get(red.block_rv)
    if not stmt.writes[0].region:       # a scalar: a whole-tensor sum or max
        return False
    last = stmt.writes[0].region[-1].min
    return isinstance(last, tirx.Var) and any(
        r.region[-1].min.same_as(last) for r in _inputs(sch, red.block_rv) if r.region)


def _try_inline(sch: s_tir.Schedule, block) -> bool:
    try:
        sch.compute_inline(block)
    except ScheduleError:
        return False
    return True


def _inline_read_once(sch: s_tir.Schedule, blocks, keep=None) -> list:
    """Inline into their readers those of ``blocks`` that are no reduction, are read once in total
    (inlined into k reads, a block's expression is copied k times: k^depth along integer Newton)
    and are not ``keep(block)``; returns the blocks kept."""
    kept = []
    for b in blocks:
        try:
            if b.is_reduction() or not _read_once(sch, b.block_rv, in_total=True) or (keep and keep(b)):
                raise ScheduleError
            sch.compute_inline(b.block_rv)
        except ScheduleError:
            kept.append(b)
    return kept


def _executions(sch: s_tir.Schedule, block) -> int | None:
    """How many times ``block``'s body runs: the product of its loops' extents (None: symbolic)."""
    extents = [_const(sch.get(lp).extent) for lp in sch.get_loops(block)]
    return None if None in extents else int(np.prod(extents, dtype=np.int64))


def _under_rows(sch: s_tir.Schedule, blocks, out) -> tuple[s_tir.Schedule, int | None]:
    """``blocks`` computed at the output's row loops, as deep as a loop takes them all without
    computing any of them twice: (the schedule, the number of row loops), or (``sch``, None) when
    none does.  A loop of the output that is not a row of its producers (the channels of a pool
    after a LayerNorm, Swin-T's head) would recompute a GEMM's whole row block per channel."""
    loops = sch.get_loops(out)
    before = [_executions(sch, b.block_rv) for b in blocks]
    for depth in range(len(loops) - 1, 0, -1):
        trial = sch.copy()
        try:
            for b in reversed(blocks):
                trial.compute_at(b.block_rv, trial.get_loops(out)[depth - 1], preserve_unit_loops=True)
        except ScheduleError:
            continue
        after = [_executions(trial, b.block_rv) for b in blocks]
        if any(n is not None and m is not None and m > n for n, m in zip(before, after, strict=True)):
            continue
        return trial, depth
    return sch, None


def _moves(stmt) -> bool:
    """Whether a block reads at other points than it writes (padding, a layout copy, a gather)."""
    written = [str(r.min) for r in stmt.writes[0].region] if stmt.writes else []
    return any([str(r.min) for r in read.region] != written for read in stmt.reads)


def _pointwise(sch: s_tir.Schedule, block) -> bool:
    """A cheap elementwise step (a cast, a shift by a constant): it reads every input at the point
    it writes, and divides nothing, so copying it into each reader costs less than a pass over
    memory."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1 or not isinstance(stmt.body, tirx.BufferStore):
        return False
    return not _moves(stmt) and not re.search(r"//|%|T\.truncdiv|T\.floordiv", stmt.body.script())


def _inline_casts(sch: s_tir.Schedule, blocks) -> list:
    """Inline the cheap elementwise blocks among ``blocks`` into their readers (not into VNNI's,
    whose operands must be bytes in memory); returns the blocks kept."""
    kept = []
    for b in blocks:
        try:
            if not _pointwise(sch, b.block_rv) or any(_is_vnni(sch, c) for c in sch.get_consumers(b.block_rv)):
                raise ScheduleError
            sch.compute_inline(b.block_rv)
        except ScheduleError:
            kept.append(b)
    return kept


def _widens_a_load(stmt) -> bool:
    """Whether a block only casts what it loads (``astype(int32 constant, "int64")``)."""
    body = stmt.body
    return isinstance(body, tirx.BufferStore) and isinstance(body.value, tirx.Cast) and \
        isinstance(body.value.value, tvm.ir.expr.TensorLoad)


def _broadcast(sch: s_tir.Schedule, block) -> bool:
    """Whether a reader covers at least twice the points the block writes (a row's sum or its
    reciprocal, read by every element of the row): inlined, each value would be computed that
    many times over (a copy into a padded layout, a few points more, is no reason to keep it)."""
    def points(b) -> int:
        return int(np.prod([_const(iv.dom.extent) or 1 for iv in sch.get(b).iter_vars
                            if iv.iter_type == tirx.IterVar.DataPar], dtype=np.int64))

    return any(points(c) >= 2 * points(block) for c in sch.get_consumers(block))


def _last_extent(sch: s_tir.Schedule, info) -> int:
    """The extent of a block's innermost spatial iterator (a row's width)."""
    spatial = [iv for iv in sch.get(info.block_rv).iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    return _const(spatial[-1].dom.extent) or 0


def _inputs(sch: s_tir.Schedule, block) -> list:
    """The regions a block reads from other buffers than its own output."""
    stmt = sch.get(block)
    own = {w.source.name for w in stmt.writes}
    return [r for r in stmt.reads if r.source.name not in own]


def _static_integer(sch: s_tir.Schedule, info) -> bool:
    """An integer block of fixed shape (float and dynamic-batch reductions keep the generic rule)."""
    stmt = sch.get(info.block_rv)
    return (all(_const(iv.dom.extent) is not None for iv in stmt.iter_vars)
            and all(tvm.DataType(str(w.source.dtype)).type_code == tvm.DataTypeCode.INT for w in stmt.writes))


def _covered(sch: s_tir.Schedule, block) -> bool:
    """Whether the loops around ``block`` run over its whole iteration domain."""
    domain = np.prod([_const(iv.dom.extent) or 0 for iv in sch.get(block).iter_vars], dtype=np.int64)
    loops = np.prod([_const(sch.get(lp).extent) or 0 for lp in sch.get_loops(block)], dtype=np.int64)
    return loops >= domain


def _write_order(sch: s_tir.Schedule, block, loops: list) -> list:
    """``block``'s loops with the one along its output's innermost axis moved innermost.  A
    block TE generated iterates in its output's axis order already; one whose output layout a
    schedule transformed (``transform_layout``: a depthwise convolution's channels-last padding)
    would otherwise store a vector with a stride.  Its iterators bind one loop each (but those
    of extent 1), in order."""
    stmt = sch.get(block)
    bound = [iv.var for iv in stmt.iter_vars if _const(iv.dom.extent) != 1]
    if not stmt.writes or len(bound) != len(loops):
        return loops
    at = [k for k, v in enumerate(bound) if v.same_as(stmt.writes[0].region[-1].min)]
    if not at or at[0] == len(loops) - 1:
        return loops
    k = at[0]
    sch.reorder(*loops[:k], *loops[k + 1:], loops[k])
    return sch.get_loops(block)


def _depthwise(block, spatial: list, width) -> bool:
    """Whether the convolution ``block`` reads its input (the operand indexed by the output's
    width) at the output channel it computes, as a depthwise one does: there channels in the
    lanes read whole vectors of a channels-last input, where a width vector reads one channel's
    row and broadcasts one weight per tap."""
    weights = [r.region[0].min for r in block.reads if r.region and not any(_uses(x.min, width) for x in r.region)]
    channel = next((m for m in weights if isinstance(m, tirx.Var) and any(m.same_as(v) for v in spatial)), None)
    return channel is not None and any(
        any(_uses(x.min, width) for x in r.region) and any(isinstance(x.min, tirx.Var) and x.min.same_as(channel)
                                                          for x in r.region) for r in block.reads)


def _axis_last(d: int):
    """The index map that moves axis ``d`` innermost."""
    return lambda *ax: (*ax[:d], *ax[d + 1:], ax[d])


def _vector_lanes(sch: s_tir.Schedule, block) -> int:
    bits = max((tvm.DataType(str(w.source.dtype)).bits for w in sch.get(block).writes), default=32)
    return max(1, VECTOR_BYTES * 8 // bits)


def _divisor_at_most(extent: int | None, limit: int) -> int:
    """Largest divisor of ``extent`` that is <= limit (1 if unknown).  Odd lane counts
    (7, 14) are fine: LLVM widens them, and a divisor avoids a predicated tail."""
    if extent is None:
        return 1
    return max(d for d in range(1, min(extent, limit) + 1) if extent % d == 0)


def _is_vnni(sch: s_tir.Schedule, block) -> bool:
    return sch.get(block).name_hint.startswith((vnni.BLOCK, vnni.CONV_BLOCK))


def _epilogues_at(sch: s_tir.Schedule, epilogues, anchor, lanes: int) -> list:
    """Each epilogue computed per tile under ``anchor``, right after the tile's reduction, its
    innermost loop vectorized ``lanes`` wide where the tile row divides into vectors.  Returns the
    epilogues left as separate nests, for the caller to schedule: those reading the whole output,
    those whose reads TVM cannot solve per tile, and those with points no tile provides (a copy
    into a bordered layout, AMX's input rows: ``pool[y - 1, x - 1]`` over rows 0..11 of an
    8-row pool), which reverse_compute_at would drop or assert on."""
    apart = []
    for epi in epilogues:
        # tried on a copy: TVM 0.27 raises a ValueError (not a ScheduleError) when it cannot
        # match a read's index to the tile (v - 1), and a dropped border is only seen afterwards
        trial = sch.copy()
        try:
            trial.reverse_compute_at(epi.block_rv, anchor)
        except (ScheduleError, tvm.error.InternalError, ValueError):
            apart.append(epi)
            continue
        if not _covered(trial, epi.block_rv):
            apart.append(epi)
            continue
        sch.reverse_compute_at(epi.block_rv, anchor)
        eloops = sch.get_loops(epi.block_rv)
        extent = _const(sch.get(eloops[-1]).extent) if eloops else None
        if lanes > 1 and extent and extent % lanes == 0:
            inner = sch.split(eloops[-1], [None, lanes])[1] if extent > lanes else eloops[-1]
            sch.vectorize(inner)
        elif lanes > 1 and extent and 4 <= extent < lanes:
            # a tile vectorized over channels stores NCHW rows of its width tile (8): one vector
            # per row, not 8 scalar 64-bit requantizes (a depthwise conv's epilogue)
            sch.vectorize(eloops[-1])
    return apart


GENERIC = tvm.target.Target({"kind": "llvm"})


def _lane_tested(stmt, axes: int) -> bool:
    """Whether an if_then_else in ``stmt`` tests the iterator of one of the output's last ``axes``
    axes, those in the vector (the stem's space-to-depth copy: the padding channel and the phase's
    border depend on the byte)."""
    names = {x.min.name for x in stmt.writes[0].region[-axes:] if isinstance(x.min, tirx.Var)}
    text = stmt.body.script()
    for m in re.finditer(r"T\.if_then_else\(", text):
        depth, k = 0, m.end()
        while k < len(text) and not (depth == 0 and text[k] == ","):
            depth += text[k] in "([" and 1 or -(text[k] in ")]")
            k += 1
        if any(re.search(rf"\b{re.escape(n)}\b", text[m.end():k]) for n in names):
            return True
    return False


def _quantizes_for_gather(sch: s_tir.Schedule, block) -> bool:
    """A float -> integer quantize (a division and a rounding per element) read by a block that
    moves data.  Inlined into the stem's space-to-depth copy (16 bytes per pixel from 4 phases of
    3 channels), each byte divides and rounds on its own: the lane-dependent padding test leaves
    the copy scalar.  Kept, it runs once per input element as a contiguous vector loop, and the
    copy moves bytes."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1 or not isinstance(stmt.body, tirx.BufferStore) or _moves(stmt):
        return False
    if not str(stmt.writes[0].source.dtype).startswith(("int", "uint")) or \
            not any(str(r.source.dtype).startswith("float") for r in stmt.reads):
        return False
    # one reader: with two (a split's parts), dlight's inlining folds one of them into it
    readers = sch.get_consumers(block)
    return len(readers) == 1 and _moves(sch.get(readers[0]))


class CPUDefault(dl.ScheduleRule):
    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self.schedule(s_tir.Schedule(func), target)
        except (ScheduleError, tvm.error.InternalError, ValueError):
            # a shape the VNNI/AMX tiling does not take (TVM 0.27 asserts in tensorize on some
            # regions): the same kernel on the plain vector schedule; a schedule decides speed, never
            # the result, so the fallback is exact
            try:
                return self.schedule(s_tir.Schedule(func), GENERIC)
            except (ScheduleError, tvm.error.InternalError, ValueError):
                return None

    def schedule(self, sch: s_tir.Schedule, target) -> s_tir.Schedule | None:
        """Schedule the kernel in ``sch`` in place (also a tuning candidate: codegen/tune.py);
        None when no rule fits."""
        blocks = dl.analysis.normalize_prim_func(sch)
        if blocks is None:
            return None
        # a constant's widening cast (int32 multipliers: passes/narrow_constants.py) joins its
        # reader first, so the kernel has the structure the rules below expect
        loaded = [b for b in blocks if not b.is_reduction() and not sch.get_producers(b.block_rv)
                  and sch.get_consumers(b.block_rv) and _widens_a_load(sch.get(b.block_rv))]
        if len(_inline_casts(sch, loaded)) < len(loaded):
            blocks = dl.analysis.normalize_prim_func(sch)
            if blocks is None:
                return None
        reductions = [b for b in blocks if b.is_reduction()]
        after = blocks[blocks.index(reductions[0]) + 1:] if reductions else blocks
        if len(reductions) > 1 or not all(_read_once(sch, b.block_rv) for b in after[:-1]):
            # I-LayerNorm, Shiftmax (with its score GEMM): several reductions along each row, and
            # chains (integer Newton) that read a value twice, where inlining copies expressions
            # exponentially
            return self._rowwise(sch, blocks, reductions[0] if reductions else None, vnni.isa(target))
        if not reductions:
            kept = [b for b in blocks if _quantizes_for_gather(sch, b.block_rv)]
            blocks = kept + dl.try_inline_contiguous_spatial(sch, [b for b in blocks if b not in kept])
            for b in blocks:
                self._injective(sch, b.block_rv)
            return sch
        if not all(b.is_injective() for b in blocks if b is not reductions[0]):
            return None
        # packed sub-byte weights: the shift/mask joins the multiply-add, no unpacked copy
        unpacked = [b for b in blocks if sch.get(b.block_rv).name_hint.startswith(subbyte.BLOCK)]
        if unpacked:
            for b in unpacked:
                sch.compute_inline(b.block_rv)
            blocks = dl.analysis.normalize_prim_func(sch)
            if blocks is None:
                return None
            reductions = [b for b in blocks if b.is_reduction()]
        red = reductions[0]
        if self._fold_prologue(sch, blocks, red):
            blocks = dl.analysis.normalize_prim_func(sch)
            if blocks is None:
                return None
            red = next(b for b in blocks if b.is_reduction())
        if _is_vnni(sch, red.block_rv) and (flavour := vnni.isa(target)):
            self._vnni(sch, red, self._epilogues(sch, blocks, red), flavour)
        elif len(_inputs(sch, red.block_rv)) == 1 and _static_integer(sch, red):
            self._plain_reduction(sch, blocks, red)
            return sch
        else:
            # padding applies to einsums (matmul), channels-last weights to strided convs
            padded = self._pad_to_tiles(sch, red)
            vec = None if padded else self._channels_last_weights(sch, red)
            if padded or vec is not None:           # new producer blocks: analyze again
                blocks = dl.analysis.normalize_prim_func(sch)
                if blocks is None:
                    return None
                red = next(b for b in blocks if b.is_reduction())
            if vec is None and _channels_innermost(sch, red):
                # vectors of channels: a border test is one per pixel and tap, not per lane, so the
                # padding joins the reduction instead of a padded copy of the input (MobileNetV2's
                # NHWC depthwise layers: 1.25 MB written and read at 112 x 112 x 96)
                inlined = [b for b in blocks[:blocks.index(red)] if _padding(sch.get(b.block_rv))
                           and not _lane_tested(sch.get(b.block_rv), 1) and _try_inline(sch, b.block_rv)]
                if inlined:
                    blocks = dl.analysis.normalize_prim_func(sch)
                    if blocks is None:
                        return None
                    red = next(b for b in blocks if b.is_reduction())
            self._reduction(sch, red, self._epilogues(sch, blocks, red), -1 if vec is None else vec)
        # producers (padding, layout copies) run once, outside the reduction's tiles:
        # inlined, the padding test would sit in the innermost loop
        for b in blocks[:blocks.index(red)]:
            self._injective(sch, b.block_rv)
        return sch

    @staticmethod
    def _fold_prologue(sch: s_tir.Schedule, blocks, red) -> bool:
        """Inline the elementwise chain before the reduction's direct producers into them (the
        epilogue of the conv that feeds a pool, fused ahead of the pool's padding): one pass over
        the data instead of one per step.  Returns whether any block was inlined."""
        prologue = blocks[:blocks.index(red)]
        return len(_inline_read_once(sch, prologue, keep=partial(_feeds, sch, red.block_rv))) < len(prologue)

    @staticmethod
    def _epilogues(sch: s_tir.Schedule, blocks, red) -> list:
        """The blocks after the reduction, elementwise chains folded into their last block."""
        idx = blocks.index(red)
        epilogues = []
        for b in blocks[idx + 1 : -1]:
            try:
                sch.compute_inline(b.block_rv)
            except ScheduleError:     # not inlinable: keep it as its own stage
                epilogues.append(b)
        return epilogues + blocks[idx + 1 :][-1:]

    def _vnni(self, sch: s_tir.Schedule, red, epilogues, flavour: str) -> None:
        """codegen/vnni.py's packed matmul: rows x (16-lane column blocks) tiles in parallel, the
        reduction in steps of 4, and each 16 x 4 step one ``vpdpbusd`` (tensorized); the tile's
        epilogue (requantize) runs on it right after its reduction."""
        block = red.block_rv
        kinds = red.dom_kind()
        loops = sch.get_loops(block)
        *rows, col = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
        *outer_red, red_loop = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
        if not rows:                    # a vector times the matrix: one row
            rows = [sch.add_unit_loop(block)]
        # the row tile splits the innermost row axis only (a conv's output width): a split of
        # fused (batch, token) rows leaves bindings tensorize cannot separate
        extents = [_const(sch.get(lp).extent) for lp in (*rows, col, *outer_red, red_loop)]
        # a tile of rt rows x ct column blocks keeps rt * ct zmm accumulators: 4 x 4, or for rows
        # no 4 divides (7 and 14 wide convs) up to 7 x 4, within AVX-512's 32 registers
        width = extents[len(rows) - 1]
        rt = _divisor_at_most(width, 4)
        rt = rt if rt == 4 else max(rt, _divisor_at_most(width, 7))
        r0, r1 = sch.split(rows[-1], [None, rt])
        n = extents[len(rows)]
        c0, c1, c2 = sch.split(col, [None, _divisor_at_most(n // vnni.LANES, min(4, 28 // rt)), vnni.LANES])
        k0, k1 = sch.split(red_loop, [None, vnni.GROUP])
        sch.reorder(*rows[:-1], r0, c0, *outer_red, k0, r1, c1, c2, k1)
        tile = sch.fuse(*rows[:-1], r0, c0)
        if None in extents or int(np.prod(extents, dtype=np.int64)) >= MIN_PARALLEL_WORK:
            sch.parallel(tile)
        apart = _epilogues_at(sch, epilogues, tile, vnni.LANES)
        sch.unroll(c1)
        sch.unroll(r1)
        sch.decompose_reduction(block, (outer_red or [k0])[0])
        sch.tensorize(c2, vnni.intrinsic(flavour))
        for b in apart:
            self._injective(sch, b.block_rv)

    def _rowwise(self, sch: s_tir.Schedule, blocks, first_reduction, flavour: str | None) -> s_tir.Schedule:
        """One pass per row: every block from the first reduction on is computed under the output's
        row loops (all its axes but the last), so a row's scores, max, sums and Newton steps stay in
        cache, and the rows run in parallel.  Layout and elementwise producers before the first
        reduction (the head split of Q and K) run once, each as its own nest."""
        start = blocks.index(first_reduction) if first_reduction is not None else 0
        head = _inline_casts(sch, blocks[:start])      # casts ahead of the first reduction
        blocks, start = head + blocks[start:], len(head)
        # elementwise steps read once fold into their reader
        kept = _inline_read_once(sch, blocks[start:-1], keep=lambda b: _broadcast(sch, b.block_rv))
        blocks = blocks[:start] + kept + blocks[-1:]
        if flavour and _is_vnni(sch, blocks[start].block_rv) and _last_extent(sch, blocks[-1]) < _last_extent(
                sch, blocks[start]):
            self._rows_from_vnni(sch, blocks[start:], flavour)
            for b in blocks[:start]:
                self._injective(sch, b.block_rv)
            return sch
        out = blocks[-1].block_rv
        sch, depth = _under_rows(sch, blocks[start:-1], out)
        if depth is not None:
            loops = sch.get_loops(out)
            rows = loops[:depth]
            work = [_const(sch.get(lp).extent) for lp in loops]
            fused = sch.fuse(*rows) if len(rows) > 1 else rows[0]
            if None in work or int(np.prod(work, dtype=np.int64)) * (len(blocks) - start) >= MIN_PARALLEL_WORK:
                try:
                    sch.parallel(fused)
                except ScheduleError:       # a row loop that a block reduces over: serial
                    pass
            for b in blocks[start:-1]:
                if flavour and _is_vnni(sch, b.block_rv):
                    self._vnni_row(sch, b.block_rv, flavour)
                else:
                    self._row_contraction(sch, b.block_rv)
        else:       # no row loop takes every block (a slice of the rows is the output): the GEMM still tiles
            for b in blocks[start:-1]:
                if flavour and _is_vnni(sch, b.block_rv):
                    self._vnni(sch, b, [], flavour)
        for b in blocks[:start]:
            self._injective(sch, b.block_rv)
        return sch

    def _rows_from_vnni(self, sch: s_tir.Schedule, blocks, flavour: str) -> None:
        """Attention scores on VNNI (Q.K^T of runtime operands, then Shiftmax), where the GEMM's
        rows are wider than the output's (197 keys in 13 blocks of 16): the GEMM's rows are the
        anchor, each computed whole, and the row's requantize and softmax after it.  Computed the
        other way round (the GEMM at the softmax's row), the GEMM would cover only the 197 columns
        the softmax reads: a partial block that ``vpdpbusd`` cannot take."""
        gemm = blocks[0].block_rv
        kinds = blocks[0].dom_kind()
        rows = [lp for lp, k in zip(sch.get_loops(gemm), kinds, strict=True) if k == "S"][:-1]
        row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        apart = []
        for b in blocks[1:]:
            # a block is computed per row only where the rows cover all of it: a padded output
            # has points no row of the GEMM provides, which reverse_compute_at would drop
            trial = sch.copy()
            try:
                trial.reverse_compute_at(b.block_rv, row, preserve_unit_loops=True)
            except (ScheduleError, tvm.error.InternalError):    # TVM 0.27 asserts on some regions
                apart.append(b)
                continue
            if _covered(trial, b.block_rv):
                sch.reverse_compute_at(b.block_rv, row, preserve_unit_loops=True)
            else:
                apart.append(b)
        work = [_const(sch.get(lp).extent) for lp in sch.get_loops(gemm)]
        if None in work or int(np.prod(work, dtype=np.int64)) * len(blocks) >= MIN_PARALLEL_WORK:
            sch.parallel(row)
        self._vnni_row(sch, gemm, flavour)
        for b in apart:
            if not b.is_reduction():
                self._injective(sch, b.block_rv)

    def _vnni_row(self, sch: s_tir.Schedule, block, flavour: str) -> None:
        """codegen/vnni.py's matmul for one row (under the row loop of _rowwise): 16-lane column
        blocks, four at a time, over the reduction in steps of 4, one vpdpbusd per 16 x 4 step."""
        col, red = [lp for lp in sch.get_loops(block)[1:] if (_const(sch.get(lp).extent) or 0) > 1][-2:]
        n = _const(sch.get(col).extent)
        c0, c1, c2 = sch.split(col, [None, _divisor_at_most(n // vnni.LANES, 4), vnni.LANES])
        k0, k1 = sch.split(red, [None, vnni.GROUP])
        sch.reorder(c0, k0, c1, c2, k1)
        sch.unroll(c1)
        sch.decompose_reduction(block, k0)
        sch.tensorize(c2, vnni.intrinsic(flavour))

    def _row_contraction(self, sch: s_tir.Schedule, block) -> None:
        """A row of scores (Q.K^T under the row loop): reduction loops outside, the row's contiguous
        axis innermost, so each step is a vector multiply-add along the row (LLVM vectorizes it;
        197 tokens have no lane-sized divisor to split by)."""
        stmt = sch.get(block)
        reduce_ = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        if len({r.source.name for r in stmt.reads}) < 2 or len(reduce_) != 1:
            return
        # under the row loop, compute_at made one loop per iterator in iterator order, the
        # reduction last; those of the row itself have extent 1
        inner = [lp for lp in sch.get_loops(block)[1:] if (_const(sch.get(lp).extent) or 0) > 1]
        if len(inner) != 2 or _const(sch.get(inner[1]).extent) != _const(reduce_[0].dom.extent):
            return
        try:
            sch.reorder(inner[1], inner[0])
            sch.decompose_reduction(block, inner[1])
        except ScheduleError:
            return

    def _plain_reduction(self, sch: s_tir.Schedule, blocks, red):
        """A sum or max of one tensor (the row and column sums of a zero-point correction, a global
        pool): its casts inlined, rows in parallel, and the axis contiguous in memory innermost,
        either the reduction (LLVM vectorizes the running sum) or, when the sum runs across
        rows, the output's own axis under the reduction, so each step adds a whole vector.
        Producers that are not casts run once before it, each as its own nest."""
        head = _inline_casts(sch, blocks[:blocks.index(red)])
        block, stmt = red.block_rv, sch.get(red.block_rv)
        if isinstance(stmt.body, tirx.BufferStore) and isinstance(stmt.body.value, tirx.Max):
            # a max pool's padded copy joins the window loop: its test is one per pixel and tap, a
            # select of a whole channel vector, where a copy would write and read the padded
            # accumulators (int32 after PoolFirst: 3.3 MB for ResNet's stem)
            head = [b for b in head if not _try_inline(sch, b.block_rv)]
        epilogues = self._epilogues(sch, blocks, red)
        loops = sch.get_loops(block)
        kinds = red.dom_kind()
        spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
        reduce_ = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
        spatial_vars = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
        (read,) = _inputs(sch, block)
        contiguous = read.region[-1].min
        inner = [lp for lp, v in zip(spatial, spatial_vars, strict=True) if _uses(contiguous, v)]
        outer = [lp for lp in spatial if lp not in inner]
        sch.reorder(*outer, *reduce_, *inner)
        work = [_const(sch.get(lp).extent) for lp in loops]
        apart = []
        if outer:
            fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            if None in work or int(np.prod(work, dtype=np.int64)) >= MIN_PARALLEL_WORK:
                sch.parallel(fused)
            apart = _epilogues_at(sch, epilogues, fused, 1)
        if inner:
            sch.decompose_reduction(block, reduce_[0])
        for b in head + apart:
            self._injective(sch, b.block_rv)

    def _pad_to_tiles(self, sch: s_tir.Schedule, red) -> bool:
        """Pad a matmul-like block whose vector or row axis has no good divisor
        (197 tokens) up to whole vectors and row tiles; padded copies of the
        operands cost far less than scalar or predicated inner loops.  Convolutions (h + ry indexing)
        are not einsums and are left alone."""
        kinds = red.dom_kind()
        spatial = [i for i, k in enumerate(kinds) if k == "S"]
        ext = [_const(it.dom) for it in red.iters]
        if not spatial or any(ext[i] is None for i in spatial):
            return False
        want = _vector_lanes(sch, red.block_rv)
        last = spatial[-1]
        pad_last = ext[last] > want and _divisor_at_most(ext[last], want) < want // 2
        others = [i for i in spatial[:-1] if ext[i] > ROW_TILES[-1]]
        pad_rows = bool(others) and all(ext[i] % ROW_TILES[-1] for i in others)
        if not (pad_last or pad_rows):
            return False
        padding = [1] * len(kinds)
        if pad_last:
            padding[last] = want
        if pad_rows:
            padding[max(others, key=lambda i: ext[i])] = ROW_TILES[0]
        try:
            sch.pad_einsum(red.block_rv, padding)
        except ScheduleError:
            return False
        return True

    def _channels_last_weights(self, sch: s_tir.Schedule, red) -> int | None:
        """For a strided or a depthwise convolution, vectorize over output channels instead of width.

        With stride s the input is read at ``s*x + rx``, so a vector over a wide
        output row is a gather.  Output channels index only the weights: a copy of the
        weights with channels innermost (made once per call) turns each step into a
        contiguous weight vector times a broadcast input value.  A depthwise convolution's
        input is read at the output channel too, and is made channels-last as well
        (``_channels_last_input``): each step is then two contiguous vectors, at any stride and
        width (MobileNetV2's stride-1 depthwise layers 8.3 -> 7.9 ms of the network, its 14- and
        7-wide ones 7.6 -> 6.6; DS-CNN's 10- and 5-wide ones 0.23 -> 0.13 ms).  Returns the
        position of the channel axis among the spatial axes, or None.
        """
        block = sch.get(red.block_rv)
        data_par = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
        spatial = [iv.var for iv in data_par]
        # narrow outputs (14, 7 wide) of a dense conv keep the width vector: there the row tile
        # over channels wins and the gathers are few; a depthwise one has no such tile
        width = _const(data_par[-1].dom.extent) if data_par else None
        if len(spatial) < 2 or width is None:
            return None
        last = spatial[-1]
        if width < 2 * ROW_TILES[0] and not _depthwise(block, spatial, last):
            return None

        strided = False
        for region in block.reads:
            for rng in region.region:
                if _uses(rng.min, last):
                    coef = detect_linear_equation(rng.min, [last])
                    strided |= not coef or _const(coef[0]) not in (0, 1)
        if not strided and not _depthwise(block, spatial, last):
            return None
        for i, region in enumerate(block.reads):
            mins = [rng.min for rng in region.region]
            if any(_uses(m, last) for m in mins) or not mins:
                continue
            users = [p for p, v in enumerate(spatial) if _uses(mins[0], v)]
            if len(users) != 1 or not isinstance(mins[0], tirx.Var):
                continue
            self._channels_last_input(sch, red.block_rv, mins[0], last)
            cache = sch.cache_read(red.block_rv, i, "global")
            sch.transform_layout(cache, ("write", 0), lambda *ax: (*ax[1:], ax[0]))
            return users[0]
        return None

    @staticmethod
    def _channels_last_input(sch: s_tir.Schedule, block, channel, width) -> None:
        """A depthwise convolution reads its input at the very output channel it computes, so
        with channels in the lanes an NCHW input is a gather: 16 loads, each C x H x W bytes
        from the next, for every multiply-add (MobileNetV2's stride-2 depthwise layers were half
        its time).  The input's producer (the padding, or a copy of a parameter) writes it
        channels-last instead (``_injective`` then runs its vector along the channels, the axis
        it writes contiguously): once per element rather than once per multiply-add.  A channel
        multiplier's input (``o // m``) keeps its layout."""
        stmt = sch.get(block)
        for i, region in enumerate(stmt.reads):
            mins = [rng.min for rng in region.region]
            dims = [d for d, m in enumerate(mins) if isinstance(m, tirx.Var) and m.same_as(channel)]
            if len(dims) != 1 or not any(_uses(m, width) for m in mins):       # the weights; not depthwise
                continue
            d = dims[0]
            buffer = region.source
            try:                            # a buffer of this kernel (the padding)
                producer = next(p for p in sch.get_producers(block) if sch.get(p).writes[0].source.same_as(buffer))
            except StopIteration:           # a parameter: a channels-last copy
                producer = sch.cache_read(block, i, "global")
            sch.transform_layout(producer, ("write", 0), _axis_last(d))
            return

    def is_target_available(self, target) -> bool:
        return target is not None and target.kind.name == "llvm"

    def _injective(self, sch: s_tir.Schedule, block) -> None:
        """Elementwise blocks are flattened into one parallel, vectorized loop.  Blocks that move
        data (padding, transposes, layout copies) keep their innermost axis as the vector: flattened,
        every lane would recompute its indices by division and modulo and gather."""
        loops = sch.get_loops(block)
        if not loops:
            return
        stmt = sch.get(block)
        loops = _write_order(sch, block, loops)
        # a padding test (v < 197) reads its axis too: flattened, that is a division per lane
        moves = _moves(stmt) or re.search(r"if_then_else|T\.Select", stmt.body.script()) is not None
        extents = [_const(sch.get(lp).extent) for lp in loops]
        inner = 1                   # trailing axes fused into the vector: at least 8 lanes (4 x 16 packing)
        while inner < len(loops) - 1 and extents[-inner] and int(np.prod(extents[-inner:])) < 8:
            inner += 1
        if moves and len(loops) > inner and None not in extents[-inner:] and int(np.prod(extents[-inner:])) >= 8:
            tail = sch.fuse(*loops[-inner:]) if inner > 1 else loops[-1]
            lanes = _divisor_at_most(int(np.prod(extents[-inner:])), _vector_lanes(sch, block))
            if lanes > 1:
                lane_loop = sch.split(tail, [None, lanes])[1]
                # TVM's vectorizer runs a loop whose if_then_else tests the lane one lane at a time
                # (the load it guards may be out of bounds); unrolled, each lane's test folds to
                # constants and leaves the pixel's border test (the stem's space-to-depth copy:
                # 216 -> 79 us with its quantize)
                if _lane_tested(stmt, inner):
                    sch.unroll(lane_loop)
                else:
                    sch.vectorize(lane_loop)
            loops = loops[:-inner] + [tail]
            outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            if None in extents or int(np.prod(extents, dtype=np.int64)) >= MIN_PARALLEL_WORK:
                sch.parallel(outer)
            return
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        extent = _const(sch.get(fused).extent)
        lanes = _divisor_at_most(extent, _vector_lanes(sch, block))
        # a vector inside one innermost row is a ramp in every index; one that crosses rows is a
        # gather per lane (TVM 0.27 does not fold the fused index (f // HW) * HW + ... back to f):
        # a float NCHW input's 224-wide rows take 56 lanes, not 64
        row = _divisor_at_most(extents[-1], lanes)
        if row >= 8 and len([e for e in extents if e != 1]) > 1:
            lanes = row
        if lanes > 1:
            outer, inner = sch.split(fused, [None, lanes])
            sch.vectorize(inner)
        else:
            outer = fused
        if extent is None or extent >= MIN_PARALLEL_WORK:
            sch.parallel(outer)

    def _reduction(self, sch: s_tir.Schedule, red, epilogues, vec: int = -1) -> s_tir.Schedule:
        """``vec`` is the spatial axis (position among the spatial axes) to vectorize."""
        block = red.block_rv
        kinds = red.dom_kind()
        loops = sch.get_loops(block)
        spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
        reduce_ = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
        if not spatial or not reduce_:
            return sch
        vec %= len(spatial)
        ext = [_const(sch.get(lp).extent) for lp in spatial]
        dims = ext + [_const(sch.get(lp).extent) for lp in reduce_]
        work = None if None in dims else int(np.prod(dims, dtype=np.int64))     # MACs
        lanes = _divisor_at_most(ext[vec], _vector_lanes(sch, block))
        v_out, v_in = sch.split(spatial[vec], [None, lanes])
        tiles_outer, tiles_inner = [v_out], [v_in]
        outer = [lp for i, lp in enumerate(spatial) if i != vec]
        # the register tile's second axis: the widest other spatial axis a tile in ROW_TILES
        # divides (output channels of a conv, rows of a matmul); each vector load of
        # the input then feeds that many accumulators
        known = [i for i in range(len(spatial)) if i != vec and ext[i]]
        rows: list[int] = []
        for tile in ROW_TILES:        # prefer the largest tile that divides some axis
            rows = [i for i in known if ext[i] % tile == 0]
            if rows:
                break
        if not rows:                  # 197 tokens: the smallest tile, with a predicated tail
            tile, rows = ROW_TILES[-1], [i for i in known if ext[i] > ROW_TILES[-1]]
        if rows:
            # vectorized over channels: tile the contiguous width, so the write-back
            # and epilogue still store whole rows
            last = len(spatial) - 1
            r = last if vec != last and last in rows else max(rows, key=lambda i: ext[i])
            r_out, r_in = sch.split(spatial[r], [None, tile])
            outer = [lp for i, lp in enumerate(spatial) if i not in (r, vec)]
            tiles_outer, tiles_inner = [r_out, v_out], [r_in, v_in]
        sch.reorder(*outer, *tiles_outer, *reduce_, *tiles_inner)
        par = outer + tiles_outer[:1]
        fused = sch.fuse(*par) if len(par) > 1 else par[0]
        if work is None or work >= MIN_PARALLEL_WORK:
            sch.parallel(fused)
        anchor = tiles_outer[-1] if len(tiles_outer) > 1 else fused
        # accumulate the T x V tile in a local buffer: constant indices after
        # unroll/vectorize let LLVM keep it in registers across the reduction
        acc = sch.cache_write(block, 0, "local")
        if vec != len(spatial) - 1:
            # keep the vector axis innermost in the accumulator, or its lanes are strided
            stmt = sch.get(block)
            var = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar][vec]
            dim = next(d for d, r in enumerate(stmt.writes[0].region) if _uses(r.min, var))
            sch.transform_layout(block, ("write", 0), lambda *ax: (*ax[:dim], *ax[dim + 1:], ax[dim]))
        sch.reverse_compute_at(acc, anchor)
        aloops = sch.get_loops(acc)
        if lanes > 1:
            sch.vectorize(aloops[-1])
        apart = _epilogues_at(sch, epilogues, anchor, lanes)
        # annotate before decomposing: afterwards the init block also writes the
        # accumulator and the update block no longer passes vectorize's dataflow check
        if len(tiles_inner) == 2:
            sch.unroll(tiles_inner[0])
        if lanes > 1:
            sch.vectorize(tiles_inner[-1])
        sch.decompose_reduction(block, reduce_[0])
        for b in apart:
            self._injective(sch, b.block_rv)
        return sch
