"""The wheel a user installs: built from the repository, installed (not editable) into a fresh virtual
environment, and run from there, away from the source tree.

The editable install that `make test` uses reads the source tree, so it cannot see a subpackage or a
data file the wheel leaves out; this test can. The fresh environment borrows the test interpreter's
installed dependencies through a `.pth` line (site-packages added that way run none of their own
`.pth` files, so the editable zotune stays out of sight) and gets zotune from the wheel alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, cwd, env_extra=(), **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | dict(env_extra)
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment holding zotune from its wheel; returns its bin/ folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    # built from a copy of what the wheel is made of: setuptools' build/ folder in the repository could
    # hold files deleted since, which would end up in the wheel and hide a missing one
    source = tmp / "source"
    shutil.copytree(ROOT / "zotune", source / "zotune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", source], tmp)
    (wheel,) = (tmp / "dist").glob("zotune-*.whl")
    env = tmp / "env"
    venv.create(env, with_pip=False)
    bin_dir = env / "bin"
    _run([*pip, "--python", bin_dir / "python", "install", "--no-deps", "--no-index", "-q", wheel], tmp)
    site = Path(_run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp).strip())
    borrowed = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "test_dependencies.pth").write_text("\n".join(borrowed) + "\n")
    return bin_dir


# what the installed wheel holds and does, asked in one process of the fresh environment (each question would
# pay the same imports). Last, `zotune validate quickstart` through the console script's `main`, from the
# repository root (argv[1]), where the quickstart finds ../shared/data: the folder the process started in
# leaves sys.path first, so nothing of the source tree can be imported from there.
PROBE = """
import contextlib, io, json, os, pkgutil, sys, traceback
sys.path.remove("")
import torch, zotune, zotune.trainer
from zotune import ZOTrainer
from zotune.cli import main
from zotune.kernels import _native
from zotune.recipe import shipped_recipes
found = {"zotune": zotune.__file__,
         "native": {"source": str(_native.SOURCE),
                    "builds": not _native.capability() or _native.library() is not None},
         "packages": sorted(m.name for m in pkgutil.walk_packages(zotune.__path__, "zotune.") if m.ispkg),
         "recipes": sorted(shipped_recipes())}
os.chdir(sys.argv[1])
sys.argv = ["zotune", "validate", "quickstart"]
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    except Exception:
        code = traceback.format_exc()[-2000:]
found["validate"] = {"code": code, "stdout": out.getvalue()}
json.dump(found, sys.stdout)
"""


@pytest.fixture(scope="module")
def probed(installed, tmp_path_factory) -> dict:
    """PROBE's findings; a RuntimeWarning (the native noise failing to build) is an error."""
    cache = tmp_path_factory.mktemp("cache")
    return json.loads(_run([installed / "python", "-W", "error::RuntimeWarning", "-c", PROBE, ROOT], cache,
                           env_extra={"ZOTUNE_CACHE": str(cache)}))


def test_the_wheel_imports_from_the_fresh_environment(installed, probed):
    where = probed["zotune"]
    assert Path(where).is_relative_to(installed.parent), f"zotune came from {where}, not the wheel"


def test_the_wheel_builds_the_native_noise(installed, probed):
    """`_native.c` ships in the wheel and builds there: the CPU ops' fast path."""
    assert probed["native"]["builds"]
    assert Path(probed["native"]["source"]).is_relative_to(installed.parent)


def test_the_wheel_holds_every_subpackage_and_recipe(probed):
    source = ROOT / "zotune"
    packages = sorted("zotune." + ".".join(p.parent.relative_to(source).parts)
                      for p in source.rglob("__init__.py") if p.parent != source)
    recipes = sorted(p.stem for p in (source / "recipes").glob("*.yaml"))
    assert (probed["packages"], probed["recipes"]) == (packages, recipes)


def test_the_cli_runs_from_the_wheel(installed, probed):
    assert "Usage: zotune" in _run([installed / "zotune", "--help"], ROOT)  # the console script itself
    validated = probed["validate"]
    assert validated["code"] == 0 and validated["stdout"].startswith("ok: quickstart"), validated
