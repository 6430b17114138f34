"""The stages a matrix optimizer is composed of (optax-style transforms over a group's matrices).

A stage maps the list of update tensors of one param group (one per matrix, initially the
gradients G_t) to a new list, keeping per-matrix state under its own namespace ("momentum/buffer",
"second_moment/v", ...). Stages never modify their input in place, and they work on whole lists
(foreach ops; one stacked Newton–Schulz call per shape), so same-shaped matrices are updated as one
batch. Numeric hyperparameters are read from the param group at every step (so schedules and
per-group overrides apply); structural choices (Nesterov on/off, exact or approximate, ...) are the
stage's fields.

    stage                  equation (per matrix; β = group["momentum"], t = the matrix's step count)
    MarsCorrection         C = G + γ β/(1−β) (G − G_prev), then C / max(1, ‖C‖_F)           MARS-M
    GradientVariance       Γ ← β Γ + β(1−β) (M_{t−1} − G)²      (before Momentum)            Muon-NSR/VS
    Momentum               M ← β M + (1−β) X;  M̂ = M/(1−β^t) (bias_correction);
                           N = (1−β) X + β M̂ (nesterov) or M̂;  N/(1−β) with sum_scale (B = M/(1−β))
    NoiseToSignal          nsr: X / (sqrt(X² + γ Γ̂) + ε)    vs: X / (sqrt(Γ̂) + ε),  Γ̂ = Γ/(1−β^t)
                           (preserve_norm: rescaled to ‖X‖_F)
    SecondMoment           V ← β₂ V + (1−β₂) Y²;  X / (sqrt(V) + ε),  Y = G (Muon²) or X (AdaMuon)
                           factored: r ← β₂ r + (1−β₂) mean_j(G² + ε₁), c likewise over i,
                           V̂ = r cᵀ / mean(r)                                              Muon²-F
    Sign                   sign(X)                                                          AdaMuon
    Orthogonalize          X → NS_K(X) or the exact polar factor (optim/orthogonalize.py), whole or
                           per attention head (the group's ``head_split``)
    LowRankOrthogonalize   Dion's rank-r power iteration with error feedback on M ← M + G   Dion
    NeuronNormalize        v ← β₂ v + (1−β₂) mean_j(X²) ∈ R^m;  X / (sqrt(v) + ε), rescaled
                           to ‖X‖_F                                                         NorMuon

The update tail (`apply_update_`, one in-place pass over the group): a scale rule s (ScaleByShape, or
a variant's own: AdaMuon's ScaleToRms), decoupled weight decay λ and the lr η:

    ScaleByShape           s = s(m, n), the group's ``adjust_lr_fn`` (optim/matrix.py)
    ScaleToRms             s = ρ sqrt(m n) / (‖D‖_F + ε)   (RMS ρ)                          AdaMuon
    W ← W (1 − η λ) − η s D,  or W − η λ W ⊙ 1[D ⊙ W > 0] − η s D (cautious_weight_decay)

Stage order is the pipeline: [Momentum, Orthogonalize] is pre-polar (Muon), [Orthogonalize,
Momentum] post-polar, [Orthogonalize] polar-only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from optim.distributed import (DTensor, Replicate, distribute_tensor, gather_row_shards, like_dtensors, local_tensors,
                               on_owners, orthogonalize_distributed, own_rows, row_sharded, rows_like, shard_like,
                               sum_over_row_shards, whole_norms)
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
    last: bool = False  # the running stage is the last: its result goes to the update tail, which adds any float dtype


def state_tensors(step: Step, key: str, like: list[Tensor]) -> list[Tensor]:
    """The state tensors under `key` ("namespace/name"), created as zeros shaped like `like` on first use."""
    for state, x in zip(step.states, like):
        if key not in state:
            state[key] = torch.zeros_like(x, memory_format=torch.preserve_format)
    return [state[key] for state in step.states]


SCALE_RULES = {
    "original": lambda m, n: math.sqrt(max(1.0, m / n)),
    "match_rms_adamw": lambda m, n: 0.2 * math.sqrt(max(m, n)),
    "spectral": lambda m, n: math.sqrt(m / n),
}


def update_scale(shape, rule: str | None) -> float:
    """s(m, n) of the scale rule `rule` (None: "original") for a matrix or block of this shape."""
    rule = rule or "original"
    if rule not in SCALE_RULES:
        raise ValueError(f"unknown adjust_lr_fn {rule!r}; valid: {sorted(SCALE_RULES)}")
    m, n = shape[-2], shape[-1]
    return SCALE_RULES[rule](m, n)


def block_shape(shape, head_split) -> tuple[int, int]:
    """The shape of the blocks a matrix is orthogonalized in: (m, n) whole, or one attention head's
    rows (head_split = (blocks, 0)) or columns ((blocks, 1))."""
    m, n = shape[-2], shape[-1]
    if head_split is None:
        return m, n
    blocks, dim = head_split
    return (m // blocks, n) if dim == 0 else (m, n // blocks)


def bias_corrections(beta: float, counts: list[int]) -> list[float]:
    return [1.0 - beta**t for t in counts]


MOMENTUM_FORMS = ("ema", "sum")


def is_sum_form(momentum_form: str) -> bool:
    """True for the sum buffer B = βB + G ("sum", Moonlight, Muon²), False for the EMA ("ema", KJ, torch)."""
    if momentum_form not in MOMENTUM_FORMS:
        raise ValueError(f"unknown momentum_form {momentum_form!r}; valid: {list(MOMENTUM_FORMS)}")
    return momentum_form == "sum"


class Stage:
    namespace: str = ""  # the prefix of this stage's state keys
    # state (names under the namespace) that, on DDP replicas dividing their matrices, only each matrix's owner
    # keeps current; MatrixOptimizer.consolidate_state_dict() brings it to every rank
    owner_only_state: ClassVar[tuple[str, ...]] = ()

    def __call__(self, updates: list[Tensor], step: Step) -> list[Tensor]:
        raise NotImplementedError

    def state(self, step: Step, name: str, like: list[Tensor]) -> list[Tensor]:
        return state_tensors(step, f"{self.namespace}/{name}", like)


@dataclass(frozen=True)
class MarsCorrection(Stage):
    """Variance-reduced gradient of MARS-M (Liu, Yuan, Gu 2025):

        C_t = G_t + γ β/(1−β) (G_t − G_prev),   then   Clip(C_t, 1) = C_t / max(1, ‖C_t‖_F)

    approximate (default): G_prev = ∇f(X_{t−1}, ξ_{t−1}), last step's gradient;
    exact: G_prev = ∇f(X_{t−1}, ξ_t), the previous weights on the current batch, which the
    optimizer's ``store_lookahead_gradients()`` recorded during the previous step.
    G_prev starts at zero (the released code), so C_1 = (1 + γβ/(1−β)) G_1 before the clip.
    State: ``mars/last_grad``, a copy, never a reference to ``p.grad`` (exact mode: the stored
    look-ahead ``mars/lookahead_grad``, consumed by the step).
    """

    exact: bool = False
    clip: bool = True
    namespace: str = "mars"

    def __call__(self, updates, step):
        beta, gamma = step.group["momentum"], step.group["gamma"]
        last = self.state(step, "last_grad", updates)
        corrected = torch._foreach_add(updates, torch._foreach_sub(updates, last), alpha=gamma * beta / (1.0 - beta))
        if self.exact:  # the stored look-ahead is consumed: it becomes the next step's G_prev
            lookahead = [state.pop(f"{self.namespace}/lookahead_grad", None) for state in step.states]
            if any(g is None for g in lookahead):
                raise RuntimeError(
                    "MARSM(exact=True) needs store_lookahead_gradients() before every step, with the gradient of "
                    "the current weights on the next batch; `train.py optim=mars_m_exact` does this"
                )
            for state, g in zip(step.states, lookahead):
                state[f"{self.namespace}/last_grad"] = g
        else:
            for previous, g in zip(last, updates):  # (no _foreach_copy_ for FSDP's DTensors)
                previous.copy_(g)
        if self.clip:  # the norms of whole matrices, from shards with one all-reduce under FSDP
            torch._foreach_mul_(local_tensors(corrected), [1.0 / n.clamp(min=1.0) for n in whole_norms(corrected)])
        return corrected


@dataclass(frozen=True)
class GradientVariance(Stage):
    """Muon-NSR/VS's noise estimate (Li, Fan, Li 2026): Γ_t = β Γ_{t−1} + β(1−β) (M_{t−1} − G_t)².

    It reads the momentum buffer (``<momentum>/buffer``) *before* Momentum updates it (the paper's
    order), so it must come first. Updates pass through unchanged. State: ``variance/gamma``."""

    namespace: str = "variance"
    momentum: str = "momentum"  # the namespace of the Momentum stage whose buffer is M

    def __call__(self, updates, step):
        beta = step.group["momentum"]
        variance = self.state(step, "gamma", updates)
        mean = state_tensors(step, f"{self.momentum}/buffer", updates)
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
    correction, Muon-NSR's M̃ = G + β/(1−β) M̂. State: ``momentum/buffer`` (the EMA)."""

    nesterov: bool = True
    sum_scale: bool = False
    bias_correction: bool = False
    namespace: str = "momentum"

    def __call__(self, updates, step):
        beta = step.group["momentum"]
        buffers = self.state(step, "buffer", updates)
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
    fixed norm that the element-wise division would otherwise change by orders of magnitude).
    Reads GradientVariance's ``variance/gamma``."""

    kind: str = "nsr"
    preserve_norm: bool = False
    variance: str = "variance"  # the namespace of the GradientVariance stage whose Γ this divides by

    def __post_init__(self):
        if self.kind not in ("nsr", "vs"):
            raise ValueError(f"unknown noise-to-signal normaliser {self.kind!r}; valid: 'nsr', 'vs'")

    def __call__(self, updates, step):
        beta, eps = step.group["momentum"], step.group["eps"]
        gamma = step.group["gamma"] if self.kind == "nsr" else 1.0
        # the denominator is built in one fresh buffer: γ Γ/(1 − β^t) (+ X²), sqrt, + ε; then X / it, in place
        denominator = torch._foreach_mul(state_tensors(step, f"{self.variance}/gamma", updates),
                                         [gamma / c for c in bias_corrections(beta, step.counts)])
        if self.kind == "nsr":
            torch._foreach_addcmul_(denominator, updates, updates)
        torch._foreach_sqrt_(denominator)
        torch._foreach_add_(denominator, eps)
        torch._foreach_reciprocal_(denominator)
        torch._foreach_mul_(denominator, updates)
        normalised = denominator
        if self.preserve_norm:
            rescale_to_norm_of_(normalised, updates)
        return normalised


