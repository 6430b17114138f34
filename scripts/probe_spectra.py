"""Spectral probes of a checkpoint ("Denoise first, orthogonalise later" §5; Muon² §3.3).

    python scripts/probe_spectra.py runs/my_run/checkpoints/last.ckpt [--grads 32] [--steps 32] [--out DIR]

Stationary probe: the weights frozen at the checkpoint, 2K mini-batch gradients of the monitored
matrices (optim/spectral.py defines every quantity). The mean of the first K is the signal proxy S;
the other K feed EMA buffers M for a sweep of β, window T = 1/(1−β). For each T: σ(M) (Figure 2),
‖sin Θ‖_2 between the top-r subspaces of M and S against the paper's (2T−1)^(−1/4) rate (Figure 3),
and the signal alignment of the pre-polar polar(M), post-polar EMA of polar(G) and polar-only
polar(G) directions (Figure 4); and DA_k per Newton–Schulz step of raw momentum and of Muon²'s
M/(sqrt(V)+ε) (Muon²'s alignment curve).

Trajectory probe: training continues from the checkpoint with the run's own optimizer for --steps
steps (no clipping); a sliding window of the last --window gradients gives the signal proxy, against
which the optimizer's actual momentum buffer and the three pipelines' directions are measured at
every step (Figures 5–6).

Writes stationary.csv, ns_alignment.csv, trajectory.csv and a PNG per figure into --out (default:
<run dir>/probe_spectra/).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import deque
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data import TrainBatches, open_dataset
from models import build_model
from models.loss import IGNORE, without_pads
from optim.orthogonalize import polar_svd
from optim.spectral import directional_alignment, principal_angles, signal_alignment
from optim.stages import second_moment_preconditioned
from trainer.checkpoint import read_checkpoint_meta
from trainer.diagnostics import default_layers
from trainer.errors import CheckpointError
from trainer.optimizers import build_optimizer
from trainer.plan import make_plan

BETAS = (0.0, 0.5, 0.75, 0.875, 0.9375, 0.96875)  # T = 1, 2, 4, 8, 16, 32


class Probe:
    """The checkpoint's model, optimizer and data, and gradients of the monitored matrices."""

    def __init__(self, path: Path):
        meta = read_checkpoint_meta(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        self.cfg = OmegaConf.create(meta["config"])
        self.step = meta["step"]
        self.model = build_model(OmegaConf.to_container(self.cfg.model, resolve=True))
        self.model.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()})
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.optimizer.load_state_dict(checkpoint["optimizer_states"][0])
        tokens = open_dataset(self.cfg.data)
        self.plan = make_plan(self.cfg, world_size=1).on_data(tokens.splits["train"])
        self.batches = TrainBatches(tokens.splits["train"], self.plan.seq_len, self.plan.seqs_per_step,
                                    self.plan.micro_batch, seed=self.plan.data_seed, packed=self.plan.packed)
        self.layers = default_layers(self.model)
        self.params = dict(self.model.named_parameters())

    def gradients(self, step: int) -> dict[str, torch.Tensor]:
        """Backpropagate the batch of optimizer step `step`; the monitored matrices' gradients."""
        self.model.zero_grad(set_to_none=True)
        parts = self.batches.step_batches(step)
        for inputs, targets in parts:
            logits = self.model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), without_pads(targets, self.plan.pad_id).flatten(),
                                                     ignore_index=IGNORE) / len(parts)
            loss.backward()
        return {name: self.params[name].grad.double().clone() for name in self.layers}


def stationary(probe: Probe, grads: int, rank: int, ns_steps: int) -> tuple[list[dict], list[dict], dict]:
    draws = [probe.gradients(probe.step + 1 + i) for i in range(2 * grads)]
    rows, ns_rows, spectra = [], [], {}
    for name in probe.layers:
        signal = torch.stack([d[name] for d in draws[:grads]]).mean(0)
        stream = [d[name] for d in draws[grads:]]
        polars = [polar_svd(G) for G in stream]  # shared by every β
        spectra[name] = {"gradient": torch.linalg.svdvals(stream[-1]).tolist()}
        for beta in BETAS:
            M = torch.zeros_like(signal)
            post = torch.zeros_like(signal)
            for G, P in zip(stream, polars):
                M = beta * M + (1 - beta) * G
                post = beta * post + (1 - beta) * P
            T = 1.0 / (1.0 - beta)
            spectra[name][f"momentum T={T:g}"] = torch.linalg.svdvals(M).tolist()
            row = {"layer": name, "beta": beta, "T": T, **principal_angles(M, signal, rank)}
            for pipeline, D in (("pre_polar", polar_svd(M)), ("post_polar", post), ("polar_only", polars[-1])):
                row[f"{pipeline}_cos"], row[f"{pipeline}_nuclear"] = signal_alignment(D, signal)
            rows.append(row)
        M = torch.zeros_like(signal)
        V = torch.zeros_like(signal)
        for G in stream:
            M, V = 0.95 * M + 0.05 * G, 0.95 * V + 0.05 * G**2
        muon2_input = second_moment_preconditioned(M, {"second_moment/v": V}, eps=1e-10)  # Muon²'s default ε
        for k, (raw, pre) in enumerate(zip(directional_alignment(M, ns_steps),
                                           directional_alignment(muon2_input, ns_steps)), start=1):
            ns_rows.append({"layer": name, "k": k, "raw_momentum": raw, "muon2_input": pre})
    return rows, ns_rows, spectra


