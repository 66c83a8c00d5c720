"""What the bench scripts share for their output: the facts each line ends with, and JSON
written to an --output file."""

from __future__ import annotations

import json
import os
import platform
import time


def run_facts(t0: float) -> dict:
    """The machine, its load and the seconds since `t0`: the end of a script's summary line."""
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "load_avg_1m": round(os.getloadavg()[0], 2), "seconds": round(time.time() - t0, 1)}


def write_json(path: str, line: dict) -> None:
    """One JSON object, indented, to `path`."""
    with open(path, "w") as f:
        json.dump(line, f, indent=1)


def write_json_lines(path: str, lines: list[dict], mode: str = "w") -> None:
    """One JSON object per line to `path` ("w": the file anew; "a": appended, for a script that
    writes each result as soon as it has it)."""
    with open(path, mode) as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def finish(summary: dict, lines: list[dict], output: str | None) -> None:
    """A script's end: the summary line printed, and every line with the summary written to
    `output` when one is given."""
    print(json.dumps(summary))
    if output:
        write_json_lines(output, lines + [summary])
