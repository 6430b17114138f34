"""Orthogonalizers: maps X = U Σ Vᵀ to (an approximation of) its polar factor polar(X) = U Vᵀ.

Newton–Schulz (Muon's default). For k = 1..K with per-step coefficients (a_k, b_k, c_k):

    X_0 = X / max(‖X‖_F, ε)                (or X / (‖X‖_F + ε): norm="add", Keller Jordan's form)
    A   = X_k Xₖᵀ,   X_{k+1} = a_k X_k + (b_k A + c_k A²) X_k

i.e. the odd quintic p_k(σ) = a_k σ + b_k σ³ + c_k σ⁵ is applied to every singular value while the
singular vectors stay. Tall inputs are transposed so that A is min(m, n)². Leading dimensions are a
batch: a stack of same-shaped matrices is orthogonalized in one call, each with its own norm.
Rectangular matrices (l ≥ 2s) in float32/float64 run the same iteration in the s × s Gram space
(`gram_newton_schulz`), a quarter to a third fewer FLOPs. On a CPU the products known to be symmetric
(A, A², and in the Gram space P A P) skip the blocks they mirror in float32/float64 (`symmetric_product`).

Coefficient sets (a list shorter than K repeats its last entry):
    "kj"             (3.4445, −4.7750, 2.0315)  Keller Jordan's quintic: steepest at 0, σ → ~[0.7, 1.2]
    "convergent"     (2, −1.5, 0.5)             p(1) = 1, p'(1) = 0: converges to polar(X) (12 steps)
    "polar_express"  5 tuples                   Amsel et al. 2025, as used by modded-nanogpt / Dion

The exact polar factor comes from a float64 SVD (`polar_svd`); it is the reference every
Newton–Schulz variant and every optimizer is checked against.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

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
CPU_STACK_ELEMENTS = 2**21  # 8 MB of fp32 per stacked Newton–Schulz call on a CPU (see Orthogonalizer.apply_all)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64, "float16": torch.float16}
METHODS = ("newton_schulz", "svd")
NORMS = ("clamp", "add")


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


BF16_MARGIN = 1.5  # a CPU gets bf16 only if its bf16 matmul is at least this much faster than fp32


def matmul_seconds(dtype: torch.dtype, size: int) -> float:
    """The best of 3 (size x size) @ (size x size) CPU matmuls in `dtype`, after a warm-up."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_prefers_bfloat16(size: int = 512) -> bool:
    """Whether this CPU's bf16 matmul beats fp32 by BF16_MARGIN (AMX or AVX-512 BF16: ~2x faster;
    without them ~400x slower, so the margin leaves noise no say). Measured once per process, and
    said once (by rank 0)."""
    speedup = matmul_seconds(torch.float32, size) / matmul_seconds(torch.bfloat16, size)
    choice = speedup >= BF16_MARGIN
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0:
        print(f"orthogonalizer dtype=auto: Newton–Schulz in {'bfloat16' if choice else 'float32'} on this CPU (a {size}x{size} bf16 "
              f"matmul takes {1 / speedup:.2f}x the fp32 time)", flush=True)
    return choice


