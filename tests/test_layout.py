"""Nothing of this repository shadows a module that Python or a dependency provides (DESIGN §1).

Python puts the folder it runs from first on `sys.path`: the repository root for `python -m ...`, a
notebook or a script there; `benchmarks/` for a benchmark; `tests/` for pytest (its folder has no
`__init__.py`); `examples/` for an example. A module or package there is found before the installed
one of the same name: a `kernels/` package at the root once hid Hugging Face's `kernels`, which
transformers imports at start-up, and broke every command started from the root. The last tests
run what a user runs from the root, in a fresh process.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS_FIRST_ON_PATH = (ROOT, ROOT / "benchmarks", ROOT / "tests", ROOT / "examples")
OWN_DISTRIBUTION = "zotune"
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def importable_names(folder: Path) -> set[str]:
    """The top-level names a folder first on sys.path makes importable: its modules (source or
    compiled) and its regular packages. A folder without `__init__.py` is a namespace portion,
    which any installed module or regular package of the same name takes precedence over."""
    suffixes = tuple(importlib.machinery.all_suffixes())
    names = set()
    for path in folder.iterdir():
        if path.is_file() and path.name.endswith(suffixes):
            names.add(path.name.split(".")[0])
        elif path.is_dir() and (path / "__init__.py").is_file():
            names.add(path.name)
    return names


def provided_elsewhere() -> dict[str, list[str]]:
    """Top-level name -> who else provides it: the standard library, or the installed distributions."""
    provided = {name: ["the standard library"] for name in sys.stdlib_module_names}
    for name, distributions in importlib.metadata.packages_distributions().items():
        others = [d for d in distributions if d.lower() != OWN_DISTRIBUTION]
        if others:
            provided.setdefault(name, []).extend(others)
    return provided


def clashes(folders, provided: dict[str, list[str]]) -> dict[str, list[str]]:
    """'folder/name' -> its other providers, for every name the folders make importable that is provided elsewhere."""
    return {f"{folder.name}/{name}": provided[name]
            for folder in folders for name in sorted(importable_names(folder)) if name in provided}


def test_no_folder_python_runs_from_shadows_an_installed_or_standard_module():
    assert clashes(FOLDERS_FIRST_ON_PATH, provided_elsewhere()) == {}


def test_a_shadowing_package_module_or_extension_is_found(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "json.py").write_text("")
    (tmp_path / "numpy.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (tmp_path / "notes").mkdir()  # a namespace portion: an installed `notes` would win over it
    (tmp_path / "notes" / "a.py").write_text("")
    (tmp_path / "mine.py").write_text("")
    provided = {"kernels": ["kernels"], "json": ["the standard library"], "numpy": ["numpy"], "notes": ["notes"]}
    assert clashes([tmp_path], provided) == {f"{tmp_path.name}/kernels": ["kernels"],
                                            f"{tmp_path.name}/json": ["the standard library"],
                                            f"{tmp_path.name}/numpy": ["numpy"]}


def run_from_root(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_transformers_and_zotune_import_from_the_repository_root(from_root):
    installed = importlib.util.find_spec("kernels")  # in this process the root is not on sys.path
    assert from_root["kernels"] == str(installed and installed.origin)


def test_the_cli_runs_as_a_module_from_the_root():
    done = run_from_root("-m", "zotune.cli", "--help")
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout


def test_pytest_collects_from_the_root(from_root):
    """`python -m pytest` from the root, as FROM_ROOT runs it: the root first on sys.path."""
    collected = from_root["pytest"]
    assert collected["code"] == 0, collected["output"]
    assert "tests/test_recipe.py::" in collected["output"]


# run from the root: what `kernels` resolves to once transformers and zotune are imported, each benchmark's
# --help, then pytest's collection of one test file (`python -m pytest` puts the root first on sys.path, as
# `python -c` does)
FROM_ROOT = """
import contextlib, importlib.util, io, json, runpy, sys, traceback
import pytest, transformers, zotune
from transformers import Trainer
spec = importlib.util.find_spec("kernels")
results = {}
for path in sys.argv[1:]:
    sys.argv, out = [path, "--help"], io.StringIO()
    sys.path.insert(0, "benchmarks")  # what `python benchmarks/NAME.py` puts first
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    except BaseException:
        code = traceback.format_exc()[-500:]
    sys.path.remove("benchmarks")
    results[path] = {"code": code, "usage": "usage:" in out.getvalue()}
# last: pytest puts tests/ on sys.path and its modules in sys.modules, where a benchmark could find them
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_recipe.py"])
collected = {"code": int(code), "output": out.getvalue()[-3000:]}
print(json.dumps({"kernels": str(spec and spec.origin), "pytest": collected, "benchmarks": results}))
"""


@pytest.fixture(scope="module")
def from_root() -> dict:
    """FROM_ROOT's findings, from one process: pytest and the scripts mostly wait on the same imports."""
    paths = [str(path.relative_to(ROOT)) for path in BENCHMARKS]
    done = run_from_root("-c", FROM_ROOT, *paths, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_every_benchmark_starts_from_the_root(from_root):
    """Each script prints its usage for --help, run as `python benchmarks/NAME.py` runs it (its folder first
    on sys.path, from the root); a helper module the scripts share (no __main__) imports cleanly."""
    results = from_root["benchmarks"]
    failures = {path: result["code"] for path, result in results.items()
                if result["code"] != 0 or ("__main__" in (ROOT / path).read_text() and not result["usage"])}
    assert len(results) > 5
    assert failures == {}