def trajectory(probe: Probe, steps: int, window: int, rank: int) -> list[dict]:
    recent = {name: deque(maxlen=window) for name in probe.layers}
    post = {name: None for name in probe.layers}
    matrix_beta = float(OmegaConf.select(probe.cfg, "optim.matrix.momentum", default=0.95))
    rows = []
    for t in range(probe.step + 1, probe.step + steps + 1):  # past the budget: at its final lr
        grads = probe.gradients(t)
        factor = probe.plan.lr_factor(t - 1)  # past the budget: its last step's
        for group in probe.optimizer.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"]) * factor
        probe.optimizer.step()
        for name, G in grads.items():
            recent[name].append(G)
            P = polar_svd(G)
            post[name] = P if post[name] is None else matrix_beta * post[name] + (1 - matrix_beta) * P
            signal = torch.stack(list(recent[name])).mean(0)
            M = probe.optimizer.state[probe.params[name]].get("momentum/buffer")
            row = {"layer": name, "step": t}
            if M is not None:
                row["momentum_sin2_left"] = principal_angles(M.double(), signal, rank)["sin2_left"]
                row["pre_polar_nuclear"] = signal_alignment(polar_svd(M), signal)[1]
            row["post_polar_nuclear"] = signal_alignment(post[name], signal)[1]
            row["polar_only_nuclear"] = signal_alignment(P, signal)[1]
            rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(out: Path, rows, ns_rows, spectra, trajectory_rows, layers) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = layers[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in spectra[layer].items():
        ax.semilogy(values, label=label, lw=2 if label == "gradient" else 1)
    ax.set(title=f"singular values, {layer}", xlabel="index i", ylabel="σ_i")
    ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(out / "spectra.png", dpi=120); plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in layers:
        sel = [r for r in rows if r["layer"] == name]
        ax.loglog([2 * r["T"] - 1 for r in sel], [r["sin2_left"] for r in sel], "o-", label=name, ms=3)
    first = [r for r in rows if r["layer"] == layers[0]]
    ax.loglog([2 * r["T"] - 1 for r in first], [first[0]["sin2_left"] * (2 * r["T"] - 1) ** -0.25 for r in first], "k--",
              label="(2T−1)^(−1/4)")
    ax.set(title="top-r subspace error of EMA momentum vs the signal", xlabel="2T − 1", ylabel="‖sin Θ‖₂ (left)")
    ax.legend(fontsize=6)
    fig.tight_layout(); fig.savefig(out / "subspace_error.png", dpi=120); plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for pipeline, style in (("pre_polar", "o-"), ("post_polar", "s-"), ("polar_only", "^-")):
        mean = [sum(r[f"{pipeline}_nuclear"] for r in rows if r["T"] == T) / len(layers) for T in sorted({r["T"] for r in rows})]
        ax.semilogx(sorted({r["T"] for r in rows}), mean, style, label=pipeline)
    ax.set(title="signal alignment ⟨D, S⟩/‖S‖_* (mean over layers)", xlabel="T = 1/(1−β)", ylabel="alignment")
    ax.legend()
    fig.tight_layout(); fig.savefig(out / "pipeline_alignment.png", dpi=120); plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for column, style in (("raw_momentum", "o-"), ("muon2_input", "s-")):
        ks = sorted({r["k"] for r in ns_rows})
        ax.plot(ks, [sum(r[column] for r in ns_rows if r["k"] == k) / len(layers) for k in ks], style, label=column)
    ax.set(title="directional alignment DA_k with polar (mean over layers)", xlabel="Newton–Schulz step k", ylabel="DA_k")
    ax.legend()
    fig.tight_layout(); fig.savefig(out / "ns_alignment.png", dpi=120); plt.close(fig)

    if trajectory_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        sel = [r for r in trajectory_rows if r["layer"] == layer]
        for column in ("pre_polar_nuclear", "post_polar_nuclear", "polar_only_nuclear", "momentum_sin2_left"):
            if column in sel[0]:
                ax.plot([r["step"] for r in sel], [r[column] for r in sel], label=column)
        ax.set(title=f"trajectory probe, {layer}", xlabel="step", ylabel="vs window-mean signal")
        ax.legend(fontsize=7)
        fig.tight_layout(); fig.savefig(out / "trajectory.png", dpi=120); plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--grads", type=int, default=32, help="K: gradients for the signal proxy, and as many for the buffers")
    parser.add_argument("--rank", type=int, default=4, help="r for subspaces")
    parser.add_argument("--ns-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32, help="trajectory probe steps (0: skip)")
    parser.add_argument("--window", type=int, default=8, help="trajectory probe gradient window")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"error: no checkpoint at {args.checkpoint} (a run dir's checkpoints/last.ckpt)", file=sys.stderr)
        return 2
    try:
        probe = Probe(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.checkpoint.parent.parent / "probe_spectra"
    out.mkdir(parents=True, exist_ok=True)
    print(f"stationary probe: {2 * args.grads} gradients at step {probe.step}, layers {probe.layers}", flush=True)
    rows, ns_rows, spectra = stationary(probe, args.grads, args.rank, args.ns_steps)
    print(f"trajectory probe: {args.steps} steps, window {args.window}", flush=True)
    trajectory_rows = trajectory(probe, args.steps, args.window, args.rank) if args.steps else []
    write_csv(rows, out / "stationary.csv")
    write_csv(ns_rows, out / "ns_alignment.csv")
    if trajectory_rows:
        write_csv(trajectory_rows, out / "trajectory.csv")
    plot(out, rows, ns_rows, spectra, trajectory_rows, probe.layers)
    print(f"wrote {out}/: stationary.csv ns_alignment.csv{' trajectory.csv' if trajectory_rows else ''} and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
