"""The per-round table of a prune-retrain run, as CSV and Markdown files in the run directory."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

COLUMNS = ("round", "epoch", "ratio", "channels_kept", "channels_fraction", "params", "macs",
           "weights_nonzero_fraction", "dice")
HEADERS = ("round", "epoch", "ratio", "channels kept", "kept fraction", "params", "MACs",
           "non-zero weights", "val Dice")


def _columns(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The fixed columns, then one per class Dice (``dice_<class>``) found in the rows."""
    classes = [k for k in dict.fromkeys(k for row in rows for k in row) if k.startswith("dice_")]
    return [*COLUMNS, *classes], [*HEADERS, *(f"Dice {k.removeprefix('dice_')}" for k in classes)]


def _fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("params", "macs", "channels_kept"):
        return f"{int(value):,}"
    if key in ("ratio", "channels_fraction", "weights_nonzero_fraction") or key.startswith("dice"):
        return f"{float(value):.4f}"
    return str(value)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    columns, headers = _columns(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(k, row.get(k)) for k in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict[str, Any]], directory: str | Path, stem: str = "prune_rounds") -> tuple[Path, Path]:
    """Write ``<stem>.csv`` and ``<stem>.md`` under ``directory``; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = directory / f"{stem}.csv", directory / f"{stem}.md"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_columns(rows)[0], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown(rows))
    return csv_path, md_path
