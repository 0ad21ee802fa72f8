"""Where a benchmark ran, for the first line of its results: one CPU's figures do not hold on another
(the compiled noise ran 4x slower on an AVX2-only EPYC than on an AVX-512 one)."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers as the OS reports them (Linux:
    /proc/cpuinfo; a virtual machine may name only the vendor's line, e.g. "AMD EPYC"), else the
    platform's word for it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        fields = {}
        for line in cpuinfo.read_text(errors="replace").split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if "model name" in fields:
            return f"{fields['model name']}, family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    return platform.processor() or platform.machine()


def version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def describe(threads: int | None = None) -> dict:
    """The CPU model and capability, the threads the measured work uses (`threads`, for work done in child
    processes; by default this process's torch threads), and the versions that decide the figures."""
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": threads or torch.get_num_threads(), "torch": torch.__version__,
            "transformers": version("transformers"), "python": platform.python_version()}


def line(threads: int | None = None) -> str:
    """`describe()` in one line, for the top of a results file."""
    d = describe(threads)
    return (f"# {d['cpu']} ({d['cpu_capability']}), {d['threads']} threads; torch {d['torch']}, "
            f"transformers {d['transformers']}, Python {d['python']}")
