"""Muon-NSR and Muon-VS: variance-adaptive normalisation before orthogonalization (Li, Fan, Li
2026, "Variance-Adaptive Muon", arXiv 2601.14603)."""

from __future__ import annotations

from collections.abc import Mapping

from optim.matrix import MatrixOptimizer
from optim.orthogonalize import Orthogonalizer
from optim.stages import GradientVariance, Momentum, NoiseToSignal, Orthogonalize


def _variance_adaptive_stages(kind: str, reshuffled: bool = False):
    """Γ before M (the paper's order), the bias-corrected look-ahead M̃ = G + β/(1−β) M̂, the
    normaliser, Newton–Schulz (reshuffled: Newton–Schulz, then the normaliser, norm-preserving)."""
    head = (GradientVariance(), Momentum(nesterov=True, sum_scale=True, bias_correction=True))
    if reshuffled:
        return head + (Orthogonalize(), NoiseToSignal(kind, preserve_norm=True))
    return head + (NoiseToSignal(kind), Orthogonalize())


class MuonNSR(MatrixOptimizer):
    r"""Muon with noise-to-signal ratio damping (jingru-lee/Variance-Adaptive-Muon,
    ``NanoGPT/gpt2/models/optimizers/muon_nsr.py``), for 2-D matrices:

        Γ_t = β Γ_{t−1} + β(1−β) (M_{t−1} − G_t)²            the squared deviation from the old mean
        M_t = β M_{t−1} + (1 − β) G_t
        M̂_t = M_t / (1 − β^t),   Γ̂_t = Γ_t / (1 − β^t)
        M̃_t = G_t + β/(1−β) M̂_t                              Nesterov look-ahead
        M̄_t = M̃_t ⊘ (sqrt(M̃_t² + γ Γ̂_t) + ε)
        W_t = W_{t−1} (1 − η λ) − η · 0.2 sqrt(max(m, n)) · NS_5(M̄_t)

    Stages: GradientVariance → Momentum(nesterov, sum scale, bias correction) → NoiseToSignal("nsr")
    → Orthogonalize. Defaults from the released GPT-2 code: gamma 10 (the code's ``alpha``; Suite A
    and the LLaMA runs use 1000), eps 1e-8, momentum 0.95, weight_decay 0.1, five Keller Jordan steps,
    the 0.2 rule. Where the references disagree: Γ is updated before M (the paper and the GPT-2 code;
    Suite A's VS updates M first); ε sits outside the square root (the code; a docstring puts it
    inside); both M and Γ are divided by (1 − β^t) (the code; a comment says β(1 − β^t) for Γ); the
    look-ahead is always applied (the released classes accept and ignore a ``nesterov`` flag).
    γ → ∞ gives Muon-VS; γ → 0 gives Newton–Schulz of sign(M̃).

    ``reshuffled=True`` is the paper's "Muon-NSR-Reshuffled" ablation, the normalisation after
    Newton–Schulz: O_t = NS_5(M̃_t), then Ō_t = O_t ⊘ (sqrt(O_t² + γ Γ̂_t) + ε) rescaled to ‖O_t‖_F,
    W_t = W_{t−1} (1 − η λ) − η · 0.2 sqrt(max(m, n)) · Ō_t. Its exact form is not public; the
    rescale is ours (NorMuon's convention), so that the update keeps Muon's RMS whatever the scale
    of Γ (without it the division maps O to ≈ sign(O) or ≈ 0).
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, cautious_weight_decay: bool = False,
                 momentum: float = 0.95, gamma: float = 10.0, eps: float = 1e-8, reshuffled: bool = False,
                 adjust_lr_fn: str = "match_rms_adamw",
                 orthogonalizer: Orthogonalizer | Mapping = Orthogonalizer()):
        defaults = dict(lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay,
                        momentum=momentum, gamma=gamma, eps=eps, adjust_lr_fn=adjust_lr_fn,
                        orthogonalizer=orthogonalizer)
        super().__init__(params, defaults, _variance_adaptive_stages("nsr", reshuffled))


class MuonVS(MatrixOptimizer):
    r"""Muon with variance scaling (jingru-lee/Variance-Adaptive-Muon,
    ``NanoGPT/gpt2/models/optimizers/muon_vs.py``), for 2-D matrices: Muon-NSR's Γ, M̂ and M̃, then

        M̄_t = M̃_t ⊘ (sqrt(Γ̂_t) + ε)
        W_t = W_{t−1} (1 − η λ) − η · 0.2 sqrt(max(m, n)) · NS_5(M̄_t)

    Stages: GradientVariance → Momentum(nesterov, sum scale, bias correction) → NoiseToSignal("vs")
    → Orthogonalize. Defaults from the released code: eps 1e-8, momentum 0.95, weight_decay 0.1, five
    Keller Jordan steps, the 0.2 rule (no γ: VS does not use it). Γ is updated before M, the paper's
    order (Suite A updates M first, which scales Γ by β² — harmless for VS, as Newton–Schulz removes
    the resulting 1/β, but not for NSR).
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, cautious_weight_decay: bool = False,
                 momentum: float = 0.95, eps: float = 1e-8, adjust_lr_fn: str = "match_rms_adamw",
                 orthogonalizer: Orthogonalizer | Mapping = Orthogonalizer()):
        defaults = dict(lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay,
                        momentum=momentum, eps=eps, adjust_lr_fn=adjust_lr_fn, orthogonalizer=orthogonalizer)
        super().__init__(params, defaults, _variance_adaptive_stages("vs"))
