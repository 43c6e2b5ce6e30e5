"""Row kernels on the GPU: Shiftmax, I-LayerNorm, pooling sums.

Every block from the first reduction on is computed per row of the output (its axes but the
last), one thread block per row:

* a reduction over the row (max, sum, sum of squares) is split across the block's threads and
  combined by TVM's cross-thread reduction (warp shuffles, then shared memory across warps);
* a step along the row (center, shift-exp, Newton, normalize) gives each thread every T-th
  element;
* the row's intermediates live in shared memory, visible to all its threads.

dlight's ``GeneralReduction`` does the same for float softmax and LayerNorm, but first inlines
every elementwise block into its readers: integer Newton reads its previous value twice per
step, so inlining copies expressions 2^depth times (I-LayerNorm did not finish compiling).
Here a block is inlined only where its readers read it once (codegen/cpu_schedule's rule).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.schedule import ScheduleError

from codegen.cpu_schedule import _broadcast, _const, _inline_casts, _inline_read_once, _under_rows

THREADS = 128              # per row at most; fewer (whole warps) for a narrower row


class CudaRule(dl.ScheduleRule):
    """A CUDA kernel rule: ``schedule`` returns None for a kernel that is not its kind, and a
    schedule primitive that refuses means the same; the next rule then takes the kernel."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        try:
            return self.schedule(s_tir.Schedule(func))
        except (ScheduleError, ValueError, RuntimeError):
            return None

    def schedule(self, sch: s_tir.Schedule) -> s_tir.Schedule | None:
        raise NotImplementedError


class Rows(CudaRule):
    def schedule(self, sch: s_tir.Schedule) -> s_tir.Schedule | None:
        blocks = dl.analysis.normalize_prim_func(sch)
        if blocks is None:
            return None
        reductions = [b for b in blocks if b.is_reduction()]
        if not reductions:
            return None
        start = blocks.index(reductions[0])
        blocks = _inline_casts(sch, blocks[:start]) + blocks[start:]
        kept = _inline_read_once(sch, blocks[:-1], keep=lambda b: _broadcast(sch, b.block_rv))
        out = blocks[-1].block_rv
        sch, depth = _under_rows(sch, kept, out)
        if depth is None:
            return None
        rows = sch.get_loops(out)[:depth]
        width = 1
        for lp in sch.get_loops(out)[depth:]:
            width *= _const(sch.get(lp).extent) or THREADS
        threads = min(THREADS, max(32, 1 << (width - 1).bit_length()))     # whole warps
        sch.bind(sch.fuse(*rows) if len(rows) > 1 else rows[0], "blockIdx.x")
        for b in kept:
            sch.set_scope(b.block_rv, 0, "shared")
            self._threads(sch, b.block_rv, depth, threads)
        self._threads(sch, out, depth, threads, anchor=True)
        return sch

    @staticmethod
    def _threads(sch: s_tir.Schedule, block, depth: int, threads: int, anchor: bool = False) -> None:
        """The block's loops under the row across the thread block: its spatial ones where it has
        any (each thread its elements, a reduction among them serial), else its reduction
        (a cross-thread reduction)."""
        # under the row, compute_at made one loop per block iterator, in iterator order (the
        # row's own of extent 1); the output's own loops are the row's and then one per iterator
        loops, iters = sch.get_loops(block)[depth:], list(sch.get(block).iter_vars)
        iters = iters[depth:] if anchor else iters
        if len(loops) != len(iters):
            raise ScheduleError
        wide = [(lp, iv) for lp, iv in zip(loops, iters, strict=True) if (_const(sch.get(lp).extent) or 2) > 1]
        spatial = [lp for lp, iv in wide if iv.iter_type == tirx.IterVar.DataPar]
        reduce_ = [lp for lp, iv in wide if iv.iter_type == tirx.IterVar.CommReduce]
        if spatial and reduce_:
            # a contraction under the row (scores of a query): its accumulation in shared memory
            # would need a barrier inside the predicated loop; such kernels go to other rules
            raise ScheduleError
        across = spatial or reduce_
        if not across:
            unit = sch.add_unit_loop(block)
            sch.bind(unit, "threadIdx.x")
            return
        fused = sch.fuse(*across) if len(across) > 1 else across[0]
        _, tx = sch.split(fused, [None, threads])
        sch.reorder(tx, _)
        sch.bind(tx, "threadIdx.x")


class Separate(CudaRule):
    """The last resort for any other kernel (attention's contractions, table lookups, layout
    copies): blocks read once are inlined into their readers, and every other block becomes a
    kernel of its own with one thread per output element, its reduction serial.  dlight's
    ``Fallback`` does this after inlining *every* block, which on integer Newton chains grows
    expressions exponentially."""

    def schedule(self, sch: s_tir.Schedule) -> s_tir.Schedule | None:
        blocks = dl.analysis.normalize_prim_func(sch)
        if blocks is None:
            return None
        _inline_read_once(sch, blocks[:-1])
        for block in sch.get_child_blocks(dl.analysis.get_root_block(sch)):
            if not own_kernel(sch, block):
                return None
        return sch


def own_kernel(sch: s_tir.Schedule, block) -> bool:
    """The block as a kernel of its own: one thread per output element, its reduction serial."""
    loops, iters = sch.get_loops(block), sch.get(block).iter_vars
    if len(loops) != len(iters):
        return False
    spatial = [lp for lp, iv in zip(loops, iters, strict=True) if iv.iter_type == tirx.IterVar.DataPar]
    reduce_ = [lp for lp, iv in zip(loops, iters, strict=True) if iv.iter_type != tirx.IterVar.DataPar]
    if not spatial:
        spatial = [sch.add_unit_loop(block)]
    sch.reorder(*spatial, *reduce_)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    bx, tx = sch.split(fused, [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return True
