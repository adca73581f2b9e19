"""Where `fpet bench` writes: the rows as JSON for tools and as a Markdown table for people, both atomically, so an
interrupted benchmark never leaves half a file behind."""

from __future__ import annotations

from pathlib import Path

from fpet.atomic import write_atomic, write_json_atomic


def write_rows(out: str | Path, stem: str, rows: list[dict], table: str) -> str:
    """`<stem>.json` and `<stem>.md` in `out`; returns the table, for the terminal."""
    folder = Path(out)
    write_json_atomic(folder / f"{stem}.json", rows)
    write_atomic(folder / f"{stem}.md", lambda tmp: tmp.write_text(table))
    return table
