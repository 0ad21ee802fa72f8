"""`make gpu-check`: in one command on a CUDA machine, whether zotune's GPU paths work and how fast.

    make gpu-check                          # on a GPU: writes benchmarks/results/gpu_check.txt
    ZOTUNE_GPU_CHECK_DRY=1 make gpu-check   # anywhere: the same steps on the CPU, every CUDA test skipped
                                            # and the benchmarks on tiny sizes; writes gpu_check_dry_run.txt

Each step runs in its own process under a budget, in seconds on one H200, and is killed and reported
as such if it overruns; the budgets add up to 430 s, so the whole stays under 8 minutes with the
start-up of each process. They are estimates: no step has run on a GPU yet. The long poles should
be compiling, once per machine: Triton's kernels (about 80 specialisations in the kernel tests) and,
in the offloaded runs, inductor's CPU kernels for the update passes on the host weights.

| step             | budget | what                                                                         |
|------------------|-------:|------------------------------------------------------------------------------|
| kernels          |    110 | every Triton kernel compiled for the GPU against its PyTorch twin            |
| dual & offload   |    110 | dual against sequential; offloaded against resident through CUDA streams and |
|                  |        | pinned memory, the residency tracker against torch.cuda's allocated bytes    |
| 4-bit base       |     35 | ZO on a bitsandbytes nf4 base on the GPU: the loss falls, replay is exact    |
| planner          |     35 | zotune.plan against torch.cuda.max_memory_allocated, three model sizes       |
| kernel bandwidth |     25 | benchmarks/kernel_throughput.py: GB/s of each op against a plain copy's, 1e8 elements  |
| ZO step          |    115 | benchmarks/zo_step.py: OPT-1.3B from config in bf16, step ÷ forward          |
|                  |        | (gaussian and rademacher), offloaded step ÷ resident step                    |

The test steps run `pytest -m cuda` on the test files (TRITON_INTERPRET=0, so Triton compiles).
Prints a summary first (each test step's pass/fail/skip counts, the benchmarks' key figures), then
each step's command and output, and writes the same to the results file. Exits 1 if a test failed,
or a step failed or overran; 2 without a GPU unless ZOTUNE_GPU_CHECK_DRY=1.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DRY_ENV = "ZOTUNE_GPU_CHECK_DRY"


@dataclass
class Step:
    name: str
    budget: int  # seconds on one H200
    argv: list[str]
    report: Path  # a test step's JUnit XML, a benchmark's JSON figures
    summarize: object = None  # a benchmark's: figures -> the summary's lines; None for a test step


@dataclass
class Outcome:
    step: Step
    seconds: float
    returncode: int | None  # None: killed at its budget
    output: str


def kernel_lines(f: dict) -> list[str]:
    lines = [f"{f['device']}, {f['elements']:.0e} fp32 elements; reference: a plain copy measured here, "
             f"{f['copy_GBps']:,.1f} GB/s",
             f"{'op':<31}{'impl':<10}{'GB/s gaussian':>14}{'rademacher':>11}{'÷ copy':>8}{'÷ copy':>8}"]
    for op, by_impl in f["ops"].items():
        for impl, kinds in by_impl.items():
            g, r = kinds["gaussian"], kinds["rademacher"]
            lines.append(f"{op:<31}{impl:<10}{g['GBps']:>14,.1f}{r['GBps']:>11,.1f}{g['of_copy']:>8.2f}"
                         f"{r['of_copy']:>8.2f}")
    return lines


def step_lines(f: dict) -> list[str]:
    lines = [f"{f['model']} ({f['params'] / 1e6:,.1f}M params, {f['dtype']}, batch {f['batch']}, {f['device']})",
             f"ZOTrainer step = {f['trainer_over_forward']:.2f} forwards, {f['trainer_vs_mezo']:.2f}x as fast as a "
             f"MeZO-style step, warm-up {f['warmup_s']:.1f} s",
             f"raw dual step = {f['raw dual, gaussian_over_forward']:.2f} forwards gaussian, "
             f"{f['raw dual, rademacher_over_forward']:.2f} rademacher"]
    if "offloaded_over_resident" in f:
        lines.append(f"offloaded trainer step = {f['offloaded_over_resident']:.2f}x the resident one "
                     f"({f['offloaded_step_s']:.3f} s against {f['trainer_step_s']:.3f} s)")
    return lines


def steps(dry: bool, scratch: Path) -> list[Step]:
    def pytest(name: str, budget: int, *files: str) -> Step:
        report = scratch / f"{files[0].removeprefix('tests/')}.xml"
        return Step(name, budget, [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q",
                                   "-rs", f"--junitxml={report}", *files], report)

    def bench(name: str, budget: int, script: str, args: list[str], summarize) -> Step:
        report = scratch / f"{script}.json"
        return Step(name, budget, [sys.executable, f"benchmarks/{script}", *args, "--json", str(report)], report,
                    summarize)

    if dry:
        kernels = ["--device", "cpu", "--impl", "eager", "--sizes", "1e4"]
        zo_step = ["--layers", "2", "--width", "48", "--batch", "2", "--seq", "32", "--steps", "6", "--repeats", "1"]
    else:
        kernels = ["--device", "cuda", "--sizes", "1e8"]
        zo_step = ["--device", "cuda", "--model", "opt-1.3b", "--dtype", "bfloat16", "--batch", "8", "--seq", "256",
                   "--steps", "8", "--repeats", "3"]
    return [
        pytest("kernels", 110, "tests/test_kernels.py", "tests/test_kernels_out_of_place.py"),
        pytest("dual & offload", 110, "tests/test_dual.py"),
        pytest("4-bit base", 35, "tests/test_quantized.py"),
        pytest("planner", 35, "tests/test_plan.py"),
        bench("kernel bandwidth", 25, "kernel_throughput.py", kernels, kernel_lines),
        bench("ZO step", 115, "zo_step.py", [*zo_step, "--offload"], step_lines),
    ]


def run(step: Step) -> Outcome:
    print(f"[{step.name}] {' '.join(step.argv[1:])} (budget {step.budget} s)", file=sys.stderr, flush=True)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a kill takes its children too
    try:
        output, _ = proc.communicate(timeout=step.budget)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        returncode = None
    return Outcome(step, time.perf_counter() - start, returncode, output)


def status(o: Outcome) -> str:
    if o.returncode is None:
        return f"KILLED at its {o.step.budget} s budget"
    return "ok" if o.returncode == 0 else f"FAILED (exit {o.returncode})"


def test_counts(o: Outcome) -> tuple[collections.Counter, collections.Counter, list[str]]:
    """(outcome -> count, skip reason -> count, failed test ids) from the step's JUnit XML."""
    counts, reasons, failed = collections.Counter(), collections.Counter(), []
    if not o.step.report.is_file():
        return counts, reasons, failed
    for case in ET.parse(o.step.report).getroot().iter("testcase"):
        found = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if found is None:
            counts["passed"] += 1
        elif found.tag == "skipped":
            counts["skipped"] += 1
            reasons[found.get("message", "")] += 1
        else:
            counts["failed"] += 1
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return counts, reasons, failed


