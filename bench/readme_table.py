"""Write a generated markdown table into README.md between two HTML-comment markers (shared by the benchmarks)."""

from __future__ import annotations

import sys
from pathlib import Path


def write_between_markers(readme: Path, start: str, end: str, table: str) -> bool:
    """Replace the text between ``start`` and ``end`` in ``readme`` with ``table``; False if a marker is missing."""
    if not readme.exists():
        return False
    text = readme.read_text()
    if start not in text or end not in text:
        print(f"{readme.name} has no {start} ... {end} markers; table not written", file=sys.stderr)
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + "\n" + table + "\n" + end + tail)
    return True
