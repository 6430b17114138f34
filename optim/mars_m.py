"""MARS-M: variance reduction meets Muon (Liu, Yuan, Gu 2025, arXiv 2510.21800)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from optim.matrix import MatrixOptimizer
from optim.orthogonalize import Orthogonalizer
from optim.stages import MarsCorrection, Momentum, Orthogonalize


class MARSM(MatrixOptimizer):
    r"""MARS-M (AGI-Arena/MARS, ``MARS_M/optimizers/mars_m.py``), for 2-D matrices:

        C_t = G_t + γ β/(1−β) (G_t − G_prev)        approximate: G_prev = ∇f(X_{t−1}, ξ_{t−1})
                                                    exact:       G_prev = ∇f(X_{t−1}, ξ_t)
        C̃_t = C_t / max(1, ‖C_t‖_F)                 unit-Frobenius clip, per matrix
        M_t = β M_{t−1} + (1 − β) C̃_t                EMA, no Nesterov, no bias correction
        O_t = NS_5(M_t)
        W_t = W_{t−1} (1 − η λ) − η · 0.2 sqrt(max(m, n)) · O_t

    Stages: MarsCorrection(exact, clip) → Momentum(nesterov=False) → Orthogonalize. Defaults are the
    released code's: lr 1e-3, weight_decay 0.1, momentum 0.95, gamma 0.025, five Keller Jordan
    steps, the 0.2·sqrt(max(m, n)) scale. Where the references disagree:
      * the clip is on (``mars_m.py`` always clips and ignores its ``clip_c`` flag;
        ``mars_m_efficient.py`` never clips): ``clip=False`` is MARS_M_Efficient's update;
      * G_prev starts at zero as in the released code, so C_1 = (1 + γβ/(1−β)) G_1 before the clip
        (the paper's Algorithm 2 starts from X_1 = X_0, i.e. no correction at step 1);
      * G_prev is a copy: the released approximate mode keeps a reference to ``p.grad``, which
        silently cancels the correction when gradients are zeroed in place;
      * weight_decay 0.1 as in the README and the Moonlight baseline (the scripts' configs use 0.01).

    Exact mode needs a second gradient per step: before ``step()`` at weights X_t, put
    ∇f(X_t, ξ_{t+1}) (the *next* batch) in ``p.grad`` and call ``store_lookahead_gradients()``; the
    step then uses the one stored during the previous step, ∇f(X_{t−1}, ξ_t). ``train.py
    optim=mars_m_exact`` runs this two-pass loop.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, cautious_weight_decay: bool = False,
                 momentum: float = 0.95, gamma: float = 0.025, exact: bool = False, clip: bool = True,
                 adjust_lr_fn: str = "match_rms_adamw",
                 orthogonalizer: Orthogonalizer | Mapping = Orthogonalizer()):
        defaults = dict(lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay,
                        momentum=momentum, gamma=gamma, adjust_lr_fn=adjust_lr_fn, orthogonalizer=orthogonalizer)
        stages = (MarsCorrection(exact=exact, clip=clip), Momentum(nesterov=False), Orthogonalize())
        super().__init__(params, defaults, stages)
        self.exact = exact

    @property
    def needs_lookahead(self) -> bool:
        return self.exact

    @torch.no_grad()
    def store_lookahead_gradients(self) -> None:
        """Record the current p.grad, ∇f(X_t, ξ_{t+1}), as next step's G_prev (exact mode)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["mars/lookahead_grad"] = p.grad.clone()
