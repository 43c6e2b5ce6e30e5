"""Per-layer bit-widths by integer linear program (HAWQ-V3 §3.4).

One binary x[l, b] per (layer, bit-width); exactly one per layer:

    minimize    sum_l,b  Omega[l, b] x[l, b]                (summed sensitivity)
    subject to  sum_b x[l, b] = 1                            for every layer l
                sum_l,b size[l, b] x[l, b]  <= S             weight bytes: ceil(params * b / 8)
                sum_l,b bops[l, b] x[l, b]  <= B             MACs * b * the input's activation bits
                sum_l,b lat[l, b]  x[l, b]  <= L             measured per-layer latency
                x[a, b] = x[c, b]                            tied layers (one residual add's branches)
                x[l, pin] = 1                                pinned layers (first and last at 8 bits)

solved exactly by HiGHS through ``scipy.optimize.milp``.  A budget is absolute, or a fraction t
of the way from the cheapest plan the ties and pins allow (t = 0) to all-8-bit (t = 1), HAWQ's
convention.  An infeasible budget is a ``UserError`` naming the smallest feasible value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import UserError

BITS = (8, 4, 2)
METRICS = ("size", "bops", "latency")
UNITS = {"size": "bytes", "bops": "BOPs", "latency": "ms"}
SUFFIXES = {"size": ("bytes", "b"), "bops": ("bops",), "latency": ("ms",)}


@dataclass(frozen=True)
class Layer:
    name: str
    params: int                             # weight count
    macs: int                               # multiply-accumulates per inference
    sensitivity: Mapping[int, float]        # bits -> Omega, the loss increase from quantizing to that width
    latency: Mapping[int, float] | None = None      # bits -> ms, measured on the target
    activation_bits: int = 8                # of the layer's input: 4 where it is a u4 ReLU output

    def cost(self, metric: str, bits: int) -> float:
        if metric == "size":
            return math.ceil(self.params * bits / 8)
        if metric == "bops":
            return float(self.macs) * bits * self.activation_bits
        if self.latency is None:
            raise UserError(f"layer {self.name}: no latency measured for the target; drop --latency-budget "
                            "or measure the latency table first")
        return float(self.latency[bits])


@dataclass(frozen=True)
class Budget:
    metric: str                             # size | bops | latency
    value: float
    fraction: bool = False                  # HAWQ's t in [0, 1] between the cheapest plan and all-8

    @classmethod
    def parse(cls, metric: str, value: float | str) -> Budget:
        """A bare number <= 1 is a fraction, any other an absolute amount; a unit suffix
        (``20000B``, ``0.8ms``) makes it absolute whatever its size."""
        text = str(value).strip().lower()
        stripped = next((text.removesuffix(u) for u in SUFFIXES.get(metric, ()) if text.endswith(u)), None)
        try:
            number = float(stripped if stripped is not None else text)
        except ValueError:
            raise UserError(f"--{metric}-budget {value}: expected a number, e.g. 0.5 (a fraction) or "
                            f"{'0.8ms' if metric == 'latency' else '20000'} (absolute)") from None
        return cls(metric, number, fraction=stripped is None and number <= 1)

    def __str__(self) -> str:
        return f"{self.value:g}" if self.fraction else f"{self.value:g} {UNITS[self.metric]}"

    def __post_init__(self):
        if self.metric not in METRICS:
            raise UserError(f"unknown budget {self.metric!r}; choose one of: {', '.join(METRICS)}")
        if not math.isfinite(self.value) or self.value < 0 or (self.fraction and self.value > 1):
            raise UserError(f"--{self.metric}-budget {self.value:g}: must be a fraction in [0, 1] (from the "
                            f"cheapest plan to all 8-bit) or an absolute number of {UNITS[self.metric]}")


@dataclass
class BitPlan:
    bits: dict[str, int]
    sensitivity: float
    totals: dict[str, float] = field(default_factory=dict)      # metric -> value of this plan
    limits: dict[str, float] = field(default_factory=dict)      # metric -> absolute budget applied


def solve(layers: Sequence[Layer], budgets: Sequence[Budget] = (), *, choices: Sequence[int] = BITS,
          ties: Sequence[Sequence[str]] = (), pins: Mapping[str, int] | None = None) -> BitPlan:
    """The plan with the least summed sensitivity within every budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    choices = tuple(sorted(set(choices), reverse=True))
    pins = dict(pins or {})
    index = {layer.name: i for i, layer in enumerate(layers)}
    for name, b in pins.items():
        if name not in index or b not in choices:
            raise UserError(f"pin {name}={b}: no such layer, or {b} bits is not among {choices}")
    n, k = len(layers), len(choices)
    if len({b.metric for b in budgets}) != len(budgets):
        raise UserError("each budget may be given once (absolute or as a fraction, not both)")

    def var(i: int, j: int) -> int:
        return i * k + j

    rows, lo, hi = [], [], []

    def add(row: np.ndarray, low: float, high: float) -> None:
        rows.append(row)
        lo.append(low)
        hi.append(high)

    for i in range(n):                                          # one width per layer
        row = np.zeros(n * k)
        row[[var(i, j) for j in range(k)]] = 1
        add(row, 1, 1)
    for group in ties:
        missing = [t for t in group if t not in index]
        if missing:
            raise UserError(f"tie {', '.join(group)}: no layer named {', '.join(missing)}")
        for a, c in zip(group, group[1:], strict=False):
            for j in range(k):
                row = np.zeros(n * k)
                row[var(index[a], j)], row[var(index[c], j)] = 1, -1
                add(row, 0, 0)
    for name, b in pins.items():
        row = np.zeros(n * k)
        row[var(index[name], choices.index(b))] = 1
        add(row, 1, 1)
    structure = (list(rows), list(lo), list(hi))

    def costs(metric: str) -> np.ndarray:
        return np.array([layer.cost(metric, b) for layer in layers for b in choices], float)

    def optimum(c: np.ndarray, extra=()) -> tuple[np.ndarray | None, float]:
        a = np.array(structure[0] + [r for r, _ in extra]) if structure[0] or extra else np.zeros((0, n * k))
        res = milp(c, constraints=LinearConstraint(a, structure[1] + [-np.inf] * len(extra),
                                                   structure[2] + [h for _, h in extra]),
                   integrality=np.ones(n * k), bounds=Bounds(0, 1))
        return (np.round(res.x).astype(int), float(res.fun)) if res.success else (None, math.inf)

    limits, extra = {}, []
    for budget in budgets:
        c = costs(budget.metric)
        low_x, low = optimum(c)                                 # the cheapest plan ties and pins allow
        if low_x is None:
            raise UserError("the ties and pins contradict each other: no plan satisfies them")
        high = float(sum(layer.cost(budget.metric, max(choices)) for layer in layers))
        limit = low + budget.value * (high - low) if budget.fraction else budget.value
        if limit < low - 1e-9 * max(1.0, abs(low)):
            raise UserError(f"--{budget.metric}-budget {budget}: infeasible; the smallest feasible "
                            f"{budget.metric} is {low:.6g} {UNITS[budget.metric]} (all 8-bit: {high:.6g})")
        limits[budget.metric] = limit
        # the row in units of the all-8-bit cost: HiGHS's feasibility tolerance (1e-7) is absolute,
        # and a latency row in ms let it exceed a tight budget by 1e-7 ms, a whole layer's difference
        scale = max(abs(high), 1e-30)
        extra.append((c / scale, limit / scale * (1 + 1e-12)))
    sens = np.array([float(layer.sensitivity[b]) for layer in layers for b in choices])
    x, objective = optimum(sens, extra)
    if x is None:
        raise UserError("the budgets contradict each other: each is feasible alone, but no plan meets "
                        f"all of {', '.join(f'{m} <= {v:.6g}' for m, v in limits.items())}")
    bits = {layer.name: choices[int(np.argmax(x[i * k:(i + 1) * k]))] for i, layer in enumerate(layers)}
    totals = {m: float(sum(layer.cost(m, bits[layer.name]) for layer in layers))
              for m in METRICS if m != "latency" or all(layer.latency is not None for layer in layers)}
    return BitPlan(bits, objective, totals, limits)