def environment(dry: bool) -> str:
    import torch

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    where = "DRY RUN on the CPU: no GPU used" if dry else (f"{torch.cuda.get_device_name()}, CUDA "
                                                          f"{torch.version.cuda}")
    return (f"{where}; torch {torch.__version__}, triton {version('triton')}, bitsandbytes {version('bitsandbytes')}, "
            f"transformers {version('transformers')}, Python {platform.python_version()}; zotune "
            f"{commit.stdout.strip() or 'outside git'}")


def summary(outcomes: list[Outcome], dry: bool, header: str) -> tuple[list[str], bool]:
    """The summary's lines, and whether everything passed."""
    total = sum(o.step.budget for o in outcomes)
    lines = [header, f"steps took {sum(o.seconds for o in outcomes):.0f} s of their {total} s (budgets for one H200; "
                     f"a step past its own is killed)", ""]
    ok, reasons_all = True, collections.Counter()
    lines.append(f"{'tests (pytest -m cuda)':<24}{'passed':>7}{'failed':>7}{'skipped':>8}{'seconds':>9}  status")
    for o in (o for o in outcomes if o.step.summarize is None):
        counts, reasons, failed = test_counts(o)
        reasons_all.update(reasons)
        ok &= o.returncode == 0 and not failed
        lines.append(f"  {o.step.name:<22}{counts['passed']:>7}{counts['failed']:>7}{counts['skipped']:>8}"
                     f"{o.seconds:>6.0f}/{o.step.budget:<3} {status(o)}")
        lines += [f"    failed: {name}" for name in failed]
    lines.append("benchmarks")
    for o in (o for o in outcomes if o.step.summarize is not None):
        ok &= o.returncode == 0
        lines.append(f"  {o.step.name:<22}{'':>22}{o.seconds:>6.0f}/{o.step.budget:<3} {status(o)}")
        if o.returncode == 0 and o.step.report.is_file():
            lines += [f"    {line}" for line in o.step.summarize(json.loads(o.step.report.read_text()))]
    if reasons_all:
        lines.append("skipped, with the reason:")
        lines += [f"  {n:>4} x {reason}" for reason, n in reasons_all.most_common()]
    verdict = ("DRY RUN: every step reached" if dry else "PASS") if ok else "FAIL"
    lines += ["", f"verdict: {verdict}"]
    return lines, ok


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    dry = os.environ.get(DRY_ENV, "").strip() not in ("", "0")
    import torch

    if not dry and not torch.cuda.is_available():
        what = "a CPU build" if torch.version.cuda is None else "built for CUDA but sees no GPU"
        print(f"error: make gpu-check needs a CUDA GPU, and torch {torch.__version__} here is {what}. On a GPU "
              f"machine the Makefile installs a CUDA build into .venv-gpu (see TORCH_INDEX and SYSTEM_TORCH there); "
              f"{DRY_ENV}=1 make gpu-check runs the steps here without one", file=sys.stderr)
        sys.exit(2)
    out = RESULTS / ("gpu_check_dry_run.txt" if dry else "gpu_check.txt")
    header = "zotune gpu-check" + (" -- DRY RUN: not a GPU result; the real check writes gpu_check.txt" if dry else "")
    header += f"\n{environment(dry)}\n{time.strftime('%Y-%m-%d %H:%M %Z')}; command: "
    header += f"{DRY_ENV}=1 make gpu-check" if dry else "make gpu-check"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        outcomes = [run(step) for step in steps(dry, Path(scratch))]
        lines, ok = summary(outcomes, dry, header)
    details = [f"\n==== {o.step.name}: {' '.join(o.step.argv[1:])}\n{status(o)} after {o.seconds:.0f} s\n{o.output}"
               for o in outcomes]
    text = "\n".join(lines) + "\n" + "".join(details)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out.write_text(text)
    print(f"written to {out.relative_to(ROOT)}", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
