"""NorMuon: Muon with a per-neuron second moment of the orthogonalized update (Li, Liu, Liang, Chen,
Zhao 2025, "NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491; official code
zichongli5/NorMuon, run in modded-nanogpt's speedrun with Polar Express and cautious weight decay)."""

from __future__ import annotations

from collections.abc import Mapping

from optim.matrix import MatrixOptimizer
from optim.orthogonalize import Orthogonalizer
from optim.stages import Momentum, NeuronNormalize, Orthogonalize, is_sum_form


class NorMuon(MatrixOptimizer):
    r"""NorMuon (the paper's Algorithm 1 with the released code's rescale), for 2-D matrices W (m × n):

        M_t = β M_{t−1} + (1 − β) G_t;  N_t = (1 − β) G_t + β M_t     Keller Jordan's Nesterov (the code)
        O_t = NS_5(N_t)
        v_t = β₂ v_{t−1} + (1 − β₂) mean_j(O_t²) ∈ R^m              one second moment per output neuron
        Ô_t = O_t ⊘ (sqrt(v_t) + ε),  Ô_t ← Ô_t ‖O_t‖_F / ‖Ô_t‖_F
        W_t = W_{t−1} (1 − η λ) − η s(m, n) Ô_t

    Stages: Momentum(nesterov) → Orthogonalize → NeuronNormalize → the update tail. Where the
    references disagree: ε = 1e-10 outside the square root and no bias correction (the code; the
    modded-nanogpt port clamps v at 1e-10 under the square root, which differs only where
    v < 1e-10); statistics over each row, the paper's neurons (the port averages over the longer
    side); the update is rescaled to ‖O‖_F, then takes the 0.2·sqrt(max(m, n)) scale, which for an
    exact polar factor (‖O‖_F = sqrt(min(m, n))) is the paper's 0.2·sqrt(m n)/‖Ô‖_F RMS rule, so the
    matrices share AdamW's lr (the code's "original" scale: ``adjust_lr_fn="original"``). β₂ 0.95
    (the code), weight decay 0.1 (ours; the code's is 0).
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, cautious_weight_decay: bool = False,
                 momentum: float = 0.95, beta2: float = 0.95, eps: float = 1e-10, nesterov: bool = True,
                 momentum_form: str = "ema", adjust_lr_fn: str = "match_rms_adamw",
                 orthogonalizer: Orthogonalizer | Mapping = Orthogonalizer()):
        defaults = dict(lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay,
                        momentum=momentum, beta2=beta2, eps=eps, adjust_lr_fn=adjust_lr_fn,
                        orthogonalizer=orthogonalizer)
        stages = (Momentum(nesterov=nesterov, sum_scale=is_sum_form(momentum_form)), Orthogonalize(), NeuronNormalize())
        super().__init__(params, defaults, stages)
