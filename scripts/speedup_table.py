"""Tokens-to-target speedup tables from multirun directories.

    python scripts/speedup_table.py runs/cpu_repro/seeds --baseline muon [--target 4.7] [--out results/table]
                                    [--metric val_loss|val_bpb|val_ppl]

The metric (default val_loss, nats per token) is what curves, finals and the target are in. Nats per
token compare only runs of one tokenizer, so with them a group is also split by tokenizer; val_bpb
(bits per UTF-8 byte) compares a GPT-2-BPE run with a T5 or LLaMA one, in one group.

Every run dir below the given directories (metrics.csv + Hydra's .hydra/ record) is read; runs are
grouped by model and data, and within a group into arms: one optimizer (and lr, when several lrs of
it are present) at one token budget, its seeds pooled. Per arm:

  n, final val loss        mean ± sample std over seeds
  tokens to target         where the arm's mean validation curve (over seeds) first reaches the target,
                           linearly interpolated between evaluations; "not reached" when it never does
                           (never extrapolated). The target defaults to the baseline's mean final val
                           loss (its best-lr arm at its largest budget, when several are present),
                           which its mean curve reaches at its last evaluation. This is a crossing
                           on the arm's own schedule: mid-schedule crossings overstate speedups (a
                           shorter run would decay its lr earlier).
  speedup                  baseline tokens / arm tokens; the 95 % t-interval is over the arm's seeds
                           (baseline tokens / each seed's own crossing), when every seed reaches the target
  p (final < target)       one-sided t-test of the mean final loss against the target (modded-nanogpt's
                           track-3 validity check, with the sample std instead of an assumed one)
  D_eff/D                  when the baseline ran at >= 3 budgets: Marin's effective data, from
                           L(D) = α D^(−B) + β fitted to the baseline's mean final losses,
                           D_eff = ((L − β)/α)^(−1/B) for the arm's mean final loss L at budget D
  time/step                the arm's median step time relative to the baseline's

Output: a markdown table on stdout and in <out>.md, the same rows in <out>.csv, and <out>.png with
each arm's mean validation curve (min-max band over seeds) and the target line.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from data.files import atomic_file
from trainer.metrics import read_budget, read_metrics


class TableError(ValueError):
    pass


@dataclass
class Run:
    path: Path
    choices: dict  # Hydra's group choices (optim, model, data, ...)
    config: dict  # the resolved config
    rows: list[dict]
    metric: str = "val_loss"
    recorded: dict | None = None  # its budget.json (trainer/metrics.py); None for runs written before it

    @property
    def budget(self) -> int:
        """The arm's budget: budget.tokens rounded down to whole steps, or as given where the steps depend on the
        data (unpacked runs counting non-pad targets: seeds differ in their steps, not in their arm)."""
        if self.recorded is not None and self.recorded["counts"] == "nonpad":
            return self.config["budget"]["tokens"]
        return self.total_steps * self.config["data"]["batch_tokens"]

    @property
    def total_steps(self) -> int:
        if self.recorded is not None:
            return self.recorded["steps"]
        return self.config["budget"]["tokens"] // self.config["data"]["batch_tokens"]

    @property
    def finished(self) -> bool:
        return bool(self.rows) and self.rows[-1]["step"] == self.total_steps and self.metric in self.rows[-1]

    @property
    def final_loss(self) -> float:
        return self.rows[-1][self.metric]

    @property
    def evals(self) -> list[tuple[int, float]]:
        return [(r["tokens"], r[self.metric]) for r in self.rows if self.metric in r]

    @property
    def step_seconds(self) -> float:
        return statistics.median(self.config["data"]["batch_tokens"] / r["tokens_per_s"] for r in self.rows)


def find_runs(roots: list[Path], metric: str = "val_loss") -> list[Run]:
    """Every run dir below the roots: a folder holding metrics.csv and Hydra's .hydra/ record."""
    runs = []
    for root in roots:
        for metrics in sorted(Path(root).rglob("metrics.csv")):
            hydra_dir = metrics.parent / ".hydra"
            if (hydra_dir / "hydra.yaml").is_file() and (hydra_dir / "config.yaml").is_file():
                choices = dict(OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.choices)
                config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False)
                runs.append(Run(metrics.parent, choices, config, read_metrics(metrics), metric, read_budget(metrics.parent)))
    return runs


