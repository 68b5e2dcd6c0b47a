"""The layout's import rules (docs/architecture.md, "Layout"), checked on every module's source so CI keeps them:

- a service package imports only itself, the core (`poise`) and third-party packages: never another service and
  never the composition root (`app`);
- the core imports no service and not the composition root;
- no module imports another module's private (`_name`) helpers, by `from m import _x` or as `m._x`.

Imports inside functions and under `if TYPE_CHECKING:` count like any other.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("proposer", "implementer", "trainer", "evaluator", "reflector", "archive")
CORE = "poise"
COMPOSITION_ROOT = "app"
PROJECT = (CORE, COMPOSITION_ROOT, *SERVICES)


def source_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement in the file, relative ones
    resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def private_attribute_uses(path: Path) -> list[tuple[str, str, int]]:
    """(module alias, private attribute, line) where a module imported as a name is used as `alias._x`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PROJECT:
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PROJECT:
            for alias in node.names:  # `from poise import sandbox`: a module imported by name
                if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").exists():
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    uses = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            uses.append((aliases[node.value.id], node.attr, node.lineno))
    return uses


def top(module: str) -> str:
    return module.split(".")[0]


def package_graph() -> dict[str, set[str]]:
    """Which project packages each project package imports (itself excluded)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for package in PROJECT:
        graph[package]
        for path in source_files(package):
            for module, _, _ in imports(path):
                if top(module) in PROJECT and top(module) != package:
                    graph[package].add(top(module))
    return graph


def test_no_service_imports_another_service_or_the_composition_root():
    wrong = []
    for service in SERVICES:
        for path in source_files(service):
            for module, _, line in imports(path):
                if top(module) in PROJECT and top(module) not in (service, CORE):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "a service may import only itself and poise/:\n" + "\n".join(wrong)


def test_the_core_imports_no_service_and_not_the_composition_root():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in source_files(CORE) for module, _, line in imports(path)
             if top(module) in PROJECT and top(module) != CORE]
    assert not wrong, "poise/ must not import a service or app/:\n" + "\n".join(wrong)


def test_no_module_imports_another_modules_private_helpers():
    wrong = []
    for package in PROJECT:
        for path in source_files(package):
            own = module_name(path)
            for module, names, line in imports(path):
                if top(module) not in PROJECT or module == own:
                    continue
                wrong += [f"{path.relative_to(ROOT)}:{line} imports {module}.{name}"
                          for name in names if name.startswith("_") and not name.startswith("__")]
            wrong += [f"{path.relative_to(ROOT)}:{line} uses {module}.{attr}"
                      for module, attr, line in private_attribute_uses(path) if module != own]
    assert not wrong, "private helpers stay in their module (make them public or move them):\n" + "\n".join(wrong)


def test_the_rules_see_imports_inside_functions(tmp_path, monkeypatch):
    # A rule that only read top-level imports would miss the lazy imports this code base uses for heavy modules.
    probe = tmp_path / "archive" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("def f():\n    from proposer.selection import select_parents\n    import app.cli\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert [m for m, _, _ in imports(probe)] == ["proposer.selection", "app.cli"]


def test_the_package_graph_has_the_core_at_the_bottom_and_the_composition_root_on_top():
    graph = package_graph()
    assert graph[CORE] == set()
    assert graph[COMPOSITION_ROOT] >= {CORE, *SERVICES}
    for service in SERVICES:
        assert graph[service] <= {CORE}, (service, graph[service])