@functools.cache
def cuda_computes_bfloat16() -> bool:
    """Whether this process's CUDA GPU has bfloat16 tensor cores (asked once; pre-Ampere GPUs emulate it slowly)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a CUDA GPU that computes in it (Ampere and newer; float32 on older
    ones); on a CPU bfloat16 where its bf16 matmul is clearly faster than fp32 (cpu_prefers_bfloat16),
    else float32 (bf16 matmuls are ~400x slower on CPUs without AVX-512 BF16 or AMX)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    check_dtype(dtype)
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_computes_bfloat16() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_prefers_bfloat16() else torch.float32
    return DTYPES[dtype]


def check_dtype(dtype: str | torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) and dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown compute dtype {dtype!r}; valid: ['auto', {', '.join(map(repr, DTYPES))}]")


def _normalised_wide(X: torch.Tensor, dtype, eps: float, norm: str) -> tuple[torch.Tensor, bool, torch.Size]:
    """X in the compute dtype as a (batch, s, l) stack with s <= l, scaled to unit Frobenius norm; and
    whether it was transposed, and its batch shape."""
    if X.ndim < 2:
        raise ValueError(f"newton_schulz needs (..., m, n) input, got shape {tuple(X.shape)}")
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
    return Y.reshape(-1, *Y.shape[-2:]), tall, X.shape[:-2]  # 3-D: the fused baddbmm below needs it


def _restored(Y: torch.Tensor, tall: bool, batch_shape: torch.Size) -> torch.Tensor:
    Y = Y.reshape(*batch_shape, *Y.shape[-2:])
    return Y.mT if tall else Y


def newton_schulz_iterates(
    X: torch.Tensor,
    steps: int = 5,
    coefficients: str | Sequence = "kj",
    dtype: str | torch.dtype = "auto",
    eps: float = 1e-7,
    norm: str = "clamp",
):
    """Yield X_1, ..., X_steps (in `dtype`, in X's orientation), the iterates of Newton–Schulz on X."""
    triples = resolve_coefficients(coefficients)
    Y, tall, batch_shape = _normalised_wide(X, dtype, eps, norm)
    for k in range(steps):
        a, b, c = triples[min(k, len(triples) - 1)]
        A = symmetric_product(Y, Y.mT)
        B = symmetric_quadratic(A, b, c)  # b A + c A²
        Y = torch.baddbmm(Y, B, Y, beta=a)  # a Y + B Y
        yield _restored(Y, tall, batch_shape)


GRAM_MIN_ASPECT = 2  # l/s from which the Gram form costs less (crossover ≈ 1.9 at 5 steps)
SYMMETRIC_MIN_CPU = 256  # a symmetric product of this size or more, on a CPU, is computed in blocks


def symmetric_product(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A @ B, (batch, n, k) @ (batch, k, n), for a product known to be symmetric (Y Yᵀ; two polynomials in
    one symmetric matrix, which commute). On a CPU from n = SYMMETRIC_MIN_CPU: the upper-right block is
    multiplied, the lower-left is its transpose, and the two diagonal blocks, symmetric themselves, are
    products of the same kind; 768: two levels, 5/8 of the multiply-adds (measured, 2 threads: 0.65x
    the time of a Gram matrix Y Yᵀ, 0.79x of A²; more levels' smaller matmuls lose). Only in float32/
    float64: a CPU's bf16 matmuls lose more to the smaller blocks than the blocks save (AVX-512 BF16,
    768 x 3072: 1.5x the time of one bmm). On a GPU, A @ B (its two smaller matmuls are not measured
    yet). Stacks go through torch.bmm: torch.matmul of a one-matrix bf16 stack against a transposed one
    took 1.4x as long on a CPU."""
    if not _in_blocks(A):
        return torch.bmm(A, B)
    h = A.shape[-2] // 2
    C = torch.empty(*A.shape[:-1], A.shape[-2], dtype=A.dtype, device=A.device)
    C[..., :h, :h] = symmetric_product(A[..., :h, :], B[..., :h])
    torch.matmul(A[..., :h, :], B[..., h:], out=C[..., :h, h:])
    C[..., h:, h:] = symmetric_product(A[..., h:, :], B[..., h:])
    C[..., h:, :h] = C[..., :h, h:].mT
    return C


def _in_blocks(A: torch.Tensor) -> bool:
    return A.device.type == "cpu" and A.dtype in (torch.float32, torch.float64) and A.shape[-2] >= SYMMETRIC_MIN_CPU


def symmetric_quadratic(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """b A + c A² of a symmetric A: A² in symmetric blocks where they apply, else one fused baddbmm."""
    if not _in_blocks(A):
        return torch.baddbmm(A, A, A, beta=b, alpha=c)
    return symmetric_product(A, A).mul_(c).add_(A, alpha=b)


GRAM_MAX_GAIN = 50.0  # restart the Gram form before ∏ a_k (the bound on ‖Q‖) would pass this


def gram_newton_schulz(Y: torch.Tensor, triples, steps: int, max_gain: float = GRAM_MAX_GAIN) -> torch.Tensor:
    r"""Newton–Schulz of a normalised (batch, s, l) stack, s ≤ l, in the s × s Gram space. Every
    iterate is X_k = Q_k X_0 with Q_k a polynomial in A_0 = X_0 X_0ᵀ, so with P_k = a_k I + b_k A_k +
    c_k A_k² (commuting with A_k):

        Q_1 = P_0,   Q_{k+1} = P_k Q_k,   A_{k+1} = X_{k+1} X_{k+1}ᵀ = P_k A_k P_k,   X_K = Q_K X_0

    ‖Q‖ can reach ∏ a_k, which multiplies the rounding error, so the iteration restarts from
    X = Q X_0 whenever that product would pass `max_gain` (Keller Jordan's coefficients: steps
    3 + 2, gains ≤ 41). A segment of k steps costs 2 l s² + (4k − 3) s³; at 5 steps that is
    4 l s² + 14 s³ against 5 (2 l s² + s³): 0.74x for qkv (l = 3s), 0.67x for the MLP matrices
    (l = 4s). On a CPU the Gram matrices, A² and P A P are computed in symmetric blocks
    (`symmetric_product`: 5/8 of their multiply-adds at s = 768). P Q is symmetric too, but mirroring
    it mixes in Q P, which differs by rounding amplified by ‖Q‖: 10x the error. Float32 rounding stays
    ~1e-6 relative; bfloat16's would not, so only float32/float64 take this path."""
    coefficients = lambda k: triples[min(k, len(triples) - 1)]  # noqa: E731
    k = 0
    while k < steps:
        A, Q, gain = symmetric_product(Y, Y.mT), None, 1.0
        while True:
            a, b, c = coefficients(k)
            P = symmetric_quadratic(A, b, c)
            P.diagonal(dim1=-2, dim2=-1).add_(a)
            Q = P if Q is None else P @ Q  # symmetric too, but its mirror mixes in Q P: 10x the error
            gain, k = gain * abs(a), k + 1
            if k == steps or gain * abs(coefficients(k)[0]) > max_gain:
                break
            A = symmetric_product(symmetric_product(P, A), P)
        Y = Q @ Y
    return Y


def newton_schulz(
    X: torch.Tensor,
    steps: int = 5,
    coefficients: str | Sequence = "kj",
    dtype: str | torch.dtype = "auto",
    eps: float = 1e-7,
    norm: str = "clamp",
) -> torch.Tensor:
    """Approximate polar factor of X (..., m, n), computed in `dtype`, returned in `dtype`. Matrices
    at least GRAM_MIN_ASPECT times as long as wide, in float32 or float64, go through the cheaper Gram
    form (the same iterates up to rounding); the others through the iterates themselves."""
    if steps < 1:
        raise ValueError(f"Newton–Schulz steps must be >= 1, got {steps}")
    s, l = sorted(X.shape[-2:]) if X.ndim >= 2 else (0, 0)
    if s and l >= GRAM_MIN_ASPECT * s and resolve_dtype(dtype, X.device) in (torch.float32, torch.float64):
        Y, tall, batch_shape = _normalised_wide(X, dtype, eps, norm)
        return _restored(gram_newton_schulz(Y, resolve_coefficients(coefficients), steps), tall, batch_shape)
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
    """One configured orthogonalizer, applied to a list of matrices with one batched call per shape.
    Its fields are the settings every matrix optimizer takes as one ``orthogonalizer`` argument (an
    Orthogonalizer, or a mapping of some of its fields: ``Muon(params, orthogonalizer={"steps": 3})``;
    in a config, the ``optim.matrix.orthogonalizer`` node)."""

    method: str = "newton_schulz"  # or "svd" (exact polar factor, float64)
    steps: int = 5
    coefficients: str | Sequence = "kj"  # a named set (COEFFICIENTS) or (a, b, c) triples
    dtype: str = "auto"  # the Newton–Schulz dtype: "auto", "float32", "bfloat16", "float64"
    eps: float = 1e-7  # the normalisation's ε
    norm: str = "clamp"  # X / max(‖X‖_F, ε); "add": X / (‖X‖_F + ε)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown orthogonalizer method {self.method!r}; valid: {list(METHODS)}")
        resolve_coefficients(self.coefficients)
        check_dtype(self.dtype)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"orthogonalizer steps={self.steps!r} must be an integer >= 1")
        if not self.eps > 0:
            raise ValueError(f"orthogonalizer eps={self.eps} must be > 0")
        if self.norm not in NORMS:
            raise ValueError(f"unknown orthogonalizer norm {self.norm!r}; valid: {list(NORMS)}")

    @classmethod
    def of(cls, settings: Orthogonalizer | Mapping, base: Orthogonalizer | None = None) -> Orthogonalizer:
        """`settings` as an Orthogonalizer; a mapping names some of the fields, the rest are `base`'s."""
        if isinstance(settings, Orthogonalizer):
            return settings
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise ValueError(f"unknown orthogonalizer setting(s) {unknown}; valid: {valid}")
        return cls(**{**asdict(base or cls()), **settings})

    def settings(self) -> dict:
        """The fields as a plain dict (what a param group and its checkpoint hold)."""
        return asdict(self)

    def compute_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype Newton–Schulz computes in on `device` (None for the SVD, which takes its input as it is)."""
        return resolve_dtype(self.dtype, device) if self.method == "newton_schulz" else None

    @functools.cached_property
    def triples(self) -> tuple[tuple[float, float, float], ...]:
        return resolve_coefficients(self.coefficients)

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        if self.method == "svd":
            return polar_svd(X)
        return newton_schulz(X, self.steps, self.triples, self.dtype, self.eps, self.norm)

    def apply_all(self, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Orthogonalize each matrix; same-shaped ones go through as stacked batches. On a CPU a stack
        holds at most CPU_STACK_ELEMENTS numbers: a batched matmul is no faster there than a loop, and
        larger temporaries leave the allocator's heap for fresh pages on every call (measured: 10-25 %
        of a GPT-2 small Muon step)."""
        out: list[torch.Tensor | None] = [None] * len(matrices)
        by_shape: dict[tuple, list[int]] = {}
        for i, M in enumerate(matrices):
            by_shape.setdefault((tuple(M.shape), M.device, M.dtype), []).append(i)
        for (shape, device, _), indices in by_shape.items():
            per_stack = max(1, CPU_STACK_ELEMENTS // math.prod(shape)) if device.type == "cpu" else len(indices)
            for start in range(0, len(indices), per_stack):
                chunk = indices[start:start + per_stack]
                if len(chunk) == 1:
                    out[chunk[0]] = self(matrices[chunk[0]])
                    continue
                for i, O in zip(chunk, self(torch.stack([matrices[i] for i in chunk])).unbind(0)):
                    out[i] = O
        return out
