"""The stages a matrix optimizer is composed of (optax-style transforms over a group's matrices).

A stage maps the list of update tensors of one param group (one per matrix, initially the
gradients G_t) to a new list, keeping per-matrix state under its own keys. Stages never modify
their input in place, and they work on whole lists (foreach ops; one stacked Newton–Schulz call
per shape), so same-shaped matrices are updated as one batch. Numeric hyperparameters are read
from the param group at every step (so schedules and per-group overrides apply); structural
choices (Nesterov on/off, exact or approximate, ...) are the stage's fields.

    stage                  equation (per matrix; β = group["momentum"], t = the matrix's step count)
    MarsCorrection         C = G + γ β/(1−β) (G − G_prev), then C / max(1, ‖C‖_F)           MARS-M
    GradientVariance       Γ ← β Γ + β(1−β) (M_{t−1} − G)²      (before Momentum)            Muon-NSR/VS
    Momentum               M ← β M + (1−β) X;  M̂ = M/(1−β^t) (bias_correction);
                           N = (1−β) X + β M̂ (nesterov) or M̂;  N/(1−β) with sum_scale (B = M/(1−β))
    NoiseToSignal          nsr: X / (sqrt(X² + γ Γ̂) + ε)    vs: X / (sqrt(Γ̂) + ε),  Γ̂ = Γ/(1−β^t)
                           (preserve_norm: rescaled to ‖X‖_F)
    SecondMoment           V ← β₂ V + (1−β₂) G²;  X / (sqrt(V) + ε)                         Muon²
                           factored: r ← β₂ r + (1−β₂) mean_j(G² + ε₁), c likewise over i,
                           V̂ = r cᵀ / mean(r)                                              Muon²-F
    Orthogonalize          X → NS_K(X) or the exact polar factor (optim/orthogonalize.py)

Stage order is the pipeline: [Momentum, Orthogonalize] is pre-polar (Muon), [Orthogonalize,
Momentum] post-polar, [Orthogonalize] polar-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from optim.distributed import orthogonalize_distributed
from optim.orthogonalize import Orthogonalizer


@dataclass
class Step:
    """What a stage sees: the group's hyperparameters, its matrices, their raw gradients and states."""

    group: dict
    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict]
    counts: list[int]  # t: how many updates each matrix has had, this one included (1 at the first)
    replicated_over: object = None  # DDP: the process group the matrices are replicated over (optim/distributed.py)


def state_tensors(step: Step, key: str, like: list[Tensor]) -> list[Tensor]:
    """The state tensors under `key`, created as zeros shaped like `like` on first use."""
    for state, x in zip(step.states, like):
        if key not in state:
            state[key] = torch.zeros_like(x, memory_format=torch.preserve_format)
    return [state[key] for state in step.states]


def bias_corrections(beta: float, counts: list[int]) -> list[float]:
    return [1.0 - beta**t for t in counts]


MOMENTUM_FORMS = ("ema", "sum")


def is_sum_form(momentum_form: str) -> bool:
    """True for the sum buffer B = βB + G ("sum", Moonlight, Muon²), False for the EMA ("ema", KJ, torch)."""
    if momentum_form not in MOMENTUM_FORMS:
        raise ValueError(f"unknown momentum_form {momentum_form!r}; valid: {list(MOMENTUM_FORMS)}")
    return momentum_form == "sum"


