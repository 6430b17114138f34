"""Dion: distributed orthonormalization by a rank-r power iteration with error feedback (Ahn, Xu,
Abreu, Langford et al. 2025, "Dion: Distributed Orthonormalized Updates", arXiv 2504.05295; official
code microsoft/dion)."""

from __future__ import annotations

from optim.matrix import MatrixOptimizer
from optim.stages import LowRankOrthogonalize


class Dion(MatrixOptimizer):
    r"""Dion (``dion_simple.py``, the paper's Algorithm 1 on one device), for 2-D matrices W (m × n):

        M_t = M_{t−1} + G_t
        P_t = QR(M_t Q_{t−1}),  R_t = M_tᵀ P_t                 one warm-started power-iteration step, rank r
        M_t ← M_t − (1 − μ) P_t R_tᵀ                           error feedback
        Q_t = R_t ⊘ (column norms of R_t + ε)
        W_t = W_{t−1} (1 − η λ) − η s(m, n) P_t Q_tᵀ

    Stages: LowRankOrthogonalize(rank_fraction) → the update tail. r = ceil(rank_fraction · min(m,
    n)); at rank_fraction 1 the update is orthonormal on the captured subspace. Defaults from the
    code: μ 0.95, ε 1e-8, no Nesterov; weight decay 0.1 and the 0.2·sqrt(max(m, n)) scale (ours, to
    share AdamW's lr as every optimizer here; Dion's own is the spectral sqrt(m/n),
    ``adjust_lr_fn="spectral"``, with wd 0.01). Same-shaped matrices iterate as one batch. Under FSDP2
    each rank works on its own rows of M and only rank-r factors travel (Q and M Q gathered, Mᵀ P
    summed); under DDP each matrix's iteration runs on one owner rank, which broadcasts D and keeps M and
    Q (``consolidate_state_dict()``, called on every rank before saving, brings them to all).
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, cautious_weight_decay: bool = False,
                 momentum: float = 0.95, rank_fraction: float = 1.0, eps: float = 1e-8,
                 adjust_lr_fn: str = "match_rms_adamw"):
        defaults = dict(lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay, momentum=momentum,
                        eps=eps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults, (LowRankOrthogonalize(rank_fraction),))
