"""Spectral diagnostics of matrix updates (float64 SVDs; off the hot path).

The quantities two of the papers argue with (reference/optimizers.md §7.3, §8.2–8.3), for matrices
of shape (m, n) with singular values σ_1 ≥ σ_2 ≥ … and a chosen rank r:

    directional alignment   DA_k(X) = ⟨NS_k(X), polar(X)⟩ / (‖NS_k(X)‖_F ‖polar(X)‖_F), k = 1…K
                            (orthogonalize.directional_alignment; Muon² §3.3)
    cross alignment         ⟨NS_K(A), polar(B)⟩ / (‖NS_K(A)‖_F ‖polar(B)‖_F): Muon²'s preconditioned
                            input A against raw momentum B's polar factor ("different target")
    spectral gap            σ_r − σ_{r+1}, and relative to σ_1
    filtering ratio         (σ_{r+1}(M)/σ_1(M)) / (σ_{r+1}(G)/σ_1(G)): < 1 when momentum M suppressed
                            the tail of the raw gradient G
    principal angles        cos θ_i = σ_i(U_Aᵀ U_B) for the top-r singular vectors of A and B:
                            ‖sin Θ‖_2 = sqrt(1 − σ_min²), ‖sin Θ‖_F = sqrt(r − ‖U_Aᵀ U_B‖_F²), left and right
    signal alignment        cosine ⟨D, S⟩/(‖D‖_F ‖S‖_F) and the nuclear-normalised ⟨D, S⟩/‖S‖_* (1 iff
                            D = polar(S) among ‖D‖_2 ≤ 1) of an update direction D with a signal S
"""

from __future__ import annotations

import math

import torch

from optim.orthogonalize import directional_alignment, newton_schulz, polar_svd

__all__ = ["directional_alignment", "cross_alignment", "spectral_gap", "filtering_ratio", "principal_angles",
           "signal_alignment", "cosine"]


def cosine(A: torch.Tensor, B: torch.Tensor) -> float:
    A, B = A.double(), B.double()
    return ((A * B).sum() / (A.norm() * B.norm())).item()


def cross_alignment(A: torch.Tensor, B: torch.Tensor, steps: int = 5, coefficients="kj") -> float:
    return cosine(newton_schulz(A.double(), steps, coefficients, dtype=torch.float64), polar_svd(B))


def singular_values(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(X.double())


def _check_rank(X: torch.Tensor, r: int) -> None:
    if not 1 <= r < min(X.shape[-2:]):
        raise ValueError(f"rank r={r} must be in [1, {min(X.shape[-2:]) - 1}] for a {tuple(X.shape)} matrix")


def spectral_gap(X: torch.Tensor, r: int) -> tuple[float, float]:
    """(σ_r − σ_{r+1}, (σ_r − σ_{r+1}) / σ_1)."""
    _check_rank(X, r)
    s = singular_values(X)
    gap = (s[r - 1] - s[r]).item()
    return gap, gap / s[0].item()


def filtering_ratio(M: torch.Tensor, G: torch.Tensor, r: int) -> float:
    _check_rank(M, r)
    sm, sg = singular_values(M), singular_values(G)
    return ((sm[r] / sm[0]) / (sg[r] / sg[0])).item()


def principal_angles(A: torch.Tensor, B: torch.Tensor, r: int) -> dict[str, float]:
    """‖sin Θ‖_2 and ‖sin Θ‖_F between the top-r left (and right) singular subspaces of A and B."""
    _check_rank(A, r)
    Ua, _, Vha = torch.linalg.svd(A.double(), full_matrices=False)
    Ub, _, Vhb = torch.linalg.svd(B.double(), full_matrices=False)
    out = {}
    for side, X, Y in (("left", Ua[:, :r], Ub[:, :r]), ("right", Vha[:r].T, Vhb[:r].T)):
        cosines = torch.linalg.svdvals(X.T @ Y).clamp(max=1.0)
        out[f"sin2_{side}"] = math.sqrt(max(0.0, 1.0 - cosines.min().item() ** 2))
        out[f"sinF_{side}"] = math.sqrt(max(0.0, r - (cosines**2).sum().item()))
    return out


def signal_alignment(D: torch.Tensor, S: torch.Tensor) -> tuple[float, float]:
    """(cosine, ⟨D, S⟩ / ‖S‖_*)."""
    D, S = D.double(), S.double()
    return cosine(D, S), ((D * S).sum() / singular_values(S).sum()).item()
