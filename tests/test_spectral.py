"""Spectral diagnostics against closed forms on constructed matrices, and the two checks against
theory: the subspace error of EMA momentum falls with the window T, and DA_k rises with k and is
higher on Muon²'s preconditioned input than on raw momentum."""

import math

import pytest
import torch

from optim.orthogonalize import polar_svd, resolve_coefficients
from optim.spectral import (cosine, cross_alignment, directional_alignment, filtering_ratio, principal_angles,
                            signal_alignment, spectral_gap)


def constructed(singular_values, m=12, n=8, seed=0):
    """U diag(s) Vᵀ with random orthonormal U (m×k), V (n×k); returns (X, U, V)."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ V.T, U, V


def test_spectral_gap_and_filtering_ratio():
    X, _, _ = constructed([5.0, 3.0, 1.0, 0.5])
    gap, relative = spectral_gap(X, r=2)
    assert gap == pytest.approx(2.0, abs=1e-12) and relative == pytest.approx(0.4, abs=1e-12)
    M, _, _ = constructed([4.0, 2.0, 0.4, 0.1])
    G, _, _ = constructed([4.0, 2.0, 2.0, 1.0], seed=1)
    assert filtering_ratio(M, G, r=2) == pytest.approx((0.4 / 4) / (2 / 4), abs=1e-12)
    with pytest.raises(ValueError, match=r"rank r=8 must be in \[1, 7\]"):
        spectral_gap(X, r=8)


def test_principal_angles_of_a_rotated_subspace():
    X, U, V = constructed([3.0, 2.0, 1.0])
    theta = 0.3
    rotated = U.clone()  # turn u_2 towards u_3 by theta: the top-2 left subspaces meet at angle theta
    rotated[:, 1] = math.cos(theta) * U[:, 1] + math.sin(theta) * U[:, 2]
    rotated[:, 2] = -math.sin(theta) * U[:, 1] + math.cos(theta) * U[:, 2]
    Y = rotated @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ V.T
    angles = principal_angles(X, Y, r=2)
    assert angles["sin2_left"] == pytest.approx(math.sin(theta), abs=1e-10)
    assert angles["sinF_left"] == pytest.approx(math.sin(theta), abs=1e-10)
    assert angles["sin2_right"] == pytest.approx(0.0, abs=1e-6) and angles["sinF_right"] == pytest.approx(0.0, abs=1e-6)


def test_signal_alignment_of_the_polar_factor_and_of_the_signal():
    S, _, _ = constructed([3.0, 1.0])
    cos, nuclear = signal_alignment(polar_svd(S), S)
    assert nuclear == pytest.approx(1.0, abs=1e-12)  # polar(S) attains ⟨D, S⟩ = ‖S‖_* with ‖D‖_2 = 1
    assert cos == pytest.approx(4.0 / (math.sqrt(2) * math.sqrt(10)), abs=1e-12)  # ‖S‖_* / (sqrt(r) ‖S‖_F)
    cos, nuclear = signal_alignment(S / 3.0, S)  # the signal itself, scaled to ‖D‖_2 = 1
    assert cos == pytest.approx(1.0, abs=1e-12) and nuclear == pytest.approx(10.0 / 3.0 / 4.0, abs=1e-12)


def ns_scalar(sigmas, steps):
    """The closed form of Newton–Schulz on singular values: s ← a s + b s³ + c s⁵ after s/‖X‖_F."""
    s = torch.tensor(sigmas, dtype=torch.float64)
    s = s / s.norm()
    out = []
    for k in range(steps):
        a, b, c = resolve_coefficients("kj")[min(k, len(resolve_coefficients("kj")) - 1)]
        s = a * s + b * s**3 + c * s**5
        out.append((s.sum() / (math.sqrt(len(s)) * s.norm())).item())
    return out


def test_directional_alignment_matches_its_closed_form_and_cross_alignment_reduces_to_it():
    sigmas = [4.0, 1.0, 0.3, 0.05]
    X, _, _ = constructed(sigmas)
    assert directional_alignment(X, steps=5) == pytest.approx(ns_scalar(sigmas, 5), abs=1e-12)
    assert cross_alignment(X, X, steps=3) == pytest.approx(directional_alignment(X, steps=3)[-1], abs=1e-12)
    assert cosine(X, 2 * X) == pytest.approx(1.0, abs=1e-15)


def ema_momentum_error(T: float, trials: int = 8, m: int = 64, n: int = 32, r: int = 2, noise: float = 0.1) -> float:
    """Mean ‖sin Θ‖_2 (left) between the top-r subspaces of an EMA of G_t = S + Ξ_t and of S."""
    beta = 1.0 - 1.0 / T
    errors = []
    for trial in range(trials):
        g = torch.Generator().manual_seed(trial)
        S, _, _ = constructed([1.0, 0.8], m=m, n=n, seed=100 + trial)
        M = torch.zeros(m, n, dtype=torch.float64)
        for _ in range(int(10 * T)):  # long enough that the EMA is stationary (β^{10T} ≈ e^{-10})
            M = beta * M + (1 - beta) * (S + noise * torch.randn(m, n, generator=g, dtype=torch.float64))
        errors.append(principal_angles(M, S, r)["sin2_left"])
    return sum(errors) / trials


def test_subspace_error_falls_with_the_window_faster_than_the_papers_bound():
    windows = [2, 4, 8, 16, 32, 64]
    errors = [ema_momentum_error(T) for T in windows]
    x = torch.tensor([math.log(2 * T - 1) for T in windows], dtype=torch.float64)
    y = torch.tensor([math.log(e) for e in errors], dtype=torch.float64)
    slope = (((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()).item()
    print(f"subspace error vs (2T-1): {dict(zip(windows, [round(e, 4) for e in errors]))}, slope {slope:.3f} (bound: -0.25)")
    assert all(a > b for a, b in zip(errors, errors[1:]))  # falls monotonically with T
    assert slope < -0.25  # at least the paper's (2T-1)^(-1/4) rate
    assert -0.6 < slope < -0.4  # and close to the Wedin/Gaussian rate (2T-1)^(-1/2): ‖E‖ shrinks as sqrt(Σ w²)


def test_alignment_rises_with_steps_and_is_higher_after_muon2_preconditioning():
    """Row and column scales spread over two decades (as in real gradients): raw momentum is
    ill-conditioned, Adam-style normalisation M/sqrt(V) flattens it, so few NS steps get closer."""
    g = torch.Generator().manual_seed(0)
    m, n, beta, beta2 = 64, 32, 0.95, 0.95
    rows = torch.logspace(0, 2, m, dtype=torch.float64).unsqueeze(1)
    cols = torch.logspace(0, -1, n, dtype=torch.float64).unsqueeze(0)
    S, _, _ = constructed([1.0, 0.7, 0.5, 0.3], m=m, n=n)
    M = torch.zeros(m, n, dtype=torch.float64)
    V = torch.zeros(m, n, dtype=torch.float64)
    for _ in range(200):
        G = rows * (S + 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)) * cols
        M = beta * M + (1 - beta) * G
        V = beta2 * V + (1 - beta2) * G**2
    raw = directional_alignment(M, steps=5)
    preconditioned = directional_alignment(M / (V.sqrt() + 1e-12), steps=5)
    print(f"DA_k raw momentum {[round(v, 4) for v in raw]}, Muon² input {[round(v, 4) for v in preconditioned]}")
    assert all(a < b for a, b in zip(raw, raw[1:]))
    # the Keller Jordan quintic does not converge to the polar factor: it maps σ into about [0.7, 1.2],
    # so DA_k rises to a plateau near 0.99 (0.9896, 0.9900, 0.9871 at k = 3, 4, 5 here) and stays there
    assert preconditioned[0] < preconditioned[1] < preconditioned[2] and min(preconditioned[2:]) > 0.98
    assert all(p > r for p, r in zip(preconditioned, raw))


@pytest.mark.parametrize("optim", ["muon", "muon2_f"])
def test_the_diagnostics_callback_writes_finite_columns(make_cfg, tmp_path, optim):
    from trainer.metrics import read_metrics
    from trainer.run import run

    cfg = make_cfg(f"optim={optim}", "callbacks=diagnostics", "callbacks.diagnostics.every_steps=5",
                   "callbacks.diagnostics.rank=2", "~callbacks.progress")
    run(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    measured = [r for r in rows if "diag/cost_s" in r]
    assert [r["step"] for r in measured] == [5, 10, 15, 20]  # every 5 steps
    layers = ["blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.mlp.fc"]  # gpt2_tiny: 2 blocks
    expected = [f"diag/{layer}/{k}" for layer in layers for k in ("da1", "da5", "gap", "rel_gap", "filter")]
    if optim == "muon2_f":
        expected += [f"diag/{layer}/{k}" for layer in layers for k in ("da1_pre", "da3_pre", "cross")]
    for row in measured:
        assert all(math.isfinite(row[c]) for c in expected), row
        assert all(0.0 <= row[f"diag/{layer}/da5"] <= 1.0 + 1e-9 for layer in layers)
    assert all(f"diag/{layer}/sin_left" in r for layer in layers for r in measured[1:])  # from the second measurement on
    assert "diag/blocks.0.attn.qkv/sin_left" not in measured[0]


def test_probe_spectra_writes_the_csvs_and_plots(make_cfg, tmp_path):
    import csv

    from conftest import load_script
    from trainer.run import run

    run(make_cfg())
    probe = load_script("probe_spectra")
    out = tmp_path / "probe"
    assert probe.main([str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--grads", "4", "--steps", "3",
                       "--window", "2", "--rank", "2", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"stationary.csv", "ns_alignment.csv", "trajectory.csv", "spectra.png",
                                              "subspace_error.png", "pipeline_alignment.png", "ns_alignment.png",
                                              "trajectory.png"}
    stationary = list(csv.DictReader(open(out / "stationary.csv")))
    assert len(stationary) == 4 * len(probe.BETAS)  # 4 monitored matrices of gpt2_tiny
    assert all(0 <= float(r["sin2_left"]) <= 1 and abs(float(r["pre_polar_cos"])) <= 1 for r in stationary)
    ns = list(csv.DictReader(open(out / "ns_alignment.csv")))
    assert [int(r["k"]) for r in ns[:5]] == [1, 2, 3, 4, 5] and all(0 < float(r["muon2_input"]) <= 1 for r in ns)
    trajectory = list(csv.DictReader(open(out / "trajectory.csv")))
    assert [int(r["step"]) for r in trajectory[::4]] == [21, 22, 23]  # past the run's 20 steps


def test_probe_spectra_without_a_checkpoint(tmp_path, capsys):
    from conftest import load_script

    assert load_script("probe_spectra").main([str(tmp_path / "nothing.ckpt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
