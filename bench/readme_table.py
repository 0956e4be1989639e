"""Helpers shared by the benchmarks: write a generated markdown table into a documentation page (README.md or a page
under docs/) between two HTML-comment markers; write result rows as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_between_markers(readme: Path, start: str, end: str, table: str) -> bool:
    """Replace the text between ``start`` and ``end`` in the markdown page ``readme`` with ``table``; False (and the
    page left as it is) if the page is missing or does not hold exactly one ``start`` followed by one ``end``."""
    if not readme.exists():
        return False
    text = readme.read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        print(f"{readme.name} needs exactly one {start} ... {end} block; table not written", file=sys.stderr)
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + "\n" + table + "\n" + end + tail)
    return True


def write_rows(out: str | Path, rows: list[dict]) -> None:
    """A benchmark's result rows as a JSON list in ``out`` (parent folders created), and say so."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {len(rows)} rows to {out}")
