"""The bit-width ILP (compiler/planning/bitplan.py) against brute force, and its budget errors."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from compiler.planning.bitplan import BITS, Budget, Layer, solve
from runtime.errors import UserError


def layers(n: int, seed: int = 0, latency: bool = False) -> list[Layer]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        params, macs = int(rng.integers(100, 5000)), int(rng.integers(1000, 100000))
        base = float(rng.uniform(0.01, 1.0))        # lower bits: more sensitive (Omega ~ 4^-b)
        sens = {b: base * 4.0 ** -b * float(rng.uniform(0.5, 1.5)) for b in BITS}
        lat = {b: float(rng.uniform(0.1, 1.0)) * (1 + b / 8) for b in BITS} if latency else None
        out.append(Layer(f"l{i}", params, macs, sens, lat))
    return out


def brute_force(ls, limits, ties=(), pins=None):
    best = None
    for combo in itertools.product(BITS, repeat=len(ls)):
        bits = {layer.name: b for layer, b in zip(ls, combo, strict=True)}
        if any(len({bits[t] for t in g}) > 1 for g in ties) or any(bits[k] != v for k, v in (pins or {}).items()):
            continue
        if any(sum(layer.cost(m, bits[layer.name]) for layer in ls) > v for m, v in limits.items()):
            continue
        s = sum(layer.sensitivity[bits[layer.name]] for layer in ls)
        if best is None or s < best[0] - 1e-12:
            best = (s, bits)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_optimal_against_brute_force(seed):
    ls = layers(5, seed, latency=True)
    ties, pins = [("l1", "l2")], {"l0": 8}
    budgets = [Budget("size", 0.4, fraction=True), Budget("bops", 0.6, fraction=True)]
    if seed % 2:
        budgets.append(Budget("latency", 0.7, fraction=True))
    plan = solve(ls, budgets, ties=ties, pins=pins)
    want = brute_force(ls, plan.limits, ties, pins)
    assert plan.sensitivity == pytest.approx(want[0], rel=1e-9)
    assert plan.bits["l0"] == 8 and plan.bits["l1"] == plan.bits["l2"]
    for metric, limit in plan.limits.items():
        assert plan.totals[metric] <= limit * (1 + 1e-9)


def test_fraction_spans_cheapest_to_all_eight_bit():
    ls = layers(8, 3)
    full = sum(layer.cost("size", 8) for layer in ls)
    cheapest = sum(layer.cost("size", 2) for layer in ls)
    assert set(solve(ls, [Budget("size", 1.0, fraction=True)]).bits.values()) == {8}   # least sensitive
    assert set(solve(ls, [Budget("size", 0.0, fraction=True)]).bits.values()) == {2}
    half = solve(ls, [Budget("size", 0.5, fraction=True)])
    assert half.limits["size"] == pytest.approx(cheapest + 0.5 * (full - cheapest))
    assert solve(ls, [Budget("size", half.limits["size"])]).bits == half.bits        # absolute == fraction


def test_sixty_layers_feasible_and_no_worse_than_greedy():
    ls = layers(60, 7, latency=True)
    budgets = [Budget("size", 0.3, fraction=True), Budget("bops", 0.5, fraction=True),
               Budget("latency", 0.6, fraction=True)]
    plan = solve(ls, budgets, ties=[("l10", "l11", "l12")], pins={"l0": 8, "l59": 8})
    assert len(plan.bits) == 60 and plan.bits["l0"] == plan.bits["l59"] == 8
    assert all(plan.totals[m] <= v * (1 + 1e-9) for m, v in plan.limits.items())
    # greedy: start at 8 bits, lower the layer with the least sensitivity increase per byte saved
    bits = {layer.name: 8 for layer in ls}
    while sum(layer.cost("size", bits[layer.name]) for layer in ls) > plan.limits["size"]:
        cands = [(layer.sensitivity[b // 2] - layer.sensitivity[b], layer.name)
                 for layer in ls if (b := bits[layer.name]) > 2 and layer.name not in ("l0", "l59")]
        _, name = min(cands)
        bits[name] //= 2
    assert plan.sensitivity <= sum(layer.sensitivity[bits[layer.name]] for layer in ls) + 1e-12


@pytest.mark.parametrize("budget, message", [
    (lambda: Budget("size", -1), "must be a fraction in [0, 1] (from the cheapest plan to all 8-bit) or an absolute "
                                 "number of bytes"),
    (lambda: Budget("bops", 1.5, fraction=True), "must be a fraction in [0, 1]"),
    (lambda: Budget("weight", 0.5, fraction=True), "unknown budget 'weight'"),
])
def test_bad_budgets_are_user_errors(budget, message):
    with pytest.raises(UserError, match=re.escape(message)):
        budget()


def test_infeasible_budget_names_the_smallest_feasible_value():
    ls = layers(4, 1)
    pinned = {"l0": 8}
    smallest = ls[0].cost("size", 8) + sum(layer.cost("size", 2) for layer in ls[1:])
    with pytest.raises(UserError, match=f"smallest feasible size is {smallest:.6g} bytes"):
        solve(ls, [Budget("size", smallest - 1)], pins=pinned)
    assert solve(ls, [Budget("size", smallest)], pins=pinned).totals["size"] == smallest


def test_contradicting_budgets():
    """Latency that rises as bits fall (unpacking costs more than it saves): a tight size budget
    and a tight latency budget are each feasible, together not."""
    ls = [Layer(f"l{i}", 1000, 1000, {8: 0.0, 4: 1.0, 2: 2.0}, {8: 1.0, 4: 2.0, 2: 3.0}) for i in range(3)]
    with pytest.raises(UserError, match="contradict"):
        solve(ls, [Budget("size", 750), Budget("latency", 3.0)])
    with pytest.raises(UserError, match="each budget may be given once"):
        solve(ls, [Budget("size", 750), Budget("size", 0.5, fraction=True)])


@pytest.mark.parametrize("metric, text, value, fraction", [
    ("size", "0.5", 0.5, True), ("size", "1", 1.0, True), ("size", "20000", 20000.0, False),
    ("size", "1B", 1.0, False), ("size", "300 bytes", 300.0, False), ("latency", "0.8ms", 0.8, False),
    ("latency", " 0.25 ", 0.25, True), ("bops", "1e9", 1e9, False), ("latency", 0.5, 0.5, True),
])
def test_budget_parse_fraction_or_absolute(metric, text, value, fraction):
    budget = Budget.parse(metric, text)
    assert (budget.metric, budget.value, budget.fraction) == (metric, value, fraction)


def test_budget_parse_errors_name_the_flag():
    with pytest.raises(UserError, match=re.escape("--latency-budget fast: expected a number, e.g. 0.5 (a fraction) "
                                                  "or 0.8ms (absolute)")):
        Budget.parse("latency", "fast")
    with pytest.raises(UserError, match="expected a number"):
        Budget.parse("size", "0.8ms")                   # a unit of another budget
