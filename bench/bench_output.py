"""What the bench scripts share for their output: JSON lines written to an --output file."""

from __future__ import annotations

import json


def write_json_lines(path: str, lines: list[dict], mode: str = "w") -> None:
    """One JSON object per line to `path` ("w": the file anew; "a": appended, for a script that
    writes each result as soon as it has it)."""
    with open(path, mode) as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
