"""A full disk at every write site of `zotune train`: an error line, no traceback, and a resume
(with the command the error line gives) that ends bit-identical to an uninterrupted run.

A recording run lists the write sites: every write primitive (open for writing, a file's write,
mkdir, rename, torch.save, safetensors' save_file) reached under the output folder, keyed by the
primitive, the innermost zotune line that led to it, and whether it wrote into a checkpoint. Then each site
in turn fails with the error a full disk raises there: OSError(ENOSPC) from Python, a SafetensorError "(os error 28)"
from safetensors' Rust writer, and torch's archive writer's RuntimeError, which names no cause
(the three as measured on a full tmpfs, see zotune/failures.py).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import shlex
import traceback
from collections import Counter
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers.modeling_utils
from safetensors import SafetensorError
from safetensors.torch import load_file
from typer.testing import CliRunner

import zotune
from helpers import write_momentum_recipe as write_recipe
from zotune.cli import app

PACKAGE = Path(zotune.__file__).parent
STEPS = ["train.max_steps=2", "train.save_steps=1"]
WRITE_MODES = set("wax+")


def disk_full(primitive: str, path: str) -> BaseException:
    if primitive == "torch.save":
        return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    if primitive == "safetensors":
        return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


class WriteSites:
    """Patches the write primitives; counts each site's calls under `root`, and fails the `fail`-th one of `site`."""

    def __init__(self, root: Path, fail: tuple[tuple, int] | None = None):
        self.root, self.fail, self.calls = str(root), fail, Counter()

    def _site(self, primitive: str, path) -> tuple | None:
        path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        if path is None or not os.path.abspath(path).startswith(self.root + os.sep):
            return None
        ours = [f for f in traceback.extract_stack()[:-2] if f.filename.startswith(str(PACKAGE))]
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
        # one site per zotune line and primitive; a checkpoint's files and the final model's apart
        checkpoint = os.path.relpath(path, self.root).startswith(".tmp-checkpoint-")
        return primitive, where, "checkpoint" if checkpoint else "run"

    def _reach(self, primitive: str, path) -> None:
        site = self._site(primitive, path)
        if site is None:
            return
        self.calls[site] += 1
        if self.fail is not None and (site, self.calls[site]) == self.fail:
            raise disk_full(primitive, os.fspath(path))

    def install(self, monkeypatch) -> None:
        sites, real_open = self, io.open

        class File:  # a file whose writes count as a site of their own
            def __init__(self, f, path):
                self._f, self._path = f, path

            def write(self, data):
                sites._reach("write", self._path)
                return self._f.write(data)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def __iter__(self):
                return iter(self._f)

            def __getattr__(self, name):
                return getattr(self._f, name)

        def opened(file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and WRITE_MODES & set(mode):
                self._reach("open", file)
                return File(real_open(file, mode, *args, **kwargs), file)
            return real_open(file, mode, *args, **kwargs)

        def wrap(primitive, real, path_of):
            def patched(*args, **kwargs):
                self._reach(primitive, path_of(*args, **kwargs))
                return real(*args, **kwargs)
            return patched

        monkeypatch.setattr(builtins, "open", opened)
        monkeypatch.setattr(io, "open", opened)
        # a folder that exists already fails with EEXIST, never for want of space
        monkeypatch.setattr(os, "mkdir", wrap("mkdir", os.mkdir, lambda path, *a, **k: None if os.path.exists(path)
                                              else path))
        monkeypatch.setattr(os, "replace", wrap("rename", os.replace, lambda src, dst, **k: dst))
        monkeypatch.setattr(torch, "save", wrap("torch.save", torch.save, lambda obj, f, *a, **k: f))
        safe = wrap("safetensors", safetensors.torch.save_file, lambda tensors, filename, *a, **k: filename)
        monkeypatch.setattr(safetensors.torch, "save_file", safe)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", safe)


def train(*args: str):
    return CliRunner().invoke(app, ["train", *args])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The write sites of an uninterrupted run, and its final weights."""
    root = tmp_path_factory.mktemp("recorded")
    recipe = write_recipe(root, "run")
    sites = WriteSites(root / "run")
    with pytest.MonkeyPatch.context() as mp:
        sites.install(mp)
        assert train(str(recipe), *STEPS).exit_code == 0
    return sites.calls, load_file(root / "run" / "model.safetensors")


def test_every_write_site_is_reached(recorded):
    calls, _ = recorded
    kinds = {primitive for primitive, _, _ in calls}
    assert kinds == {"open", "write", "mkdir", "rename", "torch.save", "safetensors"}
    modules = {where.split(":")[0] for _, where, _ in calls}
    assert {"trajectory.py", "checkpoints.py", "rundir.py", "run.py", "fsdp_checkpoints.py", "plot.py"} <= modules


def test_a_full_disk_at_each_site_is_an_error_line_and_resumes_bit_identical(recorded, tmp_path, monkeypatch):
    calls, expected = recorded
    # a write on the line that opened the file fails as its open does: the sites are the rest
    sites = [s for s in sorted(calls) if not (s[0] == "write" and ("open", *s[1:]) in calls)]
    failures = []
    for n, site in enumerate(sites):
        problem = _fill_the_disk_at(site, (calls[site] + 1) // 2, tmp_path / str(n), expected, monkeypatch)
        if problem:
            failures.append(f"{site}: {problem}")
    assert not failures, f"{len(failures)} of {len(sites)} sites:\n" + "\n".join(failures)


def _fill_the_disk_at(site: tuple, call: int, root: Path, expected: dict, monkeypatch) -> str | None:
    """Fail the `call`-th call of `site`, then resume as the error line says; what went wrong, if anything."""
    root.mkdir()
    recipe = write_recipe(root, "run")
    with monkeypatch.context() as mp:
        WriteSites(root / "run", fail=(site, call)).install(mp)
        result = train(str(recipe), *STEPS)
    output = result.output
    if result.exit_code != 2 or "Traceback" in output or "error:" not in output:
        return f"exit {result.exit_code}, not an error line: {output[-300:]}"
    message = " ".join(output[output.index("error:"):].split())
    if "No space left on device" not in message and "torch archive" not in message:
        return f"the error line does not say the disk is full: {message}"
    resume = re.search(r"resume with: (zotune train \S+ \S+)", message)
    again = shlex.split(resume.group(1))[2:] if resume else [str(recipe), *STEPS]
    result = train(*again)
    if result.exit_code != 0:
        return f"then {again}: exit {result.exit_code}: {result.output[-300:]}"
    resumed = load_file(root / "run" / "model.safetensors")
    if resumed.keys() != expected.keys() or not all(torch.equal(resumed[k], expected[k]) for k in expected):
        return f"then {again}: the weights differ from the uninterrupted run's"
    return None
