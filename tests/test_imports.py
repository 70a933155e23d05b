"""The package's imports run one way: no import cycle, imports inside functions only for optional
packages, and ``import edaformer`` stays light."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "edaformer"
# packages of the extras (pyproject's optional-dependencies), imported where they are used
OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "matplotlib", "transformers", "tensorboard", "torch.utils.tensorboard",
            "av")
LAZY = "_LAZY_IMPORTS"  # a module-level {attribute: relative module} dict of names imported on first use


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _absolute(module: str | None, level: int, package: str) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``package``."""
    if not level:
        return module or ""
    base = package.split(".")[:len(package.split(".")) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imported(node: ast.Import | ast.ImportFrom, package: str, modules: dict[str, Path]) -> list[str]:
    """The module names an import statement imports: for ``from X import y`` the submodule ``X.y``
    when there is one, else ``X``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = _absolute(node.module, node.level, package)
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def _function_imports(tree: ast.Module) -> set[int]:
    """ids of the import statements inside a function (or lambda) body."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(sub) for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom)))
    return inside


def _lazy_imports(tree: ast.Module, package: str) -> list[str]:
    """The modules of a module-level ``_LAZY_IMPORTS = {"name": ".module", ...}``."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == LAZY for t in node.targets):
            for value in node.value.values:
                text = value.value
                level = len(text) - len(text.lstrip("."))
                out.append(_absolute(text.lstrip(".") or None, level, package))
    return out


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that ``name`` (a module, or a name inside one) belongs to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """``module -> modules it imports`` over the package, and every import inside a function as
    ``(module, line, imported name)``.

    Every import statement counts, function-level ones too, relative ones resolved. Importing
    ``a.b.c`` from outside the package ``a.b`` runs ``a/b/__init__.py`` first, so it counts as
    importing ``a.b`` as well (the root package aside, which every module is inside).
    """
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    in_functions = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        package = _package_of(name, path)
        local = _function_imports(tree)
        targets = list(_lazy_imports(tree, package))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            imported = _imported(node, package, modules)
            if id(node) in local:
                in_functions += [(name, node.lineno, target) for target in imported]
            targets += imported
        for target in targets:
            owner = _owner(target, modules)
            if owner is None:
                continue  # outside the package
            parts = owner.split(".")
            for i in range(2, len(parts)):  # the packages above it that this module is not inside
                parent = ".".join(parts[:i])
                if name != parent and not name.startswith(parent + "."):
                    graph[name].add(parent)
            if owner != name:
                graph[name].add(owner)
    return graph, in_functions


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for succ in edges:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def _cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the first module of ``component``, as a path that returns to it."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for succ in sorted(graph[node] & members):
            if succ == start:
                return paths[node] + [start]
            if succ not in paths:
                paths[succ] = paths[node] + [succ]
                queue.append(succ)
    return component


def test_the_package_has_no_import_cycle():
    graph, _ = import_graph()
    assert len(graph) > 50 and PACKAGE + ".models.segmentor" in graph["edaformer.models"]
    cycles = [" -> ".join(_cycle(graph, c)) for c in strongly_connected(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_finder_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert _cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def _optional(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in OPTIONAL)


def test_imports_inside_functions_are_of_optional_packages_and_say_so():
    _, in_functions = import_graph()
    assert in_functions, "the optional packages are imported where they are used"
    modules = _modules()
    others = [f"{m}:{line} imports {target}" for m, line, target in in_functions if not _optional(target)]
    assert not others, "imports inside functions of packages that are not optional:\n" + "\n".join(others)
    unsaid = []
    for m, line, target in in_functions:
        lines = modules[m].read_text(encoding="utf-8").splitlines()
        if "optional" not in lines[line - 1] and "optional" not in lines[line - 2]:
            unsaid.append(f"{m}:{line} imports {target}")
    assert not unsaid, "imports inside functions without a comment saying the package is optional:\n" + \
        "\n".join(unsaid)


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_edaformer_imports_no_optional_package_and_neither_export_nor_flops():
    loaded = _run("import sys, edaformer; print(' '.join(sorted(sys.modules)))").split()
    assert not [m for m in loaded if _optional(m)]
    assert "edaformer.export" not in loaded and "edaformer.flops" not in loaded
    assert "edaformer.models" in loaded and "edaformer.checkpoint" in loaded
    # the lazy names resolve on first use, to the objects of their modules
    assert _run("import edaformer, edaformer.flops, edaformer.export, edaformer.inference as inf; "
                "print(edaformer.count_flops is edaformer.flops.count_flops, "
                "edaformer.export_onnx is edaformer.export.export_onnx, edaformer.Segmenter is inf.Segmenter, "
                "set(edaformer.__all__) <= set(dir(edaformer)))") == "True True True True"
