"""No import cycle among zotune's modules (zotune.kernels included), and no test file importing another.

Every file of the package is parsed (not imported) and every `zotune.*` import in it is an
edge of the module graph: at the top, inside functions and under `TYPE_CHECKING` alike, since an
import moved into a function to dodge a cycle still ties the two modules together.
"""

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"zotune": ROOT / "zotune"}  # as pyproject installs them


def module_files(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """Module name -> source file, for every .py file under the packages' folders."""
    modules = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules.setdefault(".".join(parts), path)
    return modules


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `module` imports anywhere in its source, relative imports resolved.

    `from pkg import name` depends on the submodule `pkg.name` when there is one (Python imports it
    without reading pkg's own names), else on `pkg`."""
    return imported_names(path, module, known) & known - {module}


def imported_names(path: Path, module: str = "", known: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """Every module name `path` imports anywhere; relative imports resolved against `module`."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            names.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return names


def import_graph(package_dirs: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    files = module_files(package_dirs)
    return {module: imported_modules(module, path, set(files)) for module, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph.get(module, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_zotune_has_no_import_cycle():
    graph = import_graph(PACKAGE_DIRS)
    assert {"zotune.optim", "zotune.methods.rules.sgd", "zotune.kernels._philox"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_methods_do_not_import_the_optimizer():
    graph = import_graph(PACKAGE_DIRS)
    methods = [m for m in graph if m == "zotune.methods" or m.startswith("zotune.methods.")]
    assert len(methods) > 5
    assert [m for m in methods if "zotune.optim" in graph[m]] == []


def write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, source in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return {"pkg": root / "pkg"}


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "",
        "optim.py": "from pkg.methods import build\n",
        "methods/__init__.py": "from .rules import sgd  # noqa\ndef build(): pass\n",
        "methods/rules/__init__.py": "",
        "methods/rules/sgd.py": "def choose():\n    from ...optim import Point\n",
    })
    assert find_cycle(import_graph(package)) == ["pkg.methods", "pkg.methods.rules.sgd", "pkg.optim", "pkg.methods"]


def test_a_registry_in_its_own_module_is_no_cycle(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "",
        "optim.py": "from pkg.methods import build\n",
        "methods/__init__.py": "from pkg.methods.registry import build\nfrom pkg.methods.rules import sgd  # noqa\n",
        "methods/registry.py": "def build(): pass\n",
        "methods/rules/__init__.py": "",
        "methods/rules/sgd.py": "from pkg.methods.registry import build\n",
    })
    graph = import_graph(package)
    assert graph["pkg.methods"] == {"pkg.methods.registry", "pkg.methods.rules.sgd"}
    assert find_cycle(graph) is None


def test_test_files_import_shared_helpers_never_each_other():
    tests = ROOT / "tests"
    test_modules = {path.stem for path in tests.glob("test_*.py")}
    offenders = {
        path.name: sorted(imported & test_modules)
        for path in sorted(tests.glob("*.py"))
        if (imported := {name.split(".")[0] for name in imported_names(path)}) & test_modules
    }
    assert offenders == {}, "move what they share into tests/helpers.py or conftest.py"
