"""Shared by the benchmark scripts: print a table and write it into docs/BENCHMARKS.md.

Each script owns one section between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers, so
re-running one benchmark replaces its own results and leaves the others alone.
"""

from __future__ import annotations

import platform
import re
import shlex
import sys
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
RESULTS_MD = BENCHMARKS_MD.with_name("RESULTS.md")  # model quality (benchmarks.quality)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def command_line() -> str:
    """How the script was run, as ``python -m benchmarks.NAME ARGS`` from the repository root."""
    module = f"benchmarks.{Path(sys.argv[0]).stem}"
    return " ".join(["python", "-m", module, *(shlex.quote(a) for a in sys.argv[1:])])


def write_section(name: str, title: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) section ``name`` of ``path`` (docs/BENCHMARKS.md) and print it."""
    section = (
        f"<!-- {name}:start -->\n## {title}\n\nCommand: `{command_line()}`  \n"
        f"Machine: {machine()}\n\n{body}\n<!-- {name}:end -->"
    )
    print(section)
    text = path.read_text() if path.exists() else f"# {path.stem.capitalize()}\n"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else f"{text.rstrip()}\n\n{section}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
