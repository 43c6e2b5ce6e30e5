"""The import rules of the README's architecture, checked on the source (an AST scan of every
first-party import, function-level ones included):

* no import cycle between first-party modules;
* ``passes/`` imports nothing from ``codegen/``, ``runtime/`` or ``compiler/``;
* loading and running an artifact (runtime/artifact.py and every runner codegen/registry.py
  names) reaches nothing in ``compiler/`` or ``passes/``, through any chain of imports;
* a function-level first-party import only where CLI start-up time asks for it;
* the driver, options, artifact and CLI name no target beyond the default.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from codegen import registry

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "passes", "codegen", "runtime", "models")
# lazy for CLI start-up time (``lowbit --help`` before TVM loads), and saying so
LAZY = {"compiler.cli", "compiler", "runtime"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The first-party module an import names (``from pkg import mod`` names pkg.mod)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, at function level) for every first-party import of ``module``, with the
    packages each import runs (a.b.c runs a and a.b first) except the module's own (already
    running when it is)."""
    tree = ast.parse(MODULES[module].read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] not in PACKAGES:
                continue
            target = _resolve(n)
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in MODULES and dep != module and not module.startswith(dep + "."):
                    out.append((dep, id(node) in nested))
    return out


GRAPH = {m: sorted({d for d, _ in _imports(m)}) for m in MODULES}


def _closure(roots: list[str]) -> dict[str, list[str]]:
    """Every module ``roots`` reach, with one import chain to it."""
    chains = {r: [r] for r in roots}
    todo = list(roots)
    while todo:
        m = todo.pop()
        for d in GRAPH[m]:
            if d not in chains:
                chains[d] = [*chains[m], d]
                todo.append(d)
    return chains


def test_no_import_cycle():
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):                       # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in MODULES:
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_passes_import_only_passes():
    bad = {m: [d for d in deps if d.split(".")[0] != "passes"] for m, deps in GRAPH.items()
           if m.split(".")[0] == "passes"}
    assert not {m: d for m, d in bad.items() if d}


@pytest.mark.parametrize("root", ["runtime.artifact", *sorted({e.runner.split(":")[0]
                                                               for e in registry.TARGETS.values()})])
def test_loading_and_running_reach_no_compiler(root):
    chains = _closure([root])
    bad = {m: " -> ".join(c) for m, c in chains.items() if m.split(".")[0] in ("compiler", "passes")}
    assert not bad, bad


def test_registry_names_real_modules():
    for name, entry in registry.TARGETS.items():
        for ref in (entry.backend, entry.runner):
            assert ref.split(":")[0] in MODULES, (name, ref)
    assert GRAPH["codegen.registry"] == [], "the registry is data: it imports no first-party module"


def test_function_level_imports_only_for_cli_start_up():
    late = {m: sorted({d for d, nested in _imports(m) if nested}) for m in MODULES if m not in LAZY}
    assert not {m: d for m, d in late.items() if d}


@pytest.mark.parametrize("module", ["compiler.driver", "compiler.options", "runtime.artifact", "compiler.cli"])
def test_target_neutral_modules_name_no_target(module):
    """No identifier names a target or a target's unit (rv32, cuda, mcu, gpu, vnni, amx, aarch64,
    dp4a), and no string is a target's name, the default "llvm" aside: nothing switches on one.
    (Help texts may mention targets as examples.)"""
    words = re.compile(r"rv32|cuda|\bmcu\b|\bgpu\b|vnni|\bamx\b|aarch64|dp4a")
    named = set(registry.TARGETS) - {"llvm"}
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, (ast.Name, ast.Attribute, ast.arg, ast.FunctionDef, ast.keyword)):
            ident = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "arg", None) or \
                getattr(node, "name", None)
            if ident and (m := words.search(ident.lower())):
                found.add(m.group(0))
        elif isinstance(node, ast.Constant) and node.value in named:
            found.add(node.value)
    assert not found, f"{module} names targets: {sorted(found)}"