def rescale_to_norm_of_(tensors: list[Tensor], reference: list[Tensor]) -> None:
    """tensors[i] ← tensors[i] · ‖reference[i]‖_F / ‖tensors[i]‖_F, in place (whole-matrix norms: one
    all-reduce for all of them under FSDP)."""
    norms = whole_norms([*reference, *tensors])
    ratios = [a / b.clamp(min=torch.finfo(b.dtype).tiny) for a, b in zip(norms[:len(tensors)], norms[len(tensors):])]
    torch._foreach_mul_(local_tensors(tensors), ratios)


@dataclass(frozen=True)
class SecondMoment(Stage):
    """An Adam-style element-wise preconditioner:

        V ← β₂ V + (1 − β₂) Y²,        X ← X / (sqrt(V) + ε)

    with Y the raw gradient G_t (``source="gradient"``, Muon², before orthogonalization) or the
    stage's input X (``source="update"``, AdaMuon, on the orthogonalized update).
    factored (Muon²-F, Adafactor's rank-1 estimate, (m + n) numbers per matrix; gradient source):
        r ← β₂ r + (1 − β₂) mean_j(G² + ε₁) ∈ R^m,   c ← β₂ c + (1 − β₂) mean_i(G² + ε₁) ∈ R^n,
        V̂ = r cᵀ / mean(r)
    V starts at zero without bias correction (a scalar correction would cancel in Newton–Schulz
    up to ε). State: ``second_moment/v``, or ``second_moment/row`` and ``second_moment/col``."""

    factored: bool = False
    source: str = "gradient"
    eps1: float = 1e-30  # Adafactor's ε₁ inside the factored statistics
    namespace: str = "second_moment"

    def __post_init__(self):
        if self.source not in ("gradient", "update"):
            raise ValueError(f"unknown second-moment source {self.source!r}; valid: 'gradient', 'update'")
        if self.factored and self.source != "gradient":
            raise ValueError("the factored second moment is tracked on the gradient (source='gradient')")

    def __call__(self, updates, step):
        beta2, eps = step.group["beta2"], step.group["eps"]
        observed = step.grads if self.source == "gradient" else updates
        if self.factored:
            denominator = self._factored_sqrt(step)
        else:  # V ← β₂ V + (1 − β₂) Y², in place
            second = self.state(step, "v", observed)
            torch._foreach_mul_(second, beta2)
            torch._foreach_addcmul_(second, observed, observed, value=1.0 - beta2)
            denominator = torch._foreach_sqrt(local_tensors(second))
        torch._foreach_add_(denominator, eps)
        for x, d in zip(local_tensors(updates), denominator):  # X / (sqrt(V) + ε), in the one fresh buffer: one pass
            torch.div(x, d, out=d)  # (a reciprocal, then a product, took 1.5x as long: 48 GPT-2 small matrices, 2 threads)
        return like_dtensors(denominator, updates)

    def _factored_sqrt(self, step: Step) -> list[Tensor]:
        """sqrt(V̂) of every matrix, local rows. A row shard (FSDP2) has whole rows, so r is its own; c and
        mean(r) sum over the shards: all of them in one all-reduce. The states keep the layout of a
        parameter's rows: r sharded like them, c whole on every rank."""
        beta2, grads = step.group["beta2"], step.grads
        squared = [g * g + self.eps1 for g in local_tensors(grads)]
        row_moment = local_tensors(self._moments(step, "row", [g.shape[0] for g in grads], sharded=True))
        col_moment = local_tensors(self._moments(step, "col", [g.shape[1] for g in grads], sharded=False))
        torch._foreach_lerp_(row_moment, [g2.mean(dim=-1) for g2 in squared], 1.0 - beta2)
        sums = torch.cat([torch.cat([g2.sum(dim=-2), r.sum().view(1)]) for g2, r in zip(squared, row_moment)])
        sums = sum_over_row_shards(sums, grads).split([g.shape[1] + 1 for g in grads])
        denominator = []
        for g, r, c, total in zip(grads, row_moment, col_moment, sums):
            m = g.shape[0]
            c.lerp_(total[:-1] / m, 1.0 - beta2)
            denominator.append(torch.outer(r, c) / (total[-1] / m))  # V̂ = r cᵀ / mean(r)
        torch._foreach_sqrt_(denominator)
        return denominator

    def _moments(self, step: Step, name: str, sizes: list[int], sharded: bool) -> list[Tensor]:
        """The factored statistics `name`, zeros on first use: vectors of `sizes`, under FSDP2 DTensors
        sharded like the gradients' rows (`sharded`) or whole on every rank."""
        key = f"{self.namespace}/{name}"
        for i, state in enumerate(step.states):
            if key not in state:
                zeros = torch.zeros(sizes[i], device=step.grads[i].device, dtype=step.grads[i].dtype)
                ref = step.grads[i]
                if isinstance(ref, DTensor):
                    placements = ref.placements if sharded else [Replicate()] * ref.device_mesh.ndim
                    zeros = distribute_tensor(zeros, ref.device_mesh, placements)
                state[key] = zeros
        return [state[key] for state in step.states]


