"""The house's layers: each module imports only from the layers below it (function-level imports included).

Top to bottom; modules in one row are independent of each other. ``kernels/`` installs as ``groupnet.kernels`` and
may import nothing of groupnet but ``groupnet._checks``. ``groupnet/__init__.py`` (the public facade, which imports
everything) belongs to no layer, and no module may import names from it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS: list[tuple[str, ...]] = [
    ("groupnet.train", "groupnet.eval", "groupnet.scaling", "groupnet.roofline", "groupnet.experiments"),  # CLIs
    ("groupnet.training",),
    ("groupnet.fuse",),
    ("groupnet.models", "groupnet.data"),
    ("groupnet.branch_major", "groupnet.reference", "groupnet.complexity", "groupnet.cotraining",
     "groupnet.ensembling", "groupnet.opcount", "groupnet.cpu_memory"),  # tools over grouped layers
    ("groupnet.model_stacking",),
    ("groupnet.modules",),
    ("groupnet.functional",),
    ("groupnet.ops",),
    ("groupnet.kernels",),
    ("groupnet.layout",),
    ("groupnet._checks",),
]


def module_files() -> dict[str, Path]:
    """Module name -> file, for groupnet/ and kernels/ (as groupnet.kernels)."""
    out = {}
    for base, package in ((ROOT / "groupnet", "groupnet"), (ROOT / "kernels", "groupnet.kernels")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """groupnet modules that ``name`` imports anywhere in its file (a ``from pkg import sub`` counts as pkg.sub)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m == "groupnet" or m.startswith("groupnet.")}


def layer_of(module: str) -> int | None:
    best = None
    for i, row in enumerate(LAYERS):
        for prefix in row:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (i, prefix)
    return None if best is None else best[0]


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up the house, sideways between independent rows, or into the facade."""
    out = []
    for importer, targets in sorted(graph.items()):
        if importer == "groupnet":
            continue
        here = layer_of(importer)
        if here is None:
            out.append(f"{importer} belongs to no layer: add it to LAYERS")
            continue
        for target in sorted(targets):
            there = layer_of(target)
            own = importer.startswith("groupnet.kernels") and target.startswith("groupnet.kernels")
            if target == "groupnet":
                out.append(f"{importer} imports from the package facade groupnet/__init__.py")
            elif importer.startswith("groupnet.kernels") and not own and target != "groupnet._checks":
                out.append(f"{importer} (a kernel) imports {target}; kernels may import only groupnet._checks")
            elif there is None:
                out.append(f"{importer} imports {target}, which belongs to no layer")
            elif there < here:
                out.append(f"{importer} imports {target}, a layer above it")
            elif there == here and _top(importer) != _top(target):
                out.append(f"{importer} imports {target}, an independent module of its own layer")
    return out


def _top(module: str) -> str:
    """The LAYERS entry a module falls under (the package or module named in a row)."""
    return max((p for row in LAYERS for p in row if module == p or module.startswith(p + ".")), key=len)


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def test_every_import_points_down_the_house():
    problems = violations(import_graph())
    assert not problems, "\n".join(problems)


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "groupnet.kernels.grouped_conv2d" in graph["groupnet.ops.conv2d"]  # imported inside a function
    assert "groupnet.kernels._common" in graph["groupnet.kernels.grouped_conv2d"]  # from ._common import ...
    assert graph["groupnet.kernels.grouped_conv2d"] & {"groupnet._checks"}


def test_upward_sideways_and_facade_imports_are_reported():
    bad = {
        "groupnet.kernels.grouped_gemm": {"groupnet.ops.backend"},
        "groupnet.modules.conv": {"groupnet.models.base"},
        "groupnet.models.base": {"groupnet.data.loaders"},
        "groupnet.ops.linear": {"groupnet"},
        "groupnet.newthing": set(),
    }
    found = "\n".join(violations(bad))
    assert "groupnet.kernels.grouped_gemm (a kernel) imports groupnet.ops.backend" in found
    assert "groupnet.modules.conv imports groupnet.models.base, a layer above it" in found
    assert "groupnet.models.base imports groupnet.data.loaders, an independent module" in found
    assert "groupnet.ops.linear imports from the package facade" in found
    assert "groupnet.newthing belongs to no layer" in found
    assert not violations({"groupnet.models.base": {"groupnet.modules.conv", "groupnet.models.spec"}})
