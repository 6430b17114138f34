"""metrics.csv: one row per optimizer step, the source of truth for every analysis script.

Columns: tokens, step, train_loss, val_loss (on evaluation steps; empty otherwise), lr_<group> for
every optimizer group, grad_norm (before clipping), grad_evals, tokens_per_s, mfu (model FLOPs
utilisation, trainer/throughput.py), peak_memory_gb, elapsed_s (training wall time, summed over
resumed sessions), then any columns callbacks add. A new column rewrites the file with
the wider header; otherwise rows are appended and flushed. On resume, rows after the checkpoint's
step are dropped, so an interrupted and resumed run ends with the same rows as an uninterrupted one.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from data.files import atomic_file

LEADING = ("tokens", "step", "train_loss", "val_loss")


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.csv with numbers parsed (empty cells are absent)."""
    with open(path, newline="") as f:
        return [{k: float(v) if k not in ("tokens", "step") else int(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


class MetricsCSV:
    def __init__(self, path: Path, resume_step: int | None):
        self.path = Path(path)
        self.rows: list[dict] = []
        if resume_step is not None and self.path.is_file():
            self.rows = [row for row in read_metrics(self.path) if row["step"] <= resume_step]
        self.columns = self._columns_for(self.rows)
        self._rewrite()

    @staticmethod
    def _columns_for(rows: list[dict], columns: tuple = ()) -> list[str]:
        seen = dict.fromkeys(columns)
        for row in rows:
            seen.update(dict.fromkeys(row))
        rest = [c for c in seen if c not in LEADING]
        return list(LEADING) + sorted(c for c in rest if c.startswith("lr_")) + [c for c in rest if not c.startswith("lr_")]

    @staticmethod
    def _cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return repr(value) if isinstance(value, float) else str(value)

    def _line(self, row: dict) -> str:
        return ",".join(self._cell(row.get(c)) for c in self.columns) + "\n"

    def _rewrite(self) -> None:
        text = ",".join(self.columns) + "\n" + "".join(self._line(r) for r in self.rows)
        with atomic_file(self.path) as tmp:
            tmp.write_text(text)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if any(key not in self.columns for key in row):
            self.columns = self._columns_for(self.rows, tuple(self.columns))
            self._rewrite()
            return
        with open(self.path, "a") as f:
            f.write(self._line(row))
