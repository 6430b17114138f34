"""Muon (Keller Jordan et al. 2024, https://kellerjordan.github.io/posts/muon)."""

from __future__ import annotations

import torch

from optim.matrix import MatrixOptimizer
from optim.orthogonalize import Orthogonalizer


class Muon(MatrixOptimizer):
    r"""MomentUm Orthogonalized by Newton–Schulz, for 2-D matrices.

    For each matrix W (m × n) with gradient G_t, momentum β, lr η, weight decay λ:

        M_t = β M_{t−1} + (1 − β) G_t                      EMA buffer (torch.optim.Muon's ``lerp_``)
        N_t = (1 − β) G_t + β M_t   if nesterov, else M_t   Keller Jordan's Nesterov form
        O_t = NS_K(N_t)                                    ``orthogonalizer`` (or the exact SVD polar)
        W_t = W_{t−1} (1 − η λ) − η s(m, n) O_t            ``adjust_lr_fn`` picks s (optim/matrix.py)

    The constructor mirrors ``torch.optim.Muon`` (same names and defaults: lr 1e-3, weight_decay 0.1,
    momentum 0.95, nesterov, the Keller Jordan coefficients (3.4445, −4.775, 2.0315), 5 steps,
    eps 1e-7, scale "original"), and with the orthogonalizer in float64 it matches torch.optim.Muon
    to rounding. Where the references disagree we chose:
      * momentum as an EMA (KJ, torch); Moonlight's sum buffer B_t = β B_{t−1} + G_t gives the same
        orthogonalized update up to ε, because N_t(EMA) = (1 − β) · N_t(sum);
      * normalisation X / max(‖X‖_F, ε) as torch (``ns_norm="add"`` gives KJ's X / (‖X‖_F + ε));
      * Newton–Schulz in float32 on CPU and bfloat16 on CUDA (``ns_dtype="auto"``), where every
        PyTorch reference casts to bfloat16: bf16 matmuls are ~400× slower on CPUs without
        AVX-512 BF16.

    Extra arguments: ``ns_dtype`` ("auto", "float32", "bfloat16", "float64"), ``orthogonalizer``
    ("newton_schulz" or "svd" for the exact polar factor), ``ns_norm`` ("clamp" or "add"), and
    ``ns_coefficients`` may name a set ("kj", "convergent", "polar_express") or list triples.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients="kj",
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        ns_dtype="auto",
        orthogonalizer: str = "newton_schulz",
        ns_norm: str = "clamp",
    ):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_coefficients=ns_coefficients,
            eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, orthogonalizer=orthogonalizer,
            ns_norm=ns_norm,
        )
        orthogonalizer_of(defaults)  # validates the orthogonalizer settings now, not at the first step
        super().__init__(params, defaults)

    def directions(self, group, params, grads):
        beta = group["momentum"]
        buffers = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buffers.append(state["momentum_buffer"])
        torch._foreach_lerp_(buffers, grads, 1.0 - beta)
        inputs = torch._foreach_lerp(grads, buffers, beta) if group["nesterov"] else buffers
        return orthogonalizer_of(group).apply_all(list(inputs))


def orthogonalizer_of(group: dict) -> Orthogonalizer:
    """The orthogonalizer described by a param group's ns_* / orthogonalizer / eps entries."""
    return Orthogonalizer(
        method=group["orthogonalizer"],
        steps=group["ns_steps"],
        coefficients=group["ns_coefficients"],
        dtype=group["ns_dtype"],
        eps=group["eps"],
        norm=group["ns_norm"],
    )
