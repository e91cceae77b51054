"""The package's layout is its architecture: no import cycles among lvita's modules (imports inside
functions count), and each sub-package imports only the layers below it. Reads the sources with
``ast``; imports nothing, so it runs in a fraction of a second."""
from __future__ import annotations

import ast
from pathlib import Path

LVITA = Path(__file__).resolve().parents[1] / "lvita"
# Lower layers first; a package may import its own modules and those of any layer before it.
# training and infer are siblings: neither imports the other. lvita.errors (UserError, run_main) is the
# lowest layer, a plain module: every module may import it, it imports nothing from lvita.
LAYERS = {"errors": -1, "model": 0, "parallel": 1, "config": 2, "data": 3, "ckpt": 4, "training": 5, "infer": 5,
          "demo": 6, "evaluation": 6}  # evaluation answers with infer's prompt and decoding; the lvita.eval entry point dispatches
LEAVES = {"errors"}  # layers that are one module, not a package
ENTRY_POINTS = {"cli", "train", "generate", "eval", "launch"}  # the plain modules at the top


def _modules() -> dict[str, Path]:
    mods = {}
    for path in LVITA.rglob("*.py"):
        name = ".".join(("lvita",) + path.relative_to(LVITA).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the lvita modules it imports, at module level or inside functions."""
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("lvita")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                if not base.startswith("lvita"):
                    continue
                for a in node.names:  # `from lvita.ckpt import hf` imports the module lvita.ckpt.hf
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_cycles():
    assert _cycles(_imports(_modules())) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_package_imports_only_the_layers_below_it():
    graph = _imports(_modules())
    upward = []
    for module, deps in sorted(graph.items()):
        layer = _layer(module)
        if layer is None:
            continue  # the entry points may import anything
        for dep in sorted(deps):
            dep_layer = _layer(dep)
            if dep_layer == layer:
                continue
            if dep_layer is None or LAYERS[dep_layer] >= LAYERS[layer]:
                upward.append(f"{module} -> {dep}")
    assert upward == []


def test_the_top_level_holds_only_entry_points_and_every_package_says_what_it_owns():
    plain = {p.stem for p in LVITA.glob("*.py")} - {"__init__"}
    assert plain == ENTRY_POINTS | LEAVES
    packages = {p.parent.name for p in LVITA.glob("*/__init__.py")}
    assert packages == set(LAYERS) - LEAVES
    for name in packages:
        doc = ast.get_docstring(ast.parse((LVITA / name / "__init__.py").read_text())) or ""
        assert "import" in doc, f"lvita/{name}/__init__.py: say what the package owns and may import"
    assert {p.parent.name for p in LVITA.glob("*/*.py")} == set(LAYERS) - LEAVES  # no folder without __init__.py
    for name in LEAVES:
        doc = ast.get_docstring(ast.parse((LVITA / f"{name}.py").read_text())) or ""
        assert "import" in doc, f"lvita/{name}.py: say what the module owns and may import"


def test_the_errors_module_is_a_leaf_that_every_layer_may_import():
    graph = _imports(_modules())
    assert graph["lvita.errors"] == set()
    assert "lvita.errors" in graph["lvita.model.presets"] and "lvita.errors" in graph["lvita.cli"]
