"""The import graph of ssn_exp (static, from the source): no cycles, and the layers (docs/development.md, "Layout").

Every ``import`` of every module under ``src/ssn_exp`` counts, those inside functions included: an import moved into
a function still ties the two modules together, it only runs later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: The layers, inside out; a module is in the first row whose pattern matches it (``pkg.*``: the package and all its
#: modules). Layer 1 is split in two: the noises (and what they rest on) never import the certificates built on them.
LAYERS = [
    ("1 base", ["ssn_exp", "ssn_exp.exceptions", "ssn_exp.atomic", "ssn_exp.box", "ssn_exp.noises", "ssn_exp.models"]),
    ("1 base", ["ssn_exp.smoothing"]),  # (the deprecated alias of ssn_exp.noises)
    ("3 entry points", ["ssn_exp.certify.__main__"]),  # (python -m ssn_exp.certify: calls ssn_exp.cli.certify)
    ("1 certify", ["ssn_exp.certify.*"]),
    # trust reads configs (an omegaconf DictConfig), which nothing of layer 1 needs: it sits with the Lightning layer,
    # whose checkpoints it checks, below the entry points
    ("2 lightning", ["ssn_exp.trust", "ssn_exp.lightning.*"]),
    ("3 entry points", ["ssn_exp.cli.*", "ssn_exp.__main__", "ssn_exp.sweep", "ssn_exp.bench"]),
    ("4 report", ["ssn_exp.report.*"]),
]

#: Which ssn_exp layers a layer may import (its own included).
MAY_IMPORT = {
    "1 base": {"1 base"},
    "1 certify": {"1 base", "1 certify"},
    "2 lightning": {"1 base", "1 certify", "2 lightning"},
    # the sweep reads and writes its job list with report.missing (which imports nothing of the entry points)
    "3 entry points": {"1 base", "1 certify", "2 lightning", "3 entry points", "4 report"},
    "4 report": {"1 base", "1 certify", "4 report"},
}

LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric"}
#: Other packages a layer may not import (a name forbids its submodules too).
FORBIDDEN = {
    "1 base": LIGHTNING | {"hydra", "omegaconf"},
    "1 certify": LIGHTNING | {"hydra", "omegaconf"},
    "2 lightning": {"hydra"},
    "3 entry points": set(),
    "4 report": LIGHTNING,
}
#: ... except these: the Lightning layer builds the ``_target_`` configs of a checkpoint with Hydra's instantiate
#: (a library call, the same in any program), never Hydra the application (its config, run mode, entry point).
PERMITTED = {
    "2 lightning": {"hydra.utils", "hydra.errors"},
}
#: Known exceptions, each with its reason: (module, import).
KNOWN = {
    # the wandb run's default group is the sweep's name in a multirun: read from Hydra's own config at run time
    ("ssn_exp.lightning.loggers", "hydra.core.hydra_config"),
    ("ssn_exp.lightning.loggers", "hydra.types"),
}


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def modules(src: Path = SRC) -> dict[str, Path]:
    """Every module of ssn_exp by dotted name (a package by its ``__init__``)."""
    out = {}
    for path in sorted((src / "ssn_exp").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[tuple[str, int]]:
    """(imported name, line) of every import in the module: ssn_exp modules resolved to the module (``from
    ssn_exp.certify import core`` is ``ssn_exp.certify.core``, ``from ssn_exp.noises import DSSN`` is
    ``ssn_exp.noises``), other modules by their full name."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != "ssn_exp":
                found.add((target, node.lineno))
                continue
            while target not in known:  # ssn_exp.noises.DSSN -> ssn_exp.noises
                target = target.rpartition(".")[0]
            if target != name:
                found.add((target, node.lineno))
    return found


def layer_of(name: str) -> str:
    for layer, patterns in LAYERS:
        for pattern in patterns:
            package = pattern.removesuffix(".*")
            if name == pattern or (pattern.endswith(".*") and (name == package or name.startswith(package + "."))):
                return layer
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in {Path(__file__).name}")


def graph(src: Path = SRC) -> dict[str, dict[str, int]]:
    """module -> {imported ssn_exp module or top-level package: the line of (one of) its imports}."""
    known = modules(src)
    return {
        name: {t: line for t, line in sorted(imports(name, path, known), reverse=True)} for name, path in known.items()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``edges`` as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_of_ssn_exp_imports_itself_back():
    g = graph()
    edges = {m: {t for t in targets if t.split(".")[0] == "ssn_exp"} for m, targets in g.items()}
    cycle = find_cycle(edges)
    assert cycle is None, (
        "import cycle: "
        + " -> ".join(f"{a} (line {g[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False))
        + f" -> {cycle[-1]}"
    )


def test_every_module_imports_only_its_own_layer_and_those_below():
    wrong = []
    for name, targets in graph().items():
        layer = layer_of(name)
        for target, line in targets.items():
            if target.split(".")[0] == "ssn_exp":
                if layer_of(target) not in MAY_IMPORT[layer]:
                    wrong.append(f"{name} (layer {layer}) imports {target} (layer {layer_of(target)}), line {line}")
            elif (
                _within(target, FORBIDDEN[layer])
                and not _within(target, PERMITTED.get(layer, ()))
                and (name, target) not in KNOWN
            ):
                wrong.append(f"{name} (layer {layer}) imports {target}, line {line}")
    assert not wrong, "\n".join(wrong)


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The checks above are only as good as the graph: a cycle hidden in a function, through a relative import, is
    found and named."""
    pkg = tmp_path / "ssn_exp"
    (pkg / "certify").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "noises.py").write_text("def f():\n    from ssn_exp.certify.core import g\n")
    (pkg / "certify" / "__init__.py").write_text("")
    (pkg / "certify" / "core.py").write_text("from ..noises import f\nfrom . import record\n")
    (pkg / "certify" / "record.py").write_text("import ssn_exp.noises.deep.name\n")
    g = graph(tmp_path)
    assert g["ssn_exp.certify.core"] == {"ssn_exp.noises": 1, "ssn_exp.certify.record": 2}
    assert g["ssn_exp.certify.record"] == {"ssn_exp.noises": 1}
    edges = {m: set(t) for m, t in g.items()}
    assert find_cycle(edges) == [
        "ssn_exp.certify.core",
        "ssn_exp.certify.record",
        "ssn_exp.noises",
        "ssn_exp.certify.core",
    ]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", ["ssn_exp.cli.new_thing", "ssn_exp.report.new_thing", "ssn_exp.lightning.x"])
def test_every_new_module_falls_into_a_layer(name):
    assert layer_of(name)[0] in "1234"


def test_the_bench_uses_only_the_public_names_of_other_modules():
    """``python -m ssn_exp.bench`` times what the package offers: it imports no private name (``from m import _x``,
    ``m._x``) of another module, so a change inside a module cannot break it unseen."""
    tree = ast.parse((SRC / "ssn_exp" / "bench.py").read_text())
    modules_bound = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    private = [
        f"line {n.lineno}: from {n.module} import {a.name}"
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
        for a in n.names
        if a.name.startswith("_")
    ]
    private += [
        f"line {n.lineno}: {ast.unparse(n)}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and n.attr.startswith("_")
        and not n.attr.startswith("__")
        and isinstance(n.value, ast.Name)
        and n.value.id in modules_bound
    ]
    assert not private, "\n".join(private)
