"""requirements.txt lists what the production code imports, and nothing it does not."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# component/testing holds the tiny towers and demo data for tests, the demo and benchmarks
PRODUCTION = [
    path
    for path in [*REPO.glob("*.py"), *REPO.glob("component/**/*.py"), *REPO.glob("datatools/**/*.py")]
    if "testing" not in path.relative_to(REPO).parts
]
EXTRAS = ("requirements-onnx.txt", "requirements-serve.txt", "requirements-lmdb.txt")
LOCAL = {"component", "datatools"} | {path.stem for path in REPO.glob("*.py")}
# Needed at run time without an import of ours: transformers' Trainer requires it.
RUNTIME_ONLY = {"accelerate"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[ ;]", line)[0].lower().replace("_", "-"))
    return names


def distributions_of(modules: set[str]) -> set[str]:
    providers = importlib.metadata.packages_distributions()
    return {providers[module][0].lower().replace("_", "-") for module in modules if module in providers}


def test_requirements_list_exactly_what_production_code_imports():
    modules = set().union(*(imported_modules(path) for path in PRODUCTION)) - LOCAL
    third_party = {module for module in modules if module not in sys.stdlib_module_names}
    optional = set().union(*(requirement_names(REPO / name) for name in EXTRAS))
    needed = distributions_of(third_party) - optional
    missing = sorted(
        module for module in third_party if module not in importlib.metadata.packages_distributions()
    )
    assert not missing, f"imported but not installed: {missing}"
    assert requirement_names(REPO / "requirements.txt") == needed | RUNTIME_ONLY
