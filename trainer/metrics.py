"""metrics.csv: one row per optimizer step, the source of truth for every analysis script.

Columns: tokens (what budget.tokens counts: every position, or an unpacked run's non-pad targets), step, train_loss, val_loss (nats per target token), val_ppl (exp(val_loss)) and
val_bpb (bits per UTF-8 byte of the validation text, comparable across tokenizers; trainer/evaluation.py)
on evaluation steps (empty otherwise), lr_<group> for
every optimizer group, grad_norm (before clipping), grad_evals, tokens_per_s, mfu (model FLOPs
utilisation, trainer/throughput.py), peak_memory_gb, elapsed_s (training wall time, summed over
resumed sessions), then any columns callbacks add. A new column rewrites the file with
the wider header; otherwise rows are appended and flushed. Each checkpoint keeps the rows up to its
step; a resumed run starts from those (rows written after the checkpoint are dropped, and a missing
or damaged file is rewritten), so it ends with the same rows as an uninterrupted one.

budget.json beside it: the run's whole budget as trained, {"counts", "tokens", "steps"} (an unpacked run whose
budget counts non-pad targets learns its step count from its data, so its config alone does not say it).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from data.files import atomic_file

LEADING = ("tokens", "step", "train_loss", "val_loss", "val_ppl", "val_bpb")


def write_budget(run_dir: Path, counts: str, tokens: int, steps: int) -> None:
    with atomic_file(Path(run_dir) / "budget.json") as tmp:
        tmp.write_text(json.dumps({"counts": counts, "tokens": tokens, "steps": steps}) + "\n")


def read_budget(run_dir: Path) -> dict | None:
    """The run's budget.json, or None for runs written before it existed (their config says the same)."""
    path = Path(run_dir) / "budget.json"
    return json.loads(path.read_text()) if path.is_file() else None


class MetricsError(ValueError):
    """A metrics.csv that cannot be read as one: a cut or garbled line, a missing header."""


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.csv with numbers parsed (empty cells are absent); MetricsError names the
    first line that is not a row of numbers."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or reader.fieldnames[:2] != ["tokens", "step"]:
            raise MetricsError(f"{path} has no metrics.csv header (tokens,step,...)")
        rows = []
        for row in reader:
            try:
                if None in row or None in row.values():  # more or fewer cells than the header
                    raise ValueError(f"{len(row) - (None in row)} columns")
                rows.append({k: float(v) if k not in ("tokens", "step") else int(v) for k, v in row.items() if v != ""})
            except ValueError as e:
                raise MetricsError(f"{path} line {reader.line_num} is not a row of {len(reader.fieldnames)} numbers ({e})") from None
        return rows


class MetricsCSV:
    """metrics.csv, opened with the rows already logged (a resumed run's, from its checkpoint)."""

    def __init__(self, path: Path, rows: list[dict] = ()):
        self.path = Path(path)
        self.rows: list[dict] = list(rows)
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
