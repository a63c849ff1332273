"""Print the figures of a reliability run as the markdown tables of docs/reliability.md.

    ORCH_RELIABILITY=full ORCH_FIGURES=reliability-figures.json \\
        .venv/bin/python -m pytest -q tests/reliability
    .venv/bin/python -m tests.reliability.report reliability-figures.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def table(figures: dict[str, dict[str, Any]]) -> str:
    lines = ["| suite | figure | value |", "|---|---|---|"]
    for suite in sorted(figures):
        values = figures[suite]
        name = suite.replace("test_", "", 1).replace("_", " ")
        for key in sorted(values):
            if key == "mode":
                continue
            lines.append(f"| {name} | {key.replace('_', ' ')} | {_fmt(values[key])} |")
            name = ""
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    figures = json.loads(Path(argv[0]).read_text())
    modes = {values.get("mode") for values in figures.values()}
    print(f"Mode: {', '.join(sorted(m for m in modes if m))}\n")
    print(table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
