"""The house stays easy to change: no import cycle between fer_ray's modules (module-level imports; imports inside
functions are the deliberate lazy ones), no function over 80 lines, a docstring saying what each module owns."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "fer_ray"
MODULES = {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted(PKG.rglob("*.py"))}


def _module_level_imports(tree: ast.Module, name: str, is_pkg: bool) -> set[str]:
    """fer_ray modules imported at module level (``if TYPE_CHECKING:`` blocks left out)."""
    out = set()
    nodes = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.If | ast.Try):
            handlers = [h for t in getattr(node, "handlers", []) for h in t.body]
            nodes += node.body + getattr(node, "orelse", []) + handlers
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in out if m in MODULES and m != name}


def test_no_import_cycle():
    graph = {m: _module_level_imports(ast.parse(p.read_text()), m, p.name == "__init__.py") for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " → ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_functions_are_short_and_modules_say_what_they_own(name):
    tree = ast.parse(MODULES[name].read_text())
    assert ast.get_docstring(tree), f"{name} has no module docstring"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{name}: functions over 80 lines: {long}"
