"""What every `pathways-lite` command shares: the one-line user error and the two printers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


class CliError(Exception):
    """An error shown to the user as one line, with a non-zero exit."""


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """Print rows as an aligned plain-text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
