"""Running each case of a benchmark in a fresh process, so that one case's peak memory is its own."""

from __future__ import annotations

import json
import subprocess
import sys


def each_in_a_process(script: str, option: str, labels, args, not_forwarded=()) -> dict:
    """Run `script --option=LABEL` with `args`' other options for each label; each child prints its
    result as a JSON last line. Returns {label: result}."""
    forwarded = [f"--{k}={v}" for k, v in vars(args).items() if k != option and k not in not_forwarded]
    results = {}
    for label in labels:
        out = subprocess.run([sys.executable, script, f"--{option}={label}", *forwarded], capture_output=True,
                             text=True, check=True).stdout
        results[label] = json.loads(out.strip().splitlines()[-1])
    return results