def factored_estimate(row: Tensor, col: Tensor) -> Tensor:
    """Adafactor's rank-1 second moment V̂ = r cᵀ / mean(r)."""
    return torch.outer(row, col) / row.mean()


def second_moment_preconditioned(X: Tensor, state: dict, eps: float, namespace: str = "second_moment") -> Tensor | None:
    """X / (sqrt(V) + ε) with V the second moment SecondMoment keeps in a matrix's `state` (V̂ for the
    factored one), in X's dtype; None if the state has none. What Newton–Schulz sees in Muon²
    (X = the momentum, ε = the group's eps), for the spectral diagnostics."""
    if f"{namespace}/v" in state:
        V = state[f"{namespace}/v"]
    elif f"{namespace}/row" in state:
        V = factored_estimate(state[f"{namespace}/row"].to(X.dtype), state[f"{namespace}/col"].to(X.dtype))
    else:
        return None
    return X / (V.to(X.dtype).sqrt() + eps)


@dataclass(frozen=True)
class Sign(Stage):
    """sign(X), element-wise (AdaMuon's sign stabilisation before Newton–Schulz). No state."""

    def __call__(self, updates, step):
        return torch._foreach_sign(updates)


@dataclass(frozen=True)
class Orthogonalize(Stage):
    """X → NS_K(X) or polar(X), configured by the group's ``orthogonalizer`` settings; the result is
    returned in X's dtype, or, as the last stage, in the one it was computed in (bf16 Newton–Schulz's
    result goes to the update tail without an fp32 copy, which cost ~10 % of a bf16 step on a CPU). A
    group with ``head_split = (h, 0)`` orthogonalizes each of the
    h row blocks of its matrices on its own (the heads of a q, k, v or fused qkv projection), with
    ``(h, 1)`` each of h column blocks (an attention output projection's heads). Under FSDP2 (and
    DDP, when the optimizer's ``split_orthogonalization()`` was called) each matrix is orthogonalized
    whole on one owner rank (optim/distributed.py)."""

    def __call__(self, updates, step):
        orthogonalizer = orthogonalizer_of(step.group)
        orthogonalize = orthogonalizer.apply_all
        if step.group.get("head_split") is not None:
            orthogonalize = per_head(orthogonalize, *step.group["head_split"])
        payload = orthogonalizer.compute_dtype(updates[0].device) if updates else None
        return orthogonalize_distributed(orthogonalize, updates, step.replicated_over, payload_dtype=payload,
                                         cast_back=not step.last)


