"""Orthogonalizers: maps X = U Σ Vᵀ to (an approximation of) its polar factor polar(X) = U Vᵀ.

Newton–Schulz (Muon's default). For k = 1..K with per-step coefficients (a_k, b_k, c_k):

    X_0 = X / max(‖X‖_F, ε)                (or X / (‖X‖_F + ε): norm="add", Keller Jordan's form)
    A   = X_k Xₖᵀ,   X_{k+1} = a_k X_k + (b_k A + c_k A²) X_k

i.e. the odd quintic p_k(σ) = a_k σ + b_k σ³ + c_k σ⁵ is applied to every singular value while the
singular vectors stay. Tall inputs are transposed so that A is min(m, n)². Leading dimensions are a
batch: a stack of same-shaped matrices is orthogonalized in one call, each with its own norm.

Coefficient sets (a list shorter than K repeats its last entry):
    "kj"             (3.4445, −4.7750, 2.0315)  Keller Jordan's quintic: steepest at 0, σ → ~[0.7, 1.2]
    "convergent"     (2, −1.5, 0.5)             p(1) = 1, p'(1) = 0: converges to polar(X) (12 steps)
    "polar_express"  5 tuples                   Amsel et al. 2025, as used by modded-nanogpt / Dion

The exact polar factor comes from a float64 SVD (`polar_svd`); it is the reference every
Newton–Schulz variant and every optimizer is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "kj": ((3.4445, -4.7750, 2.0315),),
    "convergent": ((2.0, -1.5, 0.5),),
    # computed for num_iters=5, safety_factor=2e-2, cushion=2 (modded-nanogpt train_gpt.py, dion/polar_express.py)
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64, "float16": torch.float16}
METHODS = ("newton_schulz", "svd")


def resolve_coefficients(coefficients: str | Sequence) -> tuple[tuple[float, float, float], ...]:
    """A named set, one (a, b, c) triple, or a sequence of triples -> tuple of triples."""
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENTS:
            raise ValueError(f"unknown Newton–Schulz coefficient set {coefficients!r}; valid: {sorted(COEFFICIENTS)}")
        return COEFFICIENTS[coefficients]
    coefficients = tuple(coefficients)
    if len(coefficients) == 3 and all(isinstance(c, (int, float)) for c in coefficients):
        coefficients = (coefficients,)
    triples = tuple(tuple(float(c) for c in triple) for triple in coefficients)
    if not triples or any(len(t) != 3 for t in triples):
        raise ValueError(f"Newton–Schulz coefficients must be (a, b, c) triples, got {coefficients!r}")
    return triples


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA and float32 elsewhere (bf16 matmuls are ~400x slower on CPUs
    without AVX-512 BF16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown compute dtype {dtype!r}; valid: ['auto', {', '.join(map(repr, DTYPES))}]")
    return DTYPES[dtype]


def newton_schulz_iterates(
    X: torch.Tensor,
    steps: int = 5,
    coefficients: str | Sequence = "kj",
    dtype: str | torch.dtype = "auto",
    eps: float = 1e-7,
    norm: str = "clamp",
):
    """Yield X_1, ..., X_steps (in `dtype`, in X's orientation), the iterates of Newton–Schulz on X."""
    if X.ndim < 2:
        raise ValueError(f"newton_schulz needs (..., m, n) input, got shape {tuple(X.shape)}")
    triples = resolve_coefficients(coefficients)
    Y = X.to(resolve_dtype(dtype, X.device))
    tall = Y.shape[-2] > Y.shape[-1]
    if tall:
        Y = Y.mT
    fro = Y.norm(dim=(-2, -1), keepdim=True)
    if norm == "clamp":
        Y = Y / fro.clamp(min=eps)
    elif norm == "add":
        Y = Y / (fro + eps)
    else:
        raise ValueError(f"unknown normalisation {norm!r}; valid: 'clamp' (torch.optim.Muon), 'add' (Keller Jordan)")
    for k in range(steps):
        a, b, c = triples[min(k, len(triples) - 1)]
        A = Y @ Y.mT
        B = b * A + c * (A @ A)
        Y = a * Y + B @ Y
        yield Y.mT if tall else Y


def newton_schulz(
    X: torch.Tensor,
    steps: int = 5,
    coefficients: str | Sequence = "kj",
    dtype: str | torch.dtype = "auto",
    eps: float = 1e-7,
    norm: str = "clamp",
) -> torch.Tensor:
    """Approximate polar factor of X (..., m, n), computed in `dtype`, returned in `dtype`."""
    if steps < 1:
        raise ValueError(f"ns_steps must be >= 1, got {steps}")
    for Y in newton_schulz_iterates(X, steps, coefficients, dtype, eps, norm):
        pass
    return Y


def polar_svd(X: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """Exact polar factor U Vᵀ in float64 (batched). Singular values below rtol·σ_max are dropped,
    as Newton–Schulz maps σ = 0 to 0."""
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    keep = (S > rtol * S.amax(dim=-1, keepdim=True)).double()
    return (U * keep.unsqueeze(-2)) @ Vh


def directional_alignment(X: torch.Tensor, steps: int = 5, coefficients: str | Sequence = "kj",
                          dtype: str | torch.dtype = torch.float64) -> list[float]:
    """DA_k(X) = ⟨NS_k(X), polar(X)⟩_F / (‖NS_k(X)‖_F ‖polar(X)‖_F) for k = 1..steps (Muon², §3.3):
    the cosine between k Newton–Schulz steps and the exact polar factor, blind to the overall scale."""
    P = polar_svd(X)
    return [((Y.double() * P).sum() / (Y.double().norm() * P.norm())).item()
            for Y in newton_schulz_iterates(X, steps, coefficients, dtype)]


@dataclass(frozen=True)
class Orthogonalizer:
    """One configured orthogonalizer, applied to a list of matrices with one batched call per shape."""

    method: str = "newton_schulz"  # or "svd" (exact polar factor, float64)
    steps: int = 5
    coefficients: str | Sequence = "kj"  # stored resolved, as a tuple of (a, b, c)
    dtype: str = "auto"
    eps: float = 1e-7
    norm: str = "clamp"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown orthogonalizer {self.method!r}; valid: {list(METHODS)}")
        object.__setattr__(self, "coefficients", resolve_coefficients(self.coefficients))
        resolve_dtype(self.dtype, torch.device("cpu"))
        if self.steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {self.steps}")

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        if self.method == "svd":
            return polar_svd(X)
        return newton_schulz(X, self.steps, self.coefficients, self.dtype, self.eps, self.norm)

    def apply_all(self, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Orthogonalize each matrix; same-shaped ones go through as one stacked batch."""
        out: list[torch.Tensor | None] = [None] * len(matrices)
        by_shape: dict[tuple, list[int]] = {}
        for i, M in enumerate(matrices):
            by_shape.setdefault((tuple(M.shape), M.device, M.dtype), []).append(i)
        for indices in by_shape.values():
            if len(indices) == 1:
                out[indices[0]] = self(matrices[indices[0]])
                continue
            for i, O in zip(indices, self(torch.stack([matrices[i] for i in indices])).unbind(0)):
                out[i] = O
        return out
