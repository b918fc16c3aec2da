"""The import contract of pyproject.toml's [tool.tcpstates.imports], checked from the source.

The folders are mapped into one import package by setuptools' `package-dir`
(core/ → tcpstates, plugins/ → tcpstates.plugins), which generic tools such as
import-linter do not follow; so the rules are checked here, from the files:

- core modules never import `tcpstates.plugins.*`, except the modules listed in
  `core_may_import_plugin_list` importing `tcpstates.plugins` itself (the list of
  default plugins);
- a plugin package imports only the public modules listed in `plugin_api` and its
  own package (never another plugin, never the core's internals);
- no import cycles, counting imports inside functions (a cycle hidden in a
  function is still a cycle); imports under `if TYPE_CHECKING:` (typing's) are
  type-only and do not count for cycles.

Imports are found in `import`/`from` statements anywhere, in calls of
`importlib.import_module("...")` and `__import__("...")` with a literal name,
and in attribute chains such as `tcpstates.registry.make_plugin_manager` after
`import tcpstates`. (Computed module names cannot be checked statically.)
"""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Import:
    source: str        # importing module
    target: str        # imported module
    line: int
    type_only: bool


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the project by its import name."""
    out: dict[str, Path] = {}
    for folder, package in (("core", "tcpstates"), ("plugins", "tcpstates.plugins")):
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _typing_names(tree: ast.Module) -> set[str]:
    """Names under which this module sees typing.TYPE_CHECKING (a local
    `TYPE_CHECKING = True` is not it)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "typing":
            names |= {a.asname or a.name for a in node.names if a.name == "TYPE_CHECKING"}
    return names


def _is_type_checking(node: ast.If, typing_names: set[str]) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id in typing_names) or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        and isinstance(test.value, ast.Name) and test.value.id == "typing")


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    typing_names = _typing_names(tree)
    found: list[Import] = []

    def resolve(module: str) -> str | None:
        """The longest known project module that `module` names (or None: not ours)."""
        while module:
            if module in known:
                return module
            module = module.rpartition(".")[0]
        return None

    def visit(node: ast.AST, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child, typing_names):
                for sub in child.body:
                    visit_one(sub, True)
                for sub in child.orelse:
                    visit_one(sub, type_only)
                continue
            visit_one(child, type_only)

    def visit_one(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = resolve(alias.name)
                if target:
                    found.append(Import(name, target, node.lineno, type_only))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            for alias in node.names:
                target = resolve(f"{base}.{alias.name}") or resolve(base)
                if target:
                    found.append(Import(name, target, node.lineno, type_only))
        elif isinstance(node, ast.Call):
            func = _dotted(node.func) or ""
            if (func.endswith("import_module") or func == "__import__") and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                target = resolve(node.args[0].value)
                if target:
                    found.append(Import(name, target, node.lineno, type_only))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            dotted = _dotted(node)
            if dotted and dotted.startswith("tcpstates."):
                target = resolve(dotted)
                if target and target != "tcpstates":
                    found.append(Import(name, target, node.lineno, type_only))
                return   # its inner attributes are prefixes of the same chain
        visit(node, type_only)

    visit(tree, False)
    return [i for i in found if i.target != name]


def plugin_package(module: str) -> str | None:
    parts = module.split(".")
    return ".".join(parts[:3]) if len(parts) >= 3 and parts[1] == "plugins" else None


def check(root: Path) -> list[str]:
    """Every violation of the contract, one line each (empty when it holds)."""
    contract = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["tcpstates"]["imports"]
    api = set(contract["plugin_api"])
    may_list = set(contract["core_may_import_plugin_list"])
    modules = module_names(root)
    known = set(modules)
    # C extension modules (a .c source in a package, built by setup.py) are
    # leaves: they import nothing of ours, so they can close no cycle
    for folder, package in (("core", "tcpstates"), ("plugins", "tcpstates.plugins")):
        for path in sorted((root / folder).rglob("*.c")):
            known.add(".".join([package, *path.relative_to(root / folder).with_suffix("").parts]))
    edges = [imp for name, path in modules.items() for imp in imports_of(name, path, known)]
    problems = []
    for imp in edges:
        where = f"{modules[imp.source].relative_to(root)}:{imp.line}"
        src_plugin, dst_plugin = plugin_package(imp.source), plugin_package(imp.target)
        if imp.source == "tcpstates.plugins":   # the list of default plugins: imports nothing
            problems.append(f"{where}: the default-plugin list imports {imp.target}")
        elif src_plugin is None:
            if imp.target == "tcpstates.plugins":
                if imp.source not in may_list:
                    problems.append(f"{where}: core module {imp.source} imports the plugin list")
            elif dst_plugin is not None:
                problems.append(f"{where}: core module {imp.source} imports plugin module {imp.target}")
        elif src_plugin is not None:
            if dst_plugin == src_plugin:
                continue
            if dst_plugin is not None:
                problems.append(f"{where}: plugin {src_plugin} imports another plugin's {imp.target}")
            elif imp.target not in api:
                problems.append(f"{where}: plugin {src_plugin} imports {imp.target}, which is not "
                                f"in the plugin API ([tool.tcpstates.imports] plugin_api)")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return problems


def cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if not e.type_only:
            graph.setdefault(e.source, set()).add(e.target)
            graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out
