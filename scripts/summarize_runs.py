"""A markdown table of the runs under a directory (a multirun, or any folder of run dirs): final
validation loss, tokens, gradient evaluations, training time and the median step's time relative to
a baseline.

    python train.py -m optim=adamw,muon,mars_m hydra.sweep.dir=runs/cmp
    python scripts/summarize_runs.py runs/cmp --baseline muon
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from trainer.metrics import read_metrics


@dataclass
class Run:
    path: Path
    choices: dict  # the Hydra group choices (optim, model, data, ...)
    config: dict  # the resolved config
    rows: list[dict]

    @property
    def total_steps(self) -> int:
        return self.config["budget"]["tokens"] // self.config["data"]["batch_tokens"]

    @property
    def finished(self) -> bool:
        return bool(self.rows) and self.rows[-1]["step"] == self.total_steps and "val_loss" in self.rows[-1]


def find_runs(root: Path) -> list[Run]:
    """Every run dir below root: a folder holding metrics.csv and Hydra's .hydra/ record."""
    runs = []
    for csv in sorted(Path(root).rglob("metrics.csv")):
        hydra_dir = csv.parent / ".hydra"
        if not (hydra_dir / "hydra.yaml").is_file():
            continue
        hydra = OmegaConf.load(hydra_dir / "hydra.yaml")
        config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False)
        runs.append(Run(csv.parent, dict(hydra.hydra.runtime.choices), config, read_metrics(csv)))
    return runs


def seconds_per_step(run: Run) -> float:
    """The median step's wall time (robust to a slow patch of the machine)."""
    tokens_per_step = run.config["data"]["batch_tokens"]
    return statistics.median(tokens_per_step / r["tokens_per_s"] for r in run.rows)


def table(runs: list[Run], baseline: str | None) -> str:
    base = next((r for r in runs if r.choices.get("optim") == baseline and r.finished), None)
    lines = ["| optim | lr | final val loss | tokens | steps | grad evals | train time | tokens/s | time/step vs "
             f"{baseline or '-'} |", "|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (not r.finished, r.rows[-1].get("val_loss", float("inf")) if r.rows else float("inf"))):
        last = run.rows[-1] if run.rows else {}
        loss = f"{last['val_loss']:.4f}" if run.finished else "unfinished"
        ratio = f"{seconds_per_step(run) / seconds_per_step(base):.2f}x" if base and run.finished else "-"
        lr = run.config.get("optim", {}).get("lr", "-")
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in run.rows) if run.rows else 0
        lines.append(f"| {run.choices.get('optim', '?')} | {lr} | {loss} | {last.get('tokens', 0):,} | {last.get('step', 0)} | "
                     f"{int(last.get('grad_evals', 0))} | {last.get('elapsed_s', 0):.0f} s | {tokens_per_s:,.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a multirun directory, or any folder of run dirs")
    parser.add_argument("--baseline", default="muon", help="the optim choice that step times are relative to")
    args = parser.parse_args(argv)
    runs = find_runs(args.root)
    if not runs:
        print(f"error: no run dirs (metrics.csv + .hydra/) under {args.root}", file=sys.stderr)
        return 2
    print(table(runs, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
