"""What every benchmark does at its end: name the command that ran, write its results, show them."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def command_line(script: str, argv=None) -> str:
    """``python benchmarks/<script>`` and the arguments it ran with, for the results' first line."""
    args = argv if argv is not None else sys.argv[1:]
    return " ".join([f"python benchmarks/{script}", *args])


def write_results(out, name: str, text: str, data) -> None:
    """``out/name.md`` (the rendered table) and ``out/name.json`` (the raw numbers), then print the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text, encoding="utf-8")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    print(text)
