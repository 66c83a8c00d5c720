"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE): the launcher runs this file with
the template parameters and the job's pipeline options as `--name=value` flags; it is
`remap embed` with those flags.

Flex Templates pass every parameter as `--name=value`, booleans too (`--full=true`), while
EmbedOptions' --full is a plain switch: `template_argv` translates.
"""

from __future__ import annotations

import logging
import sys

SWITCHES = ("full", "break_lease")   # EmbedOptions flags declared action="store_true"
TRUE = ("true", "1", "yes")


def template_argv(argv: list[str]) -> list[str]:
    """Template flags -> `remap embed` flags: `--full=true` -> `--full`, `--full=false` -> gone."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if eq and name.lstrip("-") in SWITCHES:
            if value.strip().lower() in TRUE:
                out.append(name)
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    from pipelines.embed import run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = template_argv(list(sys.argv[1:] if argv is None else argv))
    summary = run(argv)
    logging.info("remap embed launched: %s", summary.get("run_id"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