def orthogonalizer_of(group: dict) -> Orthogonalizer:
    return Orthogonalizer(**group["orthogonalizer"])


def per_head(orthogonalize, blocks: int, dim: int):
    """`orthogonalize` applied to each of `blocks` equal row (dim 0) or column (dim 1) blocks of every
    matrix, all blocks of all matrices in one batched call."""
    def split(matrices: list[Tensor]) -> list[Tensor]:
        pieces = [block for X in matrices for block in X.chunk(blocks, dim=dim)]
        done = orthogonalize(pieces)
        return [torch.cat(done[i * blocks:(i + 1) * blocks], dim=dim) for i in range(len(matrices))]
    return split


@dataclass(frozen=True)
class LowRankOrthogonalize(Stage):
    """Dion's rank-r orthonormal update with error feedback (Ahn, Xu, Abreu, Langford et al. 2025,
    arXiv 2504.05295, Algorithm 1; microsoft/dion ``dion_simple.py``), on the raw gradient:

        M ← M + G                                sum momentum
        P ← QR(M Q)                              one power-iteration step, warm-started from Q (n × r)
        R ← Mᵀ P
        M ← M − (1 − μ) P Rᵀ                     error feedback: only the captured part decays
        Q ← R ⊘ (‖R_{:,j}‖ + ε)                  column-normalised, the next step's start
        D = P Qᵀ

    μ = group["momentum"], ε = group["eps"], r = ceil(rank_fraction · min(m, n)). Q starts as a
    standard normal matrix from a generator seeded with the matrix's position in its group, so that
    every DDP replica starts alike. M and Q are updated in place (`power_iteration`). Under FSDP2/HSDP
    each rank works on its own rows and only rank-r factors travel. DDP replicas divide the matrices
    among owner ranks (optim/distributed.py, ``on_owners``), which broadcast D only: M and Q are needed
    by their owner alone, so they stay current there, and the other ranks' copies are brought up to date
    by the optimizer's ``consolidate_state_dict()`` before a checkpoint (half the bytes of broadcasting
    D and M every step; 2 ranks, GPT-2 small: 0.71x → 0.56x the replicated step). State:
    ``dion/momentum``, ``dion/q`` (under FSDP2 both sharded by rows)."""

    rank_fraction: float = 1.0
    namespace: str = "dion"
    owner_only_state: ClassVar[tuple[str, ...]] = ("momentum", "q")

    def __post_init__(self):
        if not 0.0 < self.rank_fraction <= 1.0:
            raise ValueError(f"rank_fraction={self.rank_fraction} must be in (0, 1]")

    def __call__(self, updates, step):
        mu, eps = step.group["momentum"], step.group["eps"]
        buffers = self.state(step, "momentum", updates)
        starts = self._starting_q(step, buffers)
        if row_sharded(buffers):
            torch._foreach_add_(buffers, updates)
            return power_iteration(buffers, starts, mu, eps)

        def iterate(Ms, Gs, Qs):  # on the owners: D, and M and Q as power_iteration left them (updated in place)
            torch._foreach_add_(Ms, Gs)
            return power_iteration(Ms, Qs, mu, eps), Ms, Qs

        directions, momenta, qs = on_owners(iterate, [buffers, updates, starts], outputs_like=(0, 0, 2), kept_by_owners=(1, 2),
                                            replicated_over=step.replicated_over)
        torch._foreach_copy_(local_tensors(buffers), local_tensors(momenta))  # (a tensor's copy onto itself is skipped)
        torch._foreach_copy_(local_tensors(starts), local_tensors(qs))
        return directions

    def _starting_q(self, step: Step, buffers: list[Tensor]) -> list[Tensor]:
        """Each matrix's Q (n × r), first a standard normal draw seeded with its position in the group (the
        same on every rank); under FSDP2 sharded by rows like the momentum."""
        key = f"{self.namespace}/q"
        for index, (state, M) in enumerate(zip(step.states, buffers)):
            if key not in state:
                rank = math.ceil(self.rank_fraction * min(M.shape))
                generator = torch.Generator(device=M.device).manual_seed(index)
                Q = torch.randn(M.shape[1], rank, generator=generator, device=M.device, dtype=M.dtype)
                state[key] = shard_like([Q], [M])[0]
        return [state[key] for state in step.states]


