"""docs/errors.md lists every user-facing error with the test that triggers it: each named test exists and
asserts the quoted message (so the table cannot drift from the code or lose its tests)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| (?P<what>[^|]+) \| `(?P<message>[^`]+)` \| (?P<test>tests/[\w/]+\.py::\w+) \|$")


def rows() -> list[dict[str, str]]:
    text = (ROOT / "docs" / "errors.md").read_text()
    found = [m.groupdict() for line in text.splitlines() if (m := ROW.match(line))]
    table_lines = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| what")]
    assert len(found) == len(table_lines), "a table row does not have the form | what | `message` | test |"
    return found


def _unescape(s: str) -> str:
    """A test's match string as plain text: regex escapes dropped."""
    return re.sub(r"\\(.)", r"\1", s)


def test_every_row_names_an_existing_test_that_asserts_its_message() -> None:
    table = rows()
    assert len(table) >= 70
    sources: dict[str, tuple[str, set[str]]] = {}
    for row in table:
        path, func = row["test"].split("::")
        if path not in sources:
            text = (ROOT / path).read_text()
            sources[path] = (
                _unescape(text),
                {n.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef)},
            )
        text, functions = sources[path]
        assert func in functions, f"{row['test']} does not exist"
        assert row["message"] in text, f"{row['test']} never quotes {row['message']!r}"
