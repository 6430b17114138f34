"""What every matrix optimizer shares: 2-D parameters, an update-scale rule, decoupled weight decay.

A subclass computes one direction D per matrix from its gradient and state (`directions`); the base
class then applies, for each matrix W of shape (m, n) in PyTorch layout (m = fan_out, n = fan_in):

    W ← W · (1 − η λ)              decoupled weight decay with the *unscaled* lr η
    W ← W − η · s(m, n) · D

with the scale rule s(m, n) (`adjust_lr_fn`, torch.optim.Muon's name for it):
    "original"          sqrt(max(1, m/n))       Keller Jordan; RMS of s·polar = 1/sqrt(n)
    "match_rms_adamw"   0.2 · sqrt(max(m, n))   Moonlight; RMS 0.2, so AdamW's lr and wd carry over
    "spectral"          sqrt(m/n)               Dion's default
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

SCALE_RULES = {
    "original": lambda m, n: math.sqrt(max(1.0, m / n)),
    "match_rms_adamw": lambda m, n: 0.2 * math.sqrt(max(m, n)),
    "spectral": lambda m, n: math.sqrt(m / n),
}


def update_scale(shape: torch.Size | tuple, rule: str | None) -> float:
    rule = rule or "original"
    if rule not in SCALE_RULES:
        raise ValueError(f"unknown adjust_lr_fn {rule!r}; valid: {sorted(SCALE_RULES)}")
    m, n = shape[-2], shape[-1]
    return SCALE_RULES[rule](m, n)


class MatrixOptimizer(Optimizer):
    """Base class; subclasses implement `directions(group, params, grads) -> list of D`."""

    def __init__(self, params, defaults: dict):
        if defaults.get("lr", 0.0) < 0:
            raise ValueError(f"invalid learning rate {defaults['lr']}")
        update_scale((1, 1), defaults.get("adjust_lr_fn"))  # validates the rule name
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"{type(self).__name__} updates 2-D matrices only; got a parameter of shape "
                        f"{tuple(p.shape)} (route embeddings' neighbours, norms and biases to AdamW)"
                    )

    def directions(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = self.directions(group, params, [p.grad for p in params])
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            for p, update in zip(params, updates):
                p.add_(update.to(p.dtype), alpha=-lr * update_scale(p.shape, group["adjust_lr_fn"]))
        return loss
