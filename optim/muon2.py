"""Muon² and Muon²-F: an Adam-style second moment before Newton–Schulz, so fewer steps suffice
(Liu, Zhang, Wang, Zhao, Su, Yang, Zhang 2026, arXiv 2604.09967). No official code was released."""

from __future__ import annotations

from collections.abc import Mapping

from optim.matrix import MatrixOptimizer
from optim.orthogonalize import Orthogonalizer
from optim.stages import Momentum, Orthogonalize, SecondMoment, is_sum_form


class Muon2(MatrixOptimizer):
    r"""Muon² (the paper's Algorithm 1), for 2-D matrices:

        B_t = β B_{t−1} + G_t                      sum momentum (momentum_form="ema": M_t = β M_{t−1} + (1 − β) G_t)
        V_t = β₂ V_{t−1} + (1 − β₂) G_t²            second moment of the raw gradient
        M̂_t = B_t ⊘ (sqrt(V_t) + ε)                element-wise preconditioning before Newton–Schulz
        W_t = W_{t−1} (1 − η λ) − η s(m, n) NS_3(M̂_t)

    Stages: Momentum(sum scale, nesterov off) → SecondMoment → Orthogonalize(3 steps). With no
    official code, the choices are: 3 Keller Jordan steps (the paper's "40 % fewer" than Muon's 5);
    no Nesterov (the paper; the modded-nanogpt port uses Keller Jordan's, ``nesterov=True``); the
    paper's sum buffer (the port feeds the unscaled EMA: ``momentum_form="ema"``, which differs
    only through ε, since B = M/(1 − β)); no bias correction (a scalar on B or V cancels in
    Newton–Schulz up to ε); β₂ 0.95 and ε 1e-10 from the port (which runs 12 convergent steps
    instead, with the "original" sqrt(max(1, m/n)) scale); the 0.2·sqrt(max(m, n)) scale by
    default, so that the matrices share AdamW's lr as in ``optim=muon2``.
    """

    factored = False

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, cautious_weight_decay: bool = False,
                 momentum: float = 0.95, beta2: float = 0.95, eps: float = 1e-10, nesterov: bool = False,
                 momentum_form: str = "sum", adjust_lr_fn: str = "match_rms_adamw",
                 orthogonalizer: Orthogonalizer | Mapping = Orthogonalizer(steps=3)):
        defaults = dict(lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay,
                        momentum=momentum, beta2=beta2, eps=eps, adjust_lr_fn=adjust_lr_fn,
                        orthogonalizer=orthogonalizer)
        stages = (Momentum(nesterov=nesterov, sum_scale=is_sum_form(momentum_form)), SecondMoment(factored=self.factored), Orthogonalize())
        super().__init__(params, defaults, stages)


class Muon2F(Muon2):
    r"""Muon²-F: Muon² with Adafactor's factored second moment (the paper's §3.6), for 2-D matrices:

        r_t = β₂ r_{t−1} + (1 − β₂) mean_j(G_t² + ε₁) ∈ R^m,   c_t = β₂ c_{t−1} + (1 − β₂) mean_i(G_t² + ε₁) ∈ R^n
        V̂_t = r_t c_tᵀ / mean(r_t)
        W_t = W_{t−1} (1 − η λ) − η s(m, n) NS_3(B_t ⊘ (sqrt(V̂_t) + ε))

    (m + n) second-moment numbers per matrix instead of m·n; ε₁ = 1e-30 (Adafactor). The exact
    normalisation of the paper's factorisation is not public; this is Adafactor's. Same defaults
    and choices as Muon².
    """

    factored = True
