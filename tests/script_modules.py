"""Scripts of folders that are not packages (bench/, deploy/) loaded as modules by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str):
    """The script at `path` as a module named `name` (executed once per call)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench(stem: str):
    """bench/<stem>.py as the module bench_<stem>."""
    return load_script(ROOT / "bench" / f"{stem}.py", f"bench_{stem}")
