"""AdaMuon: an element-wise second moment on Newton–Schulz of the sign of the momentum (Si, Zhang,
Shen 2025, "AdaMuon: Adaptive Muon Optimizer", arXiv 2507.11005; official code Chongjie-Si/AdaMuon).
A baseline of the Variance-Adaptive Muon paper."""

from __future__ import annotations

from collections.abc import Mapping

from optim.matrix import MatrixOptimizer
from optim.orthogonalize import Orthogonalizer
from optim.stages import Momentum, Orthogonalize, ScaleToRms, SecondMoment, Sign


class AdaMuon(MatrixOptimizer):
    r"""AdaMuon (``gpt2/models/optimizers/adamuon.py``), for 2-D matrices W (m × n):

        M_t = β M_{t−1} + (1 − β) G_t;  N_t = (1 − β) G_t + β M_t     Keller Jordan's Nesterov
        O_t = NS_5(sign(N_t))                                         sign stabilisation
        V_t = β₂ V_{t−1} + (1 − β₂) O_t²                              element-wise, on the update
        Ô_t = O_t ⊘ (sqrt(V_t) + ε)
        W_t = W_{t−1} (1 − η λ) − η · 0.2 sqrt(m n) Ô_t / (‖Ô_t‖_F + ε)   RMS alignment to 0.2

    Stages: Momentum(nesterov) → Sign → Orthogonalize → SecondMoment(source="update"), then the
    update tail with ScaleToRms(0.2) as its scale: the RMS alignment takes the scale rule's place, so there is no ``adjust_lr_fn``. Defaults from the code: β₂ = β = 0.95 (the code
    uses the momentum's β for both), ε 1e-8 (both places), no bias correction, five Keller Jordan
    steps; weight decay 0.1 (the GPT-2 configs; the class default is 0.01).
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, cautious_weight_decay: bool = False,
                 momentum: float = 0.95, beta2: float = 0.95, eps: float = 1e-8, nesterov: bool = True,
                 orthogonalizer: Orthogonalizer | Mapping = Orthogonalizer()):
        defaults = dict(lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay,
                        momentum=momentum, beta2=beta2, eps=eps, orthogonalizer=orthogonalizer)
        stages = (Momentum(nesterov=nesterov), Sign(), Orthogonalize(), SecondMoment(source="update", namespace="update_moment"))
        super().__init__(params, defaults, stages, scale=ScaleToRms(0.2))
