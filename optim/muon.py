"""Muon (Keller Jordan et al. 2024, https://kellerjordan.github.io/posts/muon)."""

from __future__ import annotations

from collections.abc import Mapping

from optim.matrix import MatrixOptimizer
from optim.orthogonalize import Orthogonalizer
from optim.stages import Momentum, Orthogonalize, is_sum_form


class Muon(MatrixOptimizer):
    r"""MomentUm Orthogonalized by Newton–Schulz, for 2-D matrices.

    For each matrix W (m × n) with gradient G_t, momentum β, lr η, weight decay λ:

        M_t = β M_{t−1} + (1 − β) G_t                      EMA buffer (torch.optim.Muon's ``lerp_``)
        N_t = (1 − β) G_t + β M_t   if nesterov, else M_t   Keller Jordan's Nesterov form
        (momentum_form="sum": B_t = β B_{t−1} + G_t, N_t = G_t + β B_t or B_t, Moonlight's form)
        O_t = NS_K(N_t)                                    ``orthogonalizer`` (or the exact SVD polar)
        W_t = W_{t−1} (1 − η λ) − η s(m, n) O_t            ``adjust_lr_fn`` picks s (optim/matrix.py)

    Stages: Momentum(nesterov, form) → Orthogonalize. The constructor follows ``torch.optim.Muon``
    (lr 1e-3, weight_decay 0.1, momentum 0.95, nesterov, the Keller Jordan coefficients (3.4445,
    −4.775, 2.0315), 5 steps, 1e-7 for the normalisation) except the scale: Moonlight's "match_rms_adamw" by default, the one ``optim=muon``
    runs, where torch's default is "original"; with ``adjust_lr_fn="original"`` and the
    orthogonalizer in float64 it matches torch.optim.Muon to rounding. Where the references
    disagree we chose:
      * momentum as an EMA (KJ, torch); ``momentum_form="sum"`` is Moonlight's sum buffer
        B_t = β B_{t−1} + G_t, the same orthogonalized update up to ε, because
        N_t(EMA) = (1 − β) · N_t(sum);
      * normalisation X / max(‖X‖_F, ε) as torch (``norm="add"`` gives KJ's X / (‖X‖_F + ε));
      * Newton–Schulz in bfloat16 on CUDA and on CPUs with fast bf16 matmuls, else float32
        (``dtype="auto"``), where every PyTorch reference casts to bfloat16: bf16 matmuls are
        ~400× slower on CPUs without AVX-512 BF16.

    ``orthogonalizer`` is an optim.Orthogonalizer or a mapping of its fields, as for every matrix
    optimizer: ``method`` ("newton_schulz" or "svd" for the exact polar factor), ``steps``,
    ``coefficients`` (a set: "kj", "convergent", "polar_express", or (a, b, c) triples), ``dtype``
    ("auto", "float32", "bfloat16", "float64"), ``eps``, ``norm`` ("clamp" or "add").
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, cautious_weight_decay: bool = False,
                 momentum: float = 0.95, nesterov: bool = True, momentum_form: str = "ema",
                 adjust_lr_fn: str = "match_rms_adamw",
                 orthogonalizer: Orthogonalizer | Mapping = Orthogonalizer()):
        defaults = dict(lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay,
                        momentum=momentum, adjust_lr_fn=adjust_lr_fn, orthogonalizer=orthogonalizer)
        stages = (Momentum(nesterov=nesterov, sum_scale=is_sum_form(momentum_form)), Orthogonalize())
        super().__init__(params, defaults, stages)
