"""The layers point down only: interfaces -> service -> pipelines -> core/models (DESIGN.md).

Every ``import`` in src/huabi is read with ``ast`` -- module level and function-local alike (a
local import is still a dependency; only ``if TYPE_CHECKING:`` blocks are skipped) -- and each must
go to a package its layer may use (``if __name__ == "__main__":`` script guards are skipped too). A second check finds import cycles between modules, which
function-local imports used to hide.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "huabi"

# package -> the huabi packages it may import (besides itself and the light top-level huabi/errors).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "models": {"core"},
    "pipelines": {"core", "models"},
    "service": {"core", "models", "pipelines"},
    "data": {"core", "models"},  # models.files: the one atomic writer (nothing that reads weights)
    "backends": {"core", "models"},  # execution backends (OpenVINO) for loaded models
    "train": {"core", "models", "pipelines", "service", "data"},  # service: sample images during training
    "eval": {"core", "models", "pipelines", "service", "data", "train"},
    "cli": {"core", "models", "pipelines", "service", "data", "train", "eval", "server"},  # server: `huabi serve`
    # The REST server builds requests with the service's request builders, as the CLI does (never through cli/).
    "server": {"core", "models", "pipelines", "service", "data", "train", "eval"},
}
ALLOWED["service"] = ALLOWED["service"] | {"backends"}
# Training reports measure before/after through huabi.eval's API (train and eval are peers; the
# cycle check below still refuses a module-level cycle between them).
ALLOWED["train"] = ALLOWED["train"] | {"eval"}

ALWAYS = {"errors", "__init__"}  # huabi.errors and ``from huabi import __version__``


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_main_guard(node: ast.If) -> bool:
    """``if __name__ == "__main__":`` -- a script entry point, not a dependency of the module."""
    test = node.test
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every huabi import in ``source``, outside ``if TYPE_CHECKING:`` blocks."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and (_is_type_checking(node) or _is_main_guard(node)):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "huabi":
            # "from huabi.cli import edit" depends on huabi.cli.edit: keep the name, callers strip it
            # back to the module that defines it.
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "huabi")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def package_of(relative: Path) -> str:
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def layer_violations(files: dict[Path, str]) -> list[str]:
    """``path:line: a imports b`` for every import that goes up or sideways (``files``: path under huabi/ -> source)."""
    problems = []
    for relative, source in sorted(files.items()):
        package = package_of(relative)
        if package not in ALLOWED:
            continue
        for line, module in imported_modules(source):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else "__init__"
            if target == "__version__":
                target = "__init__"
            if target == package or target in ALWAYS or target in ALLOWED[package]:
                continue
            problems.append(f"{relative}:{line}: {package} imports {module} ({target} is not below {package})")
    return problems


def module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["huabi", *parts])


def import_cycles(files: dict[Path, str]) -> list[list[str]]:
    """Strongly connected groups (more than one module) of the module import graph."""
    names = {module_name(relative): source for relative, source in files.items()}
    graph: dict[str, set[str]] = {}
    for name, source in names.items():
        targets = set()
        for _line, module in imported_modules(source):
            while module and module not in names:  # "huabi.x.y.Name" -> the module that defines it
                module = module.rpartition(".")[0]
            if module and module != name and module != "huabi":
                targets.add(module)
        graph[name] = targets
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def strongconnect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                strongconnect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return groups


def source_files() -> dict[Path, str]:
    return {path.relative_to(SRC): path.read_text(encoding="utf-8") for path in SRC.rglob("*.py")}


def test_no_layer_imports_upward():
    assert layer_violations(source_files()) == []


def test_the_check_fails_on_an_upward_import():
    files = {
        Path("core/sneaky.py"): "def f():\n    from huabi.service.engine import Engine\n",
        Path("pipelines/fine.py"): "from huabi.core.guidance import CFGDenoiser\nimport huabi.models.load\n",
        Path("models/typing_only.py"): "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from huabi.pipelines.common import denoise\n",
        Path("service/up.py"): "import huabi.cli.main\n",
    }
    assert layer_violations(files) == [
        "core/sneaky.py:2: core imports huabi.service.engine.Engine (service is not below core)",
        "service/up.py:1: service imports huabi.cli.main (cli is not below service)",
    ]


def test_no_import_cycles():
    assert import_cycles(source_files()) == []


def test_the_cycle_check_finds_a_local_import_cycle():
    files = {Path("a.py"): "import huabi.b\n", Path("b.py"): "def f():\n    from huabi.a import x\n",
             Path("c.py"): "import huabi.a\n"}
    assert import_cycles(files) == [["huabi.a", "huabi.b"]]


# A name with a leading underscore is its module's own business. Helpers other modules need are made
# public (or moved to a shared module) instead. Nothing is allowed here; add (module, name): reason
# only with a reason a reviewer accepts.
PRIVATE_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(files: dict[Path, str]) -> list[str]:
    """``path:line: name from module`` for every private name one module takes from another: by
    ``from huabi.x import _name`` or by ``module._name`` on a huabi module it imported."""
    modules = {module_name(relative) for relative in files}
    problems = []
    for relative, source in sorted(files.items()):
        own = module_name(relative)
        tree = ast.parse(source)
        bound: dict[str, str] = {}  # local name -> huabi module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("huabi"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in modules:
                        bound[alias.asname or alias.name] = full
                    elif _is_private(alias.name) and node.module != own and (node.module, alias.name) not in \
                            PRIVATE_IMPORTS_ALLOWED:
                        problems.append(f"{relative}:{node.lineno}: {alias.name} from {node.module}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and _is_private(node.attr) and bound[node.value.id] != own
                    and (bound[node.value.id], node.attr) not in PRIVATE_IMPORTS_ALLOWED):
                problems.append(f"{relative}:{node.lineno}: {node.attr} from {bound[node.value.id]}")
    return problems


def test_no_module_uses_another_modules_private_names():
    assert private_imports(source_files()) == []


def test_the_private_name_check_finds_both_spellings():
    files = {
        Path("core/a.py"): "_table = {}\ndef _helper():\n    return 1\n",
        Path("core/b.py"): "from huabi.core.a import _helper\nfrom huabi.core import a\nx = a._table\n"
                           "from huabi import __version__\n",
        Path("core/c.py"): "import huabi.core.a as mod\ny = mod._table\nfrom huabi.core.a import __doc__\n",
        Path("core/d.py"): "from huabi.core.d import _mine\n",  # a module's own names are its business
    }
    assert private_imports(files) == ["core/b.py:1: _helper from huabi.core.a", "core/b.py:3: _table from huabi.core.a",
                                      "core/c.py:2: _table from huabi.core.a"]
