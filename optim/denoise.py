"""The three pipelines of "Denoise First, Orthogonalize Later" (Li, Zhang, Liu, Bao 2026, arXiv
2606.03899): where momentum sits relative to orthogonalization. No official code was released.
All three coincide at β = 0."""

from __future__ import annotations

from collections.abc import Mapping

from optim.matrix import MatrixOptimizer
from optim.orthogonalize import Orthogonalizer
from optim.muon import Muon
from optim.stages import Momentum, Orthogonalize


class PrePolar(Muon):
    r"""Denoise, then orthogonalize (Muon without Nesterov, the paper's recommended order):

        M_t = β M_{t−1} + (1 − β) G_t,    W_t = W_{t−1} (1 − η λ) − η s(m, n) polar(M_t)

    (``momentum_form="sum"``: B_t = β B_{t−1} + G_t, Moonlight's buffer; the same polar factor.)
    Stages: Momentum(nesterov off) → Orthogonalize. The theory uses the exact polar factor
    (``orthogonalizer={"method": "svd"}``); the default is five Keller Jordan steps, as in practice.
    Nesterov is off as in the theory; ``nesterov=True`` is the extension (then it is Muon). Every
    other argument is Muon's.
    """

    def __init__(self, params, nesterov: bool = False, **muon_arguments):
        super().__init__(params, nesterov=nesterov, **muon_arguments)


class PostPolar(MatrixOptimizer):
    r"""Orthogonalize each gradient, then average ("orthogonal SGD with momentum"):

        M̃_t = β M̃_{t−1} + (1 − β) polar(G_t),    W_t = W_{t−1} (1 − η λ) − η s(m, n) M̃_t

    Stages: Orthogonalize → Momentum(nesterov off). The update is not orthogonal itself: averaging
    polar factors shrinks it where they disagree, which is the paper's point.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, cautious_weight_decay: bool = False,
                 momentum: float = 0.95, adjust_lr_fn: str = "match_rms_adamw",
                 orthogonalizer: Orthogonalizer | Mapping = Orthogonalizer()):
        defaults = dict(lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay,
                        momentum=momentum, adjust_lr_fn=adjust_lr_fn, orthogonalizer=orthogonalizer)
        super().__init__(params, defaults, (Orthogonalize(), Momentum(nesterov=False)))


class PolarOnly(MatrixOptimizer):
    r"""No momentum (spectral descent, Muon with β = 0):

        W_t = W_{t−1} (1 − η λ) − η s(m, n) polar(G_t)

    Stages: Orthogonalize. No state.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, cautious_weight_decay: bool = False,
                 adjust_lr_fn: str = "match_rms_adamw",
                 orthogonalizer: Orthogonalizer | Mapping = Orthogonalizer()):
        defaults = dict(lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay,
                        adjust_lr_fn=adjust_lr_fn, orthogonalizer=orthogonalizer)
        super().__init__(params, defaults, (Orthogonalize(),))