def crossing(evals: list[tuple[int, float]], target: float) -> float | None:
    """The first token count at which the curve reaches `target`, linear between evaluations."""
    previous = None
    for tokens, loss in evals:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(tokens)
            (t0, l0) = previous
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
        previous = (tokens, loss)
    return None


# ---- statistics without scipy ----------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes §6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with `dof` degrees of freedom."""
    tail = 0.5 * incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, dof: int) -> float:
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, dof) < p else (low, mid)
    return (low + high) / 2


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided t-interval (the mean twice when there is one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = t_quantile(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def p_below_target(losses: list[float], target: float) -> float | None:
    """One-sided p-value of H0: mean final loss >= target (None with fewer than 2 seeds or no spread)."""
    if len(losses) < 2 or statistics.stdev(losses) == 0:
        return None
    t = (target - statistics.fmean(losses)) / (statistics.stdev(losses) / math.sqrt(len(losses)))
    return 1.0 - t_cdf(t, len(losses) - 1)


def fit_power_law(budgets: list[float], losses: list[float]) -> tuple[float, float, float]:
    """(α, B, β) minimising Σ (α D^−B + β − L)²: a search over B, α and β by least squares for each."""
    def solve(B):
        xs = [d**-B for d in budgets]
        mx, my = statistics.fmean(xs), statistics.fmean(losses)
        sxx = sum((x - mx) ** 2 for x in xs)
        alpha = sum((x - mx) * (y - my) for x, y in zip(xs, losses)) / sxx if sxx else 0.0
        beta = my - alpha * mx
        return sum((alpha * x + beta - y) ** 2 for x, y in zip(xs, losses)), alpha, beta

    grid = [10 ** (-3 + 3.5 * i / 400) for i in range(401)]
    best = min(grid, key=lambda B: solve(B)[0])
    low, high = best / 1.05, best * 1.05
    for _ in range(100):  # golden-section refinement
        a, b = high - (high - low) / 1.618, low + (high - low) / 1.618
        low, high = (low, b) if solve(a)[0] < solve(b)[0] else (a, high)
    B = (low + high) / 2
    _, alpha, beta = solve(B)
    return alpha, B, beta


# ---- the table --------------------------------------------------------------------------------

@dataclass
class Arm:
    label: str
    optim: str
    budget: int
    runs: list[Run] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [r.final_loss for r in self.runs]

    @property
    def mean_curve(self) -> list[tuple[int, float]]:
        """The validation curve averaged over seeds, at the evaluations all seeds share."""
        curves = [dict(r.evals) for r in self.runs]
        shared = sorted(set.intersection(*(set(c) for c in curves)))
        return [(t, statistics.fmean(c[t] for c in curves)) for t in shared]


def arms_of(runs: list[Run]) -> list[Arm]:
    lrs = defaultdict(set)
    for run in runs:
        lrs[run.choices.get("optim")].add(run.config["optim"]["lr"])
    arms: dict[tuple, Arm] = {}
    for run in runs:
        optim = run.choices.get("optim", "?")
        lr = run.config["optim"]["lr"]
        label = optim if len(lrs[optim]) == 1 else f"{optim} lr={lr:g}"
        arms.setdefault((label, run.budget), Arm(label, optim, run.budget)).runs.append(run)
    return list(arms.values())


def group_key(run: Run) -> tuple[str, str]:
    """(model, data); per token, also the tokenizer (runs before the tokenizer group used GPT-2's)."""
    data = run.choices.get("data", "?")
    if run.metric != "val_bpb":
        tokenizer = run.choices.get("tokenizer", "gpt2")
        data = data if tokenizer == "gpt2" else f"{data} ({tokenizer})"
    return run.choices.get("model", "?"), data


def analyse(runs: list[Run], baseline: str, target: float | None) -> list[dict]:
    """One row per arm of one (model, data) group."""
    arms = arms_of(runs)
    base_arms = [a for a in arms if a.optim == baseline]
    if not base_arms:
        raise TableError(f"no finished run of the baseline optim={baseline} in this group (optimizers present: "
                         f"{sorted({a.optim for a in arms})}); pick one with --baseline")
    largest = max(a.budget for a in base_arms)  # the baseline arm: its largest budget, its best lr there
    base = min((a for a in base_arms if a.budget == largest), key=lambda a: statistics.fmean(a.losses))
    if target is None:
        target = statistics.fmean(base.losses)
    base_tokens = crossing(base.mean_curve, target)
    base_step = statistics.median(r.step_seconds for r in base.runs)
    fit = None
    if len({a.budget for a in base_arms}) >= 3:
        points = sorted((a.budget, statistics.fmean(a.losses)) for a in base_arms)
        fit = fit_power_law([float(d) for d, _ in points], [l for _, l in points])
    rows = []
    for arm in sorted(arms, key=lambda a: (a.budget, statistics.fmean(a.losses))):
        losses = arm.losses
        seeds = [crossing(r.evals, target) for r in arm.runs]
        row = {
            "optim": arm.label, "budget": arm.budget, "n": len(losses), "final_loss": statistics.fmean(losses),
            "final_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0, "target": target,
            "tokens_to_target": crossing(arm.mean_curve, target),
            "seeds_reached": f"{sum(t is not None for t in seeds)}/{len(seeds)}", "speedup": None, "speedup_low": None,
            "speedup_high": None,
            "p_below_target": p_below_target(losses, target), "d_eff_ratio": None,
            "time_per_step": statistics.median(r.step_seconds for r in arm.runs) / base_step,
            "grad_evals": int(arm.runs[0].rows[-1].get("grad_evals", arm.runs[0].rows[-1]["step"])),
        }
        if base_tokens and row["tokens_to_target"]:
            row["speedup"] = base_tokens / row["tokens_to_target"]
            if len(seeds) > 1 and all(t is not None for t in seeds):
                _, row["speedup_low"], row["speedup_high"] = mean_interval([base_tokens / t for t in seeds])
        if fit:
            alpha, B, beta = fit
            L = row["final_loss"]
            row["d_eff_ratio"] = ((L - beta) / alpha) ** (-1.0 / B) / arm.budget if L > beta else math.inf
        rows.append(row)
    return rows


def fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def markdown(rows: list[dict], model: str, data: str, baseline: str, metric: str = "val_loss") -> str:
    target = rows[0]["target"]
    name = metric.replace("_", " ")
    lines = [f"**{model} on {data}**, target {name} {target:.4f} (baseline {baseline})", "",
             f"| optim | budget | n | final {name} | tokens to target | speedup (95 % CI) | p(final < target) | D_eff/D | time/step | grad evals |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tokens = f"{r['tokens_to_target']:,.0f}" if r["tokens_to_target"] else "not reached"
        if r["speedup"] is None:
            speedup = "-"
        elif r["speedup_low"] is not None:
            speedup = f"{r['speedup']:.2f}x ({r['speedup_low']:.2f}-{r['speedup_high']:.2f})"
        else:
            speedup = f"{r['speedup']:.2f}x" + (f" (seeds reaching: {r['seeds_reached']})" if r["n"] > 1 else "")
        lines.append(
            f"| {r['optim']} | {r['budget']:,} | {r['n']} | {r['final_loss']:.4f} ± {r['final_loss_std']:.4f} | {tokens} | "
            f"{speedup} | {fmt(r['p_below_target'], '.3g')} | {fmt(r['d_eff_ratio'], '.2f')} | {r['time_per_step']:.2f}x | "
            f"{r['grad_evals']} |")
    return "\n".join(lines)


def plot(groups: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms_by_group = [sorted(arms_of(runs), key=lambda a: statistics.fmean(a.losses)) for runs, _ in groups.values()]
    legend_columns = [math.ceil((len(arms) + 1) / 24) for arms in arms_by_group]  # the legend sits right of its plot
    fig, axes = plt.subplots(1, len(groups), figsize=(sum(7 + 2.2 * c for c in legend_columns), 4.5), squeeze=False,
                             width_ratios=[7 + 2.2 * c for c in legend_columns])
    palette = plt.get_cmap("tab20").colors
    for ax, ((model, data), (_, rows)), arms, columns in zip(axes[0], groups.items(), arms_by_group, legend_columns):
        several_budgets = len({a.budget for a in arms}) > 1
        for i, arm in enumerate(arms):  # a colour per arm (tab20), then the colours again dashed, dotted, ...
            color, style = palette[(2 * i) % 20 + (2 * i) // 20 % 2], ("-", "--", ":", "-.")[i // 20 % 4]
            tokens, mean = zip(*arm.mean_curve)
            ax.plot(tokens, mean, color=color, linestyle=style,
                    label=f"{arm.label} ({arm.budget:,})" if several_budgets else arm.label)
            if len(arm.runs) > 1:
                curves = [dict(r.evals) for r in arm.runs]
                ax.fill_between(tokens, [min(c[t] for c in curves) for t in tokens], [max(c[t] for c in curves) for t in tokens],
                                alpha=0.15, color=color)
        ax.axhline(rows[0]["target"], color="black", linestyle="--", linewidth=1, label=f"target {rows[0]['target']:.3f}")
        ax.set(xlabel="tokens", ylabel=arms[0].runs[0].metric.replace("val_", "validation "), title=f"{model} on {data}")
        ax.set_ylim(top=min(ax.get_ylim()[1], rows[0]["target"] + 1.5))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=columns)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", type=Path, nargs="+", help="multirun directories (or any folders of run dirs)")
    parser.add_argument("--baseline", default="muon", help="the optim choice speedups are relative to (default: muon)")
    parser.add_argument("--target", type=float, help="target in --metric (default: the baseline's mean final value)")
    parser.add_argument("--metric", default="val_loss", choices=["val_loss", "val_bpb", "val_ppl"],
                        help="what the curves and the target are in (default: val_loss; val_bpb compares tokenizers)")
    parser.add_argument("--out", type=Path, help="prefix of the .md, .csv and .png outputs (default: <first dir>/speedup_table)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.dirs, args.metric)
        if not runs:
            raise TableError(f"no run dirs (metrics.csv + .hydra/) under {', '.join(map(str, args.dirs))}")
        unfinished = [r for r in runs if not r.finished]
        finished = [r for r in runs if r.finished]
        if not finished:
            raise TableError(f"none of the {len(runs)} run(s) under {', '.join(map(str, args.dirs))} has finished: "
                             + "; ".join(f"{r.path} at step {r.rows[-1]['step'] if r.rows else 0} of {r.total_steps}"
                                         for r in unfinished))
        by_group = defaultdict(list)
        for run in finished:
            by_group[group_key(run)].append(run)
        if args.target is not None and len(by_group) > 1:
            raise TableError(f"--target is one loss, but the runs hold {len(by_group)} model/data groups "
                             f"({', '.join(f'{m} on {d}' for m, d in by_group)}): pass the directories of one group")
        groups = {key: (group_runs, analyse(group_runs, args.baseline, args.target)) for key, group_runs in by_group.items()}
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = "\n\n".join(markdown(rows, model, data, args.baseline, args.metric) for (model, data), (_, rows) in groups.items())
    if unfinished:
        text += "\n\nLeft out (unfinished or failed):\n" + "\n".join(
            f"- {r.path}: step {r.rows[-1]['step'] if r.rows else 0} of {r.total_steps}" for r in unfinished)
    print(text)
    out = args.out or args.dirs[0] / "speedup_table"
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text(text + "\n")
    with atomic_file(out.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        rows = [{"model": m, "data": d, **row} for (m, d), (_, group_rows) in groups.items() for row in group_rows]
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(groups, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.md')}, {out.with_suffix('.csv')}, {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
