"""Static memory planning: every intermediate tensor of a call sequence gets an offset in one arena.

A microcontroller has no allocator worth the name, so the compiler decides, once, where each
tensor lives.  Two tensors may share bytes only when their lifetimes (the step that writes one to
the last step that reads it) are disjoint.  Finding the smallest arena is an interval-colouring
problem with sizes (NP-hard in general); we run several greedy placements (TFLite Micro's and
USMP's greedy-by-size, by first use, by conflict weight) and then a seeded local search over
placement orders (USMP's hill climb), and keep the best.  The report compares the arena with the
sum of all tensors (no reuse) and with the lower bound every plan must meet: the largest total of
tensors live at one step.

In-place reuse: a kernel that writes each output element from the same element of an input that
dies at that step (an elementwise kernel with equal element sizes) may write over that input; the
two tensors are then planned as one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

ALIGN = 8                      # int64 scratch needs 8 on rv32 (two lw of an 8-aligned pair); cheap for the rest
SEARCH_ROUNDS = 400            # local-search swaps after the greedy starts (deterministic: fixed seed)


@dataclass(frozen=True)
class Tensor:
    """A tensor to place: its size and the steps (call indices) it is live over, inclusive."""
    name: str
    size: int
    first: int
    last: int

    def overlaps(self, other: Tensor) -> bool:
        return self.first <= other.last and other.first <= self.last


@dataclass(frozen=True)
class MemoryPlan:
    offsets: dict[str, int]             # tensor -> byte offset in the arena
    arena: int                          # peak bytes: the arena the caller provides
    total: int                          # the sum of all tensors (every tensor its own buffer)
    lower_bound: int                    # max over steps of the live bytes: no plan can be smaller
    method: str                         # which placement won
    inplace: dict[str, str] = field(default_factory=dict)   # output -> the input whose bytes it reuses
    largest: str = ""                   # the largest tensor (named by --ram-limit errors)

    def summary(self) -> str:
        over = (self.arena / self.lower_bound - 1) * 100 if self.lower_bound else 0.0
        return (f"arena {self.arena} B ({self.method}); lower bound {self.lower_bound} B (+{over:.1f}%); "
                f"no reuse {self.total} B")


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _place(order: list[Tensor], conflicts: dict[str, list[Tensor]]) -> tuple[dict[str, int], int]:
    """Each tensor in turn at the lowest offset where it fits between the placed tensors it
    overlaps in time (best fit over the gaps)."""
    offsets: dict[str, int] = {}
    peak = 0
    for t in order:
        busy = sorted((offsets[o.name], offsets[o.name] + _aligned(o.size)) for o in conflicts[t.name]
                      if o.name in offsets)
        at, best_gap = None, None
        cursor = 0
        for lo, hi in busy:
            gap = lo - cursor
            if gap >= t.size and (best_gap is None or gap < best_gap):
                at, best_gap = cursor, gap
            cursor = max(cursor, hi)
        if at is None:
            at = cursor
        offsets[t.name] = at
        peak = max(peak, at + _aligned(t.size))
    return offsets, peak


def lower_bound(tensors: list[Tensor]) -> int:
    steps = {s for t in tensors for s in (t.first, t.last)}
    return max((sum(_aligned(t.size) for t in tensors if t.first <= s <= t.last) for s in steps), default=0)


def plan(tensors: list[Tensor], inplace: dict[str, str] | None = None) -> MemoryPlan:
    """Place ``tensors``.  ``inplace``: output -> input pairs a kernel may compute in place; a
    pair is merged when the input's last use is the step that writes the output."""
    by_name = {t.name: t for t in tensors}
    merged: dict[str, str] = {}             # output -> root tensor whose bytes it takes
    for out, inp in (inplace or {}).items():
        root = merged.get(inp, inp)
        if out in by_name and inp in by_name and by_name[inp].last == by_name[out].first:
            merged[out] = root
    groups: dict[str, Tensor] = {}
    for t in tensors:
        root = merged.get(t.name, t.name)
        g = groups.get(root)
        groups[root] = t if g is None else Tensor(root, max(g.size, t.size), min(g.first, t.first),
                                                  max(g.last, t.last))
    items = list(groups.values())
    conflicts = {t.name: [o for o in items if o is not t and t.overlaps(o)] for t in items}
    bound = lower_bound(items)

    starts = {
        "greedy by size": sorted(items, key=lambda t: (-t.size, t.first, t.name)),
        "greedy by first use": sorted(items, key=lambda t: (t.first, -t.size, t.name)),
        "greedy by conflicts": sorted(items, key=lambda t: (-sum(o.size for o in conflicts[t.name]) - t.size,
                                                            t.name)),
    }
    best = None
    for method, order in starts.items():
        offsets, peak = _place(order, conflicts)
        if best is None or peak < best[1]:
            best = (offsets, peak, method, order)
    offsets, peak, method, order = best
    start = method
    if peak > bound and len(items) > 2:
        rng = random.Random(0)
        current = list(order)
        for _ in range(SEARCH_ROUNDS):
            i, j = rng.sample(range(len(current)), 2)
            trial = list(current)
            trial[i], trial[j] = trial[j], trial[i]
            t_offsets, t_peak = _place(trial, conflicts)
            if t_peak <= peak:
                if t_peak < peak:
                    offsets, peak, method = t_offsets, t_peak, f"hill climb from {start}"
                current = trial
            if peak == bound:
                break
    offsets = {t.name: offsets[merged.get(t.name, t.name)] for t in tensors}
    largest = max(tensors, key=lambda t: t.size).name if tensors else ""
    return MemoryPlan(offsets, peak, sum(_aligned(t.size) for t in tensors), bound, method,
                      {o: inplace[o] for o in merged}, largest)