def power_iteration(momenta: list[Tensor], starts: list[Tensor], mu: float, eps: float) -> list[Tensor]:
    """Dion's step, M and Q updated in place; returns the directions D, in M's layout. On whole
    matrices, or on FSDP2/HSDP row shards (DTensors), each of the k ranks on its own rows i of every M:

        Q = [Q_1; …; Q_k]                           whole on every rank         one all-gather (n × r each)
        P = QR([M_1 Q; …; M_k Q])                   on the matrix's owner       one all-to-all each way (m × r)
        R = Σ_i M_iᵀ P_i                            P_i: P's rows i             one all-reduce (n × r each)
        M_i ← M_i − (1 − μ) P_i Rᵀ,   Q_i ← (R ⊘ (‖R_{:,j}‖ + ε))_i,   D_i = P_i Qᵀ

    Sharded: four collectives a step for the whole group, of rank-r factors only (about r/n of the
    bytes that sending whole matrices to owners moves); each rank does 1/k of the products with M and
    the QRs of the matrices it owns (optim/distributed.py's owners: the QRs had been repeated on every
    rank, 0.44 s of a 2.6 s one-thread step). Equal to the whole-matrix step up to the order of R's sum.
    The products with M run per matrix, which keeps M's update in place (a stack of M would be a copy
    of every momentum, and its update two more, each step: on a CPU, stacks past glibc's 32 MB mmap
    limit take fresh pages every time, 1.4 s of a 4.5 s step)."""
    sharded = row_sharded(momenta)
    M_rows, Q_rows = local_tensors(momenta), local_tensors(starts)
    Qs = gather_row_shards(Q_rows, starts) if sharded else Q_rows
    MQ = [M @ Q for M, Q in zip(M_rows, Qs)]
    if sharded:
        P_rows = local_tensors(on_owners(lambda Ps: (orthonormal_bases(Ps),), [rows_like(MQ, momenta)], outputs_like=(0,))[0])
    else:
        P_rows = orthonormal_bases(MQ)
    Rs = [M.mT @ P for M, P in zip(M_rows, P_rows)]
    if sharded:
        summed = sum_over_row_shards(torch.cat([R.reshape(-1) for R in Rs]), momenta)
        Rs = [R.view_as(Q) for R, Q in zip(summed.split([Q.numel() for Q in Qs]), Qs)]
    for M, P, R in zip(M_rows, P_rows, Rs):
        M.addmm_(P, R.mT, alpha=-(1.0 - mu))
    Qs = [R / (R.norm(dim=-2, keepdim=True) + eps) for R in Rs]
    torch._foreach_copy_(Q_rows, own_rows(Qs, starts) if sharded else Qs)
    return like_dtensors([P @ Q.mT for P, Q in zip(P_rows, Qs)], momenta)