class Stage:
    def __call__(self, updates: list[Tensor], step: Step) -> list[Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class MarsCorrection(Stage):
    """Variance-reduced gradient of MARS-M (Liu, Yuan, Gu 2025):

        C_t = G_t + γ β/(1−β) (G_t − G_prev),   then   Clip(C_t, 1) = C_t / max(1, ‖C_t‖_F)

    approximate (default): G_prev = ∇f(X_{t−1}, ξ_{t−1}), last step's gradient;
    exact: G_prev = ∇f(X_{t−1}, ξ_t), the previous weights on the current batch, which the
    optimizer's ``store_lookahead_gradients()`` recorded during the previous step.
    G_prev starts at zero (the released code), so C_1 = (1 + γβ/(1−β)) G_1 before the clip.
    State: ``last_grad``, a copy, never a reference to ``p.grad`` (exact mode: the stored look-ahead,
    consumed by the step).
    """

    exact: bool = False
    clip: bool = True

    def __call__(self, updates, step):
        beta, gamma = step.group["momentum"], step.group["gamma"]
        last = state_tensors(step, "last_grad", updates)
        corrected = torch._foreach_add(updates, torch._foreach_sub(updates, last), alpha=gamma * beta / (1.0 - beta))
        if self.exact:  # the stored look-ahead is consumed: it becomes the next step's G_prev
            lookahead = [state.pop("lookahead_grad", None) for state in step.states]
            if any(g is None for g in lookahead):
                raise RuntimeError(
                    "MARSM(exact=True) needs store_lookahead_gradients() before every step, with the gradient of "
                    "the current weights on the next batch; `train.py optim=mars_m_exact` does this"
                )
            for state, g in zip(step.states, lookahead):
                state["last_grad"] = g
        else:
            for previous, g in zip(last, updates):  # (no _foreach_copy_ for FSDP's DTensors)
                previous.copy_(g)
        if self.clip:
            norms = torch._foreach_norm(corrected)
            torch._foreach_mul_(corrected, [1.0 / n.clamp(min=1.0) for n in norms])
        return corrected


@dataclass(frozen=True)
class GradientVariance(Stage):
    """Muon-NSR/VS's noise estimate (Li, Fan, Li 2026): Γ_t = β Γ_{t−1} + β(1−β) (M_{t−1} − G_t)².

    It reads the momentum buffer *before* Momentum updates it (the paper's order), so it must come
    first. Updates pass through unchanged. State: ``variance``."""

    def __call__(self, updates, step):
        beta = step.group["momentum"]
        variance = state_tensors(step, "variance", updates)
        mean = state_tensors(step, "momentum_buffer", updates)
        deviation = torch._foreach_sub(mean, updates)
        torch._foreach_mul_(variance, beta)
        torch._foreach_addcmul_(variance, deviation, deviation, value=beta * (1.0 - beta))
        return updates


@dataclass(frozen=True)
class Momentum(Stage):
    """EMA momentum M ← β M + (1−β) X (torch.optim.Muon's buffer), then

        M̂ = M / (1 − β^t)                 if bias_correction
        N = (1 − β) X + β M̂               if nesterov (Keller Jordan's form), else N = M̂
        N ← N / (1 − β)                   if sum_scale

    The sum buffer B = β B + X (Moonlight, Muon²) is exactly M/(1−β), so sum_scale gives the sum
    convention without a second buffer: sum_scale + nesterov is G + β B (Moonlight) and, with bias
    correction, Muon-NSR's M̃ = G + β/(1−β) M̂. State: ``momentum_buffer`` (the EMA)."""

    nesterov: bool = True
    sum_scale: bool = False
    bias_correction: bool = False

    def __call__(self, updates, step):
        beta = step.group["momentum"]
        buffers = state_tensors(step, "momentum_buffer", updates)
        torch._foreach_lerp_(buffers, updates, 1.0 - beta)
        # N = s ((1 − β) X + β M / c) (nesterov) or s M / c, with c = 1 − β^t (or 1), s = 1/(1 − β) (or 1):
        # one scaled copy of M and one fused add, whatever the options
        scale = 1.0 / (1.0 - beta) if self.sum_scale else 1.0
        corrections = bias_corrections(beta, step.counts) if self.bias_correction else [1.0] * len(buffers)
        out = torch._foreach_mul(buffers, [scale * (beta if self.nesterov else 1.0) / c for c in corrections])
        if self.nesterov:
            torch._foreach_add_(out, updates, alpha=scale * (1.0 - beta))
        return out


@dataclass(frozen=True)
class NoiseToSignal(Stage):
    """Muon-NSR / Muon-VS's element-wise normaliser before orthogonalization, with Γ̂ = Γ/(1−β^t):

        "nsr":  X / (sqrt(X² + γ Γ̂) + ε)        noise-to-signal damping (γ → ∞ gives VS up to scale)
        "vs":   X / (sqrt(Γ̂) + ε)               variance scaling

    ε outside the square root, as in the released code. With ``preserve_norm`` the result is
    rescaled to ‖X‖_F per matrix (for a normaliser placed after Newton–Schulz, whose output has a
    fixed norm that the element-wise division would otherwise change by orders of magnitude)."""

    kind: str = "nsr"
    preserve_norm: bool = False

    def __post_init__(self):
        if self.kind not in ("nsr", "vs"):
            raise ValueError(f"unknown noise-to-signal normaliser {self.kind!r}; valid: 'nsr', 'vs'")

    def __call__(self, updates, step):
        beta, eps = step.group["momentum"], step.group["eps"]
        gamma = step.group["gamma"] if self.kind == "nsr" else 1.0
        # the denominator is built in one fresh buffer: γ Γ/(1 − β^t) (+ X²), sqrt, + ε; then X / it, in place
        denominator = torch._foreach_mul(state_tensors(step, "variance", updates),
                                         [gamma / c for c in bias_corrections(beta, step.counts)])
        if self.kind == "nsr":
            torch._foreach_addcmul_(denominator, updates, updates)
        torch._foreach_sqrt_(denominator)
        torch._foreach_add_(denominator, eps)
        torch._foreach_reciprocal_(denominator)
        torch._foreach_mul_(denominator, updates)
        normalised = denominator
        if self.preserve_norm:
            ratios = [a / b.clamp(min=torch.finfo(b.dtype).tiny) for a, b in
                      zip(torch._foreach_norm(updates), torch._foreach_norm(normalised))]
            torch._foreach_mul_(normalised, ratios)
        return normalised


@dataclass(frozen=True)
class SecondMoment(Stage):
    """Muon²'s Adam-style preconditioner, applied before orthogonalization, with V tracked on the
    raw gradient G_t (not on the momentum):

        V ← β₂ V + (1 − β₂) G²,        X ← X / (sqrt(V) + ε)

    factored (Muon²-F, Adafactor's rank-1 estimate, (m + n) numbers per matrix):
        r ← β₂ r + (1 − β₂) mean_j(G² + ε₁) ∈ R^m,   c ← β₂ c + (1 − β₂) mean_i(G² + ε₁) ∈ R^n,
        V̂ = r cᵀ / mean(r)
    V starts at zero without bias correction (a scalar correction would cancel in Newton–Schulz
    up to ε). State: ``second_moment``, or ``row_moment`` and ``col_moment``."""

    factored: bool = False
    eps1: float = 1e-30  # Adafactor's ε₁ inside the factored statistics

    def __call__(self, updates, step):
        beta2, eps = step.group["beta2"], step.group["eps"]
        if self.factored:
            squared = torch._foreach_mul(step.grads, step.grads)
            rows = [(g2 + self.eps1).mean(dim=-1) for g2 in squared]
            cols = [(g2 + self.eps1).mean(dim=-2) for g2 in squared]
            row_moment, col_moment = state_tensors(step, "row_moment", rows), state_tensors(step, "col_moment", cols)
            torch._foreach_lerp_(row_moment, rows, 1.0 - beta2)
            torch._foreach_lerp_(col_moment, cols, 1.0 - beta2)
            denominator = [torch.outer(r, c) / r.mean() for r, c in zip(row_moment, col_moment)]
            torch._foreach_sqrt_(denominator)
        else:  # V ← β₂ V + (1 − β₂) G², in place
            second = state_tensors(step, "second_moment", step.grads)
            torch._foreach_mul_(second, beta2)
            torch._foreach_addcmul_(second, step.grads, step.grads, value=1.0 - beta2)
            denominator = torch._foreach_sqrt(second)
        torch._foreach_add_(denominator, eps)
        torch._foreach_reciprocal_(denominator)
        torch._foreach_mul_(denominator, updates)  # X / (sqrt(V) + ε), in the one fresh buffer
        return denominator


@dataclass(frozen=True)
class Orthogonalize(Stage):
    """X → NS_K(X) or polar(X), configured by the group's ns_* entries and `orthogonalizer`; the
    result is returned in X's dtype. Under FSDP2 (and DDP, when the optimizer's
    ``split_orthogonalization()`` was called) each matrix is orthogonalized whole on one owner rank
    (optim/distributed.py)."""

    def __call__(self, updates, step):
        return orthogonalize_distributed(orthogonalizer_of(step.group).apply_all, updates, step.replicated_over)


def orthogonalizer_of(group: dict) -> Orthogonalizer:
    return Orthogonalizer(
        method=group["orthogonalizer"], steps=group["ns_steps"], coefficients=group["ns_coefficients"],
        dtype=group["ns_dtype"], eps=group["ns_eps"], norm=group["ns_norm"],
    )
