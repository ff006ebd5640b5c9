"""The package's folders are layers and imports only go down (model <- sampling/custom <- engine <-
outputs <- fronts <- tools <- the entry scripts), with no import cycle among its modules.

Read from the source with `ast` (nothing is imported or executed), every `import` counted wherever it
stands, inside functions too: a late import is still an edge.
"""
from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "optimizedSD"
# rank of each layer folder; "" is the entry scripts beside them. A module may import its own folder
# or a folder of lower rank; folders of the same rank (sampling, custom) do not import each other.
LAYERS = {"model": 0, "sampling": 1, "custom": 1, "engine": 2, "outputs": 3, "fronts": 4, "tools": 5, "": 6}
ENTRY_SCRIPTS = {"__init__", "optimized_txt2img", "optimized_img2img", "optimized_inpaint", "webui", "bench"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `name` imports (a `from X import y` of a submodule y counts as X.y)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # optimizedSD.model.config.SDConfig -> optimizedSD.model.config
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    found = modules(package)
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def layer_of(module: str) -> str:
    parts = module.split(".")[1:]
    return parts[0] if len(parts) > 1 else ""


def upward_edges(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in edges.items():
        for b in sorted(targets):
            la, lb = layer_of(a), layer_of(b)
            if b.count(".") == 0 or la == lb:
                continue  # the package's own __init__, or within a folder
            if LAYERS.get(lb, 99) >= LAYERS.get(la, -1):
                bad.append(f"{a} -> {b} ({la or 'entry'} may not import {lb or 'an entry script'})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), as a cycle to name."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_only_go_down_a_layer():
    bad = upward_edges(graph())
    assert not bad, "imports that go up a layer: " + "; ".join(bad)


def test_the_package_holds_the_entry_scripts_and_layer_folders_only():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == ENTRY_SCRIPTS
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS) - {""}
    for folder in folders:  # each says what it holds and what it may import
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and "import" in doc, f"optimizedSD/{folder}/__init__.py needs a docstring naming what it may import"


def test_no_name_shadows_the_standard_library_or_a_dependency():
    """An entry script run directly has its folder first on sys.path (until it moves itself off): a
    folder or module there named like `io` or `gradio` would shadow the real one."""
    installed = set(importlib.metadata.packages_distributions())
    names = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    names -= {"__init__", "__pycache__"}
    clashes = sorted(n for n in names if n in sys.stdlib_module_names or n in installed)
    assert not clashes, f"optimizedSD/ names that shadow installed modules: {clashes}"


# ---- the checks themselves fail where they should -----------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "optimizedSD"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_cycle_and_an_upward_import_are_caught(tmp_path):
    root = _package(tmp_path, {
        "model/__init__.py": "", "model/unet.py": "def f():\n    from ..custom import adapters\n",
        "custom/__init__.py": "", "custom/adapters.py": "from ..model.unet import f\n",
        "engine/__init__.py": "", "engine/a.py": "from .b import x\n", "engine/b.py": "from . import a\nx = 1\n"})
    edges = graph(root)
    assert edges["optimizedSD.model.unet"] == {"optimizedSD.custom.adapters"}
    assert sorted(map(tuple, cycles(edges))) == [("optimizedSD.custom.adapters", "optimizedSD.model.unet"),
                                                 ("optimizedSD.engine.a", "optimizedSD.engine.b")]
    assert upward_edges(edges) == ["optimizedSD.model.unet -> optimizedSD.custom.adapters "
                                   "(model may not import custom)"]


def test_peers_do_not_import_each_other(tmp_path):
    root = _package(tmp_path, {"sampling/__init__.py": "", "sampling/s.py": "import optimizedSD.custom.lora\n",
                               "custom/__init__.py": "", "custom/lora.py": ""})
    assert upward_edges(graph(root)) == ["optimizedSD.sampling.s -> optimizedSD.custom.lora "
                                         "(sampling may not import custom)"]