def orthonormal_bases(matrices: list[Tensor]) -> list[Tensor]:
    """The Q factor of each matrix's reduced QR; same-shaped ones as one batch (small and latency-bound:
    one solver call where there would be one per matrix)."""
    bases = [None] * len(matrices)
    for indices in same_shapes(matrices):
        for i, P in zip(indices, torch.linalg.qr(torch.stack([matrices[i] for i in indices]))[0]):
            bases[i] = P
    return bases


def same_shapes(tensors: list[Tensor]) -> list[list[int]]:
    """The positions of same-shaped tensors, one list per shape (in order of first appearance)."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(i)
    return list(groups.values())


@dataclass(frozen=True)
class NeuronNormalize(Stage):
    """NorMuon's per-neuron normalisation after orthogonalization (Li, Liu, Liang, Chen, Zhao 2025,
    arXiv 2510.05491, Algorithm 1; zichongli5/NorMuon ``normuon.py``), for O (m × n):

        v ← β₂ v + (1 − β₂) mean_j(O²_{ij}) ∈ R^m     one second moment per output neuron (row)
        Ô = O ⊘ (sqrt(v) + ε)                          broadcast over the columns
        Ô ← Ô · ‖O‖_F / ‖Ô‖_F                          the released code's rescale to O's norm

    β₂ = group["beta2"], ε = group["eps"]; no bias correction (the code). Under FSDP2 the rows are
    the shard's own, so it runs on shards; the rescale's norms are whole-matrix norms. State:
    ``neuron_moment/v`` (m × 1)."""

    namespace: str = "neuron_moment"

    def __call__(self, updates, step):
        beta2, eps = step.group["beta2"], step.group["eps"]
        row_means = [(O * O).mean(dim=-1, keepdim=True) for O in updates]
        moments = self.state(step, "v", row_means)
        torch._foreach_lerp_(moments, row_means, 1.0 - beta2)
        denominator = torch._foreach_sqrt(moments)
        torch._foreach_add_(denominator, eps)
        normalised = [O / d for O, d in zip(updates, denominator)]
        rescale_to_norm_of_(normalised, updates)
        return normalised


class UpdateScale:
    """A scale rule of the update tail: s_i for each matrix's direction D_i (see MatrixOptimizer)."""

    def __call__(self, directions: list[Tensor], step: Step) -> list[float | Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class ScaleByShape(UpdateScale):
    """s(m, n) with the group's scale rule ``adjust_lr_fn`` (optim/matrix.py), (m, n) the shape of the
    blocks that were orthogonalized (a head's, with ``split_heads``): numbers, known on the host."""

    def __call__(self, directions, step):
        head_split = step.group.get("head_split")
        return [update_scale(block_shape(p.shape, head_split), step.group["adjust_lr_fn"]) for p in step.params]


@dataclass(frozen=True)
class ScaleToRms(UpdateScale):
    """ρ sqrt(m n) / (‖D‖_F + ε): every matrix's update gets RMS ρ = ``rms`` (AdaMuon's RMS alignment,
    0.2 as Adam's typical RMS), ε = group["eps"]. Takes ScaleByShape's place. On the device (whole-matrix
    norms: one all-reduce under FSDP)."""

    rms: float = 0.2

    def __call__(self, directions, step):
        eps = step.group["eps"]
        return [self.rms * math.sqrt(p.shape[-2] * p.shape[-1]) / (norm + eps) for p, norm in zip(step.params, whole_norms(directions))]


def apply_update_(params: list[Tensor], directions: list[Tensor], scales: list[float | Tensor], group: dict) -> None:
    """The update tail, in place, without temporaries for numeric scales:

        W ← W (1 − η λ) − η s D                     decoupled decay with the unscaled η (optax's
                                                   scale_by_shape, add_decayed_weights, scale_by_learning_rate)
        W ← W − η λ W ⊙ 1[D ⊙ W > 0] − η s D        with the group's ``cautious_weight_decay``

    η = group["lr"], λ = group["weight_decay"]. Two foreach calls over the group (one per distinct s
    for the second), where three out-of-place stages and an add made four passes and three buffers. D may
    be in a lower precision than W (bf16 Newton–Schulz): it is added as it is, with the same bits as an
    fp32 copy of it (bf16 → fp32 is exact)."""
    lr, wd = group["lr"], group["weight_decay"]
    W, D = local_tensors(params), local_tensors(directions)
    if wd and group.get("cautious_weight_decay"):
        torch._foreach_addcmul_(W, W, [(d * w > 0).to(w.dtype) for d, w in zip(D, W)], value=-lr * wd)
    elif wd:
        torch._foreach_mul_(W, 1.0 - lr * wd)
    if all(isinstance(s, float) for s in scales):
        by_scale: dict[float, list[int]] = {}
        for i, scale in enumerate(scales):
            by_scale.setdefault(scale, []).append(i)
        for scale, indices in by_scale.items():
            torch._foreach_add_([W[i] for i in indices], [D[i] for i in indices], alpha=-lr * scale)
    else:  # scales on the device
        torch._foreach_add_(W, torch._foreach_mul([d.to(w.dtype) for d, w in zip(D, W)], scales), alpha=-lr)
