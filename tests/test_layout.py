"""The package's shape: modules by concern, none too long, no import cycles, torch-free data tools."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for path in [*REPO.glob("component/**/*.py"), *REPO.glob("datatools/**/*.py")]:
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def module_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The toolkit modules `name` imports, at its top level or deferred inside a function."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            imported.add(node.module)
            imported.update(
                f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known
            )
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names if a.name in known)
    parents = {name.rsplit(".", 1)[0]} if "." in name else set()
    return imported - {name} - parents


def test_no_module_or_function_is_too_long():
    too_long = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long


def test_there_are_no_import_cycles():
    known = modules()
    graph = {name: module_imports(name, path, known) for name, path in known.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for other in graph[name]:
            assert state.get(other) != "open", "import cycle: " + " -> ".join([*trail, name, other])
            if other not in state:
                visit(other, [*trail, name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_data_tools_and_script_help_load_no_torch():
    code = (
        "import sys, datatools.images, datatools.csv_rows, datatools.download; print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_production_code_never_imports_the_testing_helpers():
    offenders = []
    for name, path in modules().items():
        if not name.startswith("component.testing"):
            text = path.read_text(encoding="utf-8")
            if "component.testing" in text:
                offenders.append(name)
    assert not offenders
